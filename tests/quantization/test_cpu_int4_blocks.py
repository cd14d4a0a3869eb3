"""Block-wise CPU int4 builders: bit-identical to the whole-weight path they replace."""

import pytest
import torch
import torch.nn.functional as F

import qalora_tune.quantization.cpu_int4_blocks as blocks
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.cpu_int4_blocks import (
    plain_int4_to_cpu_int4,
    quantize_rtn_to_cpu_int4,
)
from qalora_tune.quantization.int4_weight import CpuInt4Tensor, from_torchao_int4, to_torchao_int4
from qalora_tune.quantization.plain_int4 import from_plain_int4, to_plain_int4
from qalora_tune.quantization.group_quant import GroupQuantizedWeight

CASES = [  # rows, columns, group size, bits, dtype, padded columns
    (200, 256, 64, 4, torch.bfloat16, None),  # several blocks, rows padded to 208
    (130, 160, 32, 2, torch.float32, 192),  # pad_in_dim layer
    (37, 256, 128, 3, torch.bfloat16, None),
    (96, 512, 256, 4, torch.float16, None),
]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 64 rows, so every case crosses block boundaries."""
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 1)


def _weight(rows, columns, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    weight[0, :8] = 0.0  # a constant group: the smallest scale
    weight[1] *= 50  # an outlier row
    return weight.to(dtype)


@pytest.mark.parametrize("rows, columns, group_size, bits, dtype, padded", CASES)
def test_blockwise_rtn_equals_quantize_then_pack(rows, columns, group_size, bits, dtype, padded):
    weight = _weight(rows, columns, dtype, seed=rows)
    expected = to_torchao_int4(
        quantize_rtn(F.pad(weight, (0, (padded or columns) - columns)), group_size, bits),
        device="cpu", dtype=dtype,
    )
    built = quantize_rtn_to_cpu_int4(weight, group_size, bits, dtype, padded)
    assert type(built) is CpuInt4Tensor is type(expected)  # the training storage, not torchao's
    assert built.shape == expected.shape and built.block_size == expected.block_size
    assert torch.equal(built.qdata, expected.qdata)
    assert torch.equal(built.scale_and_zero, expected.scale_and_zero)


@pytest.mark.parametrize("rows, columns, group_size, bits, dtype, padded", CASES)
def test_blockwise_repacking_of_a_plain_int4_tensor_equals_unpack_then_pack(
    rows, columns, group_size, bits, dtype, padded
):
    gq = from_torchao_int4(quantize_rtn_to_cpu_int4(
        _weight(rows, columns, dtype, seed=rows + 1), group_size, bits, dtype, padded))
    plain = to_plain_int4(gq, in_features=columns)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(2))
    whole = from_plain_int4(plain, padded)
    whole = GroupQuantizedWeight(whole.qdata[order], whole.scale[order], whole.zero[order],
                                 whole.group_size, whole.bits)
    expected = to_torchao_int4(whole, device="cpu", dtype=dtype)
    built = plain_int4_to_cpu_int4(plain, dtype, order, padded)
    assert built.shape == expected.shape
    assert torch.equal(built.qdata, expected.qdata)
    assert torch.equal(built.scale_and_zero, expected.scale_and_zero)


@pytest.mark.parametrize("rows, columns, group_size, bits, dtype, padded", CASES)
@pytest.mark.parametrize("order", ["identity", "heads", "random"])
def test_blockwise_export_to_plain_int4_equals_unpack_then_repack(
    rows, columns, group_size, bits, dtype, padded, order
):
    packed = quantize_rtn_to_cpu_int4(_weight(rows, columns, dtype, seed=rows + 2), group_size,
                                      bits, dtype, padded)
    generator = torch.Generator().manual_seed(3)
    if order == "identity":
        index = torch.arange(rows)
    elif order == "random":
        index = torch.randperm(rows, generator=generator)
    else:  # what the RoPE layouts do: rows swapped inside heads of 8
        index = torch.arange(rows).view(-1, 1)
        index = torch.cat([torch.arange(h, min(h + 8, rows)).flip(0) for h in range(0, rows, 8)])
    gq = from_torchao_int4(packed)
    gq = GroupQuantizedWeight(gq.qdata[index], gq.scale[index], gq.zero[index], gq.group_size, gq.bits)
    expected = to_plain_int4(gq, in_features=columns)
    built = blocks.cpu_int4_to_plain_int4(packed, index, in_features=columns)
    assert built.shape == expected.shape and list(built.block_size) == list(expected.block_size)
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(built, name), getattr(expected, name)), name
