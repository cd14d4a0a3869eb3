"""Model builders: QA-LoRA versions of torchtune models, fixing only the sizes.

Every builder takes the adapter and quantization knobs (rank, alpha, dropout, group size,
quantizer, padding, bits) of
:func:`~qalora_tune.models.qalora_transformer` and builds that torchtune model with an
int4 base::

    model = qalora_llama2_7b(["q_proj", "v_proj"], apply_lora_to_mlp=True, group_size=64)
"""

from functools import partial
from typing import Callable, List, Optional

from torch import nn
from torchtune.models.llama2 import llama2, llama2_7b, llama2_13b, llama2_70b
from torchtune.models.llama3_1 import llama3_1_8b, llama3_1_70b
from torchtune.models.llama3_2 import llama3_2_1b, llama3_2_3b
from torchtune.models.mistral import mistral_7b
from torchtune.models.qwen2_5 import (
    qwen2_5_0_5b,
    qwen2_5_1_5b_base,
    qwen2_5_7b_base,
    qwen2_5_14b_base,
)
from qalora_tune.models._component_builders import qalora_transformer
from qalora_tune.modules import FoldedTiedLinear

__all__ = [
    "MODEL_BUILDERS",
    "qalora_llama2",
    "qalora_llama2_13b",
    "qalora_llama2_70b",
    "qalora_llama2_7b",
    "qalora_llama3_1_70b",
    "qalora_llama3_1_8b",
    "qalora_llama3_2_1b",
    "qalora_llama3_2_3b",
    "qalora_mistral_7b",
    "qalora_qwen2_5_0_5b",
    "qalora_qwen2_5_14b",
    "qalora_qwen2_5_1_5b",
    "qalora_qwen2_5_7b",
    "qalora_stories260k",
    "qalora_tinystories656k",
    "tied_llama",
]

_BUILDER_DOC = """QA-LoRA {title}: torchtune's ``{base}`` with an int4 base and pooled adapters.

    Args:
        lora_attn_modules (List[str]): attention projections with an adapter, from
            ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``.
        apply_lora_to_mlp (bool): adapters on the feed-forward projections.
        apply_lora_to_output (bool): an adapter on the output projection.
        lora_rank (int): adapter rank.
        lora_alpha (float): adapter scaling numerator.
        lora_dropout (float): dropout on the adapters' input.
        group_size (int): quantization group size shared by base and adapters.
        quantizer (str): base quantizer, ``"rtn"``, ``"hqq"`` or ``"gptq"`` (calibrated:
            its int4 weights come from :func:`~qalora_tune.quantization.calibrate_gptq`).
        pad_in_dim (bool): zero-pad linears whose ``in_dim`` ``group_size`` does not divide.
        bits (int): bit width of the base, from 2, 3, 4, 8 (this version implements 2, 3, 4).
        double_quant_scales (bool): store the int4 base's scales as 8-bit codes.
        num_layers (int, optional): keep only the first ``num_layers`` decoder layers
            (same widths, smaller depth); default: all of them.

    Returns:
        TransformerDecoder: see :func:`~qalora_tune.models.qalora_transformer`.
    """


def _model_builder(name: str, base: Callable[[], nn.Module], title: str) -> Callable[..., nn.Module]:
    def builder(
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
        num_layers: Optional[int] = None,
    ) -> nn.Module:
        return qalora_transformer(
            base,
            lora_attn_modules,
            apply_lora_to_mlp,
            apply_lora_to_output,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            group_size=group_size,
            quantizer=quantizer,
            pad_in_dim=pad_in_dim,
            bits=bits,
            double_quant_scales=double_quant_scales,
            num_layers=num_layers,
        )

    base_name = getattr(base, "__name__", None) or base.func.__name__
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _BUILDER_DOC.format(title=title, base=base_name)
    # the unquantized model, for full-precision baselines of small models
    builder.full_precision = base
    return builder


def tied_llama(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
) -> nn.Module:
    """torchtune's llama2 decoder with the output projection tied to the token embeddings
    (the layout of llama2.c-style small models such as stories260K and TinyStories-656K).

    Returns:
        TransformerDecoder: with ``output`` a :class:`~qalora_tune.modules.FoldedTiedLinear`
        (torchtune's ``TiedLinear``, computed as one 2D product).
    """
    model = llama2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        norm_eps=norm_eps,
        rope_base=rope_base,
    )
    del model.output  # an nn.Linear; the tied projection is a plain callable
    model.output = FoldedTiedLinear(model.tok_embeddings)
    return model


def qalora_llama2(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    tie_word_embeddings: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    group_size: int = 64,
    quantizer: str = "rtn",
    pad_in_dim: bool = False,
    bits: int = 4,
    double_quant_scales: bool = False,
) -> nn.Module:
    """A QA-LoRA llama2-architecture decoder of any size (torchtune's ``llama2`` with every
    size argument), for models without a size-fixing builder of their own: benchmarks,
    tests and llama2.c-style checkpoints.

    Args:
        lora_attn_modules (List[str]): attention projections with an adapter, from
            ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``.
        apply_lora_to_mlp (bool): adapters on the feed-forward projections.
        apply_lora_to_output (bool): an adapter on the output projection (untied only).
        vocab_size (int): token embeddings.
        num_layers (int): transformer layers.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads.
        embed_dim (int): model width.
        intermediate_dim (int): feed-forward width.
        max_seq_len (int): the longest sequence (RoPE cache).
        norm_eps (float): RMSNorm epsilon.
        rope_base (float): RoPE base frequency.
        tie_word_embeddings (bool): tie the output projection to the token embeddings.
        lora_rank (int): adapter rank.
        lora_alpha (float): adapter scaling numerator.
        lora_dropout (float): dropout on the adapters' input.
        group_size (int): quantization group size shared by base and adapters.
        quantizer (str): base quantizer, ``"rtn"``, ``"hqq"`` or ``"gptq"``.
        pad_in_dim (bool): zero-pad linears whose ``in_dim`` ``group_size`` does not divide.
        bits (int): bit width of the base, from 2, 3, 4, 8.
        double_quant_scales (bool): store the int4 base's scales as 8-bit codes.

    Returns:
        TransformerDecoder: with an int4 base and pooled adapters.
    """
    sizes = dict(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, embed_dim=embed_dim, intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len, norm_eps=norm_eps, rope_base=rope_base,
    )
    base = partial(tied_llama if tie_word_embeddings else llama2, **sizes)
    return qalora_transformer(
        base,
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        group_size=group_size,
        quantizer=quantizer,
        pad_in_dim=pad_in_dim,
        bits=bits,
        double_quant_scales=double_quant_scales,
    )


qalora_llama2_7b = _model_builder("qalora_llama2_7b", llama2_7b, "Llama 2 7B")
qalora_llama2_13b = _model_builder("qalora_llama2_13b", llama2_13b, "Llama 2 13B")
qalora_llama2_70b = _model_builder("qalora_llama2_70b", llama2_70b, "Llama 2 70B")
qalora_llama3_1_8b = _model_builder("qalora_llama3_1_8b", llama3_1_8b, "Llama 3.1 8B")
qalora_llama3_1_70b = _model_builder("qalora_llama3_1_70b", llama3_1_70b, "Llama 3.1 70B")
qalora_llama3_2_1b = _model_builder("qalora_llama3_2_1b", llama3_2_1b, "Llama 3.2 1B")
qalora_llama3_2_3b = _model_builder("qalora_llama3_2_3b", llama3_2_3b, "Llama 3.2 3B")
qalora_qwen2_5_0_5b = _model_builder("qalora_qwen2_5_0_5b", qwen2_5_0_5b, "Qwen2.5 0.5B")
qalora_qwen2_5_1_5b = _model_builder("qalora_qwen2_5_1_5b", qwen2_5_1_5b_base, "Qwen2.5 1.5B")
qalora_qwen2_5_7b = _model_builder("qalora_qwen2_5_7b", qwen2_5_7b_base, "Qwen2.5 7B")
qalora_qwen2_5_14b = _model_builder("qalora_qwen2_5_14b", qwen2_5_14b_base, "Qwen2.5 14B")
qalora_mistral_7b = _model_builder("qalora_mistral_7b", mistral_7b, "Mistral 7B")
qalora_stories260k = _model_builder(
    "qalora_stories260k",
    partial(
        tied_llama, vocab_size=512, num_layers=5, num_heads=8, num_kv_heads=4,
        embed_dim=64, intermediate_dim=172, max_seq_len=512,
    ),
    "stories260K (karpathy/llama2.c)",
)
qalora_tinystories656k = _model_builder(
    "qalora_tinystories656k",
    partial(
        tied_llama, vocab_size=2048, num_layers=2, num_heads=8, num_kv_heads=4,
        embed_dim=128, intermediate_dim=384, max_seq_len=512, norm_eps=1e-6,
    ),
    "TinyStories-656K",
)
MODEL_BUILDERS = {
    builder.__name__: builder
    for builder in (
        qalora_llama2,
        qalora_llama2_7b,
        qalora_llama2_13b,
        qalora_llama2_70b,
        qalora_llama3_1_8b,
        qalora_llama3_1_70b,
        qalora_llama3_2_1b,
        qalora_llama3_2_3b,
        qalora_qwen2_5_0_5b,
        qalora_qwen2_5_1_5b,
        qalora_qwen2_5_7b,
        qalora_qwen2_5_14b,
        qalora_mistral_7b,
        qalora_stories260k,
        qalora_tinystories656k,
    )
}
"""The model builders of this package by name."""
