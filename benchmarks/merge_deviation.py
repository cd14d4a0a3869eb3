"""Measure how far a merged QALoRALinear is from the unmerged one, per storage dtype.

    python benchmarks/merge_deviation.py [--dim 4096] [--group-size 64] [--rank 16]

The adapter gets B ~ N(0, 0.02) (a trained-sized update); inputs are N(0, 1). Reported:
relative deviation of the merged output from the unmerged output and from a float64
reference of the unmerged function, and the largest change of a stored zero point
beyond the exact shift (the bf16/fp32 rounding of the merged zeros).
"""

import argparse

import torch
from torch import nn

from qalora_tune.modules import QALoRALinear
from qalora_tune.ops import pool_groups
from qalora_tune.quantization.int4_weight import dequantize_int4, zero_points


def measure(dim: int, group_size: int, rank: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    layer = QALoRALinear.from_linear(
        nn.Linear(dim, dim, bias=False), rank=rank, alpha=2.0 * rank,
        group_size=group_size, dtype=dtype,
    )
    with torch.no_grad():
        layer.lora_b.weight.normal_(0.0, 0.02)
        x = torch.randn(64, dim)
        dense = dequantize_int4(layer.weight, torch.float64)
        pooled = pool_groups(x.double(), group_size)
        exact = x.double() @ dense.t() + layer.scaling * (
            pooled @ layer.lora_a.weight.double().t() @ layer.lora_b.weight.double().t()
        )
        unmerged = layer(x.to(dtype)).double()
        zeros_before = zero_points(layer.weight).double().clone()
        shift = layer.zero_point_delta()
        layer.merge()
        merged = layer(x.to(dtype)).double()
        zero_rounding = (zero_points(layer.weight).double() - zeros_before - shift).abs()
    norm = exact.norm()
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "merged_vs_unmerged": ((merged - unmerged).norm() / norm).item(),
        "merged_vs_exact": ((merged - exact).norm() / norm).item(),
        "unmerged_vs_exact": ((unmerged - exact).norm() / norm).item(),
        "max_zero_rounding": zero_rounding.max().item(),
        "max_abs_zero": zeros_before.abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    print("| dtype | merged vs unmerged | merged vs fp64 exact | unmerged vs fp64 exact | max zero rounding (max abs zero) |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        r = measure(args.dim, args.group_size, args.rank, dtype)
        print(
            f"| {r['dtype']} | {r['merged_vs_unmerged']:.2e} | {r['merged_vs_exact']:.2e} | "
            f"{r['unmerged_vs_exact']:.2e} | {r['max_zero_rounding']:.2e} ({r['max_abs_zero']:.3f}) |"
        )


if __name__ == "__main__":
    main()
