"""Sequential GPTQ of a whole decoder (qalora_tune.quantization.gptq_calibration)."""

import copy
from pathlib import Path

import pytest
import torch

from qalora_tune.models import qalora_tinystories656k
from qalora_tune.modules import QALoRALinear, QuantizedLinear
from qalora_tune.quantization import calibrate_gptq, quantize_rtn
from qalora_tune.quantization.gptq_calibration import (
    load_quantized_base,
    sample_calibration_sequences,
)
from qalora_tune.quantization.int4_weight import (
    from_torchao_int4,
    is_int4_weight,
    zero_points,
)
from qalora_tune.recipe_utils import merge_with_report
from qalora_tune.tiny import qalora_tiny_llama

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()
TINYSTORIES = SHARED / "models" / "tinystories656K"
requires_tinystories = pytest.mark.skipif(
    not TINYSTORIES.is_dir(),
    reason="needs ../shared/models/tinystories656K (a real pretrained checkpoint)",
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens).double()


def _relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


# ------------------------------------------------------------------ random tiny llama


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    full_precision = qalora_tiny_llama.full_precision()  # untied output projection
    for name, param in full_precision.named_parameters():
        if name.endswith("weight") and param.ndim == 2:
            torch.nn.init.normal_(param, std=0.1)
    sequences = [torch.randint(0, 57, (int(n),)) for n in torch.randint(20, 40, (12,))]
    return full_precision, sequences


@pytest.mark.parametrize("bits", [3])  # 4 bits: the tinystories656K tests
def test_every_linear_becomes_int4_on_the_gptq_grid_and_loads(tiny, bits):
    full_precision, sequences = tiny
    quantized = copy.deepcopy(full_precision)
    state = calibrate_gptq(quantized, sequences, group_size=32, bits=bits, batch_size=5)
    linears = [n for n, m in full_precision.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "output" in linears
    for name in linears:
        weight = state[f"{name}.weight"]
        assert is_int4_weight(weight)
        gq = from_torchao_int4(weight)
        per_group = gq.qdata.view(gq.qdata.shape[0], -1, 32).int()
        assert int(per_group.min()) >= 0 and int(per_group.max()) <= 15
        assert int((per_group.amax(-1) - per_group.amin(-1)).max()) <= 2**bits - 1
    model = qalora_tiny_llama(["q_proj", "v_proj"], group_size=32, quantizer="gptq", bits=bits)
    load_quantized_base(model, state)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert {m.quantizer for m in layers} == {"gptq"} and {m.bits for m in layers} == {bits}
    # the int4 model computes what the calibration left in the full-precision model
    tokens = torch.stack([s[:20] for s in sequences[:4]])
    int4, dequantized = _logits(model, tokens), _logits(quantized, tokens)
    assert _relative_error(int4, dequantized) < 1e-5


def test_gptq_model_refuses_full_precision_weights():
    model = qalora_tiny_llama(["q_proj"], group_size=32, quantizer="gptq")
    with pytest.raises(ValueError, match="model.quantizer=gptq needs calibration data"):
        model.load_state_dict({"layers.0.attn.k_proj.weight": torch.randn(128, 128)}, strict=False)


def test_unknown_quantizer_names_the_setting():
    with pytest.raises(ValueError, match=r"model.quantizer='nf4' .* rtn, hqq, gptq"):
        qalora_tiny_llama(["q_proj"], group_size=32, quantizer="nf4")


def test_sample_calibration_sequences_is_reproducible_and_checked():
    dataset = [{"tokens": list(range(i, i + 10))} for i in range(20)]
    first = sample_calibration_sequences(dataset, 5, max_seq_len=4, seed=3)
    assert [s.tolist() for s in first] == [
        s.tolist() for s in sample_calibration_sequences(dataset, 5, max_seq_len=4, seed=3)
    ]
    assert len(first) == 5 and all(s.numel() == 4 for s in first)
    assert len(sample_calibration_sequences(dataset, 100)) == 20
    with pytest.raises(ValueError, match="calibration.num_samples"):
        sample_calibration_sequences(dataset, 0)
    with pytest.raises(ValueError, match="calibration.max_seq_len"):
        sample_calibration_sequences(dataset, 5, max_seq_len=0)


# ------------------------------------------------------------------ tinystories656K


@pytest.fixture(scope="module")
def tinystories():
    from qalora_tune.checkpointing import QALoRACheckpointer
    from qalora_tune.data import text_tokenizer

    checkpointer = QALoRACheckpointer(str(TINYSTORIES), "LLAMA2", "/tmp/unused")
    tokenizer = text_tokenizer(str(TINYSTORIES / "tokenizer.json"), prepend_space=False)
    text = (SHARED / "data" / "tinystories_val_a.txt").read_text()[:80000]
    ids = torch.tensor(tokenizer.encode(text, add_bos=False, add_eos=False))
    blocks = ids[: 40 * 128].view(40, 128)
    calibration, held_out = list(blocks[:32]), blocks[32:]
    full_precision = qalora_tinystories656k.full_precision()
    checkpointer.load_base(full_precision)
    exact = _logits(full_precision, held_out)
    state = calibrate_gptq(full_precision, calibration, group_size=32, bits=4)
    return checkpointer, state, held_out, exact


@requires_tinystories
def test_sequential_gptq_beats_rtn_on_held_out_logits(tinystories):
    checkpointer, state, held_out, exact = tinystories
    gptq = qalora_tinystories656k([], group_size=32, quantizer="gptq")
    load_quantized_base(gptq, state)
    rtn = qalora_tinystories656k([], group_size=32, quantizer="rtn")
    checkpointer.load_base(rtn)
    gptq_error = _relative_error(_logits(gptq, held_out), exact)
    rtn_error = _relative_error(_logits(rtn, held_out), exact)
    print(f"held-out logits relative error: GPTQ {gptq_error:.4f}, RTN {rtn_error:.4f}")
    assert gptq_error < rtn_error, (gptq_error, rtn_error)


@requires_tinystories
def test_gptq_base_uses_float_zeros_and_merges_exactly(tinystories):
    checkpointer, state, held_out, _ = tinystories
    name = "layers.1.mlp.w2"
    gq = from_torchao_int4(state[f"{name}.weight"])
    rtn = quantize_rtn(checkpointer_weight(checkpointer, name), 32, 4)
    assert not torch.equal(gq.qdata, rtn.qdata)  # the error feedback moved codes
    offsets = gq.zero / gq.scale  # float zero points: not an integer number of steps
    assert (offsets - offsets.round()).abs().max() > 1e-2

    model = qalora_tinystories656k(ATTENTION, apply_lora_to_mlp=True, group_size=32, lora_rank=4, quantizer="gptq")
    load_quantized_base(model, state)
    torch.manual_seed(0)
    adapters = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    for layer in adapters:
        torch.nn.init.normal_(layer.lora_b.weight, std=0.05)
    zeros = [zero_points(layer.weight).clone() for layer in adapters]
    report = merge_with_report(model, adapters, {"tokens": held_out[:4]}, torch.device("cpu"))
    assert report["max_relative_logit_error"] < 1e-4, report
    for layer, before in zip(adapters, zeros):
        layer.unmerge()
        assert torch.equal(zero_points(layer.weight), before)


def checkpointer_weight(checkpointer, name):
    model = qalora_tinystories656k.full_precision()
    checkpointer.load_base(model)
    return model.get_submodule(name).weight.detach()
