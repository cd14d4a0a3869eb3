"""GPTQ on QA-LoRA's grid: RTN without a Hessian, block-size invariant, and lower output
error than RTN on the inputs real layers see."""

from pathlib import Path

import pytest
import torch

from qalora_tune.quantization import calibrate_gptq, quantize_rtn, to_base
from qalora_tune.quantization.base_weight import from_torchao_base
from qalora_tune.quantization.gptq import HessianAccumulator, quantize_gptq
from qalora_tune.quantization.gptq_calibration import load_quantized_base
from qalora_tune.quantization.int4_weight import dequantize_int4, to_torchao_int4
from qalora_tune.quantization.intx_weight import is_intx_weight

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()


@pytest.mark.parametrize("group_size", [32, 8])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_without_error_feedback_gptq_is_rtn(bits, group_size):
    weight = torch.randn(48, 256)
    expected = quantize_rtn(weight, group_size, bits)
    for hessian in (None, torch.eye(256, dtype=torch.float64)):
        got = quantize_gptq(weight, group_size, bits, hessian, damp=0.0)
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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
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
    if bits <= 4:
        # stored as int4 codes (narrower grids included), it is the same weight
        assert torch.equal(dequantize_int4(to_torchao_int4(gq), torch.float64), gq.dequantize(torch.float64))
    else:
        # 8 bits: the intx base, same codes and scales, zeros within two fp32 roundings
        stored = to_base(gq)
        assert is_intx_weight(stored)
        back = from_torchao_base(stored)
        assert torch.equal(back.qdata, gq.qdata) and torch.equal(back.scale, gq.scale)
        assert ((back.zero - gq.zero).abs() <= 2 * 2.0**-24 * gq.zero.abs()).all()


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
    with pytest.raises(ValueError, match="bits=5"):
        quantize_gptq(weight, 32, 5)
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


@pytest.mark.parametrize("bits", [8])  # 4 bits at group 8 takes the same intx path
def test_calibrate_gptq_with_group_size_8_gives_intx_weights_that_load(bits):
    import copy

    from qalora_tune.modules import QuantizedLinear
    from qalora_tune.tiny import qalora_tiny_llama

    torch.manual_seed(bits)
    full_precision = qalora_tiny_llama.full_precision()
    for name, param in full_precision.named_parameters():
        if name.endswith("weight") and param.ndim == 2:
            torch.nn.init.normal_(param, std=0.1)
    sequences = [torch.randint(0, 57, (int(n),)) for n in torch.randint(12, 24, (6,))]
    quantized = copy.deepcopy(full_precision)
    state = calibrate_gptq(quantized, sequences, group_size=8, bits=bits, batch_size=3)
    linears = [n for n, m in full_precision.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in linears:
        weight = state[f"{name}.weight"]
        assert is_intx_weight(weight), name
        assert tuple(weight.block_size) == (1, 8) and weight.target_dtype == getattr(torch, f"int{bits}")
    model = qalora_tiny_llama(["q_proj", "v_proj"], group_size=8, quantizer="gptq", bits=bits)
    load_quantized_base(model, state)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(linears) and {m.bits for m in layers} == {bits}
    assert all(is_intx_weight(m.weight) for m in layers)
    tokens = torch.stack([s[:12] for s in sequences[:3]])
    model.eval()
    quantized.eval()
    with torch.no_grad():
        intx, dequantized = model(tokens).double(), quantized(tokens).double()
    assert ((intx - dequantized).norm() / dequantized.norm()).item() < 1e-5
