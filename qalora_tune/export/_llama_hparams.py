"""A Hugging Face Llama ``config.json`` as llama.cpp's ``llama`` architecture hyperparameters.

Also the one weight transformation llama.cpp's llama architecture needs: Hugging Face stores
``q_proj``/``k_proj`` rows in the "rotate half" RoPE order; llama.cpp (like Meta's original
checkpoints) rotates adjacent pairs. Within each head the rows ``[x_0 .. x_{h/2-1},
y_0 .. y_{h/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]`` — what llama.cpp's own converter
does for ``LlamaForCausalLM`` (``k_proj`` with the key-value head count). It is a row
permutation, so it applies exactly to codes, scales and zeros (groups run along inputs).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

__all__ = ["LlamaHParams", "llama_hparams", "rope_row_order"]

_MODEL_TYPES = ("llama", "mistral")
_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class LlamaHParams:
    """What llama.cpp's ``llama`` architecture reads from a GGUF file.

    Attributes:
        n_layers, n_embd, n_ff, n_head, n_head_kv, head_dim, n_ctx, n_vocab (int): sizes.
        rope_theta (float): RoPE frequency base.
        rms_eps (float): RMSNorm epsilon.
        rope_scaling (str): ``"none"``, ``"linear"`` or ``"llama3"``.
        rope_factor (float, optional): linear scaling factor.
        rope_freq_factors (List[float], optional): Llama 3 per-frequency divisors, written as
            the ``rope_freqs.weight`` tensor.
        tied_embeddings (bool): the output projection is the token embedding.
    """

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rope_theta: float
    rms_eps: float
    rope_scaling: str = "none"
    rope_factor: Optional[float] = None
    rope_freq_factors: Optional[List[float]] = None
    tied_embeddings: bool = False


def llama_hparams(config: Dict[str, Any]) -> LlamaHParams:
    """Hyperparameters of a Llama-architecture ``config.json``.

    Reads transformers 4 (``rope_theta``, ``rope_scaling``) and 5 (``rope_parameters``)
    layouts.

    Raises:
        ValueError: for anything llama.cpp's ``llama`` architecture would run differently
            (another model type, activation, sliding window, RoPE scaling type).
    """
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"config.json has model_type {model_type!r}; the GGUF export writes llama.cpp's "
            f"llama architecture, for model_type {' or '.join(map(repr, _MODEL_TYPES))} only"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json has hidden_act {config['hidden_act']!r}; llama.cpp's llama "
            "architecture uses silu only"
        )
    window = config.get("sliding_window")
    if window is not None and window < config.get("max_position_embeddings", 0):
        raise ValueError(
            f"config.json has sliding_window={window}, which llama.cpp's llama architecture "
            "ignores; export a model without a sliding window"
        )
    n_head = config["num_attention_heads"]
    n_embd = config["hidden_size"]
    head_dim = config.get("head_dim") or n_embd // n_head
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"config.json has RoPE scaling type {rope_type!r}; the GGUF export supports "
            f"{', '.join(_ROPE_TYPES)} (remove or change rope_scaling)"
        )
    hparams = dict(
        n_layers=config["num_hidden_layers"],
        n_embd=n_embd,
        n_ff=config["intermediate_size"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=head_dim,
        n_ctx=config.get("max_position_embeddings", 2048),
        n_vocab=config["vocab_size"],
        rope_theta=rope_theta,
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    if rope_type == "linear":
        hparams.update(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif rope_type == "llama3":
        hparams.update(
            rope_scaling="llama3",
            rope_freq_factors=llama3_rope_factors(
                head_dim,
                rope_theta,
                factor=float(rope.get("factor", 8.0)),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_context=int(rope.get("original_max_position_embeddings", 8192)),
            ),
        )
    return LlamaHParams(**hparams)


def llama3_rope_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_context: int,
) -> List[float]:
    """Llama 3's RoPE scaling as llama.cpp applies it: one divisor per rotary frequency.

    Frequencies whose wavelength is short against the original context keep their value,
    long ones are divided by ``factor``, and the band between is interpolated smoothly
    (transformers' ``_compute_llama3_parameters``).

    Returns:
        List[float]: ``head_dim / 2`` divisors.
    """
    short = original_context / high_freq_factor
    long = original_context / low_freq_factor
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < short:
            divisors.append(1.0)
        elif wavelength > long:
            divisors.append(factor)
        else:
            smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return divisors


def rope_row_order(out_dim: int, n_heads: int) -> torch.Tensor:
    """The row order that turns Hugging Face ``q_proj``/``k_proj`` rows into llama.cpp's.

    Args:
        out_dim (int): rows of the weight (``n_heads * head_dim``).
        n_heads (int): query heads for ``q_proj``, key-value heads for ``k_proj``.

    Returns:
        torch.Tensor: ``index`` (int64, ``(out_dim,)``) with ``llama_cpp = hf[index]``.

    Raises:
        ValueError: if ``out_dim`` is not ``n_heads`` times an even head size.
    """
    if n_heads <= 0 or out_dim % (2 * n_heads):
        raise ValueError(f"{out_dim} rows do not split into {n_heads} heads of an even size")
    half = out_dim // n_heads // 2
    # rows of head h: first half (h, 0, i), second half (h, 1, i); llama.cpp wants (h, i, 0/1)
    return torch.arange(out_dim).reshape(n_heads, 2, half).transpose(1, 2).reshape(out_dim)
