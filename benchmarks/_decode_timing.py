"""Timing and checking in ``benchmarks/decode.py``: greedy prefill + decode with
torchtune's KV cache (eager or compiled), the ops a decode step spends its time in, weight
bytes per token, and the summaries, ratios and targets of the measured runs."""

import argparse
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from _decode_models import DTYPE
from torch import nn

from qalora_tune.models import tensor_nbytes

MODELS = ("qalora_int4_merged", "lora_bf16_merged", "qlora_nf4")

# targets from issue 7 (ratios of merged int4 to the others)
TARGETS = {
    "decode_int4_over_bf16_cpu": 1.5,
    "decode_int4_over_bf16_cuda": 2.0,
    "decode_int4_over_qlora": 3.0,
    "bandwidth_fraction_cuda": 0.40,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of every weight one decoded token reads.

    All parameters in full, except the token embedding, of which a token reads one row
    (and, when the output projection is tied to it, the whole table once more).
    """
    from torchtune.modules import TiedLinear

    total = 0
    embedding = model.tok_embeddings.weight
    for name, param in model.named_parameters():
        if param is embedding:
            total += tensor_nbytes(param) // param.shape[0]
        else:
            total += tensor_nbytes(param)
    if isinstance(model.output, TiedLinear):
        total += tensor_nbytes(embedding)
    return total


def weight_classes(model: nn.Module) -> List[str]:
    """Tensor classes of the model's 2-D weights (e.g. ``Int4OpaqueTensor``, ``NF4Tensor``)."""
    names = set()
    for param in model.parameters():
        if param.dim() == 2:
            cls = type(param)
            names.add("torch.Tensor" if cls is nn.Parameter else f"{cls.__module__}.{cls.__name__}")
    return sorted(names)


class Decoder:
    """Greedy prefill + decode with torchtune's KV cache, optionally compiled.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder``.
        device (torch.device): where it runs.
        max_len (int): prompt plus generated tokens.
        compile_mode (str, optional): ``torch.compile`` mode; None: eager.
        compile_backend (str): ``torch.compile`` backend.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        max_len: int,
        compile_mode: Optional[str] = None,
        compile_backend: str = "inductor",
    ):
        self.model = model
        self.device = device
        with device:
            model.setup_caches(batch_size=1, dtype=DTYPE, decoder_max_seq_len=max_len)
        self.mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))
        self.compiled = compile_mode is not None
        self._step = _step
        if self.compiled:
            mode = compile_mode if compile_backend == "inductor" else None
            self._step = torch.compile(_step, backend=compile_backend, mode=mode, dynamic=False)

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Next greedy token ``(1, 1)`` after ``tokens`` ``(1, s)`` at positions ``(s,)``."""
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self._step(self.model, self.mask, tokens, input_pos).clone()

    @torch.inference_mode()
    def run(self, prompt: torch.Tensor, new_tokens: int) -> Tuple[float, float, List[int]]:
        """Prefill ``prompt`` ``(1, L)`` and decode ``new_tokens`` tokens.

        Returns:
            Tuple[float, float, List[int]]: prefill seconds, decode seconds, the tokens.
        """
        self.model.reset_caches()
        length = prompt.shape[1]
        prefill_pos = torch.arange(length, device=self.device)
        input_pos = torch.tensor([length], device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        token = self.step(prompt, prefill_pos)
        _sync(self.device)
        prefilled = time.perf_counter()
        tokens = [token]
        for _ in range(new_tokens):
            token = self.step(token, input_pos)
            input_pos += 1
            tokens.append(token)
        _sync(self.device)
        done = time.perf_counter()
        return prefilled - start, done - prefilled, torch.cat(tokens, dim=1)[0].tolist()


def _step(
    model: nn.Module, mask: torch.Tensor, tokens: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """One forward with the KV cache; the greedy next token ``(1, 1)``."""
    logits = model(tokens, mask=mask[input_pos][None], input_pos=input_pos[None])
    return logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.inference_mode()
def top_kernels(decoder: Decoder, prompt: torch.Tensor, top: int = 6) -> List[str]:
    """The ops that take most (self) time in one decode step, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    decoder.model.reset_caches()
    length = prompt.shape[1]
    token = decoder.step(prompt, torch.arange(length, device=decoder.device))
    activities = [ProfilerActivity.CPU]
    if decoder.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        decoder.step(token, torch.tensor([length], device=decoder.device))
        _sync(decoder.device)
    key = "self_device_time_total" if decoder.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [f"{e.key} ({100 * getattr(e, key) / total:.0f}%)" for e in events[:top]]


@torch.inference_mode()
def prefill_logits(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``(L, vocab)`` of one forward without a KV cache."""
    return model(prompt)[0].float()


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` (Frobenius)."""
    return ((x - reference).norm() / reference.norm()).item()


def _error_text(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:600]


def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _summarize(
    prefill: List[float], decode: List[float], args: argparse.Namespace,
    info: Dict[str, Any], result: Dict[str, Any],
) -> Dict[str, Any]:
    prefill_s, decode_s = _median(prefill), _median(decode)
    per_token = decode_s / args.new_tokens
    gbps = info["weight_bytes_per_token"] / per_token / 1e9
    bandwidth = result["settings"].get("bandwidth_gbps")
    return {
        "prefill_tokens_per_s": args.prompt_len / prefill_s,
        "decode_tokens_per_s": args.new_tokens / decode_s,
        "decode_ms_per_token": 1e3 * per_token,
        "prefill_seconds_all": [round(x, 5) for x in prefill],
        "decode_seconds_all": [round(x, 5) for x in decode],
        "weight_gb_per_s": gbps,
        "bandwidth_fraction": gbps / bandwidth if bandwidth else None,
    }


def _ratios(results: Dict[str, Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Optional[float]]]:
    ratios = {}
    for mode, per_model in results.items():
        int4 = per_model.get("qalora_int4_merged", {})
        entry = {}
        for other, label in (("lora_bf16_merged", "bf16"), ("qlora_nf4", "qlora")):
            for phase in ("prefill", "decode"):
                key = f"{phase}_tokens_per_s"
                a, b = int4.get(key), per_model.get(other, {}).get(key)
                entry[f"{phase}_int4_over_{label}"] = a / b if a and b else None
        ratios[mode] = entry
    return ratios


def _greedy_agreement(greedy: Dict[str, Dict[str, List[int]]]) -> Dict[str, Dict[str, float]]:
    """Fraction of greedy tokens equal to the bf16 model's (same mode)."""
    out = {}
    for mode, tokens in greedy.items():
        reference = tokens.get("lora_bf16_merged")
        if reference is None:
            continue
        out[mode] = {
            name: sum(x == y for x, y in zip(seq, reference)) / len(reference)
            for name, seq in tokens.items() if name != "lora_bf16_merged"
        }
    return out


def _targets(result: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """Each issue-7 target with the best measured value (over modes) and whether it is met."""
    def best(key: str) -> Optional[float]:
        values = [r.get(key) for r in result["ratios"].values() if r.get(key) is not None]
        return max(values) if values else None

    bf16_key = f"decode_int4_over_bf16_{device.type}"
    out = {
        bf16_key: {"target": TARGETS.get(bf16_key), "measured_best": best("decode_int4_over_bf16")},
        "decode_int4_over_qlora": {
            "target": TARGETS["decode_int4_over_qlora"],
            "measured_best": best("decode_int4_over_qlora"),
        },
    }
    if device.type == "cuda":
        fractions = [
            r["qalora_int4_merged"].get("bandwidth_fraction")
            for r in result["results"].values() if "qalora_int4_merged" in r
        ]
        fractions = [f for f in fractions if f is not None]
        out["bandwidth_fraction_cuda"] = {
            "target": TARGETS["bandwidth_fraction_cuda"],
            "measured_best": max(fractions) if fractions else None,
        }
    for entry in out.values():
        measured = entry["target"] is not None and entry["measured_best"] is not None
        entry["met"] = entry["measured_best"] >= entry["target"] if measured else None
    return out

