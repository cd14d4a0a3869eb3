"""The embedded default's model: a tiny llama2 decoder, and its QA-LoRA builder."""

from typing import Any, Dict, List

from torch import nn
from torchtune.models.llama2 import llama2

from qalora_tune.errors import UserValueError
from qalora_tune.models import qalora_llama2
from qalora_tune.tiny.tokenizer import TinyTokenizer

__all__ = ["TINY_LLAMA_SIZES", "build_tiny_base", "qalora_tiny_llama", "tiny_llama_sizes"]

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


HEAD_DIM = 32
"""Width of an attention head of the tiny bases, whatever their width."""


def tiny_llama_sizes(embed_dim: int = 128) -> Dict[str, Any]:
    """The tiny base's sizes at another width: :data:`TINY_LLAMA_SIZES` with ``embed_dim``
    changed, one head per 32 features and a feed-forward width of ``2 * embed_dim``
    (``tiny_llama_sizes(128) == TINY_LLAMA_SIZES``). Wider tiny bases are what
    ``benchmarks/lr_transfer.py`` measures learning-rate transfer across width on.

    Raises:
        UserValueError: if ``embed_dim`` is not a positive multiple of 32.
    """
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0 or (
        embed_dim % HEAD_DIM
    ):
        raise UserValueError(f"embed_dim must be a positive multiple of {HEAD_DIM}, got {embed_dim!r}")
    heads = embed_dim // HEAD_DIM
    return {
        **TINY_LLAMA_SIZES,
        "embed_dim": embed_dim,
        "num_heads": heads,
        "num_kv_heads": heads,
        "intermediate_dim": 2 * embed_dim,
    }


def build_tiny_base(embed_dim: int = 128) -> nn.Module:
    """A freshly initialised ``llama2(**tiny_llama_sizes(embed_dim))`` (fp32)."""
    return llama2(**tiny_llama_sizes(embed_dim))


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
