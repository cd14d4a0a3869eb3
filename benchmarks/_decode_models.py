"""The three models of ``benchmarks/decode.py``, built from one set of base weights and
pooled adapters: the QA-LoRA model merged and served through ``qalora_tune.load_merged``,
torchtune's LoRA merged into bf16, and torchtune's QLoRA (NF4 base, unmerged LoRA)."""

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torchtune.training import set_default_dtype

from qalora_tune.checkpointing import (
    HFKeyMap,
    QALoRACheckpointer,
    find_checkpoint_files,
    load_hf_weights,
    load_merged,
    read_hf_config,
    write_merged_int4,
)
from qalora_tune.models import qalora_transformer, tied_llama
from qalora_tune.modules import QALoRALinear

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"

ATTN_TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj"]
MLP_TARGETS = ("w1", "w2", "w3")
DTYPE = torch.bfloat16


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
            return read_hf_config(Path(self.checkpoint_dir))
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
        hf = read_hf_config(path)
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
    """The real checkpoint's weights in torchtune keys, streamed into the full-precision
    decoder by the project's Hugging Face loader (key map, tied embeddings)."""
    model = shape.base_decoder()()
    files = find_checkpoint_files(Path(shape.checkpoint_dir), None, "hf")
    load_hf_weights(model, files, "LLAMA2", shape.hf_config())
    return {key: value.detach() for key, value in model.state_dict().items()}


def make_weights(
    shape: Shape, device: torch.device, seed: int = 0, adapter_scale: float = 0.1
) -> Weights:
    """Base weights and non-zero pooled adapters on every target linear.

    ``A ~ N(0, 1)``; ``B ~ N(0, 1)`` scaled so that the dense update of the sum-pooled
    layer, ``(alpha / r) B A`` with ``A`` repeated over each group, has about
    ``adapter_scale`` times the RMS of the base weight.
    """
    base = checkpoint_base(shape) if shape.checkpoint_dir else random_base(shape, device, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    adapters = {}
    for name, linear in _target_linears(shape).items():
        n_groups = linear.in_features // shape.group_size
        a = torch.randn(shape.rank, n_groups, generator=generator)
        b = torch.randn(linear.out_features, shape.rank, generator=generator)
        weight_rms = base[f"{name}.weight"].float().pow(2).mean().sqrt().item()
        update_rms = shape.alpha / shape.rank * math.sqrt(shape.rank)
        b *= adapter_scale * weight_rms / update_rms
        adapters[name] = (a.to(device), b.to(device))
    return Weights(base, adapters)


def dense_lora_a(a: torch.Tensor, group_size: int, pooling: str = "sum") -> torch.Tensor:
    """A torchtune LoRA ``A`` ``(r, K)`` equal in function to a pooled ``A`` ``(r, K/G)``
    (QA-LoRA layers pool by group sum; adapters of qalora-tune 0.1 by group mean)."""
    dense = a.repeat_interleave(group_size, dim=1)
    return dense / group_size if pooling == "mean" else dense


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
