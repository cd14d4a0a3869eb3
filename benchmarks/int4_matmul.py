"""The frozen int4 base's matmuls, path by path, against a dense matmul of the same shape.

    python benchmarks/int4_matmul.py --json docs/results/int4_matmul_cpu.json \
        --markdown docs/results/int4_matmul_cpu.md
    python benchmarks/int4_matmul.py --device cuda   # tinygemm vs dequantize + GEMM

For each linear shape of a Llama-2-7B decoder layer (``in -> out``: 4096 -> 4096,
4096 -> 11008, 11008 -> 4096) and each number of rows ``M`` of ``x``, one repeat times,
interleaved:

- ``dense``: ``x @ W^T`` with ``W`` dense in the compute dtype (what LoRA's base costs);
- ``kernel``: the int4 kernel itself (CPU ``_weight_int4pack_mm_for_cpu``, CUDA tinygemm
  ``_weight_int4pack_mm``); not timed in fp32 on CPU, which has no fast fp32 kernel;
- ``dequant``: dequantize and a dense GEMM (CPU: chunk by chunk, ``_cpu_int4_chunked``,
  each chunk built by the fused compiled kernel of ``_cpu_int4_fused``; CUDA: unpack the
  tinygemm codes with tensor ops, dequantize the layer, one GEMM);
- ``dequant_eager`` (CPU): the same chunks built by the eager ATen passes;
- ``op``: ``qalora_tune::int4_linear``, which picks its path by ``M`` (on CPU, where it
  runs, the native GEMM of ``_cpu_int4_native``; column ``op path``);
- ``grad_input``: ``qalora_tune::int4_linear_grad_input`` (``grad @ W``); on CPU also
  ``grad_dequant`` and ``grad_eager``, ``grad @ W`` over dequantized chunks built by the
  fused compiled kernel or by the eager passes; on CUDA ``grad_identity``, the earlier way
  that dequantized through tinygemm's identity product.

Times are medians in ms; ``x dense`` is the time over ``dense``'s. Bases are RTN-quantized
random weights at group size ``--group-size``. The first call of every method on each
shape is reported apart: for the compiled CPU chunks it includes compiling their kernels.
"""

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from _report import command_line, cpu_model_name, write_outputs

from qalora_tune.ops import int4_linear, int4_linear_grad_input
from qalora_tune.ops._cpu_int4_chunked import (
    chunked_int4_grad_input,
    chunked_int4_linear,
)
from qalora_tune.ops import _cpu_int4_native as native_int4
from qalora_tune.ops._cpu_int4_fused import use_compiled
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.int4_weight import (
    dequantize_int4,
    dequantize_packed,
    tinygemm_padded_in_features,
    to_torchao_int4,
)

# the module, for its thresholds (``qalora_tune.ops.int4_linear`` names the op itself)
int4_linear_module = importlib.import_module("qalora_tune.ops.int4_linear")

# (in_dim, out_dim) of a Llama-2-7B layer's linears: q/k/v/o, w1/w3, w2
LLAMA2_7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
DEFAULT_ROWS = {"cpu": [1, 16, 128, 512], "cuda": [1, 16, 64, 128, 256, 1024, 4096]}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _shape(text: str) -> tuple:
    in_dim, _, out_dim = text.partition("x")
    try:
        return int(in_dim), int(out_dim)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IN_DIMxOUT_DIM such as 4096x11008, got {text!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="compute dtype (CUDA's kernel needs bf16)")
    parser.add_argument("--shapes", type=_shape, nargs="+", default=LLAMA2_7B_SHAPES,
                        help="linears as IN_DIMxOUT_DIM (default: a Llama-2-7B layer's)")
    parser.add_argument("--rows", type=int, nargs="+", help="rows M of x (default per device)")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if args.device == "cuda" and args.dtype != "bf16":
        parser.error("the CUDA int4 kernel (tinygemm) computes in bf16; use --dtype bf16")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    args.rows = args.rows or DEFAULT_ROWS[args.device]
    if min(args.rows) < 1:
        parser.error("--rows must be positive")
    for in_dim, _ in args.shapes:
        if in_dim % args.group_size:
            parser.error(f"in_dim {in_dim} is not a multiple of --group-size {args.group_size}")
    return args


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds one call of ``fn`` takes (CUDA events on a GPU)."""
    if device.type == "cuda":
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return cuda_time

    def cpu_time(fn):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    return cpu_time


def _identity_grad_input(grad, weight, group_size, in_dim):
    """``grad @ W`` with ``W`` dequantized through tinygemm's identity product (the CUDA
    backward before ``tinygemm_layout``), for comparison."""
    k_pad = tinygemm_padded_in_features(weight.qdata)
    eye = torch.eye(k_pad, dtype=torch.bfloat16, device=grad.device)
    w_t = torch.ops.aten._weight_int4pack_mm(eye, weight.qdata, group_size, weight.scale_and_zero)
    return grad @ w_t[:in_dim, : grad.shape[-1]].t()


def methods_for(weight, dense, group_size: int, dtype: torch.dtype,
                device: torch.device) -> Dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    """The timed calls for one linear, each ``fn(x, grad)``."""
    out_dim, in_dim = dense.shape
    qdata, scale_and_zero = weight.qdata, weight.scale_and_zero
    methods: Dict[str, Callable] = {"dense": lambda x, g: x @ dense.t()}
    if device.type == "cpu":
        if dtype != torch.float32:
            methods["kernel"] = lambda x, g: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, qdata, group_size, scale_and_zero)
        methods["dequant"] = lambda x, g: chunked_int4_linear(
            x, qdata, scale_and_zero, group_size, out_dim, compiled=True)
        methods["dequant_eager"] = lambda x, g: chunked_int4_linear(
            x, qdata, scale_and_zero, group_size, out_dim, compiled=False)
    else:
        k_pad = tinygemm_padded_in_features(qdata)

        def kernel(x, g):
            padded = torch.nn.functional.pad(x, (0, k_pad - in_dim))
            return torch.ops.aten._weight_int4pack_mm(padded, qdata, group_size, scale_and_zero)

        methods["kernel"] = kernel
        methods["dequant"] = lambda x, g: x @ dequantize_packed(
            qdata, scale_and_zero, group_size, out_dim, in_dim).t()
    methods["op"] = lambda x, g: int4_linear(x, qdata, scale_and_zero, group_size, out_dim)
    methods["grad_input"] = lambda x, g: int4_linear_grad_input(g, qdata, scale_and_zero, group_size, in_dim)
    if device.type == "cpu":
        methods["grad_dequant"] = lambda x, g: chunked_int4_grad_input(
            g, qdata, scale_and_zero, group_size, in_dim, compiled=True)
        methods["grad_eager"] = lambda x, g: chunked_int4_grad_input(
            g, qdata, scale_and_zero, group_size, in_dim, compiled=False)
    if device.type == "cuda":
        methods["grad_identity"] = lambda x, g: _identity_grad_input(g, weight, group_size, in_dim)
    return methods


def op_path(device: torch.device, dtype: torch.dtype, rows: int, numel: int) -> str:
    """Which path ``int4_linear`` takes for ``rows`` rows of a weight of ``numel`` values
    (the op's own decision, asked here)."""
    if device.type == "cuda":
        return "kernel" if rows < int4_linear_module.CUDA_DEQUANTIZE_MIN_ROWS else "dequant"
    if int4_linear_module._cpu_takes_native(rows, dtype) and native_int4.available():
        return "native"  # the C++ GEMM of _cpu_int4_native (weights of whole 64-row blocks)
    compiled = use_compiled(numel)
    if not int4_linear_module._cpu_takes_chunks(rows, dtype, compiled):
        return "kernel"
    return "dequant" if compiled else "dequant_eager"


def bench_shape(in_dim: int, out_dim: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(in_dim * 7 + out_dim)
    gq = quantize_rtn(torch.randn(out_dim, in_dim, generator=generator), args.group_size)
    weight = to_torchao_int4(gq, device=device, dtype=dtype)
    dense = dequantize_int4(weight, dtype).contiguous()
    timer = _timer(device)
    rows_out = []
    for rows in args.rows:
        x = torch.randn(rows, in_dim, generator=generator).to(device, dtype)
        grad = torch.randn(rows, out_dim, generator=generator).to(device, dtype)
        methods = methods_for(weight, dense, args.group_size, dtype, device)
        # the first call of each method on this shape: for the compiled CPU chunks it
        # includes compiling their kernels (their layout does not depend on M)
        first_call = None
        if not rows_out:  # the first M on this shape
            first_call = {name: timer(lambda: fn(x, grad)) for name, fn in methods.items()}
        for _ in range(args.warmup):
            for fn in methods.values():
                fn(x, grad)
        times: Dict[str, List[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                times[name].append(timer(lambda: fn(x, grad)))
        medians = {name: statistics.median(t) for name, t in times.items()}
        row = {"in_dim": in_dim, "out_dim": out_dim, "rows": rows,
               "op_path": op_path(device, dtype, rows, in_dim * out_dim), "ms": medians,
               "x_dense": {name: t / medians["dense"] for name, t in medians.items()}}
        if first_call is not None:
            row["first_call_ms"] = first_call
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    return rows_out


def environment(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    import torchao

    env = {"torch": torch.__version__, "torchao": torchao.__version__, "cpu": cpu_model_name(),
           "threads": torch.get_num_threads(),
           "command": command_line("benchmarks/int4_matmul.py", argv),
           "cpu_dequantize_min_rows": int4_linear_module.CPU_DEQUANTIZE_MIN_ROWS,
           "cpu_compiled_dequantize_min_rows": int4_linear_module.CPU_COMPILED_DEQUANTIZE_MIN_ROWS,
           "cuda_dequantize_min_rows": int4_linear_module.CUDA_DEQUANTIZE_MIN_ROWS}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    names: List[str] = []
    for row in report["results"]:
        names += [n for n in row["ms"] if n not in names]
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    lines = [
        f"`{env['command']}`", "",
        f"{where}; torch {env['torch']}, torchao {env['torchao']}; {report['dtype']}, "
        f"group size {report['group_size']}. Median ms (x the dense matmul of the same shape); "
        "`op` is `qalora_tune::int4_linear`, which took the path in the `op path` column.", "",
        "| in -> out | M | op path | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in report["results"]:
        cells = [
            f"{row['ms'][n]:.3g} ({row['x_dense'][n]:.2f}x)" if n in row["ms"] else "-" for n in names
        ]
        lines.append(f"| {row['in_dim']} -> {row['out_dim']} | {row['rows']} | {row['op_path']} | "
                     + " | ".join(cells) + " |")
    firsts = [row for row in report["results"] if "first_call_ms" in row]
    if firsts:
        lines += ["", "First call of each method on each shape, in ms (at the first M; for the "
                  "compiled CPU chunks it includes compiling their kernels, so it depends on "
                  "inductor's cache, `TORCHINDUCTOR_CACHE_DIR`):", "",
                  "| in -> out | M | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for row in firsts:
            cells = [f"{row['first_call_ms'][n]:.3g}" if n in row["first_call_ms"] else "-" for n in names]
            lines.append(f"| {row['in_dim']} -> {row['out_dim']} | {row['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.manual_seed(0)
    results = []
    with torch.no_grad():
        for in_dim, out_dim in args.shapes:
            results += bench_shape(in_dim, out_dim, args)
    report = {"environment": environment(args, argv), "device": args.device, "dtype": args.dtype,
              "group_size": args.group_size, "repeats": args.repeats, "results": results}
    table = markdown(report)
    print(table)
    write_outputs(args.json, args.markdown, report, table)
    return report


if __name__ == "__main__":
    main()
