"""Smallest end-to-end QA-LoRA run on one layer: quantize, adapt, merge, check.

    python -m qalora_tune.demo

A full-precision layer is quantized to int4 (torchao's CPU int4 tensor). The task is that
layer plus a low-rank, group-constant change (what a fine-tune of that layer looks like to
a pooled adapter). A QALoRALinear learns it, then folds the adapter into the int4 zero
points; the script prints the error at each stage and what the merge changed.
"""

import argparse
import time

import torch
from torch import nn

from qalora_tune.modules import QALoRALinear
from qalora_tune.quantization.int4_weight import from_torchao_int4


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return ((output - target).norm() / target.norm()).item()


def run(
    in_dim: int = 1024,
    out_dim: int = 1024,
    group_size: int = 64,
    rank: int = 8,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict:
    """Run the demo and return its measurements."""
    torch.manual_seed(seed)
    base = nn.Linear(in_dim, out_dim, bias=False)
    n_groups = in_dim // group_size
    task_shift = (torch.randn(out_dim, rank) @ torch.randn(rank, n_groups)) * 0.002
    target_weight = base.weight.detach() + task_shift.repeat_interleave(group_size, dim=1)

    layer = QALoRALinear.from_linear(base, rank=rank, alpha=2.0 * rank, group_size=group_size)
    held_out = torch.randn(512, in_dim)
    target = held_out @ target_weight.t()
    with torch.no_grad():
        error_fp_base = _relative_error(base(held_out), target)
        error_int4_base = _relative_error(layer(held_out), target)

    optimizer = torch.optim.AdamW(
        [layer.lora_a.weight, layer.lora_b.weight], lr=lr, weight_decay=0.0
    )
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(64, in_dim)
        loss = nn.functional.mse_loss(layer(x), x @ target_weight.t())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start

    with torch.no_grad():
        unmerged = layer(held_out)
        before = from_torchao_int4(layer.weight)
        layer.merge()
        merged = layer(held_out)
        after = from_torchao_int4(layer.weight)
    return {
        "error_fp_base": error_fp_base,
        "error_int4_base": error_int4_base,
        "error_qalora": _relative_error(unmerged, target),
        "error_merged_int4": _relative_error(merged, target),
        "merge_max_abs_deviation": (merged - unmerged).abs().max().item(),
        "merge_relative_deviation": _relative_error(merged, unmerged),
        "codes_unchanged": torch.equal(before.qdata, after.qdata),
        "scales_unchanged": torch.equal(before.scale, after.scale),
        "train_seconds": train_seconds,
        "weight_type": type(layer.weight).__name__,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = run(group_size=args.group_size, rank=args.rank, steps=args.steps, seed=args.seed)
    print("QA-LoRA demo: 1024x1024 layer, int4 base, group size", args.group_size, "rank", args.rank)
    print("  relative output error vs the fine-tuned target (held-out inputs)")
    print(f"    fp32 base, not adapted     {r['error_fp_base']:.4f}")
    print(f"    int4 base, not adapted     {r['error_int4_base']:.4f}")
    print(f"    int4 base + QA-LoRA        {r['error_qalora']:.4f}   ({args.steps} steps, {r['train_seconds']:.1f} s)")
    print(f"    merged int4 (no adapter)   {r['error_merged_int4']:.4f}")
    print(f"  merge: base stays {r['weight_type']}; codes unchanged={r['codes_unchanged']}, "
          f"scales unchanged={r['scales_unchanged']}; merged vs unmerged relative deviation "
          f"{r['merge_relative_deviation']:.2e} (max abs {r['merge_max_abs_deviation']:.2e})")


if __name__ == "__main__":
    main()
