"""The embedded default's model: a tiny llama2 decoder, and its QA-LoRA builder."""

from typing import Any, Dict, List

from torch import nn
from torchtune.models.llama2 import llama2

from qalora_tune.models import qalora_llama2
from qalora_tune.tiny.tokenizer import TinyTokenizer

__all__ = ["TINY_LLAMA_SIZES", "build_tiny_base", "qalora_tiny_llama"]

TINY_LLAMA_SIZES: Dict[str, Any] = {
    "vocab_size": TinyTokenizer().vocab_size,  # 57: <pad>, <bos>, <eos> + 54 characters
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 4,
    "embed_dim": 128,
    "intermediate_dim": 256,
    "max_seq_len": 64,
}
"""Exact ``torchtune.models.llama2.llama2`` keyword arguments of the tiny base.

Every linear has ``in_dim`` 128 or 256: 4 or 8 quantization groups of 32.
"""


def build_tiny_base() -> nn.Module:
    """A freshly initialised ``llama2(**TINY_LLAMA_SIZES)`` (fp32)."""
    return llama2(**TINY_LLAMA_SIZES)


def qalora_tiny_llama(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    group_size: int = 64,
    quantizer: str = "rtn",
    pad_in_dim: bool = False,
    bits: int = 4,
    double_quant_scales: bool = False,
) -> nn.Module:
    """QA-LoRA tiny llama (the embedded default's base): ``qalora_llama2`` at
    :data:`TINY_LLAMA_SIZES`.

    Args:
        lora_attn_modules (List[str]): attention projections with an adapter.
        apply_lora_to_mlp (bool): adapters on the feed-forward projections.
        apply_lora_to_output (bool): an adapter on the output projection.
        lora_rank (int): adapter rank.
        lora_alpha (float): adapter scaling numerator.
        lora_dropout (float): dropout on the adapters' input.
        group_size (int): quantization group size shared by base and adapters.
        quantizer (str): base quantizer, ``"rtn"``, ``"hqq"`` or ``"gptq"``.
        pad_in_dim (bool): zero-pad linears whose ``in_dim`` ``group_size`` does not divide.
        bits (int): bit width of the base, from 2, 3, 4, 8.
        double_quant_scales (bool): store the int4 base's scales as 8-bit codes.

    Returns:
        TransformerDecoder: see :func:`~qalora_tune.models.qalora_transformer`.
    """
    return qalora_llama2(
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, **TINY_LLAMA_SIZES,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        group_size=group_size, quantizer=quantizer, pad_in_dim=pad_in_dim, bits=bits,
        double_quant_scales=double_quant_scales,
    )


qalora_tiny_llama.full_precision = build_tiny_base  # the unquantized model, for baselines
