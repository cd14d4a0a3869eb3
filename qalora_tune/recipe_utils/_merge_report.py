"""Merge the adapters into the int4 zero points, measuring what the merge changed.

The report gives two figures a user must not confuse:

- ``merge_weight_error``: the merge's own error, in weight space. For every adapted layer,
  the dequantized merged weight minus the dequantized base plus the scaled adapter
  ``(alpha/r) B A`` (spread over each group). Codes and scales do not change, so this is
  exactly the rounding of the new zero points to their storage dtype: at most the unit
  roundoff of that dtype relative to the zero point (2^-8 in bf16, 2^-24 in fp32).
- ``max_relative_logit_error`` (and the perplexities): the merged model against the
  unmerged one on a probe batch, same dtype and kernels. The unmerged model computes the
  adapter on its own path and adds it; the merged one runs the int4 kernel alone. In bf16
  the two round differently in every layer, so through a deep model this figure is mostly
  kernel rounding (the zero-point rounding above is one part of it), not merge error.
"""

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from qalora_tune._memory import release_free_memory
from qalora_tune._progress import progress_bar
from qalora_tune.modules import QALoRALinear
from qalora_tune.recipe_utils._evaluation import joined_logits, next_token_loss

__all__ = ["LOGIT_BUDGET_BYTES", "merge_with_report", "merge_weight_error", "summarize_report"]

LOGIT_BUDGET_BYTES = 256 << 20
"""float32 logits of one probe forward at most: longer probes run a few sequences at a time."""

COMPARE_BUDGET_BYTES = 8 << 20
"""float32 logits compared at once: the two forwards' outputs stay in the model's dtype and
are compared a slice of positions at a time (a 512-token sequence of a 128k vocabulary
has 262 MB of fp32 logits; whole, its comparison held five such copies)."""

_LAYERS_PER_RELEASE = 16  # merged layers between two release_free_memory() calls

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _perplexity(loss: float, count: int) -> Dict[str, float]:
    mean = loss / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0))}


@torch.no_grad()
def merge_weight_error(adapters: Iterable[QALoRALinear], names: Optional[List[str]] = None) -> Dict[str, Any]:
    """The merge's own error in weight space, over merged layers (see the module notes).

    Args:
        adapters (Iterable[QALoRALinear]): layers merged in this process (their previous
            zero points are kept, see :meth:`QALoRALinear.merge`).
        names (List[str], optional): the layers' names, to name the worst one.

    Returns:
        Dict[str, Any]: ``max_abs`` (largest ``|W_merged - (W_base + dW)|``, in weight
        units), ``max_relative_to_zero_point`` (the same per group over ``|z'|``),
        ``unit_roundoff`` of the zero points' dtype, ``relative_to_adapter_update``
        (``||error||_F / ||dW||_F`` over all layers), ``worst_layer`` and ``layers``.
    """
    adapters = list(adapters)
    names = names or [str(i) for i in range(len(adapters))]
    max_abs, max_rel, worst, error_sq, update_sq, dtype, count = 0.0, 0.0, None, 0.0, 0.0, None, 0
    for name, layer in zip(names, adapters):
        rounding = layer.merge_rounding()
        if rounding is None:
            continue
        error, exact, delta, dtype = rounding
        count += 1
        layer_max = error.abs().max().item()
        if layer_max >= max_abs:
            max_abs, worst = layer_max, name
        max_rel = max(max_rel, (error.abs() / exact.abs().clamp_min(1e-30)).max().item())
        error_sq += error.square().sum().item()
        update_sq += delta.square().sum().item()
        del error, exact, delta, rounding
        if count % _LAYERS_PER_RELEASE == 0:
            release_free_memory()  # the float64 temporaries (see _toggle)
    return {
        "max_abs": max_abs,
        "max_relative_to_zero_point": max_rel,
        "unit_roundoff": _UNIT_ROUNDOFF.get(dtype),
        "relative_to_adapter_update": math.sqrt(error_sq / update_sq) if update_sq else 0.0,
        "worst_layer": worst,
        "layers": count,
        "definition": (
            "the merge's own error: dequantized merged weight minus (dequantized base + "
            "(alpha/r) B A spread over each group), every adapted layer; codes and scales do "
            "not change, so it is the rounding of the new zero points to their storage "
            "dtype, at most unit_roundoff of |z'| per group"
        ),
    }


def _toggle(adapters: List[QALoRALinear], merged: bool) -> None:
    for index, layer in enumerate(adapters, start=1):
        if layer.merged != merged:
            layer.merge() if merged else layer.unmerge()
        if merged and index % _LAYERS_PER_RELEASE == 0:
            # each merge's float64 temporaries are freed around the zero points it keeps:
            # on Llama-2-7B, 0.5 GB of holes over 224 layers when never released (an
            # unmerge copies the kept zeros back and makes none)
            release_free_memory()
    if merged:
        release_free_memory()


@torch.no_grad()
def merge_with_report(
    model: nn.Module,
    adapters: Iterable[QALoRALinear],
    probe: Mapping[str, torch.Tensor],
    device: torch.device,
) -> Dict[str, Any]:
    """Merge every adapter (``z += (alpha/r)(BA)/G``) and report both figures of the module
    notes.

    The model computes the probe batch before and after the merge, in eval mode; no copy
    of the model is made (the merge is undone and redone in place when a long probe runs
    a few sequences at a time, which ``unmerge`` makes bit-exact). ``unmerge()`` restores
    the previous zeros bit for bit.

    Args:
        model (nn.Module): the QA-LoRA model; its adapters are merged on return.
        adapters (Iterable[QALoRALinear]): the model's adapted layers, not merged.
        probe (Mapping[str, torch.Tensor]): a batch with ``tokens`` ``(batch, seq)`` and,
            for perplexities, ``labels`` (``-100`` where no loss is taken).
        device (torch.device): where the model runs.

    Returns:
        Dict[str, Any]: ``merge_weight_error`` (see :func:`merge_weight_error`);
        ``max_relative_logit_error`` and ``mean_relative_logit_error`` (per position
        ``|l_merged - l_unmerged|_2 / |l_unmerged|_2``, max and mean over positions),
        ``max_abs_logit_error``, the loss and perplexity of ``unmerged`` and ``merged`` on
        the labelled tokens, their ``perplexity_relative_difference``, and the probe's size.
    """
    adapters = list(adapters)
    names = _layer_names(model, adapters)
    was_training = model.training
    model.eval()
    tokens = probe["tokens"].to(device)
    labels = probe.get("labels")
    labels = labels.to(device) if labels is not None else None
    batch, seq = tokens.shape
    vocab = getattr(getattr(model, "tok_embeddings", None), "num_embeddings", 1)
    step = max(1, LOGIT_BUDGET_BYTES // max(1, seq * vocab * 4))
    errors, max_abs = [], 0.0
    sums = {"unmerged": [0.0, 0], "merged": [0.0, 0]}
    with progress_bar(batch, "measuring the merge", unit="seq") as bar:
        for start in range(0, batch, step):
            part = slice(start, start + step)
            _toggle(adapters, merged=False)
            unmerged = joined_logits(model(tokens[part]))
            _toggle(adapters, merged=True)
            merged = joined_logits(model(tokens[part]))
            rows = unmerged.shape[0]
            width = max(1, COMPARE_BUDGET_BYTES // max(1, rows * unmerged.shape[-1] * 4))
            part_errors = []
            for first in range(0, seq, width):
                positions = slice(first, first + width)
                before, after = unmerged[:, positions].float(), merged[:, positions].float()
                difference = after - before
                part_errors.append(difference.norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-30))
                low, high = torch.aminmax(difference)  # the largest |difference|, no copy
                max_abs = max(max_abs, -low.item(), high.item())
                if labels is not None:
                    for name, logits in (("unmerged", before), ("merged", after)):
                        loss, count = next_token_loss(logits, labels[part], first)
                        sums[name][0] += loss
                        sums[name][1] += count
                del before, after, difference
            errors.append(torch.cat(part_errors, dim=1))
            del unmerged, merged
            bar.update(tokens[part].shape[0])
    model.train(was_training)
    release_free_memory()  # the probe's activations, freed in the heap's holes
    error = torch.cat(errors)
    report: Dict[str, Any] = {
        "merge_weight_error": merge_weight_error(adapters, names),
        "probe_sequences": int(batch),
        "probe_tokens": int(tokens.numel()),
        "max_relative_logit_error": error.max().item(),
        "mean_relative_logit_error": error.mean().item(),
        "max_abs_logit_error": max_abs,
    }
    if labels is not None:
        report["unmerged"] = _perplexity(*sums["unmerged"])
        report["merged"] = _perplexity(*sums["merged"])
        before, after = report["unmerged"]["perplexity"], report["merged"]["perplexity"]
        report["perplexity_relative_difference"] = abs(after - before) / before
    report["definition"] = (
        "max_relative_logit_error: per token position, |logits_merged - "
        "logits_unmerged|_2 / |logits_unmerged|_2 on the probe batch, same dtype and kernels "
        "as training; the unmerged model adds the adapter on its own path, so in bf16 this "
        "is mostly kernel rounding through the layers, not merge error (that is "
        "merge_weight_error)"
    )
    return report


def _layer_names(model: nn.Module, adapters: List[QALoRALinear]) -> List[str]:
    by_id = {id(module): name for name, module in model.named_modules()}
    return [by_id.get(id(layer), str(i)) for i, layer in enumerate(adapters)]


def summarize_report(report: Mapping[str, Any]) -> str:
    """One line with both figures, each named for what it is, for logs and summaries."""
    parts = []
    weight = report.get("merge_weight_error")
    if weight:
        roundoff = weight.get("unit_roundoff")
        bound = f" (storage unit roundoff {roundoff:.1e})" if roundoff else ""
        parts.append(
            f"merge error in weight space (zero-point rounding): max {weight['max_abs']:.2e}, "
            f"{weight['max_relative_to_zero_point']:.2e} of |z'|{bound}, "
            f"{weight['relative_to_adapter_update']:.2e} of the adapter update"
        )
    if "max_relative_logit_error" in report:
        text = (
            "merged vs unmerged logits (kernel rounding, not merge error): max relative "
            f"{report['max_relative_logit_error']:.2e}"
        )
        if "perplexity_relative_difference" in report:
            text += f", perplexity {report['perplexity_relative_difference']:.2e} relative"
        parts.append(text)
    return "; ".join(parts) if parts else "merge deviation not measured"
