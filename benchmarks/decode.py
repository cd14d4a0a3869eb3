"""Prefill and decode tokens/s: QA-LoRA merged int4 vs bf16 merged LoRA vs QLoRA-style serving.

    python benchmarks/decode.py --shape llama2_7b_layers \
        --json docs/results/decode_cpu.json --markdown docs/results/decode_cpu.md
    python benchmarks/decode.py --shape tinystories656K   # the real checkpoint, ../shared/models
    python benchmarks/decode.py --device cuda --shape llama2_7b_layers   # 32 layers: Llama 2 7B

Three models compute the same function from the same base weights ``W`` and the same
adapter (``A``: ``(r, K/G)``, ``B``: ``(N, r)``, non-zero, on q/k/v/output_proj and the MLP):

- ``qalora_int4_merged``: the QA-LoRA model built with the project's builder
  (``qalora_transformer``; an int4 base quantized with RTN on load), its adapters merged
  into the int4 zero points, exported to ``merged_int4/`` (torchao ``Int4Tensor``, the
  transformers ``TorchAoConfig`` layout) and loaded back with :func:`qalora_tune.load_merged`,
  i.e. what a user serves. Every linear is int4, the output projection included.
- ``lora_bf16_merged``: a torchtune LoRA adapter with the same function (its ``A`` is the
  pooled ``A`` spread over each group, ``A[:, k] = A_pooled[:, k // G] / G``) merged with
  torchtune's ``get_merged_lora_ckpt`` into a plain bf16 ``llama2``.
- ``qlora_nf4``: torchtune's ``lora_llama2(..., quantize_base=True)``: NF4 base with the
  same LoRA adapter unmerged, in bf16 (torchtune's QLoRA; its output projection stays bf16).

Prefill is one forward over ``prompt_len`` tokens with the KV cache set up; decode is
``new_tokens`` greedy steps of one token (torchtune ``setup_caches`` and ``input_pos``).
The three models are interleaved in every repeat and medians are reported; ``compile``
times ``torch.compile``'d steps after a warm-up (a compile failure is recorded, not
raised). Weight bytes per decoded token count every weight a token reads (int4 codes
plus scales/zeros, NF4 codes plus its scalers, dense tensors, one embedding row); their
ratio to the time per token is compared with ``--bandwidth-gbps`` (a default per known
GPU). On CPU the int4 kernel is fast only in bf16, so every model is served in bf16.

The merged int4 file holds torchao ``Int4Tensor`` weights; ``load_merged`` repacks them into
``Int4OpaqueTensor`` computed by ``aten._weight_int4pack_mm_for_cpu`` on CPU, and into
``Int4TilePackedTo4dTensor`` computed by ``aten._weight_int4pack_mm`` (tinygemm) on CUDA,
both through the ``qalora_tune::int4_linear`` op. The output records the weight classes
and the ops a decode step spends its time in (profiler), so this is measured, not assumed.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchtune.training import set_default_dtype

import qalora_tune
from qalora_tune.checkpointing import (
    HFKeyMap,
    QALoRACheckpointer,
    find_checkpoint_files,
    iter_hf_tensors,
    load_merged,
    write_merged_int4,
)
from qalora_tune.models import qalora_transformer, tensor_nbytes, tied_llama
from qalora_tune.modules import QALoRALinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, cpu_model_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"

MODELS = ("qalora_int4_merged", "lora_bf16_merged", "qlora_nf4")
MODEL_TITLES = {
    "qalora_int4_merged": "QA-LoRA merged int4 (load_merged)",
    "lora_bf16_merged": "LoRA merged, dense bf16",
    "qlora_nf4": "QLoRA-style: NF4 base + unmerged LoRA, bf16",
}
MODES = ("eager", "compile")
ATTN_TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj"]
MLP_TARGETS = ("w1", "w2", "w3")
DTYPE = torch.bfloat16

# HBM bandwidth (GB/s) of GPUs whose name identifies the part
_KNOWN_BANDWIDTH_GBPS = (
    (("H200",), 4800.0),
    (("H100", "HBM3"), 3350.0),
    (("H100", "SXM"), 3350.0),
    (("A100", "SXM4-80GB"), 2039.0),
)

# CPU features the bf16 and int4 CPU kernels use
_CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")

# targets from issue 7 (ratios of merged int4 to the others)
TARGETS = {
    "decode_int4_over_bf16_cpu": 1.5,
    "decode_int4_over_bf16_cuda": 2.0,
    "decode_int4_over_qlora": 3.0,
    "bandwidth_fraction_cuda": 0.40,
}


# ---------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A llama2-architecture decoder and the adapter put on it.

    ``checkpoint_dir`` set: real Hugging Face weights (and ``builder``, the project's model
    builder for them); unset: random weights.
    """

    name: str
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float
    tied: bool
    group_size: int
    rank: int
    alpha: float
    checkpoint_dir: Optional[str] = None
    builder: Optional[str] = None

    def decoder_kwargs(self) -> Dict[str, Any]:
        """Arguments of torchtune's ``llama2`` (and of :func:`tied_llama`)."""
        return dict(
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            embed_dim=self.embed_dim,
            intermediate_dim=self.intermediate_dim,
            max_seq_len=self.max_seq_len,
            norm_eps=self.norm_eps,
        )

    def base_decoder(self) -> Callable[[], nn.Module]:
        """Builds the full-precision torchtune decoder (tied output when ``tied``)."""
        from torchtune.models.llama2 import llama2

        return partial(tied_llama if self.tied else llama2, **self.decoder_kwargs())

    def hf_config(self) -> Dict[str, Any]:
        """A Hugging Face ``config.json`` for this decoder (the real one when there is one)."""
        if self.checkpoint_dir is not None:
            return json.loads((Path(self.checkpoint_dir) / "config.json").read_text())
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }


def make_shape(name: str, num_layers: Optional[int] = None) -> Shape:
    """The benchmark shapes.

    Args:
        name (str): ``llama2_7b_layers`` (Llama 2 7B's sizes, random weights),
            ``tinystories656K`` (the real checkpoint in ``../shared/models``) or ``tiny``
            (2 random layers of width 256, for tests).
        num_layers (int, optional): layers of ``llama2_7b_layers`` (32: the whole 7B).

    Raises:
        FileNotFoundError: for ``tinystories656K`` without ``../shared/models``.
    """
    if name == "llama2_7b_layers":
        return Shape(
            name, vocab_size=32000, num_layers=num_layers or 2, num_heads=32, num_kv_heads=32,
            embed_dim=4096, intermediate_dim=11008, max_seq_len=4096, norm_eps=1e-5,
            tied=False, group_size=64, rank=16, alpha=32.0,  # as configs/llama2_7B_qalora.yaml
        )
    if name == "tiny":
        return Shape(
            name, vocab_size=512, num_layers=num_layers or 2, num_heads=4, num_kv_heads=2,
            embed_dim=256, intermediate_dim=768, max_seq_len=512, norm_eps=1e-5,
            tied=False, group_size=64, rank=4, alpha=8.0,
        )
    if name == "tinystories656K":
        path = SHARED_MODELS / "tinystories656K"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} not found: the tinystories656K shape reads ../shared/models"
            )
        hf = json.loads((path / "config.json").read_text())
        return Shape(
            name, vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
            embed_dim=hf["hidden_size"], intermediate_dim=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"], norm_eps=hf["rms_norm_eps"],
            tied=bool(hf.get("tie_word_embeddings")), group_size=32, rank=4, alpha=8.0,
            checkpoint_dir=str(path), builder="qalora_tune.models.qalora_tinystories656k",
        )  # group size, rank and alpha as configs/tinystories656K_qalora.yaml
    raise ValueError(f"unknown shape {name!r}")


# ---------------------------------------------------------------------------- weights


@dataclass
class Weights:
    """The shared weights: torchtune-keyed base tensors and pooled adapters.

    Attributes:
        base (Dict[str, torch.Tensor]): full-precision base weights, torchtune keys.
        adapters (Dict[str, Tuple[torch.Tensor, torch.Tensor]]): module path ->
            ``(A, B)``, ``A`` of shape ``(rank, in_dim // group_size)``, ``B`` of shape
            ``(out_dim, rank)``, fp32.
    """

    base: Dict[str, torch.Tensor]
    adapters: Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def _target_linears(shape: Shape) -> Dict[str, nn.Linear]:
    with torch.device("meta"):
        model = shape.base_decoder()()
    targets = set(ATTN_TARGETS) | set(MLP_TARGETS)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def random_base(shape: Shape, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
    """Random bf16 base weights: N(0, 0.02) matrices, unit norm scales."""
    with torch.device("meta"):
        meta = shape.base_decoder()().state_dict()
    generator = torch.Generator(device).manual_seed(seed)
    base = {}
    for key, tensor in meta.items():
        value = torch.empty(tensor.shape, dtype=DTYPE, device=device)
        if key.endswith("scale"):
            value.fill_(1.0)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        base[key] = value
    return base


def checkpoint_base(shape: Shape) -> Dict[str, torch.Tensor]:
    """The real checkpoint's weights in torchtune keys, through the project's key map."""
    directory = Path(shape.checkpoint_dir)
    key_map = HFKeyMap("LLAMA2", shape.hf_config())
    base = {}
    for hf_key, tensor in iter_hf_tensors(find_checkpoint_files(directory, None, "hf")):
        base.update(key_map.to_tune({hf_key: tensor}))
    if shape.tied:  # either copy of a tied embedding may be the stored one
        output = base.pop("output.weight", None)
        if "tok_embeddings.weight" not in base and output is not None:
            base["tok_embeddings.weight"] = output
    return base


def make_weights(
    shape: Shape, device: torch.device, seed: int = 0, adapter_scale: float = 0.1
) -> Weights:
    """Base weights and non-zero pooled adapters on every target linear.

    ``A ~ N(0, 1)``; ``B ~ N(0, 1)`` scaled so that the dense update
    ``(alpha / r) B A / G`` has about ``adapter_scale`` times the RMS of the base weight.
    """
    base = checkpoint_base(shape) if shape.checkpoint_dir else random_base(shape, device, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    adapters = {}
    for name, linear in _target_linears(shape).items():
        n_groups = linear.in_features // shape.group_size
        a = torch.randn(shape.rank, n_groups, generator=generator)
        b = torch.randn(linear.out_features, shape.rank, generator=generator)
        weight_rms = base[f"{name}.weight"].float().pow(2).mean().sqrt().item()
        update_rms = shape.alpha / shape.rank * math.sqrt(shape.rank) / shape.group_size
        b *= adapter_scale * weight_rms / update_rms
        adapters[name] = (a.to(device), b.to(device))
    return Weights(base, adapters)


def dense_lora_a(a: torch.Tensor, group_size: int) -> torch.Tensor:
    """A torchtune LoRA ``A`` ``(r, K)`` equal in function to a pooled ``A`` ``(r, K/G)``."""
    return a.repeat_interleave(group_size, dim=1) / group_size


def dense_update(a: torch.Tensor, b: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The adapter's dense weight update ``(alpha / r) B A_dense`` ``(N, K)`` in fp32."""
    return (shape.alpha / shape.rank) * b.float() @ dense_lora_a(a.float(), shape.group_size)


# ---------------------------------------------------------------------------- models


def build_qalora(shape: Shape, weights: Weights, device: torch.device, workdir: Path) -> nn.Module:
    """The QA-LoRA training-time model (int4 base, adapters set, not merged).

    The real checkpoint is streamed in by the project's checkpointer; random weights go
    through ``load_state_dict``, which quantizes each linear on arrival.
    """
    with set_default_dtype(DTYPE), device:
        model = qalora_transformer(
            shape.base_decoder(), ATTN_TARGETS, True, False, lora_rank=shape.rank,
            lora_alpha=shape.alpha, group_size=shape.group_size, quantizer="rtn",
        )
    if shape.checkpoint_dir:
        QALoRACheckpointer(shape.checkpoint_dir, "LLAMA2", str(workdir)).load_base(model)
    else:
        missing, unexpected = model.load_state_dict(weights.base, strict=False)
        not_adapters = [k for k in missing if ".lora_" not in k]
        if not_adapters or unexpected:
            raise RuntimeError(f"base weights do not fit: {not_adapters[:3]} {unexpected[:3]}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    if set(layers) != set(weights.adapters):
        raise RuntimeError(f"adapter targets differ: {sorted(set(layers) ^ set(weights.adapters))}")
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = weights.adapters[name]
            layer.lora_a.weight.copy_(a)
            layer.lora_b.weight.copy_(b)
    return model.eval()


def export_merged(model: nn.Module, shape: Shape, directory: Path) -> Path:
    """Merge every adapter into the zero points and write ``merged_int4/`` as the recipe does."""
    for module in model.modules():
        if isinstance(module, QALoRALinear):
            module.merge()
    builder_args = dict(lora_attn_modules=[], apply_lora_to_mlp=False, group_size=shape.group_size)
    if shape.builder:
        spec_model = {"_component_": shape.builder, **builder_args}
    else:
        spec_model = {
            "_component_": "qalora_tune.models.qalora_llama2",
            **shape.decoder_kwargs(),
            "tie_word_embeddings": shape.tied,
            **builder_args,
        }
    spec = {"model": spec_model, "model_type": "LLAMA2"}
    hf_config = shape.hf_config()
    directory.mkdir(parents=True, exist_ok=True)
    write_merged_int4(model, directory, HFKeyMap("LLAMA2", hf_config), hf_config, spec)
    return directory


def build_int4_merged(
    shape: Shape, weights: Weights, device: torch.device, workdir: Path
) -> nn.Module:
    """(a) Train-time QA-LoRA model -> merge -> ``merged_int4/`` -> ``load_merged`` in bf16."""
    model = build_qalora(shape, weights, device, workdir)
    directory = export_merged(model, shape, workdir / "merged_int4")
    del model
    return load_merged(directory, device=device, dtype=DTYPE)


def _lora_state_dict(
    shape: Shape, weights: Weights, device: torch.device
) -> Dict[str, torch.Tensor]:
    state = {k: v.to(device=device, dtype=DTYPE) for k, v in weights.base.items()}
    for name, (a, b) in weights.adapters.items():
        state[f"{name}.lora_a.weight"] = dense_lora_a(a.float(), shape.group_size).to(device, DTYPE)
        state[f"{name}.lora_b.weight"] = b.to(device, DTYPE)
    return state


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """RoPE caches of a model built on ``meta`` and loaded with ``assign=True``."""
    with device:
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on meta: {left[:3]}")


def build_bf16_merged(shape: Shape, weights: Weights, device: torch.device) -> nn.Module:
    """(b) torchtune LoRA merged by ``get_merged_lora_ckpt`` into a plain bf16 decoder."""
    from torchtune.modules.peft import get_merged_lora_ckpt

    state = _lora_state_dict(shape, weights, device)
    for key in list(state):
        if key.endswith(".weight") and f"{key[:-len('weight')]}lora_a.weight" in state:
            state[key] = state[key].clone()  # merged in place; keep the shared base intact
    state = get_merged_lora_ckpt(state, rank=shape.rank, alpha=shape.alpha)
    with torch.device("meta"):
        model = shape.base_decoder()()
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, device)
    return model.eval().requires_grad_(False)


def build_qlora(shape: Shape, weights: Weights, device: torch.device) -> nn.Module:
    """(c) torchtune ``lora_llama2(quantize_base=True)``: NF4 base, unmerged LoRA, bf16."""
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules import TiedLinear

    with set_default_dtype(DTYPE), device:
        model = lora_llama2(
            ATTN_TARGETS, True, False, lora_rank=shape.rank, lora_alpha=shape.alpha,
            quantize_base=True, **shape.decoder_kwargs(),
        )
    if shape.tied:
        del model.output
        model.output = TiedLinear(model.tok_embeddings)
    model.load_state_dict(_lora_state_dict(shape, weights, device), strict=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- measuring


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


# ---------------------------------------------------------------------------- the run


def _error_text(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:600]


def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _environment(device: torch.device, argv: Sequence[str]) -> Dict[str, Any]:
    from importlib.metadata import version

    cpu_model, cpu_flags = cpu_model_name(), []
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        if line.startswith("flags"):
            cpu_flags = [f for f in line.split(":", 1)[1].split() if f in _CPU_FLAGS_OF_NOTE]
            break
    return {
        "torch": torch.__version__,
        "torchao": version("torchao"),
        "torchtune": version("torchtune"),
        "qalora_tune": qalora_tune.__version__,
        "python": platform.python_version(),
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_model}"
        ),
        "cpu_model": cpu_model,
        "cpu_flags_of_note": cpu_flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "command": command_line("benchmarks/decode.py", argv),
    }


def default_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """HBM bandwidth of a known GPU (H100 SXM, H200, A100 80GB SXM), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for parts, gbps in _KNOWN_BANDWIDTH_GBPS:
        if all(part in name for part in parts):
            return gbps
    return None


def build_models(
    shape: Shape, weights: Weights, device: torch.device, workdir: Path
) -> Tuple[Dict[str, nn.Module], Dict[str, Dict[str, Any]]]:
    """The three models (a build failure is recorded in the info, not raised)."""
    builders = {
        "qalora_int4_merged": lambda: build_int4_merged(shape, weights, device, workdir),
        "lora_bf16_merged": lambda: build_bf16_merged(shape, weights, device),
        "qlora_nf4": lambda: build_qlora(shape, weights, device),
    }
    models, info = {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        try:
            models[name] = build()
        except Exception as error:  # e.g. NF4 needs numel divisible by 64 * 256
            info[name] = {"title": MODEL_TITLES[name], "build_error": _error_text(error)}
            print(f"[decode] {name}: build failed: {info[name]['build_error']}", flush=True)
            continue
        model = models[name]
        info[name] = {
            "title": MODEL_TITLES[name],
            "build_seconds": round(time.perf_counter() - start, 2),
            "weight_classes": weight_classes(model),
            "weight_bytes_per_token": weight_bytes_per_token(model),
        }
        if name == "qalora_int4_merged":
            kernel = "_weight_int4pack_mm" + ("" if device.type == "cuda" else "_for_cpu")
            classes = [c for c in info[name]["weight_classes"] if c != "torch.Tensor"]
            info[name]["served_as"] = (
                "merged_int4/ (torchao Int4Tensor, TorchAoConfig layout) loaded by "
                f"qalora_tune.load_merged into {classes}, computed by "
                f"qalora_tune::int4_linear -> aten.{kernel}"
            )
        print(f"[decode] built {name} in {info[name]['build_seconds']}s", flush=True)
    return models, info


def check_logits(models: Dict[str, nn.Module], prompt: torch.Tensor) -> Dict[str, Any]:
    """Relative error of each quantized model's prefill logits (fp32, no KV cache) to the bf16
    merged LoRA model's."""
    logits = {name: prefill_logits(model, prompt) for name, model in models.items()}
    out: Dict[str, Any] = {}
    reference = logits.get("lora_bf16_merged")
    if reference is not None:
        for name in ("qalora_int4_merged", "qlora_nf4"):
            if name in logits:
                out[f"{name}_vs_lora_bf16_merged"] = relative_error(logits[name], reference)
    return out


def run(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    """Build the three models, check their logits, time them; return the result dict."""
    device = torch.device(args.device)
    shape = make_shape(args.shape, args.layers)
    modes = args.modes
    torch.manual_seed(args.seed)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    result: Dict[str, Any] = {
        "benchmark": "decode",
        "environment": _environment(device, argv),
        "settings": {
            "shape": asdict(shape),
            "device": str(device),
            "dtype": "bfloat16",
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "modes": list(modes),
            "compile_mode": args.compile_mode,
            "compile_backend": args.compile_backend,
            "bandwidth_gbps": args.bandwidth_gbps,
            "adapter_targets": ATTN_TARGETS + list(MLP_TARGETS),
            "seed": args.seed,
        },
    }
    start = time.perf_counter()
    weights = make_weights(shape, device, args.seed)
    with tempfile.TemporaryDirectory(prefix="qalora_decode_") as tmp:
        models, info = build_models(shape, weights, device, Path(tmp))
    del weights
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, shape.vocab_size, (1, args.prompt_len), generator=generator)
    prompt = prompt.to(device)
    result["models"] = info
    result["logits"] = check_logits(models, prompt)
    result["setup_seconds"] = round(time.perf_counter() - start, 1)
    max_len = args.prompt_len + args.new_tokens + 1
    result["results"] = {}
    greedy: Dict[str, Dict[str, List[int]]] = {}
    for mode in modes:
        decoders: Dict[str, Decoder] = {}
        per_model: Dict[str, Dict[str, Any]] = {}
        for name in MODELS:
            if name not in models:
                per_model[name] = {"error": info[name]["build_error"]}
                continue
            per_model[name], decoder = _prepare(
                name, models[name], mode, args, device, max_len, prompt
            )
            if decoder is not None:
                decoders[name] = decoder
        timings = {name: ([], []) for name in decoders}
        for repeat in range(args.repeats):
            order = list(decoders)
            order = order[repeat % len(order):] + order[: repeat % len(order)] if order else order
            for name in order:
                prefill_s, decode_s, tokens = decoders[name].run(prompt, args.new_tokens)
                timings[name][0].append(prefill_s)
                timings[name][1].append(decode_s)
                greedy.setdefault(mode, {})[name] = tokens
        for name, (prefill, decode) in timings.items():
            per_model[name].update(_summarize(prefill, decode, args, info[name], result))
        result["results"][mode] = per_model
        print(f"[decode] {mode} done", flush=True)
    result["ratios"] = _ratios(result["results"])
    result["greedy_agreement"] = _greedy_agreement(greedy)
    result["targets"] = _targets(result, device)
    result["environment"]["load_average_at_end"] = list(os.getloadavg())
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    return result


def _prepare(
    name: str, model: nn.Module, mode: str, args: argparse.Namespace, device: torch.device,
    max_len: int, prompt: torch.Tensor,
) -> Tuple[Dict[str, Any], Optional[Decoder]]:
    """A warmed-up decoder (compile included) and the ops one decode step spends its time in."""
    entry: Dict[str, Any] = {}
    start = time.perf_counter()
    try:
        compile_mode = args.compile_mode if mode == "compile" else None
        decoder = Decoder(model, device, max_len, compile_mode, args.compile_backend)
        for _ in range(2 if mode == "compile" else 1):
            decoder.run(prompt, min(args.new_tokens, 3))
        entry["top_ops_decode_step"] = top_kernels(decoder, prompt)
    except Exception as error:  # compile failures are part of the result
        entry["error"] = _error_text(error)
        print(f"[decode] {name} ({mode}) failed: {entry['error']}", flush=True)
        return entry, None
    entry["warmup_seconds"] = round(time.perf_counter() - start, 2)
    print(f"[decode] {name} ({mode}) warmed up in {entry['warmup_seconds']}s", flush=True)
    return entry, decoder


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


# ---------------------------------------------------------------------------- output


def _fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def markdown(result: Dict[str, Any]) -> str:
    """A markdown report: settings, one row per (mode, model), ratios and targets."""
    s, env = result["settings"], result["environment"]
    shape = s["shape"]
    flags = env.get("cpu_flags_of_note")
    lines = [
        f"# Decode benchmark: {shape['name']} on {env['device']}",
        "",
        f"`{env['command']}`",
        "",
        f"{shape['num_layers']} layers, dim {shape['embed_dim']}, ffn {shape['intermediate_dim']}, "
        f"vocab {shape['vocab_size']}, group size {shape['group_size']}, rank {shape['rank']}, "
        f"alpha {shape['alpha']:g}; prompt {s['prompt_len']} tokens, {s['new_tokens']} decoded "
        f"(greedy, KV cache), batch 1, bf16, median of {s['repeats']} interleaved repeats. "
        f"torch {env['torch']}, torchao {env['torchao']}, torchtune {env['torchtune']}, "
        f"{env['torch_threads']} threads"
        + (f", CPU flags {' '.join(flags)}." if flags else "."),
        "",
        "| mode | model | prefill tok/s | decode tok/s | ms/token | weight MB/token "
        "| weight GB/s | % of bandwidth |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, per_model in result["results"].items():
        for name in MODELS:
            entry = per_model.get(name, {})
            title = result["models"][name]["title"]
            if "error" in entry:
                lines.append(f"| {mode} | {title} | error: {entry['error'][:120]} | | | | | |")
                continue
            mb = result["models"][name]["weight_bytes_per_token"] / 1e6
            fraction = entry.get("bandwidth_fraction")
            lines.append(
                f"| {mode} | {title} | {_fmt(entry['prefill_tokens_per_s'])} | "
                f"{_fmt(entry['decode_tokens_per_s'], 2)} | "
                f"{_fmt(entry['decode_ms_per_token'], 1)} | "
                f"{_fmt(mb, 1)} | {_fmt(entry['weight_gb_per_s'], 2)} | "
                f"{'n/a' if fraction is None else f'{100 * fraction:.1f}%'} |"
            )
    lines += [
        "",
        "| mode | prefill int4/bf16 | decode int4/bf16 | prefill int4/QLoRA | decode int4/QLoRA |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, r in result["ratios"].items():
        lines.append(
            f"| {mode} | {_fmt(r['prefill_int4_over_bf16'], 2, 'x')} | "
            f"{_fmt(r['decode_int4_over_bf16'], 2, 'x')} | "
            f"{_fmt(r['prefill_int4_over_qlora'], 2, 'x')} | "
            f"{_fmt(r['decode_int4_over_qlora'], 2, 'x')} |"
        )
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    lines += ["", "Targets (issue 7, best over modes): " + "; ".join(
        f"{k} >= {v['target']}: {_fmt(v['measured_best'], 2)} ({verdict[v['met']]})"
        for k, v in result["targets"].items()
    )]
    agreement = ", ".join(f"{k.split('_vs_')[0]} {v:.3g}" for k, v in result["logits"].items())
    greedy = "; ".join(
        f"{mode}: " + ", ".join(f"{k} {v:.0%}" for k, v in g.items())
        for mode, g in result["greedy_agreement"].items()
    )
    lines += ["", f"Prefill logits vs the bf16 merged LoRA model (relative Frobenius error, "
              f"no KV cache): {agreement or 'n/a'}. Greedy tokens equal to the bf16 model's: "
              f"{greedy or 'n/a'}."]
    if shape.get("checkpoint_dir") is None:
        lines += ["", "Random weights: the logits are close to noise, so any 4-bit base (int4 RTN "
                  "here, NF4 in QLoRA) moves them by a similar amount and changes most greedy "
                  "tokens. That the served int4 model computes the dequantized int4 base plus "
                  "the merged adapter within bf16 rounding is checked by "
                  "`tests/benchmarks/test_decode.py`."]
    lines += ["", "Weight tensor classes, and the ops one decode step spends its time in "
              "(profiler, self time):", ""]
    for name in MODELS:
        info = result["models"][name]
        classes = ", ".join(f"`{c}`" for c in info.get("weight_classes", [])) or "n/a"
        lines.append(f"- {info['title']}: {classes}" + (
            f"; build error: {info['build_error']}" if "build_error" in info else "")
            + (f"; {info['served_as']}" if "served_as" in info else ""))
        for mode, per_model in result["results"].items():
            top_ops = per_model.get(name, {}).get("top_ops_decode_step", [])
            ops = ", ".join(f"`{op}`" for op in top_ops)
            if ops:
                lines.append(f"  - {mode}: {ops}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (device-dependent defaults filled in)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--shape", choices=("llama2_7b_layers", "tinystories656K", "tiny"),
        default="llama2_7b_layers", help="tiny: 2 random layers of width 256 (tests)",
    )
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of llama2_7b_layers (default 2 on CPU, 32 on CUDA)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="default 16 on CPU (QLoRA's eager NF4 decode takes ~4 s/token at 7B "
                        "width there), 128 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 on CPU, 5 on CUDA")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time eager and torch.compile (the default)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: 'default' on CPU, "
                        "'reduce-overhead' on CUDA)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (tests use aot_eager to stay fast)")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="memory bandwidth to compare with (default: known GPUs; "
                        "required on other GPUs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a "
                        "shared machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    for name in ("prompt_len", "new_tokens", "repeats", "layers", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.layers = args.layers or (32 if cuda else 2)
    args.new_tokens = args.new_tokens or (128 if cuda else 16)
    args.repeats = args.repeats or (5 if cuda else 3)
    if args.modes is None:
        args.modes = list(MODES) if args.compile in (None, True) else ["eager"]
    elif args.compile is False:
        args.modes = [m for m in args.modes if m != "compile"] or ["eager"]
    args.compile_mode = args.compile_mode or ("reduce-overhead" if cuda else "default")
    if cuda and args.bandwidth_gbps is None:
        args.bandwidth_gbps = default_bandwidth_gbps(torch.device("cuda"))
        if args.bandwidth_gbps is None:
            parser.error(
                f"no known memory bandwidth for {torch.cuda.get_device_name()}; "
                "pass --bandwidth-gbps"
            )
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark, print the markdown report, write ``--json`` / ``--markdown``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(args, argv)
    text = markdown(result)
    print(text)
    for path, content in ((args.json, json.dumps(result, indent=2)), (args.markdown, text)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content + ("" if content.endswith("\n") else "\n"))
    return result


if __name__ == "__main__":
    main()
