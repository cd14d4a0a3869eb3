"""What 8-bit scales (``double_quant_scales``) save in bits and cost in accuracy.

    python benchmarks/double_quant.py --json docs/results/double_quant.json \
        --markdown docs/results/double_quant.md

Two measurements:

1. **Bits per weight** of the int4 base, plain and with 8-bit scales, for the seven linears
   of a Llama-2-7B decoder layer (dim 4096, MLP 11008) at group sizes 32/64/128 in bf16
   and fp32, and for the real TinyStories-656K model. Counted from the stored tensors
   (``qalora_tune.models.tensor_nbytes``: packed codes, scales or scale codes and their
   per-row grid, zero points, row padding), over the logical ``out_dim * in_dim``.
2. **Accuracy** on TinyStories-656K (``../shared/models``): the quantized base's
   perplexity on held-out TinyStories text (``../shared/data/tinystories_val_a.txt``, one
   sequence per story, BOS first) with plain and with 8-bit scales, for each bit width,
   group size and quantizer (RTN, HQQ), and the weights' squared error against the fp32
   checkpoint (summed over the linears).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_outputs  # noqa: E402
from accuracy import BUILDER, DEFAULT_SHARED, perplexity, tinystories_batches  # noqa: E402

MODEL_DIR = Path("models") / "tinystories656K"
# (in_dim, out_dim) of the linears of one Llama-2-7B decoder layer: q, k, v, o, w1, w3, w2
LLAMA2_7B_LINEARS = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]


def _linear_bits(linears: List[tuple], group_size: int, dtype: torch.dtype, double_quant: bool) -> float:
    from qalora_tune.models import tensor_nbytes
    from qalora_tune.modules import QuantizedLinear

    stored, weights = 0, 0
    for in_dim, out_dim in linears:
        layer = QuantizedLinear(in_dim, out_dim, group_size=group_size, dtype=dtype, device="meta",
                           pad_in_dim=True, double_quant_scales=double_quant)
        stored += 8 * tensor_nbytes(layer.weight)
        weights += in_dim * out_dim
    return stored / weights


def llama2_7b_bits(group_sizes: List[int]) -> List[Dict[str, Any]]:
    """Bits per weight of a Llama-2-7B layer's int4 linears, plain and with 8-bit scales."""
    rows = []
    for group_size in group_sizes:
        for dtype in (torch.bfloat16, torch.float32):
            plain = _linear_bits(LLAMA2_7B_LINEARS, group_size, dtype, False)
            eight = _linear_bits(LLAMA2_7B_LINEARS, group_size, dtype, True)
            rows.append({
                "group_size": group_size, "dtype": str(dtype).replace("torch.", ""),
                "plain_bits": plain, "double_quant_bits": eight,
                "saved_fraction": 1 - eight / plain,
            })
    return rows


def _weight_error(model: nn.Module, reference: Dict[str, torch.Tensor]) -> float:
    from qalora_tune.modules import QuantizedLinear
    from qalora_tune.quantization.base_weight import dequantize_base

    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            dense = dequantize_base(module.weight, torch.float64)[:, : module.in_dim]
            total += (dense - reference[f"{name}.weight"].double()).pow(2).sum().item()
    return total


def tinystories_accuracy(args: argparse.Namespace) -> Dict[str, Any]:
    """Base perplexity and weight error of TinyStories-656K, plain vs 8-bit scales."""
    from qalora_tune.checkpointing import QALoRACheckpointer
    from qalora_tune.data import text_tokenizer
    from qalora_tune.models import base_bits_per_weight, qalora_tinystories656k
    from qalora_tune.quantization.gptq_calibration import load_quantized_base
    from qalora_tune.recipe_utils import load_full_precision

    model_dir = args.shared / MODEL_DIR
    checkpointer = QALoRACheckpointer(str(model_dir), "LLAMA2", output_dir=tempfile.gettempdir())
    full, _ = load_full_precision(BUILDER, checkpointer, torch.device("cpu"), torch.float32,
                                  otherwise="--shared")
    state = {k: v.detach().clone() for k, v in full.state_dict().items()}
    tokenizer = text_tokenizer(str(model_dir / "tokenizer.json"), prepend_space=False)
    # the held-out TinyStories text exactly as benchmarks/accuracy.py evaluates it
    batches = tinystories_batches(tokenizer, argparse.Namespace(
        shared=args.shared, eval_seq_len=args.seq_len, eval_batch_size=16,
        tinystories_tokens=args.tinystories_tokens,
    ))

    def ppl(model: nn.Module) -> float:
        return perplexity(model.eval(), batches)

    rows = []
    for bits in args.bits:
        for group_size in args.group_sizes:
            for quantizer in args.quantizers:
                row: Dict[str, Any] = {"bits": bits, "group_size": group_size, "quantizer": quantizer}
                for label, double_quant in (("plain", False), ("double_quant", True)):
                    model = qalora_tinystories656k([], group_size=group_size, quantizer=quantizer,
                                                   bits=bits, double_quant_scales=double_quant)
                    load_quantized_base(model, state)
                    row[f"{label}_perplexity"] = ppl(model)
                    row[f"{label}_weight_sq_error"] = _weight_error(model, state)
                    row[f"{label}_bits"] = base_bits_per_weight(model)
                row["perplexity_change"] = row["double_quant_perplexity"] / row["plain_perplexity"] - 1
                row["weight_error_change"] = (
                    row["double_quant_weight_sq_error"] / row["plain_weight_sq_error"] - 1
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # predicted ones
    return {"fp32_perplexity": ppl(full), "predicted_tokens": tokens, "rows": rows}


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"`{report['command']}`", "", "Bits per weight of a Llama-2-7B decoder layer's int4 linears:", "",
             "| group size | scales/zeros dtype | plain | 8-bit scales | saved |", "|---|---|---|---|---|"]
    for row in report["llama2_7b_bits"]:
        lines.append(f"| {row['group_size']} | {row['dtype']} | {row['plain_bits']:.3f} | "
                     f"{row['double_quant_bits']:.3f} | {100 * row['saved_fraction']:.1f}% |")
    accuracy = report.get("tinystories656K")
    if accuracy:
        lines += ["", f"TinyStories-656K base (fp32 scales and zeros), perplexity on "
                  f"{accuracy['predicted_tokens']} held-out TinyStories tokens (fp32 model: "
                  f"{accuracy['fp32_perplexity']:.3f}):", "",
                  "| bits | G | quantizer | bits/weight plain | bits/weight 8-bit scales | ppl plain | "
                  "ppl 8-bit scales | ppl change | weight sq. error change |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in accuracy["rows"]:
            lines.append(
                f"| {row['bits']} | {row['group_size']} | {row['quantizer']} | {row['plain_bits']:.3f} | "
                f"{row['double_quant_bits']:.3f} | {row['plain_perplexity']:.3f} | "
                f"{row['double_quant_perplexity']:.3f} | {100 * row['perplexity_change']:+.2f}% | "
                f"{100 * row['weight_error_change']:+.2f}% |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--quantizers", nargs="+", choices=["rtn", "hqq"], default=["rtn", "hqq"])
    parser.add_argument("--tinystories-tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    bad = [b for b in args.bits if b not in (2, 3, 4)] + [g for g in args.group_sizes if g not in (32, 64, 128)]
    if bad:
        parser.error(f"8-bit scales are for int4 kernel bases: --bits from 2 3 4, --group-sizes "
                     f"from 32 64 128 (got {bad})")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    report: Dict[str, Any] = {
        "command": command_line("benchmarks/double_quant.py", argv),
        "torch": torch.__version__,
        "llama2_7b_bits": llama2_7b_bits([32, 64, 128]),
    }
    if (args.shared / MODEL_DIR).is_dir():
        report["tinystories656K"] = tinystories_accuracy(args)
    else:
        report["tinystories656K_skipped"] = f"{args.shared / MODEL_DIR} not found"
    table = markdown(report)
    print(table)
    write_outputs(args.json, args.markdown, report, table)
    return report


if __name__ == "__main__":
    main()
