"""A base and several tasks on it, written the way training writes them (for the task tests).

The tiny llama with random full-precision weights is quantized once per model built (RTN
is deterministic, so every build has the same codes and scales); each task gets its own
random adapters, merged, and is written as its own ``merged_int4/``; the task-free base is
the same quantization without adapters.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch
from torch import nn
from torchtune import training

from qalora_tune.checkpointing import HFKeyMap
from qalora_tune.modules import QALoRALinear
from qalora_tune.tiny import TINY_LLAMA_SIZES, qalora_tiny_llama
from qalora_tune.tiny.hf_checkpoint import hf_llama_config
from tests.export.merged_models import ATTENTION, write_merged

CONFIG = hf_llama_config(TINY_LLAMA_SIZES)
KEY_MAP = HFKeyMap("LLAMA2", CONFIG)


@dataclass
class Family:
    """``base``: the task-free merged directory; ``merged[k]``: task k's merged directory;
    ``models[k]``: task k's merged model in memory (QALoRALinear layers, merged)."""

    base: Path
    merged: List[Path]
    models: List[nn.Module]


def plain_weights(seed: int = 0) -> dict:
    """Full-precision tiny llama weights (the 'checkpoint' every build quantizes)."""
    torch.manual_seed(seed)
    return qalora_tiny_llama.full_precision().state_dict()


def build(
    weights: dict,
    bits: int,
    group_size: int,
    adapters: bool,
    dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    targets=ATTENTION,
) -> nn.Module:
    """The tiny llama quantized from ``weights``, with (unmerged, zero-B) adapters or none."""
    with training.set_default_dtype(dtype):
        model = qalora_tiny_llama(
            list(targets) if adapters else [], apply_lora_to_mlp=adapters,
            apply_lora_to_output=adapters, lora_rank=2, lora_alpha=4.0, group_size=group_size,
            bits=bits, double_quant_scales=double_quant,
        )
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    return model.eval()


def merge_random_adapters(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Give every adapter random ``A`` and ``B`` (from ``seed``) and merge it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QALoRALinear):
                layer.lora_a.weight.normal_(0, 0.5, generator=generator)
                layer.lora_b.weight.normal_(0, std, generator=generator)
                layer.merge()
    return model


def make_family(
    root: Path,
    bits: int = 4,
    group_size: int = 32,
    tasks: int = 3,
    dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    seed: int = 0,
    merged_format: str = "intx",
) -> Family:
    """Write a task-free base and ``tasks`` merged tasks of it under ``root``, in
    ``merged_format`` (``intx``: the default merged output on CPU)."""
    weights = plain_weights(seed)
    base = root / "base"
    write_merged(
        build(weights, bits, group_size, False, dtype, double_quant), base, bits, group_size,
        merged_format,
    )
    merged, models = [], []
    for k in range(tasks):
        model = build(weights, bits, group_size, True, dtype, double_quant)
        merge_random_adapters(model, seed=1000 + k)
        path = root / f"merged_{k}"
        write_merged(model, path, bits, group_size, merged_format)
        merged.append(path)
        models.append(model)
    return Family(base, merged, models)


def assert_same_model(model: nn.Module, reference: nn.Module) -> None:
    """Every tensor of two loaded models equal bit for bit (quantized ones by their parts)."""
    mine, theirs = model.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        other = mine[key]
        assert type(other) is type(value), key
        names = getattr(value, "tensor_data_names", None)
        if names:
            for name in names:
                a, b = getattr(other, name), getattr(value, name)
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (key, name)
        else:
            assert torch.equal(other, value), key


def zeros_snapshot(model: nn.Module) -> dict:
    """A copy of every quantized weight's inner tensors (codes, scales, zeros)."""
    snapshot = {}
    for key, value in model.state_dict().items():
        for name in getattr(value, "tensor_data_names", ()):
            snapshot[(key, name)] = getattr(value, name).clone()
    return snapshot
