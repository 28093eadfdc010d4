"""Batch jobs under torchrun: the rank's place in the job, its device, and the process group.

    torchrun --standalone --nproc_per_node=4 -m interp heads smollm2-135m --out heads.parquet

torchrun (torch.distributed.run) starts the processes, restarts them after a failure
(`--max-restarts`) and sets RANK, WORLD_SIZE and LOCAL_RANK; this module only reads them. A job
started with WORLD_SIZE > 1 takes shard RANK of WORLD_SIZE, runs on `cuda:LOCAL_RANK` when CUDA is
available and no device was pinned (else where it was pinned, or on the CPU), and joins a process
group (nccl on CUDA, gloo on the CPU) used for one thing: the barrier before rank 0 finishes the
job. There is no scheduler here: the shards are fixed by rank, and failures are torchrun's to
handle. docs/distributed.md has the commands.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

__all__ = ["Group", "Launch", "TIMEOUT_ENV", "backend_for", "launched", "pick_device", "process_group", "replica_gpus", "timeout"]

TIMEOUT_ENV = "INTERP_DIST_TIMEOUT_S"
# The barrier waits for the slowest rank's whole shard (after a restart, one rank may have all of
# its shard left and another none of it), so the default is long; a dead rank is torchrun's to
# notice, not this timeout's.
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: how many times torchrun has restarted the workers

    @property
    def shard(self) -> tuple[int, int]:
        """(i, n) for `--shard i/n`: shard RANK of WORLD_SIZE."""
        return self.rank, self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def tag(self) -> str:
        """`[rank 1/4]`, with the restart count after a restart, for the lines a rank prints."""
        again = f", restart {self.restart}" if self.restart else ""
        return f"[rank {self.rank}/{self.world_size}{again}]"


def _env_int(name: str, default: Optional[int] = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"WORLD_SIZE is set but {name} is not; start the job with torchrun, or unset WORLD_SIZE")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer; start the job with torchrun") from None


def launched() -> Optional[Launch]:
    """The torchrun launch this process belongs to, or None when it runs alone (WORLD_SIZE unset or 1)."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return None
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"RANK={rank}, LOCAL_RANK={local_rank} with WORLD_SIZE={world_size} is not a valid torchrun "
                         "launch; start the job with torchrun")
    return Launch(rank, world_size, local_rank, _env_int("TORCHELASTIC_RESTART_COUNT", 0))


def pick_device(requested: Optional[str], launch: Optional[Launch]) -> Optional[str]:
    """The device of this rank: `cuda:LOCAL_RANK` when CUDA is available and no device was pinned
    (`--device cuda` without an index counts as not pinned); else `requested` as given."""
    if launch is None:
        return requested
    if requested not in (None, "cuda") or not torch.cuda.is_available():
        return requested
    visible = torch.cuda.device_count()
    if launch.local_rank >= visible:
        raise ValueError(f"LOCAL_RANK {launch.local_rank} has no GPU of its own: {visible} CUDA device(s) visible; "
                         f"use --nproc_per_node={visible} or fewer, or --device cpu")
    return f"cuda:{launch.local_rank}"


def replica_gpus(local_rank: int, gpus_per_replica: int, visible: Optional[int] = None) -> list[int]:
    """The CUDA indices of this rank's replica when one replica spans `gpus_per_replica` GPUs
    (device_map): LOCAL_RANK r holds GPUs r*k .. r*k+k-1, so run --nproc_per_node = GPUs // k."""
    visible = torch.cuda.device_count() if visible is None else visible
    first = local_rank * gpus_per_replica
    if gpus_per_replica < 1 or first + gpus_per_replica > visible:
        raise ValueError(f"LOCAL_RANK {local_rank} with {gpus_per_replica} GPU(s) per replica needs GPUs {first} to "
                         f"{first + gpus_per_replica - 1}, but {visible} are visible; use --nproc_per_node="
                         f"{max(visible // max(gpus_per_replica, 1), 1)} or fewer")
    return list(range(first, first + gpus_per_replica))


def backend_for(device: Union[str, torch.device]) -> str:
    """nccl for a model on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def timeout() -> timedelta:
    """How long a collective (the final barrier) waits: INTERP_DIST_TIMEOUT_S seconds, default 24 h."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give the barrier timeout in seconds, a positive number")
    return timedelta(seconds=seconds)


@dataclass
class Group:
    """The job's process group, or a stand-in for a process that runs alone (its barrier does nothing)."""

    launch: Optional[Launch] = None
    cuda_index: Optional[int] = None  # the rank's GPU when the backend is nccl

    @property
    def is_main(self) -> bool:
        return self.launch is None or self.launch.is_main

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.launch is None:
            return
        if self.cuda_index is not None:
            dist.barrier(device_ids=[self.cuda_index])
        else:
            dist.barrier()


def _attempt_store(launch: Launch) -> Optional[dist.Store]:
    """On one node with torchrun's shared store, the store under a prefix of this attempt; else None
    (init_process_group's own env:// rendezvous).

    torchrun's agent keeps one TCPStore across restarts and the workers' process-group keys are the
    same every attempt, so a restarted rank can read the address a dead rank published in the
    failed attempt and fail with "Connection refused" (pytorch/pytorch#135712, #167288). On one node
    every worker has the agent's TORCHELASTIC_RESTART_COUNT, so that count keeps attempts apart; on
    several nodes it does not (agents count their own restarts): there, start torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every attempt a fresh store (docs/distributed.md).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if launch.is_main and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
            print("interp: note: restarts on several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                  "environment, or a restarted rank may fail to connect (docs/distributed.md)", file=sys.stderr, flush=True)
        return None
    store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size, timeout=timeout()))
    return dist.PrefixStore(f"interp/attempt_{launch.restart}", store)


@contextlib.contextmanager
def process_group(launch: Optional[Launch], device: Union[str, torch.device]) -> Iterator[Group]:
    """Join the torchrun job's process group for the block (nccl when `device` is CUDA, else gloo).

    Yields a `Group`; with no launch, a stand-in whose barrier does nothing. The group is destroyed
    on leaving the block, errors included.
    """
    if launch is None:
        yield Group()
        return
    device = torch.device(device)
    backend = backend_for(device)
    cuda_index = None
    if backend == "nccl":
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(cuda_index)
    store = _attempt_store(launch)
    dist.init_process_group(backend, store=store, timeout=timeout(), rank=launch.rank, world_size=launch.world_size)
    try:
        yield Group(launch, cuda_index)
    finally:
        dist.destroy_process_group()
