"""Driving a real llama.cpp (llama-cpp-python) and the float64 model of what it computes.

llama.cpp's CPU kernel for a ``Q4_1`` weight does not multiply by the fp32 activation: it
first quantizes each block of 32 activations to ``Q8_1`` (``d = amax / 127`` stored in fp16,
codes ``round(x * 127 / amax)``, and ``s = fp16(d * sum(codes))``), then per block
``d4 * d8 * sum(q4 * q8) + m4 * s8``. :func:`emulate_llama_cpp_q4_1` installs exactly that
arithmetic (in float64) into our model for every linear the GGUF file holds as ``Q4_1``, so
the deviation llama.cpp *should* show is computed, not guessed: llama.cpp (run with an F32
KV cache, no flash attention: everything else in fp32) must then agree with the emulated
model to fp32 rounding, and our model differs from both by what ``Q8_1`` costs.
"""

import contextlib
import math
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from qalora_tune.modules import QuantizedLinear
from qalora_tune.recipe_utils import full_logits

gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install 'qalora-tune[gguf]')")

try:
    import llama_cpp
except (ImportError, OSError, RuntimeError):  # no llama-cpp-python, or its library fails to load
    llama_cpp = None

requires_llama_cpp = pytest.mark.skipif(
    llama_cpp is None,
    reason="needs llama-cpp-python (pip install 'qalora-tune[llamacpp]'; builds llama.cpp, ~10+ min on 2 cores)",
)

_GGML_TYPE_F32 = 0
_TUNE_TO_GGUF = {
    "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
    "attn.output_proj": "attn_output", "mlp.w1": "ffn_gate", "mlp.w2": "ffn_down", "mlp.w3": "ffn_up",
}


def gguf_name(module_name: str) -> str:
    """torchtune module name -> GGUF tensor name (``layers.0.attn.q_proj`` -> ``blk.0.attn_q.weight``)."""
    if module_name == "output":
        return "output.weight"
    _, layer, rest = module_name.split(".", 2)
    return f"blk.{layer}.{_TUNE_TO_GGUF[rest]}.weight"


def open_llama(path: Path, n_ctx: int, f32_kv_cache: bool = False):
    """A llama.cpp context returning logits for every position, single-threaded."""
    kwargs = dict(type_k=_GGML_TYPE_F32, type_v=_GGML_TYPE_F32) if f32_kv_cache else {}
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
        n_threads=1, n_threads_batch=1, flash_attn=False, verbose=False, seed=0, **kwargs,
    )


def llama_logits(llm, tokens: Sequence[int]) -> torch.Tensor:
    """llama.cpp's logits ``(len(tokens), vocab)`` for one sequence from an empty cache."""
    llm.reset()
    llm.eval(list(tokens))
    return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))


@torch.no_grad()
def model_logits(model: nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    return full_logits(model(torch.tensor([list(tokens)])))[0]


def q4_1_blocks(path: Path) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GGUF ``Q4_1`` tensors as ``(d, m, codes)``: fp16 ``d`` and ``m`` ``(rows, blocks)``
    and codes ``(rows, blocks, 32)``, parsed from the file's bytes."""
    out = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        raw = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, 20)
        d = torch.from_numpy(raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64))
        m = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64))
        qs = torch.from_numpy(raw[..., 4:].astype(np.int64))
        codes = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # byte j: element j low, j + 16 high
        out[tensor.name] = (d, m, codes)
    return out


def q4_1_times_q8_1(x: torch.Tensor, d4: torch.Tensor, m4: torch.Tensor, q4: torch.Tensor) -> torch.Tensor:
    """ggml's ``Q4_1 x Q8_1`` dot products, exactly as its CPU kernels round, in float64.

    Args:
        x (torch.Tensor): fp32 activations ``(..., K)``.
        d4, m4 (torch.Tensor): the weight's fp16 ``d`` and ``m`` ``(N, K / 32)``.
        q4 (torch.Tensor): its codes ``(N, K / 32, 32)``.

    Returns:
        torch.Tensor: ``(..., N)`` in fp32.
    """
    blocks = x.float().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q8 = torch.round(blocks * inverse)  # round half to even, as _mm256_round_ps
    d8 = d.half().double()
    s8 = (d * q8.sum(-1, keepdim=True)).half().double()[..., 0]
    x8 = d8 * q8.double()
    y = torch.einsum("...bj,nbj->...n", x8, d4[..., None] * q4.double())
    return (y + torch.einsum("...b,nb->...n", s8, m4)).float()


@contextlib.contextmanager
def emulate_llama_cpp_q4_1(model: nn.Module, path: Path) -> Iterator[List[str]]:
    """Make ``model``'s linears that are ``Q4_1`` in ``path`` compute as llama.cpp does.

    Yields:
        List[str]: the GGUF names emulated.
    """
    blocks = q4_1_blocks(path)
    handles, names = [], []
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or gguf_name(name) not in blocks:
            continue
        d4, m4, q4 = blocks[gguf_name(name)]
        handles.append(module.register_forward_hook(
            lambda mod, args, out, d4=d4, m4=m4, q4=q4: q4_1_times_q8_1(args[0], d4, m4, q4).to(out.dtype)
        ))
        names.append(gguf_name(name))
    try:
        yield names
    finally:
        for handle in handles:
            handle.remove()


def relative_errors(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per position ``|logits - reference|_2 / |reference|_2``."""
    return (logits.double() - reference.double()).norm(dim=-1) / reference.double().norm(dim=-1)


def next_token_nll(logits: torch.Tensor, tokens: Sequence[int]) -> Tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of predictions."""
    targets = torch.tensor(list(tokens[1:]))
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(1, targets[:, None]).sum()), len(targets)


def perplexity(pairs: Sequence[Tuple[float, int]]) -> float:
    nll = sum(p[0] for p in pairs)
    count = sum(p[1] for p in pairs)
    return math.exp(nll / count)


@torch.no_grad()
def greedy_ours(model: nn.Module, prompt: Sequence[int], steps: int) -> List[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def greedy_llama(llm, prompt: Sequence[int], steps: int) -> List[int]:
    """llama.cpp's greedy continuation, with its own incremental KV cache."""
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out
