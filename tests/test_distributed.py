"""utils.distributed: single-process fallbacks, and real gloo collectives across 2 processes."""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils import distributed as D


def test_single_process_fallbacks():
    assert not dist.is_initialized()
    assert D.rank() == 0 and D.world_size() == 1 and not D.is_distributed() and D.is_main_process()
    x = torch.arange(6.0).reshape(3, 2)
    assert D.all_gather_rows(x) is x
    assert torch.equal(D.all_reduce(x.clone()), x)
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.broadcast_tensors([x])  # a no-op, must not raise


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = torch.full((rank + 2, 3), float(rank))  # 2 rows on rank 0, 3 on rank 1
        gathered = D.all_gather_rows(rows)
        t = torch.full((4,), float(rank + 1))
        D.all_reduce(t)
        b = torch.full((2,), float(rank * 10))
        D.broadcast_tensors([b])
        choice = D.broadcast_object(random.Random(rank).random())
        from quantization import ResidualVectorQuantizer

        q = ResidualVectorQuantizer(4, 2, 16, 50, [0.5, 1.0])
        bw = q.sample_bandwidth(random.Random(rank + 123))
        torch.save({"gathered": gathered, "sum": t, "bcast": b, "choice": choice, "bw": bw, "rank": D.rank()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_collectives_across_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(port, out), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"]) == (0, 1)
    expected = torch.cat([torch.zeros(2, 3), torch.ones(3, 3)])
    for r in (r0, r1):
        assert torch.equal(r["gathered"], expected)  # uneven row counts gathered in rank order
        assert torch.equal(r["sum"], torch.full((4,), 3.0))
        assert torch.equal(r["bcast"], torch.zeros(2))  # rank 0's values everywhere
    assert r0["choice"] == r1["choice"] == random.Random(0).random()
    assert r0["bw"] == r1["bw"]  # every rank trains the same number of codebooks


def test_device_and_backend_choice_for_a_process_layout():
    """More NCCL processes than GPUs is one clear error; gloo lets ranks share a GPU."""
    assert D.choose_device(0, 1, 0) == (torch.device("cpu"), "gloo")
    assert D.choose_device(3, 8, 8) == (torch.device("cuda", 3), "nccl")
    assert D.choose_device(1, 2, 1, backend="gloo") == (torch.device("cuda", 0), "gloo")  # two ranks, one GPU
    assert D.choose_device(1, 2, 1, device="cpu") == (torch.device("cpu"), "gloo")
    with pytest.raises(D.DistributedError, match=r"2 processes on this node but 1 GPU\(s\) visible.*--nproc-per-node=1.*dist_backend=gloo"):
        D.choose_device(0, 2, 1)  # every rank of the node fails alike, not only the ones past the last GPU
    with pytest.raises(D.DistributedError, match="no GPU is visible"):
        D.choose_device(0, 1, 0, device="cuda")
    with pytest.raises(D.DistributedError, match="nccl needs GPUs"):
        D.choose_device(0, 1, 0, backend="nccl")


def test_shard_and_rank_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert D.rank_and_world_size() == (1, 3) and D.shard(list(range(7)), 1, 3) == [1, 4]
    assert D.rank() == 0 and D.world_size() == 1  # no process group: collectives stay single-process
    monkeypatch.setenv("WORLD_SIZE", "abc")
    with pytest.raises(ValueError, match="must be integers"):
        D.rank_and_world_size()
