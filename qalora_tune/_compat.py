"""Every private or version-sensitive torchao / torchtune / torch import lives here.

qalora-tune is pinned to torchao 0.15 and torchtune 0.6.1 (see ``pyproject.toml``).
When either moves, this is the one file to update.
"""

import torch
from torchao.prototype.int4_opaque_tensor import Int4OpaqueTensor
from torchao.quantization import Int4TilePackedTo4dTensor
from torchao.quantization.quant_primitives import (
    MappingType,
)
from torchao.quantization.quant_primitives import (
    _choose_qparams_affine_tinygemm as choose_qparams_tinygemm,
)
from torchao.quantization.quant_primitives import (
    _choose_qparams_and_quantize_affine_hqq as choose_qparams_and_quantize_hqq,
)
from torchao.quantization.quant_primitives import (
    _quantize_affine_tinygemm as quantize_tinygemm,
)
from torchao.quantization.utils import (
    pack_tinygemm_scales_and_zeros,
    unpack_tinygemm_scales_and_zeros,
)
from torchao.utils import TorchAOBaseTensor
from torchtune.modules.peft import AdapterModule

__all__ = [
    "AdapterModule",
    "Int4OpaqueTensor",
    "Int4TilePackedTo4dTensor",
    "MappingType",
    "TorchAOBaseTensor",
    "choose_qparams_and_quantize_hqq",
    "choose_qparams_tinygemm",
    "pack_tinygemm_scales_and_zeros",
    "quantize_tinygemm",
    "unpack_tinygemm_scales_and_zeros",
]

# checkpoint key conversion (torchtune <-> Hugging Face, torchtune <-> Meta)
from torchtune.models.convert_weights import (  # noqa: E402
    hf_to_tune,
    meta_to_tune,
    tune_to_hf,
    tune_to_meta,
)
from torchtune.models.qwen2._convert_weights import (  # noqa: E402
    qwen2_hf_to_tune,
    qwen2_tune_to_hf,
)

__all__ += [
    "hf_to_tune",
    "meta_to_tune",
    "qwen2_hf_to_tune",
    "qwen2_tune_to_hf",
    "tune_to_hf",
    "tune_to_meta",
]

# dotted-path lookup of config components
from torchtune.config._utils import _get_component_from_path as get_component_from_path  # noqa: E402

__all__ += ["get_component_from_path"]

# torchao's plain int4 layout and its safetensors serialization (what transformers'
# TorchAoConfig checkpoints hold)
from torchao.core.config import config_to_dict  # noqa: E402
from torchao.prototype.safetensors.safetensors_support import (  # noqa: E402
    flatten_tensor_state_dict,
    unflatten_tensor_state_dict,
)

# the dequantizing base for 8-bit codes and group sizes the int4 kernels lack, and its
# transformers TorchAoConfig entry
from torchao.quantization import (  # noqa: E402  # noqa: E402
    Int4Tensor,
    Int4WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    PerGroup,
)

__all__ += [
    "Int4Tensor",
    "Int4WeightOnlyConfig",
    "IntxUnpackedToInt8Tensor",
    "IntxWeightOnlyConfig",
    "PerGroup",
    "config_to_dict",
    "flatten_tensor_state_dict",
    "inductor_compile",
    "override_torchao_linear",
    "unflatten_tensor_state_dict",
]


def override_torchao_linear(cls, implementation) -> None:
    """Route ``F.linear`` / ``aten.linear`` on torchao subclass ``cls`` to ``implementation``.

    ``implementation(original, func, types, args, kwargs)`` receives torchao's own handler
    as ``original`` so that it can defer to it. Uses torchao's private dispatch tables
    (``_TORCH_FN_TABLE`` / ``_ATEN_OP_TABLE``), hence its place here.
    """
    import functools

    tables = (
        (cls._TORCH_FN_TABLE[cls], torch.nn.functional.linear),
        (cls._ATEN_OP_TABLE[cls], torch.ops.aten.linear.default),
    )
    for table, op in tables:
        original = table.get(op)
        if original is None or getattr(original, "_qalora_override", False):
            continue
        handler = functools.partial(implementation, original)
        handler._qalora_override = True
        table[op] = handler


def inductor_compile(fn, example_inputs):
    """``fn`` traced to an FX graph and compiled by inductor for these exact inputs.

    Unlike ``torch.compile``, the result has no dynamo guards and no recompile limit: it
    is one kernel for the inputs' shapes, strides and dtypes (checked when it runs), which
    the caller caches. ``fn`` may write its result into an input with ``copy_``. Uses
    ``torch._inductor.compile``, a private entry point, hence its place here.
    """
    from torch._inductor import compile as compile_graph
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(fn)(*example_inputs)
    return compile_graph(graph, list(example_inputs))

