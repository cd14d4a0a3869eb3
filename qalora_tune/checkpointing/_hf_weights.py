"""Stream a Hugging Face checkpoint into a torchtune model one tensor at a time."""

import json
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from torch import nn

from qalora_tune._compat import hf_to_tune, qwen2_hf_to_tune

__all__ = [
    "HF_MODEL_TYPES",
    "find_checkpoint_files",
    "iter_hf_tensors",
    "load_hf_weights",
    "read_hf_config",
]

# torchtune's ModelType names whose HF key layout this module converts
HF_MODEL_TYPES = ("LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "QWEN2")


def find_checkpoint_files(checkpoint_dir: Path, checkpoint_files: Optional[List[str]]) -> List[Path]:
    """The weight files to read: the given ones, or the directory's safetensors/bin files.

    Raises:
        FileNotFoundError: if a named file is missing or the directory has no weights.
    """
    if checkpoint_files:
        paths = [checkpoint_dir / name for name in checkpoint_files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint files not found: {', '.join(missing)}")
        return paths
    for pattern in ("*.safetensors", "*.bin"):
        paths = sorted(p for p in checkpoint_dir.glob(pattern) if "adapter" not in p.name)
        if paths:
            return paths
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {checkpoint_dir}")


def iter_hf_tensors(paths: List[Path]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` from safetensors (lazily) or PyTorch ``.bin`` files."""
    for path in paths:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            for key in list(state):
                yield key, state.pop(key)


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
    convert = _key_converter(model_type, hf_config)
    expected = {
        key
        for key in model.state_dict()
        if "lora_" not in key
    }
    tied = bool(hf_config.get("tie_word_embeddings"))
    tied_keys = ("tok_embeddings.weight", "output.weight")
    loaded, unexpected = set(), []
    tied_value: Optional[torch.Tensor] = None
    for hf_key, tensor in iter_hf_tensors(paths):
        try:
            converted = convert({hf_key: tensor})
        except Exception:  # torchtune raises a bare Exception for keys it cannot map
            unexpected.append(hf_key)
            continue
        for key, value in converted.items():
            if tied and key in tied_keys:
                tied_value = value  # checkpoints store either copy of tied weights
            if key not in expected:
                if not (tied and key in tied_keys):
                    unexpected.append(key)
                continue
            _load_one(model, key, value)
            loaded.add(key)
    missing = expected - loaded
    for key in tied_keys:
        if key in missing and tied_value is not None:
            _load_one(model, key, tied_value)
            missing.discard(key)
    if unexpected:
        raise ValueError(
            f"the checkpoint holds weights this model does not have (e.g. {sorted(unexpected)[:3]}); "
            "check that model and checkpointer.model_type match the checkpoint"
        )
    if missing:
        raise ValueError(
            f"the checkpoint lacks weights the model needs (e.g. {sorted(missing)[:3]}); "
            "check that model matches the checkpoint and that every checkpoint file is listed"
        )


def _load_one(model: nn.Module, key: str, value: torch.Tensor) -> None:
    try:
        model.load_state_dict({key: value}, strict=False)
    except RuntimeError as error:
        if "size mismatch" in str(error):
            raise ValueError(
                f"{key}: checkpoint shape {tuple(value.shape)} does not match the model; "
                "check that the model builder matches the checkpoint"
            ) from None
        raise


def read_hf_config(checkpoint_dir: Path) -> Dict:
    """The checkpoint's ``config.json``."""
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a Hugging Face checkpoint has one)")
    return json.loads(path.read_text())
