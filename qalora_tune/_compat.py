"""Every private or version-sensitive torchao / torchtune / torch import lives here.

qalora-tune is pinned to torchao 0.15 and torchtune 0.6.1 (see ``pyproject.toml``).
When either moves, this is the one file to update.
"""

import importlib.util
import sys
from pathlib import Path

import torch
import torchtune
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

from qalora_tune.errors import UserValueError

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


def read_torchao_safetensors_tensor(handle, metadata, name: str) -> torch.Tensor:
    """One tensor of a safetensors file written by ``flatten_tensor_state_dict``: a plain
    tensor, or a torchao subclass rebuilt from its inner tensors (stored as
    ``{module}._{param}_{inner}`` and described by the JSON metadata entry ``name``), read
    one at a time instead of the whole file as ``unflatten_tensor_state_dict`` does. Knows
    torchao 0.15's layout of that file, hence its place here."""
    import json

    info = json.loads(metadata[name])
    if info.get("_type") == "Tensor":
        return handle.get_tensor(name)
    module, param = name.rsplit(".", 1)
    parts = {
        f"{module}._{param}_{part}": handle.get_tensor(f"{module}._{param}_{part}")
        for part in info["_tensor_data_names"]
    }
    one = {name: metadata[name], "tensor_names": json.dumps([name])}
    return unflatten_tensor_state_dict(parts, one)[0][name]


__all__ += ["read_torchao_safetensors_tensor"]

# the dequantizing base for 8-bit codes and group sizes the int4 kernels lack, and its
# transformers TorchAoConfig entry
from torchao.quantization import (  # noqa: E402  # noqa: E402
    Int4Tensor,
    Int4WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    PerGroup,
)
from torchao.quantization.quantize_.workflows.int4.int4_packing_format import (  # noqa: E402
    Int4PackingFormat,
)

__all__ += [
    "Int4PackingFormat",
    "Int4Tensor",
    "Int4WeightOnlyConfig",
    "IntxUnpackedToInt8Tensor",
    "IntxWeightOnlyConfig",
    "PerGroup",
    "config_to_dict",
    "flatten_tensor_state_dict",
    "inductor_compile",
    "unflatten_tensor_state_dict",
]


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


# PyTorch's private int4 kernels and their packing ops (aten ops with a leading
# underscore: no stability promise across releases)


def cpu_int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` with the CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)


def cpu_int4pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack int32 codes ``(N, K)`` for the CPU kernel (``aten._convert_weight_to_int4pack_for_cpu``)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


def tinygemm_int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` with tinygemm on CUDA (``aten._weight_int4pack_mm``)."""
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_and_zero)


def tinygemm_int4pack(pairs: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Pack byte pairs ``(N, K / 2)`` for tinygemm on CUDA (``aten._convert_weight_to_int4pack``)."""
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)


# segments torch inserts into module names: activation checkpointing's wrapper
# (torch.distributed.algorithms._checkpoint) and torch.compile's OptimizedModule
WRAPPER_NAME_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")

__all__ += [
    "WRAPPER_NAME_SEGMENTS",
    "cpu_int4pack",
    "cpu_int4pack_mm",
    "tinygemm_int4pack",
    "tinygemm_int4pack_mm",
]


# torchtune's lm-eval model wrapper, private to a recipe file that is not importable


def torchtune_eleuther_wrapper() -> type:
    """torchtune 0.6.1's lm-eval model wrapper for text decoders, ``_LLMEvalWrapper``.

    It is private to torchtune's ``eleuther_eval`` recipe, a file beside the installed
    package that is not importable as a module (``recipes/__init__.py`` refuses): load
    it from where ``tune run eleuther_eval`` finds it. It imports lm_eval at the top, so
    call this only once lm_eval is known to be installed.
    """
    name = "_qalora_eval_torchtune_eleuther_eval"
    if name not in sys.modules:
        path = Path(torchtune.__file__).parent.parent / "recipes" / "eleuther_eval.py"
        if not path.is_file():
            raise UserValueError(
                f"torchtune's eleuther_eval recipe is not at {path}; reinstall torchtune==0.6.1 "
                "or set lm_eval=null"
            )
        # the file annotates with PIL.Image after a bare `import PIL`
        import PIL.Image  # noqa: F401

        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]._LLMEvalWrapper


__all__ += ["torchtune_eleuther_wrapper"]
