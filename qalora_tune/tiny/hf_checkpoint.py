"""Write a torchtune llama2 decoder as a Hugging Face ``LlamaForCausalLM`` checkpoint."""

import json
import os
from typing import Any, Dict, Mapping

import torch
from safetensors.torch import save_file

from qalora_tune._compat import tune_to_hf

__all__ = ["hf_llama_config", "save_hf_checkpoint"]

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"


def hf_llama_config(sizes: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``LlamaForCausalLM`` ``config.json`` for ``llama2(**sizes)``.

    Args:
        sizes (Mapping[str, Any]): the ``llama2()`` keyword arguments (``vocab_size``,
            ``num_layers``, ``num_heads``, ``num_kv_heads``, ``embed_dim``, ``max_seq_len``,
            ``intermediate_dim``, optionally ``norm_eps`` and ``rope_base``).

    Returns:
        Dict[str, Any]: the config, fp32 weights, untied output projection.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": sizes["embed_dim"],
        "intermediate_size": sizes["intermediate_dim"],
        "num_attention_heads": sizes["num_heads"],
        "num_key_value_heads": sizes["num_kv_heads"],
        "num_hidden_layers": sizes["num_layers"],
        "head_dim": sizes["embed_dim"] // sizes["num_heads"],
        "vocab_size": sizes["vocab_size"],
        "max_position_embeddings": sizes["max_seq_len"],
        "rms_norm_eps": sizes.get("norm_eps", 1e-5),
        "rope_theta": sizes.get("rope_base", 10000.0),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor], sizes: Mapping[str, Any], directory: str
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (Hugging Face key names) to ``directory``.

    Args:
        state_dict (Mapping[str, torch.Tensor]): torchtune llama2 state dict.
        sizes (Mapping[str, Any]): the ``llama2()`` keyword arguments of the model.
        directory (str): existing directory to write into.
    """
    hf_state = tune_to_hf(
        dict(state_dict),
        num_heads=sizes["num_heads"],
        num_kv_heads=sizes["num_kv_heads"],
        dim=sizes["embed_dim"],
    )
    hf_state = {k: v.detach().to(torch.float32).contiguous() for k, v in hf_state.items()}
    save_file(hf_state, os.path.join(directory, WEIGHTS_FILENAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILENAME), "w", encoding="utf-8") as f:
        json.dump(hf_llama_config(sizes), f, indent=2)
