"""One int4 base, many tasks: bytes per task package against a full merged model, the
time to switch a loaded base to another task, and whether the switched model is bit for
bit the task's own merged model.

    OMP_NUM_THREADS=1 python benchmarks/tasks.py --json docs/results/tasks.json \\
        --markdown docs/results/tasks.md

For each model and merged format: the base is quantized once (RTN) and written as the
task-free merged model; each of ``--tasks`` tasks shifts every zero point by a random
amount (what a QA-LoRA merge does: ``z' = z + (alpha/r)(B A)/G``, through the same
``stored_zero_points`` view) and is written as its own merged model, then exported as a
task package (``export_task_from_merged``). A base loaded with ``load_merged`` is then
switched through the tasks in a cycle; each switch is timed (``load_task``: read the
package, check it, write the zeros) and compared bit for bit with ``load_merged`` of the
task's own directory, which is also timed (reloading a whole model is the alternative to a
switch).

Models: stories260K and TinyStories-656K (``../shared``; skipped if absent), and a
Llama-2-7B-shaped model (hidden 4096, MLP 11008, vocab 32000, 32 heads) with random
weights and ``--layers_7b`` layers (1 by default: the full 32 layers do not fit this
machine's budget), ``--tasks_7b`` tasks and ``--reloads_7b`` reload comparisons (each
reload loads the whole model); its 32-layer figures are extrapolated: bytes exactly from
the shapes, switch time in proportion to the number of zero points (a switch is a copy per
group), fingerprint and reload times in proportion to the weights.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torchtune import training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, cpu_model_name, write_outputs  # noqa: E402

import qalora_tune  # noqa: E402
from qalora_tune.checkpointing import HFKeyMap, QALoRACheckpointer, write_merged_int4  # noqa: E402
from qalora_tune.models import qalora_llama2, qalora_stories260k, qalora_tinystories656k  # noqa: E402
from qalora_tune.modules import QuantizedLinear  # noqa: E402
from qalora_tune.quantization.base_weight import stored_zero_points  # noqa: E402
from qalora_tune.tasks import export_task_from_merged  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
LLAMA2_7B = {
    "vocab_size": 32000, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32,
    "embed_dim": 4096, "intermediate_dim": 11008, "max_seq_len": 4096,
}


def _hf_config(sizes: Dict[str, int]) -> Dict[str, Any]:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": sizes["vocab_size"], "hidden_size": sizes["embed_dim"],
        "intermediate_size": sizes["intermediate_dim"], "num_hidden_layers": sizes["num_layers"],
        "num_attention_heads": sizes["num_heads"], "num_key_value_heads": sizes["num_kv_heads"],
        "max_position_embeddings": sizes["max_seq_len"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    }


def _same(model: nn.Module, reference: nn.Module) -> bool:
    """Every tensor of two loaded models equal bit for bit (quantized ones by their parts)."""
    mine, theirs = model.state_dict(), reference.state_dict()
    if mine.keys() != theirs.keys():
        return False
    for key, value in theirs.items():
        other = mine[key]
        names = getattr(value, "tensor_data_names", None) or [None]
        for name in names:
            a = other if name is None else getattr(other, name)
            b = value if name is None else getattr(value, name)
            if a.dtype != b.dtype or not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
                return False
    return True


def _shift_zeros(model: nn.Module, generator: torch.Generator) -> None:
    """A task's merge: every zero point moved by a random fraction of its group's scale
    range (in place, through the view the merge writes)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                zeros = stored_zero_points(module.weight)
                delta = torch.randn(zeros.shape, generator=generator) * 0.01
                zeros.add_(delta.to(zeros.dtype))


def _snapshot_zeros(model: nn.Module) -> List[torch.Tensor]:
    return [stored_zero_points(m.weight).clone() for m in model.modules() if isinstance(m, QuantizedLinear)]


def _restore_zeros(model: nn.Module, saved: List[torch.Tensor]) -> None:
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    with torch.no_grad():
        for module, zeros in zip(layers, saved):
            stored_zero_points(module.weight).copy_(zeros)


def measure(
    name: str, model: nn.Module, hf_config: Dict[str, Any], spec: Dict[str, Any], merged_format: str,
    tasks: int, switches: int, work: Path, reloads: Optional[int] = None,
) -> Dict[str, Any]:
    """Write the base and ``tasks`` tasks in ``merged_format``, export the packages, then
    time switches; after each of the first ``reloads`` switches (all by default) reload the
    task's own merged model, timed, and compare."""
    key_map = HFKeyMap("LLAMA2", hf_config)
    root = work / f"{name}-{merged_format}"
    root.mkdir(parents=True)
    saved = _snapshot_zeros(model)
    spec = {"model": spec, "model_type": "LLAMA2"}
    base_sizes = write_merged_int4(model, _mkdir(root / "base"), key_map, hf_config, spec, merged_format)
    generator = torch.Generator().manual_seed(0)
    packages, merged = [], []
    export_seconds = []
    for k in range(tasks):
        _shift_zeros(model, generator)
        write_merged_int4(model, _mkdir(root / f"merged_{k}"), key_map, hf_config, spec, merged_format)
        _restore_zeros(model, saved)
        start = time.perf_counter()
        meta = export_task_from_merged(root / f"merged_{k}", root / f"task_{k}", base_dir=root / "base")
        export_seconds.append(time.perf_counter() - start)
        packages.append(root / f"task_{k}")
        merged.append(root / f"merged_{k}")
    merged_file = (root / "base" / "model.safetensors").stat().st_size
    package_file = (packages[0] / "zero_points.safetensors").stat().st_size
    package_dir = sum(p.stat().st_size for p in packages[0].iterdir())

    start = time.perf_counter()
    switched = qalora_tune.load_merged(root / "base")
    load_base_seconds = time.perf_counter() - start
    first = switched.load_task(packages[0])
    reload_seconds, exact, infos = [], [], []
    for i in range(switches):
        k = (i + 1) % tasks
        info = switched.load_task(packages[k])
        infos.append(info)
        if reloads is None or i < reloads:
            start = time.perf_counter()
            own = qalora_tune.load_merged(merged[k])
            reload_seconds.append(time.perf_counter() - start)
            exact.append(_same(switched, own))
            del own
    if reloads is None:  # the task-free base is a package too: back to the model as loaded
        export_task_from_merged(root / "base", root / "task_none")
        switched.load_task(root / "task_none")
        exact.append(_same(switched, qalora_tune.load_merged(root / "base")))
    result = {
        "model": name,
        "merged_format": merged_format,
        "dtype": str(next(m.weight.dtype for m in model.modules() if isinstance(m, QuantizedLinear))).removeprefix("torch."),
        "group_size": meta["base"]["group_size"],
        "bits": meta["base"]["bits"],
        "quantized_parameters": meta["size"]["quantized_parameters"],
        "zero_points": sum(a * b for a, b in (layer["zero_shape"] for layer in meta["layers"].values())),
        "package_zero_dtype": meta["zero_dtype"],
        "package_zeros_file_bytes": package_file,
        "package_dir_bytes": package_dir,
        "merged_model_file_bytes": merged_file,
        "merged_quantized_bytes": base_sizes["quantized_bytes"],
        "package_bits_per_quantized_weight": 8 * package_file / meta["size"]["quantized_parameters"],
        "merged_bits_per_quantized_weight": base_sizes["bits_per_quantized_parameter"],
        "package_over_merged_file": package_file / merged_file,
        "export_task_seconds_median": statistics.median(export_seconds),
        "load_merged_base_seconds": load_base_seconds,
        "first_switch_seconds_with_fingerprint": first["seconds"],
        "switch_seconds_median": statistics.median(i["seconds"] for i in infos),
        "switch_read_seconds_median": statistics.median(i["read_seconds"] for i in infos),
        "switch_check_seconds_median": statistics.median(i["check_seconds"] for i in infos),
        "switch_write_seconds_median": statistics.median(i["write_seconds"] for i in infos),
        "switches": len(infos),
        "reload_task_model_seconds_median": statistics.median(reload_seconds),
        "bitwise_equal_to_own_merged_model": all(exact),
        "comparisons": len(exact),
    }
    shutil.rmtree(root)
    return result


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def shared_model(name: str, builder: Any, group_size: int, pad_in_dim: bool) -> Optional[Dict[str, Any]]:
    path = SHARED / "models" / name
    if not path.is_dir():
        return None
    checkpointer = QALoRACheckpointer(str(path), "LLAMA2", tempfile.mkdtemp())
    with training.set_default_dtype(torch.float32):
        model = builder([], False, False, group_size=group_size, pad_in_dim=pad_in_dim)
    checkpointer.load_base(model)
    spec = {
        "_component_": f"qalora_tune.models.{builder.__name__}", "lora_attn_modules": [],
        "group_size": group_size, "pad_in_dim": pad_in_dim,
    }
    return {"model": model.eval(), "hf_config": checkpointer.hf_config, "spec": spec}


def llama2_7b_shape(layers: int, group_size: int) -> Dict[str, Any]:
    sizes = dict(LLAMA2_7B, num_layers=layers)
    torch.manual_seed(0)
    with training.set_default_dtype(torch.bfloat16):
        model = qalora_llama2([], False, False, group_size=group_size, **sizes)
        # random weights, one linear at a time (the load hook quantizes them)
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                weight = torch.randn(module.out_dim, module.in_dim) * 0.02
                module.load_state_dict({"weight": weight.to(torch.bfloat16)})
                del weight
    spec = {"_component_": "qalora_tune.models.qalora_llama2", "lora_attn_modules": [],
            "group_size": group_size, **sizes}
    return {"model": model.eval(), "hf_config": _hf_config(sizes), "spec": spec, "sizes": sizes}


def extrapolate_7b(row: Dict[str, Any], layers: int) -> Dict[str, Any]:
    """32-layer figures from a ``layers``-layer Llama-2-7B-shaped row: zero points and
    weights counted from the shapes, switch time scaled by the number of zero points."""
    d, f, v, g = LLAMA2_7B["embed_dim"], LLAMA2_7B["intermediate_dim"], LLAMA2_7B["vocab_size"], row["group_size"]
    per_layer_weights = 4 * d * d + 3 * d * f
    per_layer_groups = 4 * d * (d // g) + 2 * f * (d // g) + d * (f // g)
    weights = 32 * per_layer_weights + v * d
    groups = 32 * per_layer_groups + v * (d // g)
    measured_groups = layers * per_layer_groups + v * (d // g)
    assert measured_groups == row["zero_points"], (measured_groups, row["zero_points"])
    zero_bytes = {"bfloat16": 2, "float32": 4, "float16": 2}[row["package_zero_dtype"]]
    scale = groups / measured_groups
    return {
        "model": "Llama-2-7B shape, 32 layers (extrapolated)",
        "merged_format": row["merged_format"],
        "from_measured_layers": layers,
        "quantized_parameters": weights,
        "zero_points": groups,
        "package_zeros_bytes": groups * zero_bytes,
        "merged_quantized_bytes": round(row["merged_quantized_bytes"] * weights / row["quantized_parameters"]),
        "switch_seconds_median": row["switch_seconds_median"] * scale,
        "first_switch_seconds_with_fingerprint": row["first_switch_seconds_with_fingerprint"] * weights / row["quantized_parameters"],
        "reload_task_model_seconds_median": row["reload_task_model_seconds_median"] * weights / row["quantized_parameters"],
    }


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        "# One int4 base, many tasks: package size and switch time",
        "",
        f"`{report['command']}` on {report['cpu']}, torch {report['torch']}, "
        f"{report['threads']} thread(s). Each row: a base written once as a merged model, "
        f"{report['tasks']} tasks as task packages; switch = `model.load_task(package)` on a "
        "base from `load_merged` (read, check, write the zeros); reload = `load_merged` of "
        "the task's own merged directory. Medians over the switches.",
        "",
        "| model | format | dtype | G | package (zeros) | merged model file | package / merged | bits/weight: package vs merged | switch | first switch (fingerprint) | reload task model | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['merged_format']} | {r['dtype']} | {r['group_size']} | "
            f"{r['package_zeros_file_bytes']:,} B ({r['package_zero_dtype']}) | "
            f"{r['merged_model_file_bytes']:,} B | {r['package_over_merged_file']:.3f} | "
            f"{r['package_bits_per_quantized_weight']:.3f} vs {r['merged_bits_per_quantized_weight']:.2f} | "
            f"{1e3 * r['switch_seconds_median']:.2f} ms | {1e3 * r['first_switch_seconds_with_fingerprint']:.1f} ms | "
            f"{1e3 * r['reload_task_model_seconds_median']:.1f} ms | "
            f"{'yes' if r['bitwise_equal_to_own_merged_model'] else 'NO'} ({r['comparisons']} comparisons) |"
        )
    if report["extrapolated"]:
        lines += [
            "",
            "Llama-2-7B shape, extrapolated to 32 layers (bytes from the shapes; times scaled "
            "from the measured layers by zero points (switch) or weights (fingerprint, reload)):",
            "",
            "| format | quantized weights | zero points | package | merged linears | switch | first switch | reload |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in report["extrapolated"]:
            lines.append(
                f"| {e['merged_format']} | {e['quantized_parameters']:,} | {e['zero_points']:,} | "
                f"{e['package_zeros_bytes'] / 1e6:.0f} MB | {e['merged_quantized_bytes'] / 1e9:.2f} GB | "
                f"{e['switch_seconds_median']:.2f} s | {e['first_switch_seconds_with_fingerprint']:.1f} s | "
                f"{e['reload_task_model_seconds_median']:.1f} s |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--switches", type=int, default=9)
    parser.add_argument("--layers_7b", type=int, default=1, help="0 skips the 7B shape")
    parser.add_argument("--tasks_7b", type=int, default=2)
    parser.add_argument("--reloads_7b", type=int, default=1, help="switches compared with a reload")
    parser.add_argument("--formats_7b", nargs="+", default=["intx"])
    parser.add_argument("--skip_shared", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qalora-tasks-"))
    rows, extrapolated = [], []
    try:
        shared = [
            ("stories260K", qalora_stories260k, 32, True, ["int4_plain"]),  # 172 inputs: padded
            ("tinystories656K", qalora_tinystories656k, 32, False, ["intx", "int4_plain", "int4_tile_packed"]),
        ]
        for name, builder, group_size, pad, formats in [] if args.skip_shared else shared:
            built = shared_model(name, builder, group_size, pad)
            if built is None:
                print(f"skipping {name}: ../shared/models/{name} not found")
                continue
            for merged_format in formats:
                row = measure(name, built["model"], built["hf_config"], built["spec"], merged_format,
                              args.tasks, args.switches, work)
                print(row, flush=True)
                rows.append(row)
        if args.layers_7b:
            built = llama2_7b_shape(args.layers_7b, 64)
            for merged_format in args.formats_7b:
                row = measure(f"Llama-2-7B shape, {args.layers_7b} layer(s)", built["model"],
                              built["hf_config"], built["spec"], merged_format, args.tasks_7b,
                              args.switches, work, reloads=args.reloads_7b)
                print(row, flush=True)
                rows.append(row)
                extrapolated.append(extrapolate_7b(row, args.layers_7b))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": command_line("benchmarks/tasks.py", argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tasks": args.tasks,
        "rows": rows,
        "extrapolated": extrapolated,
    }
    write_outputs(args.json, args.markdown, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
