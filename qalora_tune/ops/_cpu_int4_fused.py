"""Compiled kernels that rebuild a chunk of a CPU-packed int4 weight in one pass.

The eager chunk builder in ``_cpu_int4_chunked`` takes six elementwise passes per chunk
(nibble masks and shifts, ``q - 8``, ``* s``, ``+ z``, the rounding to bf16), each a
separate ATen call. Here the same arithmetic is written once as a pure function of the
packed bytes and the chunk's scales and zeros, and inductor fuses it into one loop that
reads each byte once and writes each weight once. The result is bit-identical to the
eager builder: ``(q - 8)`` is formed exactly in fp32, then multiplied by ``s``, added to
``z`` and rounded once to the compute dtype, in that order.

Each kernel is compiled for the exact shapes, strides and dtypes of a chunk (seven for the
three linear shapes of a Llama-2-7B layer, forward and input gradient) and cached for the
process. Compiling takes seconds, so weights under :data:`COMPILED_MIN_ELEMENTS` keep the
eager passes. If inductor cannot compile here (no C++ compiler, say), one warning is
issued and the eager passes are used from then on; ``QALORA_TUNE_EAGER_DEQUANTIZE=1``
selects them from the start.
"""

import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from qalora_tune._compat import inductor_compile

__all__ = ["COMPILED_MIN_ELEMENTS", "columns", "dequantize", "row_blocks", "use_compiled"]

# Weights with fewer values than this keep the eager passes: a kernel costs seconds to
# compile, and small weights are dominated by per-op overhead anyway. 2^22 is 2048 x 2048;
# every linear of a 1B+ model is larger.
COMPILED_MIN_ELEMENTS = 1 << 22

_EAGER_ENV = "QALORA_TUNE_EAGER_DEQUANTIZE"
_kernels: Dict[Tuple, Callable] = {}
_failed = False


def use_compiled(numel: int) -> bool:
    """Whether a weight of ``numel`` values is rebuilt with the compiled kernels."""
    if _failed or os.environ.get(_EAGER_ENV, "0") not in ("", "0"):
        return False
    return numel >= COMPILED_MIN_ELEMENTS


def _nibbles(packed: torch.Tensor, halves: bool) -> torch.Tensor:
    """Codes of ``(..., rows / 2)`` bytes as ``(..., rows)`` uint8 in row order.

    With ``halves``, low nibbles are rows ``[0, rows / 2)`` and high nibbles the rest;
    otherwise byte ``c`` holds rows ``2c`` (low) and ``2c + 1`` (high). One broadcast
    shift by ``[0, 4]`` produces both nibbles, so the compiled loop has no branches.
    """
    shifts = torch.tensor([0, 4], dtype=torch.uint8)
    if halves:
        codes = (packed.unsqueeze(-2) >> shifts.view(2, 1)) & 15  # (..., 2, rows / 2)
    else:
        codes = (packed.unsqueeze(-1) >> shifts) & 15  # (..., rows / 2, 2)
    return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def row_blocks(packed, scale, zero, out, halves: bool) -> None:
    """``W^T`` of whole row blocks, written into ``out``: a kernel body for :func:`dequantize`.

    Args:
        packed (torch.Tensor): ``(blocks, K, rows / 2)`` uint8, the blocks' packed bytes.
        scale (torch.Tensor): ``(blocks, groups, 1, rows)`` fp32.
        zero (torch.Tensor): ``(blocks, groups, 1, rows)`` fp32.
        out (torch.Tensor): ``(blocks, K, rows)`` in the compute dtype.
        halves (bool): the lane layout (low nibbles first half of the rows) or plain pairs.
    """
    blocks, k, half = packed.shape
    groups = scale.shape[1]
    codes = _nibbles(packed.view(blocks, groups, k // groups, half), halves)
    out.view(blocks, groups, k // groups, 2 * half).copy_((codes.float() - 8) * scale + zero)


def columns(packed, scale, zero, out, halves: bool) -> None:
    """``W^T[k0:k1]`` (whole groups, all rows), written into ``out``: a kernel body for
    :func:`dequantize`.

    Args:
        packed (torch.Tensor): ``(blocks, columns, rows / 2)`` uint8: columns ``k0:k1`` of
            every row block (a strided view).
        scale (torch.Tensor): ``(groups, 1, N)`` fp32.
        zero (torch.Tensor): ``(groups, 1, N)`` fp32.
        out (torch.Tensor): ``(columns, N)`` contiguous, in the compute dtype.
        halves (bool): as for :func:`row_blocks`.
    """
    blocks, n_columns, half = packed.shape
    groups = scale.shape[0]
    codes = _nibbles(packed.permute(1, 0, 2), halves)  # (columns, blocks, rows)
    codes = codes.reshape(groups, n_columns // groups, blocks * 2 * half)
    out.view(groups, n_columns // groups, -1).copy_((codes.float() - 8) * scale + zero)


def dequantize(
    body: Callable,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    out: torch.Tensor,
    halves: bool,
) -> bool:
    """Run ``body`` (:func:`row_blocks` or :func:`columns`) compiled for the layout of
    these arguments, compiling it on first use; the arguments are ``body``'s.

    Returns:
        bool: whether ``out`` was written; False, without writing, once a compile has
        failed in this process (the caller then takes the eager passes).
    """
    global _failed
    args = (packed, scale, zero, out)
    key = (body, halves) + tuple((tuple(a.shape), a.stride(), a.dtype) for a in args)
    kernel = _kernels.get(key)
    if kernel is None:
        if _failed:
            return False

        def fn(packed, scale, zero, out):
            body(packed, scale, zero, out, halves)

        try:
            # traced on examples with the inputs' layout but none of their autograd or
            # inference-mode state (an inference tensor cannot be traced as mutated)
            with torch.inference_mode(False), torch.no_grad():
                examples = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype) for a in args]
                kernel = inductor_compile(fn, examples)
        except Exception as error:  # any failure to build leaves the eager path, once
            _failed = True
            first_line = (str(error).splitlines() or [""])[0]
            warnings.warn(
                "qalora-tune could not compile its CPU int4 dequantization kernel "
                f"({type(error).__name__}: {first_line}); using the slower eager path. "
                f"Set {_EAGER_ENV}=1 to skip this attempt.",
                stacklevel=2,
            )
            return False
        _kernels[key] = kernel
    kernel(*args)
    return True


def _reset(failed: Optional[bool] = None) -> None:
    """Forget the compiled kernels (and set the failure flag); for tests."""
    global _failed
    _kernels.clear()
    if failed is not None:
        _failed = failed
