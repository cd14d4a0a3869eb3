"""Stream a Hugging Face checkpoint into a torchtune model one tensor at a time."""

import json
from pathlib import Path
from typing import Callable, Dict, List

from torch import nn

from qalora_tune._compat import hf_to_tune, qwen2_hf_to_tune
from qalora_tune.checkpointing._streaming import iter_checkpoint_tensors, load_tensor_stream

__all__ = [
    "HF_MODEL_TYPES",
    "iter_hf_tensors",
    "load_hf_weights",
    "read_hf_config",
]

# torchtune's ModelType names whose HF key layout this module converts
HF_MODEL_TYPES = ("LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "QWEN2")

# safetensors (lazily) or PyTorch ``.bin`` files, one tensor at a time
iter_hf_tensors = iter_checkpoint_tensors


def _key_converter(model_type: str, hf_config: Dict) -> Callable[[Dict], Dict]:
    heads = hf_config["num_attention_heads"]
    kwargs = dict(
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads", heads),
        dim=hf_config["hidden_size"],
        head_dim=hf_config.get("head_dim"),
    )
    if model_type == "QWEN2":
        tied = hf_config.get("tie_word_embeddings", False)
        return lambda sd: qwen2_hf_to_tune(sd, tie_word_embeddings=tied, **kwargs)
    return lambda sd: hf_to_tune(sd, **kwargs)


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
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"checkpointer.model_type={model_type!r} is not supported; use one of {HF_MODEL_TYPES}"
        )
    load_tensor_stream(
        model,
        iter_hf_tensors(paths),
        _key_converter(model_type, hf_config),
        tied=bool(hf_config.get("tie_word_embeddings")),
        checkpoint_format="hf",
    )


def read_hf_config(checkpoint_dir: Path) -> Dict:
    """The checkpoint's ``config.json``."""
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a Hugging Face checkpoint has one)")
    return json.loads(path.read_text())
