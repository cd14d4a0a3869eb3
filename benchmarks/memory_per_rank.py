"""Memory per rank of the shipped configs: data parallel (int4 base replicated) vs FSDP2.

    python benchmarks/memory_per_rank.py [--nproc 8] [--configs llama2_7B_qalora ...]

Each config's ``model`` section is built on the ``meta`` device in bf16, exactly as the
recipe builds it, and the bytes of the tensors it creates are summed by kind: the int4
base (codes, scales and zero points), the other frozen weights (embeddings, norms) and
the adapters. Training adds, per adapter parameter, a gradient and AdamW's two moments
(same dtype). Activations are left out: they are the same under both strategies.

    data parallel (this recipe)   every rank: base + frozen + 4 x adapters
    FSDP2 (sharded)               every rank: (base + frozen + 4 x adapters) / N
                                  + two transformer layers unsharded (current, prefetched)

and, per optimizer step, what each rank sends and receives: data parallel all-reduces the
adapter gradients (about 2 x their bytes in a ring); FSDP2 all-gathers every layer in the
forward and again in the backward (about 2 x the base's bytes).

The int4 layout built on the meta device is the CPU one (``Int4OpaqueTensor``); the CUDA
one (tinygemm) stores the same codes and bf16 scale/zero pairs, so the same bytes.
"""

import argparse
from typing import Dict, List

import torch
from omegaconf import OmegaConf
from torchtune import config as tune_config

from qalora_tune.models import tensor_nbytes
from qalora_tune.recipe_utils import packaged_config_names, resolve_config

GIB = 1024**3
DEFAULT_CONFIGS = [
    "llama3_2_1B_qalora",
    "llama3_2_3B_qalora",
    "llama2_7B_qalora",
    "mistral_7B_qalora",
    "qwen2_5_7B_qalora",
    "llama3_1_8B_qalora",
    "llama2_13B_qalora",
    "llama2_70B_qalora",
]


def measure(config_name: str) -> Dict[str, float]:
    """Bytes by kind of the model ``config_name`` builds, plus its largest layer."""
    cfg = OmegaConf.load(resolve_config(config_name))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = tune_config.instantiate(cfg.model)
    finally:
        torch.set_default_dtype(previous)
    base = frozen = adapters = 0
    for _, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        size = tensor_nbytes(tensor)
        if tensor.requires_grad:
            adapters += size
        elif hasattr(tensor, "__tensor_flatten__"):
            base += size
        else:
            frozen += size
    layer = max(
        sum(tensor_nbytes(t) for t in layer.parameters()) for layer in model.layers
    )
    return {"base": base, "frozen": frozen, "adapters": adapters, "layer": layer}


def table(names: List[str], nproc: int) -> str:
    rows = [
        f"| config | int4 base | other frozen | adapters | data parallel, per rank | "
        f"FSDP2 over {nproc}, per rank | traffic per step: DP / FSDP2 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        m = measure(name)
        trainable = 4 * m["adapters"]  # weights, gradients, AdamW's two moments
        replicated = m["base"] + m["frozen"] + trainable
        sharded = replicated / nproc + 2 * m["layer"]
        rows.append(
            f"| {name} | {m['base'] / GIB:.2f} GiB | {m['frozen'] / GIB:.2f} GiB | "
            f"{m['adapters'] / 2**20:.0f} MiB | {replicated / GIB:.2f} GiB | "
            f"{sharded / GIB:.2f} GiB | {2 * m['adapters'] / 2**20:.0f} MiB / "
            f"{2 * m['base'] / GIB:.1f} GiB |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=8, help="ranks for the FSDP2 column")
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, choices=packaged_config_names(),
        metavar="CONFIG", help="packaged configs to measure",
    )
    args = parser.parse_args()
    print(table(args.configs, args.nproc))


if __name__ == "__main__":
    main()
