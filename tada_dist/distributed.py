"""Process-group setup shared by `tada-train`, `python -m tada_dist.train` and torchrun.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every worker. A plain
single-process run sets them itself, because DeepSpeed otherwise falls back to MPI discovery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on localhost that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_env() -> None:
    """Give a process started without torchrun the environment of a one-process group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


VERBOSE_ENV = "TADA_DIST_VERBOSE"  # "1": let DeepSpeed print its start-up messages (tada-train --verbose)


@contextlib.contextmanager
def deepspeed_output() -> Iterator[None]:
    """Keep DeepSpeed's start-up chatter off stdout, where only results belong (tada-eval --json).

    DeepSpeed logs accelerator detection and its config to stdout, and its op builders print. Its log
    handler writes to the stdout of the moment it is imported, so the import happens here with stdout
    pointing at stderr; unless TADA_DIST_VERBOSE=1, a filter (set before the import, which already
    logs) lets only its errors through, and prints inside this block are dropped."""
    verbose = os.environ.get(VERBOSE_ENV) == "1"
    # DeepSpeed's own logger, and torch's note (on every machine without CUDA) when DeepSpeed loads its
    # CPU communication op.
    for name in ("DeepSpeed", "torch.utils.cpp_extension"):
        chatty = logging.getLogger(name)
        if not verbose and _errors_only not in chatty.filters:
            chatty.addFilter(_errors_only)
    target = sys.stderr if verbose else open(os.devnull, "w")
    try:
        with contextlib.redirect_stdout(target):
            with contextlib.redirect_stdout(sys.stderr):
                import deepspeed  # noqa: F401  (its handler now writes to stderr)
            yield
    finally:
        if target is not sys.stderr:
            target.close()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the process group through DeepSpeed: nccl on GPUs, gloo on CPUs."""
    with deepspeed_output():
        import deepspeed  # imported here: it is slow to import

    ensure_process_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on CPU machines")
    if not dist.is_initialized():
        _init_process_group(backend)
        with deepspeed_output():
            deepspeed.init_distributed(dist_backend=backend)  # adopts the group
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def _init_process_group(backend: str) -> None:
    """env:// initialisation, with the store keys of each torchrun restart under their own prefix.

    torchrun keeps one store for the whole job. Without a prefix, the workers of a restarted group can
    read the addresses the failed group published and try to connect to processes that are gone
    (gloo: "connectFullMesh failed ... Connection refused"), which costs a restart each time."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"tada-dist/attempt{attempt}", store),
                            rank=rank, world_size=world_size)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class Verdict:
    """Flags OR-ed over all ranks, on their way: result() waits for the all-reduce (if it has not
    finished) and gives every rank the same answer."""

    def __init__(self, values: torch.Tensor, work: dist.Work | None):
        self._values = values
        self._work = work

    def result(self) -> list[bool]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return [bool(value) for value in self._values.tolist()]


def any_rank_async(flags: list[bool | torch.Tensor], device: torch.device) -> Verdict:
    """Start OR-ing each flag over all ranks in one small all-reduce; the caller works on meanwhile
    (the trainer runs its backward pass) and takes the answer with Verdict.result().

    A flag may be a one-element tensor on the device (say, "this loss is not finite"): it joins the
    others on the device, so the answer costs a single wait for the device, not one per flag."""
    values = torch.stack([flag.reshape(()).float() if isinstance(flag, torch.Tensor)
                          else torch.tensor(float(flag), device=device) for flag in flags])
    work = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)
    return Verdict(values, work)


def any_rank(flags: list[bool | torch.Tensor], device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks, so that every rank takes the same branch."""
    return any_rank_async(flags, device).result()


def average_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Give every rank the mean of the ranks' BatchNorm running statistics.

    Each rank's statistics follow its own shard of the data, and DeepSpeed neither synchronises
    buffers nor saves any rank's but rank 0's. Averaging before evaluation and before each checkpoint
    makes evaluation use all the data's statistics, equal on every rank, and makes a resumed run
    continue from exactly the state it saved."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                total = buffer.detach().float()  # a copy: gloo has no bf16 reduction
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                buffer.copy_(total / dist.get_world_size())


def all_gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order; [value] without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, src: int = 0):
    """Send a picklable value from rank `src` to every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
