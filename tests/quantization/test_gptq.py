"""GPTQ on QA-LoRA's grid: RTN without a Hessian, block-size invariant, and lower output
error than RTN on the inputs real layers see."""

from pathlib import Path

import pytest
import torch

from qalora_tune.quantization import dequantize_int4, quantize_rtn, to_torchao_int4
from qalora_tune.quantization.gptq import HessianAccumulator, quantize_gptq

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_without_error_feedback_gptq_is_rtn(bits):
    weight = torch.randn(48, 256)
    expected = quantize_rtn(weight, 32, bits)
    for hessian in (None, torch.eye(256, dtype=torch.float64)):
        got = quantize_gptq(weight, 32, bits, hessian, damp=0.0)
        assert torch.equal(got.qdata, expected.qdata)
        assert torch.equal(got.scale, expected.scale) and torch.equal(got.zero, expected.zero)


def _correlated_inputs(rows=512, in_dim=128, seed=0):
    """Rows of one distribution (a fixed mixing of Gaussians, plus a little noise); the
    seed draws different samples of it."""
    mixing = torch.randn(in_dim, in_dim, generator=torch.Generator().manual_seed(0)) / in_dim**0.5
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(rows, in_dim, generator=generator) @ mixing + 0.1 * torch.randn(
        rows, in_dim, generator=generator
    )


def test_lazy_block_updates_do_not_change_the_result():
    weight = torch.randn(32, 128, dtype=torch.float64)
    accumulator = HessianAccumulator(128)
    accumulator.add(_correlated_inputs())
    hessian = accumulator.matrix()
    column_by_column = quantize_gptq(weight, 32, 3, hessian, block_size=1)
    for block_size in (16, 128):
        blocked = quantize_gptq(weight, 32, 3, hessian, block_size=block_size)
        same = (blocked.qdata == column_by_column.qdata).double().mean().item()
        assert same > 0.999, same  # at most a rounding tie flips
        torch.testing.assert_close(blocked.scale, column_by_column.scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_the_output_error_of_rtn_on_correlated_inputs(bits):
    torch.manual_seed(bits)
    weight = torch.randn(64, 128)
    calibration, held_out = _correlated_inputs(2048, seed=1), _correlated_inputs(2048, seed=2)
    accumulator = HessianAccumulator(128)
    for chunk in calibration.split(100):  # accumulating in pieces is the same sum
        accumulator.add(chunk)
    gq = quantize_gptq(weight, 32, bits, accumulator.matrix())
    assert int(gq.qdata.max()) <= 2**bits - 1

    def error(quantized):
        exact = held_out.double() @ weight.double().t()
        return ((held_out.double() @ quantized.dequantize(torch.float64).t() - exact).norm() / exact.norm()).item()

    assert error(gq) < 0.9 * error(quantize_rtn(weight, 32, bits))
    # stored as int4 codes (narrower grids included), it is the same weight
    assert torch.equal(dequantize_int4(to_torchao_int4(gq), torch.float64), gq.dequantize(torch.float64))


def test_inputs_that_never_fire_and_bad_arguments():
    weight = torch.randn(8, 64)
    inputs = torch.randn(200, 64)
    inputs[:, [5, 9, 40]] = 0.0  # dead inputs: their Hessian rows and columns are zero
    accumulator = HessianAccumulator(64)
    accumulator.add(inputs)
    gq = quantize_gptq(weight, 32, 4, accumulator.matrix())
    assert torch.isfinite(gq.dequantize()).all()
    with pytest.raises(ValueError, match="no calibration inputs"):
        HessianAccumulator(64).matrix()
    with pytest.raises(ValueError, match=r"expected inputs \(\.\.\., 64\)"):
        accumulator.add(torch.randn(3, 32))
    with pytest.raises(ValueError, match=r"hessian must have shape \(64, 64\)"):
        quantize_gptq(weight, 32, 4, torch.eye(32))
    with pytest.raises(ValueError, match="bits=8"):
        quantize_gptq(weight, 32, 8)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_gptq(weight, 48, 4)


@pytest.mark.skipif(
    not (SHARED / "models" / "tinystories656K").is_dir(),
    reason="needs ../shared/models/tinystories656K (a real pretrained checkpoint)",
)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_real_weights_and_activations(bits):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = SHARED / "models" / "tinystories656K"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = (SHARED / "data" / "tinystories_val_a.txt").read_text()[:60000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : 32 * 256].reshape(32, 256)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    inputs = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: inputs[name].append(args[0].detach())
        )
        for name in names
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    for name in names:
        rows = torch.cat(inputs[name]).flatten(0, -2)
        calibration, held_out = rows[: len(rows) // 2], rows[len(rows) // 2 :]
        accumulator = HessianAccumulator(rows.shape[-1])
        accumulator.add(calibration)
        weight = model.get_submodule(name).weight
        exact = held_out.double() @ weight.double().t()

        def error(quantized):
            approx = held_out.double() @ quantized.dequantize(torch.float64).t()
            return ((approx - exact).norm() / exact.norm()).item()

        gptq, rtn = error(quantize_gptq(weight, 32, bits, accumulator.matrix())), error(quantize_rtn(weight, 32, bits))
        assert gptq < 0.97 * rtn, (name, bits, gptq, rtn)
