"""tinygemm's packed int4 layout (CUDA ``aten._weight_int4pack_mm``) in plain tensor ops.

PyTorch packs a weight for tinygemm with ``aten._convert_weight_to_int4pack``, which has
only a CUDA kernel, and provides no unpack: the usual way back is to multiply the identity
through the int4 GEMM, which costs ``2 * K * K * N`` flops. This module writes the layout
down as reshapes and permutes, so that unpacking costs one pass over the codes on any
device, and so that the layout can be built and tested on CPU.

The layout, for ``inner_k_tiles`` ``T`` (2, 4 or 8), is an int32 tensor
``(N / 8, K / (16 T), 32, T / 2)``. Word ``[n_tile, k_tile, lane, j]`` holds eight 4-bit
codes; its nibble ``p = 4 * lo + 2 * i_hi + i_lo`` (bits ``4p .. 4p + 3``) is the code of

- row ``n = 8 * n_tile + lane // 4``,
- column ``k = 16 T * k_tile + 32 j + 16 i_hi + 8 i_lo + 2 * (lane % 4) + lo``,

which is where the m16n8k16 tensor-core instruction wants the B operand of each lane.
"""

import torch

__all__ = [
    "TINYGEMM_K_TILE",
    "TINYGEMM_N_TILE",
    "pack_tinygemm_int4",
    "unpack_tinygemm_int4",
]

TINYGEMM_N_TILE = 8
TINYGEMM_K_TILE = 16
_LANES = 32
_LANE_ROWS = _LANES // 4

# The 8 nibble axes of one word's bytes, as split below, in the order (lane // 4, lane % 4,
# j, lo, i_hi, i_lo) after (n_tile, k_tile), and the permutation that puts them in (n, k)
# order: n = (n_tile, lane // 4), k = (k_tile, j, i_hi, i_lo, lane % 4, lo).
_TO_ROW_MAJOR = (0, 2, 1, 4, 6, 7, 3, 5)
_FROM_ROW_MAJOR = (0, 2, 1, 6, 3, 7, 4, 5)


def unpack_tinygemm_int4(qdata: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes held by tinygemm-packed int32 words, row-major.

    Args:
        qdata (torch.Tensor): int32 ``(N / 8, K / (16 T), 32, T / 2)``, as made by
            ``aten._convert_weight_to_int4pack`` (or :func:`pack_tinygemm_int4`).

    Returns:
        torch.Tensor: uint8 codes in ``[0, 15]``, shape ``(N, K)``, on ``qdata``'s device.

    Raises:
        ValueError: if ``qdata`` is not a 4D int32 tensor of that shape.
    """
    _check_packed(qdata)
    n_tiles, k_tiles, _, words = qdata.shape
    inner_k_tiles = 2 * words
    # little-endian int32: byte c of a word holds nibbles p = 2c (low) and 2c + 1 (high),
    # and c = 2 * lo + i_hi
    data = qdata.contiguous().view(torch.uint8)
    data = data.view(n_tiles, k_tiles, _LANE_ROWS, 4, words, 2, 2)
    nibbles = torch.stack((data & 0xF, data >> 4), dim=-1)
    return nibbles.permute(_TO_ROW_MAJOR).reshape(
        n_tiles * TINYGEMM_N_TILE, k_tiles * inner_k_tiles * TINYGEMM_K_TILE
    )


def pack_tinygemm_int4(codes: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """Pack row-major 4-bit codes into tinygemm's layout (the inverse of
    :func:`unpack_tinygemm_int4`); bit-identical to ``aten._convert_weight_to_int4pack``
    on the codes' byte pairs ``codes[:, ::2] << 4 | codes[:, 1::2]``.

    Args:
        codes (torch.Tensor): uint8 ``(N, K)`` in ``[0, 15]``, ``N`` a multiple of 8 and
            ``K`` a multiple of ``16 * inner_k_tiles``.
        inner_k_tiles (int): 2, 4 or 8.

    Returns:
        torch.Tensor: int32 ``(N / 8, K / (16 * inner_k_tiles), 32, inner_k_tiles / 2)``.

    Raises:
        ValueError: for other shapes, dtypes or ``inner_k_tiles``.
    """
    if inner_k_tiles not in (2, 4, 8):
        raise ValueError(f"inner_k_tiles must be 2, 4 or 8, got {inner_k_tiles}")
    k_block = TINYGEMM_K_TILE * inner_k_tiles
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(
            f"expected uint8 codes of shape (N, K), got {codes.dtype} {tuple(codes.shape)}"
        )
    n, k = codes.shape
    if n % TINYGEMM_N_TILE or k % k_block:
        raise ValueError(
            f"codes of shape {(n, k)} need N a multiple of {TINYGEMM_N_TILE} and K a "
            f"multiple of {k_block} (16 * inner_k_tiles); pad them first"
        )
    words = inner_k_tiles // 2
    n_tiles, k_tiles = n // TINYGEMM_N_TILE, k // k_block
    nibbles = codes.reshape(n_tiles, _LANE_ROWS, k_tiles, words, 2, 2, 4, 2)
    nibbles = nibbles.permute(_FROM_ROW_MAJOR)
    data = nibbles[..., 0] & 0xF | (nibbles[..., 1] & 0xF) << 4
    data = data.reshape(n_tiles, k_tiles, _LANES, 4 * words)
    return data.view(torch.int32)


def _check_packed(qdata: torch.Tensor) -> None:
    if (
        qdata.dim() != 4
        or qdata.dtype != torch.int32
        or qdata.shape[2] != _LANES
        or qdata.shape[3] not in (1, 2, 4)
    ):
        raise ValueError(
            "expected tinygemm-packed int32 codes of shape (N / 8, K / (16 T), 32, T / 2) "
            f"with T in (2, 4, 8), got {qdata.dtype} {tuple(qdata.shape)}"
        )
