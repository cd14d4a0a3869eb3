import pytest
import torch

from qalora_tune.quantization.tinygemm_layout import (
    pack_tinygemm_int4,
    unpack_tinygemm_int4,
)
from tests.reference import CUDA_SKIP_REASON, requires_cuda


def _pytorch_cuda_packing(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """PyTorch's ``_convert_weight_to_int4pack`` CUDA kernel (aten/src/ATen/native/cuda/
    int4mm.cu, NVIDIA branch), one lane and one int32 word at a time, as scalar loops."""
    n, k = codes.shape
    pairs = (codes[:, ::2].int() << 4 | codes[:, 1::2].int()).tolist()  # [n][k / 2] bytes
    k_tiles = k // (16 * inner_k_tiles)
    words = torch.zeros(n // 8, k_tiles, 32, inner_k_tiles // 2, dtype=torch.int64)
    for n_tile in range(n // 8):
        for k_outer in range(k_tiles):
            for lane in range(32):
                for inner in range(0, inner_k_tiles, 2):
                    row = pairs[n_tile * 8 + lane // 4]
                    base = (k_outer * inner_k_tiles + inner) * 8
                    first = base + lane % 4
                    v = [row[first], row[first + 4], row[first + 8], row[first + 12]]
                    word = 0
                    for i in range(4):
                        word |= (v[i] & 0xF) << (16 + 4 * i)  # low nibbles: bits 16..31
                        word |= (v[i] >> 4) << (4 * i)  # high nibbles: bits 0..15
                    words[n_tile, k_outer, lane, inner // 2] = word
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
@pytest.mark.parametrize("n,k", [(8, 128), (24, 256)])
def test_pack_matches_pytorch_cuda_packing(inner_k_tiles, n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_tinygemm_int4(codes, inner_k_tiles)
    assert packed.shape == (n // 8, k // (16 * inner_k_tiles), 32, inner_k_tiles // 2)
    assert torch.equal(packed, _pytorch_cuda_packing(codes, inner_k_tiles))


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
@pytest.mark.parametrize("n,k", [(8, 128), (40, 1024), (96, 2048)])
def test_unpack_inverts_pack(inner_k_tiles, n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    assert torch.equal(unpack_tinygemm_int4(pack_tinygemm_int4(codes, inner_k_tiles)), codes)


def test_every_position_is_recovered():
    # each code at its own position: distinct 4-bit digits of the flat index, one per pass
    n, k = 16, 256
    index = torch.arange(n * k).view(n, k)
    for digit in range(4):
        codes = ((index >> (4 * digit)) & 0xF).to(torch.uint8)
        assert torch.equal(unpack_tinygemm_int4(pack_tinygemm_int4(codes)), codes)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_tinygemm_int4(torch.zeros(12, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_tinygemm_int4(torch.zeros(8, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="inner_k_tiles must be 2, 4 or 8"):
        pack_tinygemm_int4(torch.zeros(8, 128, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="expected uint8 codes"):
        pack_tinygemm_int4(torch.zeros(8, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="tinygemm-packed int32"):
        unpack_tinygemm_int4(torch.zeros(8, 64, dtype=torch.uint8))


@pytest.mark.skipif(not requires_cuda, reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_cuda_packing_op_agrees(inner_k_tiles):
    codes = torch.randint(0, 16, (40, 2048), dtype=torch.uint8, device="cuda")
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    assert torch.equal(packed, pack_tinygemm_int4(codes, inner_k_tiles))
    assert torch.equal(unpack_tinygemm_int4(packed), codes)
