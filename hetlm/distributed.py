"""Multi-process helpers (torchrun + torch.distributed): this process's rank, joining and leaving the
process group, sharing batches and clusters out over the ranks, and the collectives the trainers use.

Every helper is a no-op (or returns its input) in a single process, so callers need not branch on it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place in the job: rank 0 of 1 unless torch.distributed is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR...).
    A no-op in a single process or when already joined. backend: nccl on GPUs, gloo on CPUs."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return dist_info()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this rank's GPU
    dist.init_process_group(backend)
    # A process that exits with the group alive can abort in gloo's teardown ("terminate called without an
    # active exception", about 1 run in 3 here), so scripts that never call close_distributed still exit cleanly.
    atexit.register(close_distributed)
    return dist_info()


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's disjoint part of a global batch: every world_size-th item from the rank-th. Strided, so
    the ranks share a length-sorted batch evenly."""
    return list(items[rank::world_size])


def owned_clusters(n_clusters: int, info: DistInfo) -> list[int]:
    """Clusters whose predictor lives on this rank (HeTLM over several processes): k % world_size == rank."""
    return [k for k in range(n_clusters) if k % info.world_size == info.rank]


def _collective(tensor: torch.Tensor, reduce: bool, src: int = 0) -> torch.Tensor:
    """A copy of `tensor` summed (reduce) or broadcast from rank `src` over the ranks, on the device the
    backend needs (nccl: this GPU); returned on the tensor's own device."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = tensor.detach().to(comm, copy=True)
    if reduce:
        dist.all_reduce(buffer)
    else:
        dist.broadcast(buffer, src=src)
    return buffer.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _collective(tensor, reduce=True)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / dist_info().world_size


def gather_columns(matrix: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """The full (rows, K) matrix on every rank when each rank filled only its own `columns` (e.g. the
    NLL of its clusters' predictors): an all-reduce sum of the zero-filled matrices."""
    own = torch.zeros_like(matrix)
    own[:, list(columns)] = matrix[:, list(columns)]
    return all_reduce_sum(own)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers those of rank `src` (e.g. HeTLM's selector from rank 0,
    or each predictor from the rank that trained it)."""
    for tensor in module.state_dict().values():
        tensor.copy_(_collective(tensor, reduce=False, src=src))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
