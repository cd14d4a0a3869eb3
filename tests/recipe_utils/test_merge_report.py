"""The merge report's two figures: the merge's own error in weight space (checked against
dequantized weights in float64) and the merged-vs-unmerged logit difference, the same
whether the probe runs in one forward or a few sequences at a time."""

from functools import partial

import pytest
import torch
from torchtune.models.llama2 import llama2

import qalora_tune.recipe_utils._merge_report as merge_report
from qalora_tune.models import qalora_transformer
from qalora_tune.modules import QALoRALinear
from qalora_tune.quantization.base_weight import dequantize_base
from qalora_tune.recipe_utils import merge_weight_error, merge_with_report, summarize_report
from tests.reference import UNIT_ROUNDOFF


def _random_adapter(layer, generator):
    with torch.no_grad():
        layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 16)], ids=["int4", "intx"])
def test_the_weight_error_is_the_dequantized_difference_and_within_the_roundoff(dtype, bits, group_size):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = QALoRALinear(128, 48, rank=4, alpha=8.0, group_size=group_size, bits=bits, dtype=dtype)
    _random_adapter(layer, generator)
    base = dequantize_base(layer.weight, torch.float64)
    delta = layer.zero_point_delta().repeat_interleave(group_size, dim=1)
    layer.merge()
    merged = dequantize_base(layer.weight, torch.float64)
    error, exact, _, stored_dtype = layer.merge_rounding()
    # the per-group figure is the whole weight's error, spread over each group
    expected = merged - (base + delta)
    assert torch.allclose(error.repeat_interleave(group_size, dim=1), expected, rtol=0, atol=1e-12)
    assert stored_dtype == dtype
    report = merge_weight_error([layer], ["layer"])
    assert report["max_abs"] == pytest.approx(expected.abs().max().item(), rel=1e-9)
    assert report["max_relative_to_zero_point"] <= UNIT_ROUNDOFF[dtype]
    assert report["unit_roundoff"] == UNIT_ROUNDOFF[dtype] and report["worst_layer"] == "layer"
    if dtype == torch.bfloat16:  # the rounding is visible, and far below the update itself
        assert 0 < report["relative_to_adapter_update"] < 0.05


def test_a_layer_not_merged_here_has_no_weight_error():
    layer = QALoRALinear(64, 16, rank=2, alpha=4.0, group_size=32)
    assert layer.merge_rounding() is None
    assert merge_weight_error([layer])["layers"] == 0


def _small_model(seed):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                 max_seq_len=32, intermediate_dim=96)
    model = qalora_transformer(partial(llama2, **sizes), ["q_proj", "v_proj"],
                               apply_lora_to_mlp=True, lora_rank=2, lora_alpha=4.0, group_size=32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QALoRALinear):
                module.weight = torch.nn.Parameter(
                    QALoRALinear(module.in_dim, module.out_dim, rank=2, alpha=4.0,
                                 group_size=32).weight, requires_grad=False)
                _random_adapter(module, generator)
    return model


def test_a_probe_run_a_few_sequences_at_a_time_reports_the_same(monkeypatch):
    tokens = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(3))
    labels = tokens.clone()
    reports = []
    for budget in (1 << 30, 2 * 12 * 64 * 4):  # everything at once; two sequences a step
        model = _small_model(1)
        adapters = [m for m in model.modules() if isinstance(m, QALoRALinear)]
        monkeypatch.setattr(merge_report, "LOGIT_BUDGET_BYTES", budget)
        reports.append(merge_with_report(model, adapters, {"tokens": tokens, "labels": labels},
                                         torch.device("cpu")))
        assert all(layer.merged for layer in adapters)
    whole, pieces = reports
    for key in ("max_relative_logit_error", "max_abs_logit_error"):
        assert pieces[key] == pytest.approx(whole[key], rel=1e-4), key
    assert pieces["merged"]["loss"] == pytest.approx(whole["merged"]["loss"], rel=1e-6)
    assert pieces["merge_weight_error"] == whole["merge_weight_error"]
    line = summarize_report(whole)
    assert "merge error in weight space (zero-point rounding)" in line
    assert "merged vs unmerged logits (kernel rounding, not merge error)" in line


@pytest.mark.parametrize("positions", [1, 5, 12])
def test_logits_compared_a_slice_of_positions_at_a_time_report_the_same(monkeypatch, positions):
    """The comparison (and the probe's losses) over slices of ``positions`` positions equal
    the whole batch's, with masked labels and a slice left over at the end."""
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(4))
    labels = tokens.clone()
    labels[0, :5] = -100  # a prompt without loss
    labels[2, 7:] = -100  # padding
    reports = []
    for budget in (1 << 30, 3 * positions * 64 * 4):
        model = _small_model(2)
        adapters = [m for m in model.modules() if isinstance(m, QALoRALinear)]
        monkeypatch.setattr(merge_report, "COMPARE_BUDGET_BYTES", budget)
        reports.append(merge_with_report(model, adapters, {"tokens": tokens, "labels": labels},
                                         torch.device("cpu")))
    whole, slices = reports
    for key in ("max_relative_logit_error", "mean_relative_logit_error", "max_abs_logit_error"):
        assert slices[key] == pytest.approx(whole[key], rel=1e-6), key
    for name in ("unmerged", "merged"):
        assert slices[name]["loss"] == pytest.approx(whole[name]["loss"], rel=1e-6)
    # against a float64 reference of the losses: the labelled next-token predictions
    model = _small_model(2)
    with torch.no_grad():
        logits = model(tokens).double()
    targets, mask = labels[:, 1:], labels[:, 1:] != -100
    reference = torch.nn.functional.cross_entropy(logits[:, :-1][mask], targets[mask], reduction="mean")
    assert whole["unmerged"]["loss"] == pytest.approx(reference.item(), rel=1e-5)
