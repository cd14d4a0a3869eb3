"""What only real model shapes exposed: Llama 3's scaled RoPE built after the meta-device
build, the tied output as one 2D product, ``num_layers``, and the all-zero placeholders
the builder creates instead of quantizing random weights."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import TiedLinear

from qalora_tune.models import qalora_llama2_7b, qalora_transformer
from qalora_tune.modules import FoldedTiedLinear, QALoRALinear, QuantizedLinear
from qalora_tune.quantization.base_weight import dequantize_base, from_torchao_base, zero_base

SMALL_LLAMA3_2 = dict(
    vocab_size=96, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64,
    max_seq_len=128, intermediate_dim=128, scale_factor=32,
)


def _small_llama3_2(**kwargs):
    return qalora_transformer(
        partial(llama3_2, **SMALL_LLAMA3_2), ["q_proj", "v_proj"], apply_lora_to_mlp=True,
        lora_rank=2, lora_alpha=4.0, group_size=32, **kwargs,
    )


def test_llama3_scaled_rope_is_built_on_the_device():
    torch.manual_seed(0)
    model = _small_llama3_2()
    rope = model.layers[0].attn.pos_embeddings
    assert rope.is_cache_built and rope.cache.device.type == "cpu"
    # the cache a Llama3ScaledRoPE built directly on the CPU holds
    reference = type(rope)(dim=rope.dim, max_seq_len=rope.max_seq_len, base=rope.base,
                           scale_factor=rope.scale_factor)
    assert torch.equal(rope.cache, reference.cache)
    logits = model(torch.randint(0, 96, (2, 8)))
    assert logits.shape == (2, 8, 96) and torch.isfinite(logits).all()


def test_num_layers_keeps_the_first_layers_and_refuses_out_of_range():
    model = _small_llama3_2(num_layers=2)
    assert len(model.layers) == 2
    for bad in (0, 4, 1.5):
        with pytest.raises(ValueError, match=r"model.num_layers=.* must be an integer from 1 to 3"):
            _small_llama3_2(num_layers=bad)


def test_num_layers_on_a_real_width_builder_on_meta():
    with torch.device("meta"):
        model = qalora_llama2_7b(["q_proj"], num_layers=2)
    assert len(model.layers) == 2
    assert model.layers[1].attn.q_proj.in_dim == 4096


def test_the_tied_output_is_folded_and_equals_torchtunes():
    torch.manual_seed(1)
    model = _small_llama3_2()
    assert isinstance(model.output, FoldedTiedLinear)
    hidden = torch.randn(3, 10, 64)
    chunk = hidden.chunk(5, dim=1)[1]  # what chunked_output passes: not contiguous
    assert not chunk.is_contiguous()
    folded = model.output(chunk)
    # the 2D product of the contiguous input, bit for bit; torchtune's batched path sums
    # in another order, so only to rounding
    assert torch.equal(folded, F.linear(chunk.contiguous(), model.tok_embeddings.weight))
    torch.testing.assert_close(folded, TiedLinear(model.tok_embeddings)(chunk))


@pytest.mark.parametrize(
    "bits, group_size, double_quant",
    [(4, 32, False), (4, 64, True), (2, 32, False), (8, 32, False), (4, 16, False)],
)
def test_zero_base_dequantizes_to_zero(bits, group_size, double_quant):
    weight = zero_base(48, 128, group_size, bits, "cpu", torch.bfloat16, double_quant)
    assert torch.count_nonzero(dequantize_base(weight, torch.float32)) == 0
    gq = from_torchao_base(weight)
    assert torch.count_nonzero(gq.scale) == 0 and torch.count_nonzero(gq.zero) == 0
    # the same subclass and inner shapes as a quantized base
    layer = QuantizedLinear(128, 48, group_size=group_size, bits=bits, dtype=torch.bfloat16,
                       double_quant_scales=double_quant)
    assert type(weight) is type(layer.weight)
    names, _ = weight.__tensor_flatten__()
    for name in names:
        assert getattr(weight, name).shape == getattr(layer.weight, name).shape, name


def test_the_builder_starts_from_zero_bases_and_initialised_adapters():
    torch.manual_seed(2)
    model = _small_llama3_2()
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(torch.count_nonzero(dequantize_base(m.weight)) == 0 for m in layers)
    adapters = [m for m in layers if isinstance(m, QALoRALinear)]
    assert adapters and all(torch.count_nonzero(m.lora_a.weight) > 0 for m in adapters)
    assert all(torch.count_nonzero(m.lora_b.weight) == 0 for m in adapters)
