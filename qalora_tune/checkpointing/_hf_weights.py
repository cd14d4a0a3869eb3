"""Stream a Hugging Face checkpoint into a torchtune model one tensor at a time."""

from pathlib import Path
from typing import Dict, List

from torch import nn

from qalora_tune._files import read_json
from qalora_tune.checkpointing._hf_keys import HF_MODEL_TYPES, HFKeyMap
from qalora_tune.checkpointing._streaming import (
    iter_checkpoint_tensors,
    load_tensor_stream,
)
from qalora_tune.errors import UserFileNotFoundError

__all__ = [
    "HF_MODEL_TYPES",
    "iter_hf_tensors",
    "load_hf_weights",
    "read_hf_config",
]

# safetensors (lazily) or PyTorch ``.bin`` files, one tensor at a time
iter_hf_tensors = iter_checkpoint_tensors


def load_hf_weights(
    model: nn.Module, paths: List[Path], model_type: str, hf_config: Dict
) -> None:
    """Load Hugging Face weights into a torchtune model, one tensor at a time.

    Each tensor is renamed (and, for attention, permuted) to torchtune's layout and loaded
    on its own, so int4 layers quantize it on arrival: peak memory stays about one
    full-precision tensor above the quantized model.

    Raises:
        ValueError: if ``model_type`` is unknown, the checkpoint lacks weights the model
            needs, holds weights it does not have, or a shape does not match.
    """
    load_tensor_stream(
        model,
        iter_hf_tensors(paths),
        HFKeyMap(model_type, hf_config).to_tune,
        tied=bool(hf_config.get("tie_word_embeddings")),
        checkpoint_format="hf",
        total_bytes=sum(p.stat().st_size for p in paths),
    )


def read_hf_config(checkpoint_dir: Path) -> Dict:
    """The checkpoint's ``config.json``."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise UserFileNotFoundError(f"{path} not found (a Hugging Face checkpoint has one)")
    return read_json(path, "the checkpoint's config", "use the config.json that came with the weights")
