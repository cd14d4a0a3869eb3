"""Key names and row orders between torchtune and Hugging Face checkpoints.

torchtune's converters rename keys and, for the attention ``q_proj`` / ``k_proj`` weights,
reorder rows (the two RoPE layouts). Dense tensors go through them as they are. A
quantized weight (codes, scales and zeros) or a LoRA ``B`` cannot: instead the converter is
run on a probe whose rows hold their own index, which yields the new key and the row order,
and every per-row tensor is then indexed with it. Rows are output features and
quantization groups run along the input, so reordering rows is exact.
"""

from typing import Callable, Dict, Tuple

import torch

from qalora_tune._compat import (
    hf_to_tune,
    qwen2_hf_to_tune,
    qwen2_tune_to_hf,
    tune_to_hf,
)
from qalora_tune.errors import UserValueError

__all__ = ["HF_MODEL_TYPES", "HFKeyMap", "check_model_type"]

# torchtune's ModelType names whose HF key layout is converted here
HF_MODEL_TYPES = ("LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "QWEN2")
# the ``model_type`` of a Hugging Face config.json each of them reads
_HF_CONFIG_MODEL_TYPES = {
    "LLAMA2": "llama",
    "LLAMA3": "llama",
    "LLAMA3_2": "llama",
    "MISTRAL": "mistral",
    "QWEN2": "qwen2",
}

Converter = Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


class HFKeyMap:
    """torchtune <-> Hugging Face conversion for one model.

    Args:
        model_type (str): torchtune model type: ``LLAMA2``, ``LLAMA3``, ``LLAMA3_2``,
            ``MISTRAL`` or ``QWEN2``.
        hf_config (Dict): the checkpoint's ``config.json``.

    Raises:
        ValueError: for an unknown ``model_type``, or one that the ``model_type`` of
            ``hf_config`` contradicts (e.g. ``QWEN2`` for a ``"llama"`` checkpoint).
    """

    def __init__(self, model_type: str, hf_config: Dict):
        check_model_type(model_type, hf_config)
        for key in ("num_attention_heads", "hidden_size"):
            value = hf_config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserValueError(
                    f"the checkpoint's config.json has {key}={value!r}, not a positive integer; "
                    "use the config.json that came with the weights"
                )
        heads = hf_config["num_attention_heads"]
        self.dim = hf_config["hidden_size"]
        kwargs = dict(
            num_heads=heads,
            num_kv_heads=hf_config.get("num_key_value_heads", heads),
            dim=self.dim,
            head_dim=hf_config.get("head_dim"),
        )
        tied = hf_config.get("tie_word_embeddings", False)
        self._to_tune, self._to_hf = _converters(model_type, tied, kwargs)
        # the row-order probes: one column (the converters reshape rows as
        # (heads, ..., columns), so any column count works once head_dim is explicit)
        probe_kwargs = dict(kwargs, dim=1, head_dim=kwargs["head_dim"] or self.dim // heads)
        self._probe_to_tune, self._probe_to_hf = _converters(model_type, tied, probe_kwargs)

    def to_tune(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Dense tensors, Hugging Face keys -> torchtune keys (rows reordered as needed).

        Raises:
            Exception: torchtune's bare ``Exception`` for a key it cannot map.
        """
        return self._to_tune(state_dict)

    def to_hf(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Dense tensors, torchtune keys -> Hugging Face keys (rows reordered as needed)."""
        return self._to_hf(state_dict)

    def row_order(self, key: str, out_dim: int, to_hf: bool) -> Tuple[str, torch.Tensor]:
        """The converted key of a weight and the order of its rows there.

        Args:
            key (str): a weight's key (``...weight``) in the source layout.
            out_dim (int): its number of rows.
            to_hf (bool): torchtune -> Hugging Face if True, else the reverse.

        Returns:
            Tuple[str, torch.Tensor]: the new key and ``index`` such that
            ``converted = source[index]`` for every per-row tensor of that weight.
        """
        # a one-column probe whose rows hold their own index (a probe of the weight's
        # width would be copied by the converter's reshape: 268 MB for a 70B q_proj)
        probe = torch.arange(out_dim, dtype=torch.float32)[:, None]
        converted = (self._probe_to_hf if to_hf else self._probe_to_tune)({key: probe})
        (new_key, rows), = converted.items()
        return new_key, rows[:, 0].long()


def _converters(model_type: str, tied: bool, kwargs: Dict) -> Tuple[Converter, Converter]:
    """torchtune's (HF -> torchtune, torchtune -> HF) key converters for ``model_type``."""
    if model_type == "QWEN2":
        return (
            lambda sd: qwen2_hf_to_tune(sd, tie_word_embeddings=tied, **kwargs),
            lambda sd: qwen2_tune_to_hf(sd, tie_word_embeddings=tied, **kwargs),
        )
    return (lambda sd: hf_to_tune(sd, **kwargs), lambda sd: tune_to_hf(sd, **kwargs))


def check_model_type(model_type: str, hf_config: Dict) -> None:
    """Refuse a ``checkpointer.model_type`` that is unknown or that the checkpoint's
    ``config.json`` contradicts (a config.json ``model_type`` this project does not map,
    or none, is not checked).

    Raises:
        ValueError: naming ``checkpointer.model_type`` and the values that fit.
    """
    if model_type not in HF_MODEL_TYPES:
        raise UserValueError(
            f"checkpointer.model_type={model_type!r} is not supported; use one of "
            f"{HF_MODEL_TYPES}"
        )
    hf_type = hf_config.get("model_type")
    fitting = [t for t, hf in _HF_CONFIG_MODEL_TYPES.items() if hf == hf_type]
    if fitting and model_type not in fitting:
        raise UserValueError(
            f"checkpointer.model_type={model_type!r} does not match the checkpoint, whose "
            f"config.json has model_type {hf_type!r}; set checkpointer.model_type to "
            f"{' or '.join(fitting)}"
        )
