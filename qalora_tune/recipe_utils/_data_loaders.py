"""The recipes' datasets and loaders: one dataset or a list of them, padded SFT batches,
a rank's share of each epoch, and the probe batch a merge is measured on."""

from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from qalora_tune._compat import get_component_from_path
from qalora_tune.errors import UserValueError
from qalora_tune.recipe_utils._distributed import shard_indices
from qalora_tune.recipe_utils._instantiate import instantiate_section

__all__ = [
    "IGNORE_INDEX",
    "build_dataset",
    "padded_collate",
    "probe_batch",
    "training_loader",
    "validation_loader",
]

IGNORE_INDEX = -100
"""The label of positions that take no loss (torchtune's ``CROSS_ENTROPY_IGNORE_IDX``)."""


def build_dataset(cfg_dataset: Any, tokenizer: Any, setting: str = "dataset") -> torch.utils.data.Dataset:
    """The dataset a config section describes; a list of sections is concatenated."""
    if isinstance(cfg_dataset, (list, tuple)) or OmegaConf.is_list(cfg_dataset):
        parts = [
            instantiate_section(c, f"{setting}[{i}]", tokenizer) for i, c in enumerate(cfg_dataset)
        ]
        return torch.utils.data.ConcatDataset(parts)
    return instantiate_section(cfg_dataset, setting, tokenizer)


def padded_collate(pad_id: int) -> Callable[[Sequence[Dict[str, Any]]], Dict[str, torch.Tensor]]:
    """torchtune's SFT collate: tokens padded with ``pad_id``, labels with ``IGNORE_INDEX``."""
    collate = get_component_from_path("torchtune.data.padded_collate_sft")
    return partial(collate, padding_idx=pad_id, ignore_idx=IGNORE_INDEX)


def _loader(dataset, batch_size: int, sampler, drop_last: bool, pad_id: int, seed: int) -> StatefulDataLoader:
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=padded_collate(pad_id),
        # a loader without a generator draws a seed from the global RNG at every iter():
        # its own keeps the dropout stream where an exact resume expects it
        generator=torch.Generator().manual_seed(seed),
    )


def training_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    world_size: int,
    rank: int,
    shuffle: bool,
    seed: int,
    pad_id: int,
) -> StatefulDataLoader:
    """This rank's loader: every ``world_size``-th example of each epoch's order
    (resumable mid-epoch through its ``state_dict``).

    Raises:
        UserValueError: if the dataset cannot fill one global batch.
    """
    if len(dataset) < batch_size * world_size:
        raise UserValueError(
            f"the dataset has {len(dataset)} examples, fewer than batch_size={batch_size} x "
            f"{world_size} processes; lower batch_size"
        )
    sampler = StatefulDistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    return _loader(dataset, batch_size, sampler, shuffle, pad_id, seed)


def validation_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    max_batches: Optional[int],
    world_size: int,
    rank: int,
    seed: int,
    pad_id: int,
) -> StatefulDataLoader:
    """A loader over this rank's share of the first ``max_batches * batch_size`` examples
    (all when ``max_batches`` is None), split so that summed metrics equal one process's."""
    count = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    shard = list(shard_indices(count, world_size, rank))
    return _loader(dataset, batch_size, shard, False, pad_id, seed)


def probe_batch(dataset: torch.utils.data.Dataset, size: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """The first ``size`` examples of ``dataset``, collated: the batch on which a merge's
    logits are compared with the unmerged model's."""
    return padded_collate(pad_id)([dataset[i] for i in range(min(size, len(dataset)))])
