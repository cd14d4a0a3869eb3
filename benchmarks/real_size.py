"""Real model sizes end to end on a CPU: time and peak memory of every phase a user runs.

    python benchmarks/real_size.py --shape llama2_7b                        # the whole model
    python benchmarks/real_size.py --shape llama2_13b --workdir /data/rs    # ~26 GB of disk
    python benchmarks/real_size.py --shape llama2_7b --layers 2 --out docs/results/real_size_7b_2layers

Phases, each a child process whose wall time and peak RSS (``wait4``'s ``ru_maxrss``) are
recorded:

1. ``write``: a random-weight Hugging Face checkpoint of the shape (``_real_shapes.py``:
   bf16, sharded about 2 GB per file with ``model.safetensors.index.json``, written one
   tensor at a time), a stand-in tokenizer of its format and a synthetic text;
2. ``finetune``: ``tune run qalora_finetune --config <its packaged config> device=cpu
   dtype=bf16`` with checkpoint, tokenizer and dataset overridden, ``--steps`` steps of
   ``--seq-len`` tokens, writing ``epoch_0/merged_int4``; its log gives the load+quantize
   time, throughput and peak, and (``log_peak_memory_stats=True``) the training peak;
3. ``merge``: ``tune run qalora_merge`` of that adapter into a second ``merged_int4``;
4. ``load_merged``: ``qalora_tune.load_merged`` + a greedy 4-token generation;
5. ``transformers``: ``AutoModelForCausalLM.from_pretrained`` + ``generate`` (4 tokens);
6. ``eval``: ``tune run qalora_eval`` of the merged model on the text (perplexity).

The memory bounds the project holds itself to (the model bytes are the int4 linears plus
the full-precision embeddings and norms, as in ``merged_int4/``):

- load + quantize <= model bytes + the largest bf16 tensor + 1.5 GB;
- training <= model bytes + adapters with gradients and AdamW state + 1.5 GB (activations
  of ``--seq-len`` tokens are inside the 1.5 GB);
- merge and export at the end of ``finetune`` <= the training peak + 3 x the largest
  quantized layer as written (the export streams one tensor at a time and builds the merge
  report on the model itself; the layer, its plain repacking on the way to intx and what the
  allocator keeps of the previous one) + 64 MB of working buffers, and the
  offline ``merge`` (which loads the base as well) <= the fine-tuning's load or training
  peak + the same;
- ``load_merged`` and transformers (load + first forward), above the RSS of the imports
  alone, <= 1.2 x the merged files' size.

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``docs/results/real_size``).
The stand-in tokenizer and random weights make the losses meaningless; the shapes, the
bytes moved and the memory are the real ones.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_shapes  # noqa: E402
from _real_size_bounds import ALLOWANCE, GB, IN_FLIGHT_LAYERS, LOADER_RATIO, WORKING_BUFFERS, check_bounds, model_bytes  # noqa: E402
from _real_size_phases import (  # noqa: E402
    PHASES,
    ROOT,
    finetune_overrides,
    parse_finetune_log,
    run,
    run_phase,
)
from _real_size_report import combine_reports, markdown, memory_model, plot  # noqa: E402
from _report import command_line, cpu_model_name, write_outputs  # noqa: E402

# what tests (``tests/recipes/test_real_shapes.py``) and users call from here
__all__ = [
    "ALLOWANCE",
    "GB",
    "IN_FLIGHT_LAYERS",
    "LOADER_RATIO",
    "PHASES",
    "WORKING_BUFFERS",
    "check_bounds",
    "combine_reports",
    "finetune_overrides",
    "main",
    "markdown",
    "memory_model",
    "model_bytes",
    "parse_finetune_log",
    "plot",
    "run",
    "run_phase",
]


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-write":
        shape, directory, layers, shards = argv[1], Path(argv[2]), int(argv[3]), int(argv[4])
        info = _real_shapes.write_random_checkpoint(directory, shape, layers=layers or None,
                                                    shards=shards or None, progress=True)
        print(json.dumps({"files": info["files"], "bytes": info["bytes"]}))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(_real_shapes.SHAPES), required=True)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qalora-tune-real-size"))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--shards", type=int, default=None, help="checkpoint files (default: ~2 GB each)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "real_size")
    parser.add_argument("--from-json", type=Path, action="append", default=[],
                        help="combine the reports of earlier runs (phases run separately) "
                             "into --out instead of running anything")
    args = parser.parse_args(argv)
    if args.from_json:
        outputs = [json.loads(p.read_text()) for p in args.from_json]
        reports = combine_reports(outputs)
        command = " && ".join(output["command"] for output in outputs)
        write_outputs(args.out.with_suffix(".json"), args.out.with_suffix(".md"),
                      {"command": command, "cpu": cpu_model_name(), "reports": reports},
                      markdown(reports, command))
        plot(reports, args.out.with_suffix(".png"))
        return
    phases = [p for p in args.phases.split(",") if p]
    reports = []
    for shape in args.shape:
        report = run(shape, args.workdir / shape, args.layers, phases, args.threads, args.seq_len,
                     args.steps, args.max_shard_size, args.shards, args.keep)
        report["settings"] = {"shape": shape, "layers": args.layers, "threads": args.threads,
                              "seq_len": args.seq_len, "steps": args.steps,
                              "max_shard_size": args.max_shard_size, "phases": phases}
        reports.append(report)
        for bound in report["bounds"]:
            print(f"{shape}: {bound['bound']}: {bound['measured_bytes'] / GB:.2f} GB "
                  f"<= {bound['limit_bytes'] / GB:.2f} GB: {bound['holds']}", flush=True)
    command = command_line("benchmarks/real_size.py", argv)
    out = args.out
    write_outputs(out.with_suffix(".json"), out.with_suffix(".md"),
                  {"command": command, "cpu": cpu_model_name(), "reports": reports},
                  markdown(reports, command))
    plot(reports, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
