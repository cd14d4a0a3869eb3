"""The data-parallel helpers on one process and on two gloo processes (CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qalora_tune.recipe_utils import (
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_parameters,
    gather_objects,
    run_on_rank_zero,
    shard_indices,
    world_size_and_rank,
)


def test_single_process_helpers_are_the_identity():
    assert world_size_and_rank() == (1, 0)
    x = torch.arange(3.0)
    assert all_reduce_sum(x) is x and x.tolist() == [0.0, 1.0, 2.0]
    assert gather_objects({"a": 1}) == [{"a": 1}]
    assert run_on_rank_zero(lambda: 7) == 7
    with pytest.raises(ValueError, match="boom"):
        run_on_rank_zero(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_shards_cover_every_index_once():
    shards = [list(shard_indices(11, 3, rank)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert shards[0] == [0, 3, 6, 9]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)
        params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
        broadcast_parameters(params)
        params[0].grad = torch.full((3, 2), float(rank + 1))
        # params[1] has no gradient on rank 1: it must count as zeros, not hang
        if rank == 0:
            params[1].grad = torch.ones(4)
        all_reduce_gradients(params)

        def fails_on_rank_zero():
            raise PermissionError("cannot write here")

        try:
            run_on_rank_zero(fails_on_rank_zero)
            error = None
        except PermissionError as caught:
            error = str(caught)
        results[rank] = {
            "p0": params[0].detach().clone(),
            "g0": params[0].grad.clone(),
            "g1": params[1].grad.clone(),
            "gathered": gather_objects(rank * 10),
            "written_by_rank_zero": run_on_rank_zero(lambda: dist.get_rank()),
            "error": error,
        }
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_sum_gradients_and_share_rank_zero_results():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    assert torch.equal(zero["p0"], one["p0"])  # rank 0's values everywhere
    assert torch.equal(zero["g0"], torch.full((3, 2), 3.0)) and torch.equal(one["g0"], zero["g0"])
    assert torch.equal(one["g1"], torch.ones(4))
    assert zero["gathered"] == one["gathered"] == [0, 10]
    assert zero["written_by_rank_zero"] == one["written_by_rank_zero"] == 0
    assert zero["error"] == one["error"] == "cannot write here"
