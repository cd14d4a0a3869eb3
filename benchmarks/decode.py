"""Prefill and decode tokens/s: QA-LoRA merged int4 vs bf16 merged LoRA vs QLoRA-style serving.

    python benchmarks/decode.py --shape llama2_7b_layers \
        --json docs/results/decode_cpu.json --markdown docs/results/decode_cpu.md
    python benchmarks/decode.py --shape tinystories656K   # the real checkpoint, ../shared/models
    python benchmarks/decode.py --device cuda --shape llama2_7b_layers   # 32 layers: Llama 2 7B

Three models compute the same function from the same base weights ``W`` and the same
adapter (``A``: ``(r, K/G)``, ``B``: ``(N, r)``, non-zero, on q/k/v/output_proj and the MLP):

- ``qalora_int4_merged``: the QA-LoRA model built with the project's builder
  (``qalora_transformer``; an int4 base quantized with RTN on load), its adapters merged
  into the int4 zero points, exported to ``merged_int4/`` (torchao ``Int4Tensor``, the
  transformers ``TorchAoConfig`` layout) and loaded back with :func:`qalora_tune.load_merged`,
  i.e. what a user serves. Every linear is int4, the output projection included.
- ``lora_bf16_merged``: a torchtune LoRA adapter with the same function (its ``A`` is the
  pooled ``A`` spread over each group, ``A[:, k] = A_pooled[:, k // G] / G``) merged with
  torchtune's ``get_merged_lora_ckpt`` into a plain bf16 ``llama2``.
- ``qlora_nf4``: torchtune's ``lora_llama2(..., quantize_base=True)``: NF4 base with the
  same LoRA adapter unmerged, in bf16 (torchtune's QLoRA; its output projection stays bf16).

Prefill is one forward over ``prompt_len`` tokens with the KV cache set up; decode is
``new_tokens`` greedy steps of one token (torchtune ``setup_caches`` and ``input_pos``).
The three models are interleaved in every repeat and medians are reported; ``compile``
times ``torch.compile``'d steps after a warm-up (a compile failure is recorded, not
raised). Weight bytes per decoded token count every weight a token reads (int4 codes
plus scales/zeros, NF4 codes plus its scalers, dense tensors, one embedding row); their
ratio to the time per token is compared with ``--bandwidth-gbps`` (a default per known
GPU). On CPU the int4 kernel is fast only in bf16, so every model is served in bf16.

The merged int4 file holds torchao ``Int4Tensor`` weights; ``load_merged`` repacks them into
``Int4OpaqueTensor`` computed by ``aten._weight_int4pack_mm_for_cpu`` on CPU, and into
``Int4TilePackedTo4dTensor`` computed by ``aten._weight_int4pack_mm`` (tinygemm) on CUDA,
both through the ``qalora_tune::int4_linear`` op. The output records the weight classes
and the ops a decode step spends its time in (profiler), so this is measured, not assumed.

The models are built in ``_decode_models.py``, timed in ``_decode_timing.py`` and
reported by ``_decode_report.py``.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode_models import (  # noqa: E402
    ATTN_TARGETS,
    MLP_TARGETS,
    Shape,
    Weights,
    build_bf16_merged,
    build_int4_merged,
    build_qalora,
    build_qlora,
    dense_lora_a,
    dense_update,
    export_merged,
    make_shape,
    make_weights,
)
from _decode_report import _environment, default_bandwidth_gbps, markdown  # noqa: E402
from _decode_timing import (  # noqa: E402
    MODELS,
    Decoder,
    _error_text,
    _greedy_agreement,
    _ratios,
    _summarize,
    _targets,
    prefill_logits,
    relative_error,
    top_kernels,
    weight_bytes_per_token,
    weight_classes,
)

# what tests and users call from here
__all__ = [
    "MODELS",
    "MODES",
    "Decoder",
    "Shape",
    "Weights",
    "build_bf16_merged",
    "build_int4_merged",
    "build_qalora",
    "build_qlora",
    "dense_lora_a",
    "dense_update",
    "export_merged",
    "main",
    "make_shape",
    "make_weights",
    "markdown",
    "prefill_logits",
    "relative_error",
    "run",
]

MODEL_TITLES = {
    "qalora_int4_merged": "QA-LoRA merged int4 (load_merged)",
    "lora_bf16_merged": "LoRA merged, dense bf16",
    "qlora_nf4": "QLoRA-style: NF4 base + unmerged LoRA, bf16",
}
MODES = ("eager", "compile")


def build_models(
    shape: Shape, weights: Weights, device: torch.device, workdir: Path
) -> Tuple[Dict[str, nn.Module], Dict[str, Dict[str, Any]]]:
    """The three models (a build failure is recorded in the info, not raised)."""
    builders = {
        "qalora_int4_merged": lambda: build_int4_merged(shape, weights, device, workdir),
        "lora_bf16_merged": lambda: build_bf16_merged(shape, weights, device),
        "qlora_nf4": lambda: build_qlora(shape, weights, device),
    }
    models, info = {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        try:
            models[name] = build()
        except Exception as error:  # e.g. NF4 needs numel divisible by 64 * 256
            info[name] = {"title": MODEL_TITLES[name], "build_error": _error_text(error)}
            print(f"[decode] {name}: build failed: {info[name]['build_error']}", flush=True)
            continue
        model = models[name]
        info[name] = {
            "title": MODEL_TITLES[name],
            "build_seconds": round(time.perf_counter() - start, 2),
            "weight_classes": weight_classes(model),
            "weight_bytes_per_token": weight_bytes_per_token(model),
        }
        if name == "qalora_int4_merged":
            kernel = "_weight_int4pack_mm" + ("" if device.type == "cuda" else "_for_cpu")
            classes = [c for c in info[name]["weight_classes"] if c != "torch.Tensor"]
            info[name]["served_as"] = (
                "merged_int4/ (torchao Int4Tensor, TorchAoConfig layout) loaded by "
                f"qalora_tune.load_merged into {classes}, computed by "
                f"qalora_tune::int4_linear -> aten.{kernel}"
            )
        print(f"[decode] built {name} in {info[name]['build_seconds']}s", flush=True)
    return models, info


def check_logits(models: Dict[str, nn.Module], prompt: torch.Tensor) -> Dict[str, Any]:
    """Relative error of each quantized model's prefill logits (fp32, no KV cache) to the bf16
    merged LoRA model's."""
    logits = {name: prefill_logits(model, prompt) for name, model in models.items()}
    out: Dict[str, Any] = {}
    reference = logits.get("lora_bf16_merged")
    if reference is not None:
        for name in ("qalora_int4_merged", "qlora_nf4"):
            if name in logits:
                out[f"{name}_vs_lora_bf16_merged"] = relative_error(logits[name], reference)
    return out


def run(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    """Build the three models, check their logits, time them; return the result dict."""
    device = torch.device(args.device)
    shape = make_shape(args.shape, args.layers)
    modes = args.modes
    torch.manual_seed(args.seed)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    result: Dict[str, Any] = {
        "benchmark": "decode",
        "environment": _environment(device, argv),
        "settings": {
            "shape": asdict(shape),
            "device": str(device),
            "dtype": "bfloat16",
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "modes": list(modes),
            "compile_mode": args.compile_mode,
            "compile_backend": args.compile_backend,
            "bandwidth_gbps": args.bandwidth_gbps,
            "adapter_targets": ATTN_TARGETS + list(MLP_TARGETS),
            "seed": args.seed,
        },
    }
    start = time.perf_counter()
    weights = make_weights(shape, device, args.seed)
    with tempfile.TemporaryDirectory(prefix="qalora_decode_") as tmp:
        models, info = build_models(shape, weights, device, Path(tmp))
    del weights
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, shape.vocab_size, (1, args.prompt_len), generator=generator)
    prompt = prompt.to(device)
    result["models"] = info
    result["logits"] = check_logits(models, prompt)
    result["setup_seconds"] = round(time.perf_counter() - start, 1)
    max_len = args.prompt_len + args.new_tokens + 1
    result["results"] = {}
    greedy: Dict[str, Dict[str, List[int]]] = {}
    for mode in modes:
        decoders: Dict[str, Decoder] = {}
        per_model: Dict[str, Dict[str, Any]] = {}
        for name in MODELS:
            if name not in models:
                per_model[name] = {"error": info[name]["build_error"]}
                continue
            per_model[name], decoder = _prepare(
                name, models[name], mode, args, device, max_len, prompt
            )
            if decoder is not None:
                decoders[name] = decoder
        timings = {name: ([], []) for name in decoders}
        for repeat in range(args.repeats):
            order = list(decoders)
            order = order[repeat % len(order):] + order[: repeat % len(order)] if order else order
            for name in order:
                prefill_s, decode_s, tokens = decoders[name].run(prompt, args.new_tokens)
                timings[name][0].append(prefill_s)
                timings[name][1].append(decode_s)
                greedy.setdefault(mode, {})[name] = tokens
        for name, (prefill, decode) in timings.items():
            per_model[name].update(_summarize(prefill, decode, args, info[name], result))
        result["results"][mode] = per_model
        print(f"[decode] {mode} done", flush=True)
    result["ratios"] = _ratios(result["results"])
    result["greedy_agreement"] = _greedy_agreement(greedy)
    result["targets"] = _targets(result, device)
    result["environment"]["load_average_at_end"] = list(os.getloadavg())
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    return result


def _prepare(
    name: str, model: nn.Module, mode: str, args: argparse.Namespace, device: torch.device,
    max_len: int, prompt: torch.Tensor,
) -> Tuple[Dict[str, Any], Optional[Decoder]]:
    """A warmed-up decoder (compile included) and the ops one decode step spends its time in."""
    entry: Dict[str, Any] = {}
    start = time.perf_counter()
    try:
        compile_mode = args.compile_mode if mode == "compile" else None
        decoder = Decoder(model, device, max_len, compile_mode, args.compile_backend)
        for _ in range(2 if mode == "compile" else 1):
            decoder.run(prompt, min(args.new_tokens, 3))
        entry["top_ops_decode_step"] = top_kernels(decoder, prompt)
    except Exception as error:  # compile failures are part of the result
        entry["error"] = _error_text(error)
        print(f"[decode] {name} ({mode}) failed: {entry['error']}", flush=True)
        return entry, None
    entry["warmup_seconds"] = round(time.perf_counter() - start, 2)
    print(f"[decode] {name} ({mode}) warmed up in {entry['warmup_seconds']}s", flush=True)
    return entry, decoder



def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (device-dependent defaults filled in)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--shape", choices=("llama2_7b_layers", "tinystories656K", "tiny"),
        default="llama2_7b_layers", help="tiny: 2 random layers of width 256 (tests)",
    )
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of llama2_7b_layers (default 2 on CPU, 32 on CUDA)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="default 16 on CPU (QLoRA's eager NF4 decode takes ~4 s/token at 7B "
                        "width there), 128 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 on CPU, 5 on CUDA")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time eager and torch.compile (the default)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: 'default' on CPU, "
                        "'reduce-overhead' on CUDA)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (tests use aot_eager to stay fast)")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="memory bandwidth to compare with (default: known GPUs; "
                        "required on other GPUs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a "
                        "shared machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    for name in ("prompt_len", "new_tokens", "repeats", "layers", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.layers = args.layers or (32 if cuda else 2)
    args.new_tokens = args.new_tokens or (128 if cuda else 16)
    args.repeats = args.repeats or (5 if cuda else 3)
    if args.modes is None:
        args.modes = list(MODES) if args.compile in (None, True) else ["eager"]
    elif args.compile is False:
        args.modes = [m for m in args.modes if m != "compile"] or ["eager"]
    args.compile_mode = args.compile_mode or ("reduce-overhead" if cuda else "default")
    if cuda and args.bandwidth_gbps is None:
        args.bandwidth_gbps = default_bandwidth_gbps(torch.device("cuda"))
        if args.bandwidth_gbps is None:
            parser.error(
                f"no known memory bandwidth for {torch.cuda.get_device_name()}; "
                "pass --bandwidth-gbps"
            )
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark, print the markdown report, write ``--json`` / ``--markdown``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(args, argv)
    text = markdown(result)
    print(text)
    for path, content in ((args.json, json.dumps(result, indent=2)), (args.markdown, text)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content + ("" if content.endswith("\n") else "\n"))
    return result


if __name__ == "__main__":
    main()
