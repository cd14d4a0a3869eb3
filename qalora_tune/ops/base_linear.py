"""``F.linear`` for the frozen base tensors: each storage class computes through its op.

The base classes live in :mod:`qalora_tune.quantization` (layouts, conversions, the
zero-point view); their linear is registered here, one layer up, because it calls this
package's custom ops, which carry the input gradient torchao's kernels lack:

- :class:`~qalora_tune.quantization.int4_weight.CpuInt4Tensor` and
  :class:`~qalora_tune.quantization.int4_weight.TileInt4Tensor`: ``qalora_tune::int4_linear``;
- :class:`~qalora_tune.quantization.double_quant.DoubleQuantInt4Tensor`:
  ``qalora_tune::int4_dq_linear`` (8-bit scales rebuilt per call);
- :class:`~qalora_tune.quantization.intx_weight.IntxBaseTensor`: ``qalora_tune::intx_linear``.

Both ``torch.nn.functional.linear`` (torch function level, before autograd) and
``aten.linear`` are routed, so ``torch.compile`` sees one opaque op per base matmul.
"""

from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from qalora_tune.ops.int4_dq_linear import int4_dq_linear
from qalora_tune.ops.int4_linear import int4_linear, one_row_int4_linear
from qalora_tune.ops.intx_linear import intx_linear
from qalora_tune.quantization.double_quant import DoubleQuantInt4Tensor
from qalora_tune.quantization.int4_weight import CpuInt4Tensor, TileInt4Tensor
from qalora_tune.quantization.intx_weight import IntxBaseTensor

__all__ = []  # registrations only


def _arguments(args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
    return x, weight, bias


def _register(cls: type, compute: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
    def linear(func, types, args, kwargs):
        x, weight, bias = _arguments(args, kwargs)
        out = compute(x, weight)
        return out if bias is None else out + bias

    cls.implements_torch_function(F.linear)(linear)
    cls.implements(torch.ops.aten.linear.default)(linear)


def _int4(x: torch.Tensor, weight: Any) -> torch.Tensor:
    args = (weight.qdata, weight.scale_and_zero, weight.block_size[1], weight.shape[0])
    out = one_row_int4_linear(x, *args)  # decode: the kernel without the op's dispatch
    return out if out is not None else int4_linear(x, *args)


def _int4_double_quant(x: torch.Tensor, weight: DoubleQuantInt4Tensor) -> torch.Tensor:
    return int4_dq_linear(
        x, weight.qdata, weight.scale_codes, weight.scale_min, weight.scale_step, weight.zero,
        weight.block_size[1], weight.shape[0],
    )


def _intx(x: torch.Tensor, weight: IntxBaseTensor) -> torch.Tensor:
    return intx_linear(x, weight.qdata, weight.scale, weight.zero_point)


_register(CpuInt4Tensor, _int4)
_register(TileInt4Tensor, _int4)
_register(DoubleQuantInt4Tensor, _int4_double_quant)
_register(IntxBaseTensor, _intx)
