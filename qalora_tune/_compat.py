"""Every private or version-sensitive torchao / torchtune import lives here.

qalora-tune is pinned to torchao 0.15 and torchtune 0.6.1 (see ``pyproject.toml``).
When either moves, this is the one file to update.
"""

from torchao.prototype.int4_opaque_tensor import Int4OpaqueTensor
from torchao.quantization import Int4TilePackedTo4dTensor
from torchao.quantization.quant_primitives import (
    MappingType,
    _choose_qparams_affine_tinygemm as choose_qparams_tinygemm,
    _choose_qparams_and_quantize_affine_hqq as choose_qparams_and_quantize_hqq,
    _quantize_affine_tinygemm as quantize_tinygemm,
)
from torchao.quantization.utils import (
    pack_tinygemm_scales_and_zeros,
    unpack_tinygemm_scales_and_zeros,
)
from torchtune.modules.peft import AdapterModule

__all__ = [
    "AdapterModule",
    "Int4OpaqueTensor",
    "Int4TilePackedTo4dTensor",
    "MappingType",
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
