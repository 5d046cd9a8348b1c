"""Process-group helpers that work without one too (collectives run only with several ranks); the one source of
rank and world size."""

import datetime
import gc
import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    return _grouped() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)``: the process group's, else ``RANK``/``WORLD_SIZE``, else ``(0, 1)``; ValueError if bad."""
    if _grouped():
        return rank(), world_size()
    if ("WORLD_SIZE" in os.environ) != ("RANK" in os.environ):
        given, absent = ("WORLD_SIZE", "RANK") if "WORLD_SIZE" in os.environ else ("RANK", "WORLD_SIZE")
        fix = "set both (torchrun does), or neither for one process"
        raise ValueError(f"{given}={os.environ[given]} is set but {absent} is not: {fix}")
    try:
        r, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        values = f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}"
        raise ValueError(f"{values} must be integers") from None
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"RANK={r} must lie in [0, WORLD_SIZE={world})")
    return r, world


def rank() -> int:
    return dist.get_rank() if _grouped() else 0


def world_size() -> int:
    return dist.get_world_size() if _grouped() else 1


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Items ``rank, rank + world_size, ...``: every item goes to exactly one rank."""
    return list(items[rank::world_size])


class DistributedError(RuntimeError):
    """A process layout that cannot run (e.g. more NCCL ranks than GPUs); the message says what to change."""


def choose_device(local: int, local_world: int, gpus: int, device: str = "auto",
                  backend: str = "auto") -> tuple[torch.device, str]:  # fmt: skip
    """This process's device and the group's backend.

    Args:
        local: the local rank; local_world: processes on this node; gpus: GPUs visible.
        device: ``"auto"`` (cuda when a GPU is visible), ``"cuda"`` or ``"cpu"``.
        backend: ``"auto"`` (NCCL on GPUs, else gloo), ``"nccl"`` (a GPU each) or ``"gloo"`` (GPU ``local % gpus``).
    """
    if device == "cpu" or (device == "auto" and gpus == 0):
        if backend == "nccl":
            raise DistributedError("dist_backend=nccl needs GPUs; on CPU use dist_backend=gloo (or auto)")
        return torch.device("cpu"), "gloo"
    if gpus == 0:
        raise DistributedError("device=cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, drivers); use device=cpu or auto")
    backend = "nccl" if backend == "auto" else backend
    if backend == "nccl" and local_world > gpus:
        fix = f"run --nproc-per-node={gpus}, or set dist_backend=gloo (ranks share GPUs) or device=cpu"
        found = f"{local_world} processes on this node but {gpus} GPU(s) visible"
        raise DistributedError(f"{found}: NCCL needs one GPU per process; {fix}")
    return torch.device("cuda", local % gpus), backend


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0) -> torch.device:
    """Join torchrun's process group when there is one; returns this rank's device (:func:`choose_device`).
    DistributedError for malformed or incomplete torchrun variables, instead of a hang or a traceback."""
    try:
        _, world = rank_and_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as exc:
        raise DistributedError(f"{exc}; launch several processes with torchrun --nproc-per-node=N") from None
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(v)]
    if missing:
        fix = f"launch with torchrun --nproc-per-node={world} (it sets them), or unset WORLD_SIZE and RANK"
        raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: {fix} for one process")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    chosen, backend = choose_device(local, local_world, gpus, device, backend)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": chosen} if backend == "nccl" else {}
        # torchrun's store outlives a failed attempt: a prefix per attempt, never the dead group's addresses
        store, r, size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"xcodec/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, store=store, rank=r, world_size=size, timeout=timeout, **kwargs)
    return chosen


def close_distributed(wait: bool) -> None:
    """Destroy the process group (if any) now, after DDP wrappers are dropped: left to the interpreter's exit
    it can hang (gloo's threads joined holding the GIL). ``wait``: a barrier first (not on an error path)."""
    if not _grouped():
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        gc.collect()  # DDP's reducer sits in reference cycles: free it (and its hold on the group) now
        dist.destroy_process_group()


def first_to_report(message: str) -> bool:
    """Whether this process prints fatal ``message``: under torchrun only the first rank to report it (counted in
    its store); True outside torchrun or when the store is unreachable (a line twice, never none)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not host or not port.isdigit():
        return True
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return store.add(f"xcodec/attempt_{attempt}/reported/{hashlib.sha1(message.encode()).hexdigest()}", 1) == 1
    except (RuntimeError, OSError, ValueError):  # DistStoreError is a RuntimeError
        return True


def is_main_process() -> bool:
    return rank() == 0


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op)
    return tensor


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Broadcast floating-point tensors in place from ``src`` to every rank."""
    if not is_distributed():
        return
    for tensor in tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            dist.broadcast(tensor.data, src=src)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N_r, D) from every rank along dim 0; N_r may differ per rank."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)], dim=0)


def broadcast_object(obj, src: int = 0):
    """Return rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_on_every_rank(error: BaseException | None, src: int = 0) -> None:
    """Raise rank ``src``'s picklable ``error`` (or nothing) on every rank alike, a collective."""
    error = broadcast_object(error, src)
    if error is not None:
        raise error


def gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=device), dist.ReduceOp.MAX).item() > 0)
