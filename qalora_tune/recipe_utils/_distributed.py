"""Data parallelism over the adapters: every rank holds the whole int4 base, gradients of
the adapter parameters are summed across ranks before each optimizer step.

Each function is a no-op (or the single-process answer) when ``torch.distributed`` is not
initialized, so the recipe runs the same code on one process and on ``N``.
"""

import os
from typing import Any, Callable, Iterable, List, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_parameters",
    "destroy_distributed",
    "gather_objects",
    "init_distributed",
    "is_rank_zero",
    "run_on_rank_zero",
    "shard_indices",
    "world_size_and_rank",
]


def init_distributed(device: str) -> bool:
    """Join the process group that ``torchrun`` (``tune run --nproc_per_node N``) set up.

    Args:
        device (str): the config's device; ``cpu`` uses gloo, ``cuda`` NCCL (gloo for CPU
            tensors).

    Returns:
        bool: whether the run is distributed (more than one process).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return True


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size_and_rank() -> tuple:
    """``(world_size, rank)``; ``(1, 0)`` on a single process."""
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def is_rank_zero() -> bool:
    return world_size_and_rank()[1] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks, through one flat fp32 buffer per dtype.

    A parameter without a gradient on this rank contributes zeros, so every rank calls the
    same collective. Adapters are a small share of the model (well under 1% of its
    parameters), so one buffer costs less than the base's int4 weights.
    """
    if not dist.is_initialized():
        return
    by_dtype = {}
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads]).float()  # sum in fp32
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (identical adapters to start)."""
    if not dist.is_initialized():
        return
    for param in params:
        dist.broadcast(param.data, src=src)


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` on a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


_T = TypeVar("_T")


def run_on_rank_zero(function: Callable[[], _T]) -> _T:
    """Call ``function`` on rank 0 only (a save, a summary) and return its result on every
    rank; if it raises, every rank raises the same error, so none waits forever on a
    collective rank 0 will never reach.
    """
    if not dist.is_initialized():
        return function()
    outcome: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (True, function())
        except Exception as error:  # re-raised below, on every rank
            outcome[0] = (False, error)
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def shard_indices(count: int, world_size: int, rank: int) -> Sequence[int]:
    """Rank ``rank``'s share of ``range(count)``: every ``world_size``-th index (no padding,
    so sums over the shards equal the sum over all items)."""
    return range(rank, count, world_size)
