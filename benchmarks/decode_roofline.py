"""The memory roofline of one-token decode on CPU: how fast int4 and bf16 weights can be
read, and what that allows for the decode ratio int4 / bf16.

    python benchmarks/decode_roofline.py --json docs/results/decode_roofline_cpu.json \\
        --markdown docs/results/decode_roofline_cpu.md

Decoding one token multiplies one row of activations by every weight: each byte of the
weights is read once and used for two flops, so the step is bound by memory bandwidth and
the int4 / bf16 speed ratio is at most the ratio of the bytes read, times how much better
a fraction of the bandwidth the int4 kernel reaches than the bf16 GEMV. This script
measures the three numbers that decide it, interleaved, on ``--layers`` copies of a
Llama-2-7B decoder layer's seven linears (so the weights do not fit in any cache):

- ``stream``: summing a ``--stream-mib`` bf16 buffer, the rate at which this machine's
  cores read memory (the roofline);
- ``dense bf16``: ``x @ W^T`` with ``x`` of one row, ``W`` dense bf16 (LoRA merged);
- ``int4 kernel``: PyTorch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) on the
  same weights at group size ``--group-size`` (codes plus bf16 scale and zero per group);
- ``int4_linear op``: ``qalora_tune::int4_linear``, the op (what ``torch.compile`` and
  training call);
- ``merged layer (F.linear)``: ``F.linear`` on the merged model's weight (a
  ``CpuInt4Tensor``), what an eager merged model's decode calls: its one-row path runs the
  kernel without the op's dispatch.

Times are medians over ``--repeats`` interleaved passes over all the linears.
"""

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from _report import add_output_arguments, command_line, cpu_model_name, publish

from qalora_tune._compat import cpu_int4pack, cpu_int4pack_mm
import torch.nn.functional as F

from qalora_tune.ops import int4_linear
from qalora_tune.quantization.int4_weight import CpuInt4Tensor

# (in_dim, out_dim) of a Llama-2-7B decoder layer's linears: q, k, v, o, w1, w3, w2
LLAMA2_7B_LAYER = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="copies of the layer's linears")
    parser.add_argument("--dim-divisor", type=int, default=1,
                        help="divide every width by this (tests use a small shape)")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256])
    parser.add_argument("--stream-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1 or args.stream_mib < 1 or args.dim_divisor < 1:
        parser.error("--layers, --repeats, --stream-mib and --dim-divisor must be positive")
    for width in (4096, 11008):
        if width % args.dim_divisor or width // args.dim_divisor % args.group_size:
            parser.error(f"{width} / --dim-divisor must be a whole multiple of --group-size "
                         f"{args.group_size}")
    return args


def _median_seconds(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median seconds of each ``fn``, the functions called in turn (interleaved)."""
    for fn in fns.values():  # warm-up
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _linears(args: argparse.Namespace) -> List[Dict[str, torch.Tensor]]:
    shapes = [(k // args.dim_divisor, n // args.dim_divisor) for k, n in LLAMA2_7B_LAYER]
    linears = []
    for in_dim, out_dim in shapes * args.layers:
        codes = torch.randint(0, 16, (out_dim, in_dim), dtype=torch.int32)
        packed = cpu_int4pack(codes)
        scale_and_zero = torch.randn(in_dim // args.group_size, out_dim, 2, dtype=torch.bfloat16)
        linears.append({
            "dense": torch.randn(out_dim, in_dim, dtype=torch.bfloat16),
            "packed": packed,
            "scale_and_zero": scale_and_zero,
            "merged": CpuInt4Tensor(qdata=packed, scale_and_zero=scale_and_zero,
                                    block_size=[1, args.group_size],
                                    shape=torch.Size([out_dim, in_dim])),
        })
    return linears


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    buffer = torch.randn(args.stream_mib * 2**20 // 2, dtype=torch.bfloat16)
    linears = _linears(args)
    in_dims = {lin["dense"].shape[1] for lin in linears}
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in in_dims}
    g = args.group_size

    def dense() -> None:
        for lin in linears:
            xs[lin["dense"].shape[1]] @ lin["dense"].t()

    def kernel() -> None:
        for lin in linears:
            cpu_int4pack_mm(xs[lin["dense"].shape[1]], lin["packed"], g, lin["scale_and_zero"])

    def op() -> None:
        for lin in linears:
            int4_linear(xs[lin["dense"].shape[1]], lin["packed"], lin["scale_and_zero"], g,
                        lin["dense"].shape[0])

    def merged() -> None:
        for lin in linears:
            F.linear(xs[lin["dense"].shape[1]], lin["merged"])

    with torch.no_grad():
        seconds = _median_seconds(
            {"stream": buffer.sum, "dense bf16": dense, "int4 kernel": kernel, "int4_linear op": op,
             "merged layer (F.linear)": merged},
            args.repeats)
    dense_bytes = sum(lin["dense"].numel() * 2 for lin in linears)
    int4_bytes = sum(lin["packed"].numel() * lin["packed"].element_size()
                     + lin["scale_and_zero"].numel() * 2 for lin in linears)
    read = {"stream": buffer.numel() * 2, "dense bf16": dense_bytes,
            "int4 kernel": int4_bytes, "int4_linear op": int4_bytes,
            "merged layer (F.linear)": int4_bytes}
    stream_rate = read["stream"] / seconds["stream"]
    rows = {name: {"ms": 1e3 * s, "bytes": read[name], "gb_per_s": read[name] / s / 1e9,
                   "of_stream": read[name] / s / stream_rate} for name, s in seconds.items()}
    return {
        "rows": rows,
        "bytes_ratio": dense_bytes / int4_bytes,
        "measured_ratio_kernel": seconds["dense bf16"] / seconds["int4 kernel"],
        "measured_ratio_op": seconds["dense bf16"] / seconds["int4_linear op"],
        "measured_ratio_merged": seconds["dense bf16"] / seconds["merged layer (F.linear)"],
        # int4 read at the full stream rate against the bf16 GEMV as it runs
        "ceiling_ratio": seconds["dense bf16"] / (int4_bytes / stream_rate),
    }


def markdown(report: Dict[str, Any]) -> str:
    m = report["measurement"]
    lines = [
        "# Decode roofline on CPU: int4 and bf16 weight reads", "",
        f"`{report['command']}`", "",
        f"{report['cpu']}, {report['threads']} thread(s), torch {report['torch']}; "
        f"{report['layers']} Llama-2-7B layer(s) of linears (widths / {report['dim_divisor']}), "
        f"x of 1 row, group size {report['group_size']}; medians of {report['repeats']} interleaved passes.",
        "", "| read | ms | MB read | GB/s | of the stream rate |", "|---|---:|---:|---:|---:|",
    ]
    for name, row in m["rows"].items():
        lines.append(f"| {name} | {row['ms']:.2f} | {row['bytes'] / 1e6:,.1f} | "
                     f"{row['gb_per_s']:.1f} | {row['of_stream']:.0%} |")
    lines += [
        "",
        f"- bytes read, bf16 / int4: **{m['bytes_ratio']:.2f}x** (the decode ratio when both "
        "kernels reach the same fraction of the bandwidth);",
        f"- measured, dense bf16 time / int4 time: kernel {m['measured_ratio_kernel']:.2f}x, "
        f"op {m['measured_ratio_op']:.2f}x, merged layer (F.linear) "
        f"{m['measured_ratio_merged']:.2f}x;",
        f"- ceiling, int4 at the full stream rate against this bf16 GEMV: "
        f"**{m['ceiling_ratio']:.2f}x**.", "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    measurement = measure(args)
    report = {"command": command_line("benchmarks/decode_roofline.py", argv), "cpu": cpu_model_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "layers": args.layers,
              "dim_divisor": args.dim_divisor, "group_size": args.group_size,
              "repeats": args.repeats, "measurement": measurement}
    publish(report, markdown(report), args)
    return report


if __name__ == "__main__":
    main()
