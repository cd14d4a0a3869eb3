"""Merged tiny models written the way training writes them, for the export tests."""

from pathlib import Path

import torch
from torch import nn

from qalora_tune.checkpointing import write_merged_int4
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.modules import QALoRALinear
from qalora_tune.tiny import TINY_LLAMA_SIZES, TinyTokenizer, qalora_tiny_llama
from qalora_tune.tiny.hf_checkpoint import hf_llama_config

ATTENTION = ["q_proj", "k_proj", "v_proj", "output_proj"]


def merged_tiny_model(bits: int, group_size: int, seed: int = 0) -> nn.Module:
    """The tiny llama (random weights) quantized, with random adapters merged."""
    torch.manual_seed(seed)
    plain = qalora_tiny_llama.full_precision()
    model = qalora_tiny_llama(
        ATTENTION, apply_lora_to_mlp=True, apply_lora_to_output=True, lora_rank=2,
        lora_alpha=4.0, group_size=group_size, bits=bits,
    )
    model.load_state_dict(plain.state_dict(), strict=False)
    for layer in model.modules():
        if isinstance(layer, QALoRALinear):
            nn.init.normal_(layer.lora_b.weight, std=0.05)
            layer.merge()
    return model.eval()


def write_merged(
    model: nn.Module, directory: Path, bits: int, group_size: int, merged_format: str = "int4_plain"
) -> dict:
    """Write a merged tiny llama as a ``merged_int4/`` directory (weights and configs) in
    ``merged_format``; returns ``write_merged_int4``'s sizes."""
    config = hf_llama_config(TINY_LLAMA_SIZES)
    spec = {
        "model": {
            "_component_": "qalora_tune.tiny.qalora_tiny_llama",
            "lora_attn_modules": [], "group_size": group_size, "bits": bits,
        },
        "model_type": "LLAMA2",
    }
    directory.mkdir(parents=True, exist_ok=True)
    return write_merged_int4(model, directory, HFKeyMap("LLAMA2", config), config, spec, merged_format)


def write_merged_tiny(directory: Path, bits: int = 4, group_size: int = 32, seed: int = 0) -> nn.Module:
    """Write ``merged_tiny_model`` as a ``merged_int4/`` directory with its tokenizer."""
    model = merged_tiny_model(bits, group_size, seed)
    write_merged(model, directory, bits, group_size)
    TinyTokenizer().save(str(directory))
    return model
