"""Data-parallel training under ``torchrun``: the process group, batch shards and sum reductions.

``torchrun`` starts one process per device and describes the job in environment variables:
``RANK`` (this process, 0 to ``WORLD_SIZE - 1``), ``WORLD_SIZE``, ``LOCAL_RANK`` (this process's
index on its machine, which picks the GPU) and ``MASTER_ADDR``/``MASTER_PORT`` (the rendezvous).
:func:`process_group_from_env` reads them and initializes ``torch.distributed``: the nccl backend
on ``cuda:LOCAL_RANK`` when CUDA is available, gloo on the CPU otherwise. Without ``WORLD_SIZE``
the process runs alone and every helper here is a no-op, so one code path serves both.

Every rank keeps the whole data set in memory and draws the same permutation per epoch. A
global batch of ``B`` examples is split into contiguous shares of sizes differing by at most one
(:func:`shard_bounds`), and each rank's mean loss is weighted by ``n_r * W / B``
(:attr:`ShardedBatch.loss_weight`). DistributedDataParallel and the sharpness-aware optimizers
average gradients over the ``W`` ranks, so the averaged gradient is
``(1/W) sum_r (n_r W / B) (1/n_r) sum_{i in r} grad l_i = (1/B) sum_i grad l_i``, the
global-batch mean, also for uneven shares. A rank whose share is empty adds a zero gradient.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ShardedBatch",
    "ShardedBatchSampler",
    "TorchrunEnvironment",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "eval_batch_starts",
    "has_process_group",
    "is_distributed",
    "is_main_process",
    "process_group_from_env",
    "rank",
    "read_torchrun_env",
    "shard_bounds",
    "training_device",
    "unwrap_model",
    "world_size",
    "wrap_model",
]

# The variables that torchrun sets for every worker. WORLD_SIZE alone decides whether they apply.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class TorchrunEnvironment:
    """The job description that ``torchrun`` passes to one worker process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnvironment | None:
    """Read the torchrun variables from ``environ`` (default ``os.environ``).

    Returns None when ``WORLD_SIZE`` is not set, which means one process without torchrun.
    Raises ValueError naming the variable when one is missing or out of range.
    """
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if not environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; "
            "start the processes with torchrun, which sets all of "
            f"{', '.join(TORCHRUN_VARIABLES)}, or unset WORLD_SIZE to train in one process"
        )
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        text = environ[name]
        try:
            numbers[name] = int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a whole number; start the processes with torchrun") from None
    if numbers["WORLD_SIZE"] < 1:
        raise ValueError(f"WORLD_SIZE={numbers['WORLD_SIZE']} must be at least 1; start the processes with torchrun")
    if not 0 <= numbers["RANK"] < numbers["WORLD_SIZE"]:
        raise ValueError(
            f"RANK={numbers['RANK']} is outside [0, WORLD_SIZE={numbers['WORLD_SIZE']}); "
            "start the processes with torchrun"
        )
    if numbers["LOCAL_RANK"] < 0:
        raise ValueError(f"LOCAL_RANK={numbers['LOCAL_RANK']} is negative; start the processes with torchrun")
    if not 0 < numbers["MASTER_PORT"] < 65536:
        raise ValueError(f"MASTER_PORT={numbers['MASTER_PORT']} is not a TCP port (1 to 65535)")
    return TorchrunEnvironment(
        rank=numbers["RANK"],
        world_size=numbers["WORLD_SIZE"],
        local_rank=numbers["LOCAL_RANK"],
        master_addr=environ["MASTER_ADDR"],
        master_port=numbers["MASTER_PORT"],
    )


# The device of this process's model and batches, which process_group_from_env sets.
_device = torch.device("cpu")


@contextlib.contextmanager
def process_group_from_env() -> Iterator[torch.device]:
    """Initialize ``torch.distributed`` from the torchrun variables and tear it down on exit.

    Yields the device this process trains on: ``cuda:LOCAL_RANK`` with the nccl backend when
    CUDA is available, the CPU with gloo otherwise, and the CPU without a process group when
    ``WORLD_SIZE`` is not set. On a normal exit the ranks meet at a barrier first, so that no
    rank tears the group down while another still communicates. On an exception the group is
    destroyed at once: the failed rank exits, and torchrun stops the other workers.

    A process group that the caller initialized already is used as it is and left open, so a
    script can run several trainings in one group.

    NOTE: destroying the default group and initializing it again in the same torchrun workers
    failed in 3 of 5 launches that did so twice (gloo, torch 2.13: connection refused or reset
    by the peer). Start one process group per torchrun launch, or keep one open across runs.
    """
    global _device
    env = read_torchrun_env()
    if env is None:
        yield torch.device("cpu")
        return

    # Pick the backend by device. nccl needs the current CUDA device set before the group starts.
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owned = not dist.is_initialized()
    if owned:
        # env:// reads the same variables. Under torchrun it joins the store that the torchrun
        # agent already serves on MASTER_PORT instead of opening a second server there.
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    _device = device
    try:
        yield device
        dist.barrier()
    finally:
        _device = torch.device("cpu")
        if owned:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- process queries


def is_distributed() -> bool:
    """Return True when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Return the number of ranks, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Return this process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# Aliases for code whose own arguments are named rank and world_size.
_group_world_size = world_size
_group_rank = rank


def has_process_group() -> bool:
    """Return True when a ``torch.distributed`` process group is initialized, also one of one rank."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Return True on rank 0, the process that prints and writes files, and in one process."""
    return rank() == 0


def training_device() -> torch.device:
    """Return the device chosen by :func:`process_group_from_env`, the CPU outside it."""
    return _device


def barrier() -> None:
    """Wait until every rank reaches this call. In one process, return at once."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Replace ``tensor`` in place by its sum over the ranks of ``group`` (default: all) and return it.

    In one process the tensor is returned unchanged. Every rank of the group must call it with a tensor of the same shape
    and dtype, in the same order as its other collectives.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ---------------------------------------------------------------------------- the model


def wrap_model(model: nn.Module) -> nn.Module:
    """Move ``model`` to the training device and wrap it in DistributedDataParallel when distributed.

    Returns ``model`` itself in one process. DDP broadcasts rank 0's parameters and buffers at
    construction, so every rank starts from the same weights.
    """
    device = training_device()
    model.to(device)
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers of ``model``, such as BatchNorm running statistics, to every rank.

    Each rank's BatchNorm layers update their running statistics from that rank's share, so after
    training the ranks differ. The checkpoint stores rank 0's, and evaluating with them on every
    rank makes the metrics those of the checkpoint. In one process this returns at once.
    """
    if not is_distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside a DistributedDataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------- shards and batches


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return ``(start, stop)`` of rank ``rank``'s contiguous share of ``size`` items.

    The first ``size % world_size`` ranks get ``size // world_size + 1`` items and the others
    ``size // world_size``, so shares differ by at most one, cover every item once and are empty
    for the last ranks when ``size < world_size``.
    """
    if size < 0:
        raise ValueError(f"size={size} is negative; pass the number of items to split")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1; pass the number of processes")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size}); pass a rank from 0 to world_size - 1")
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


class ShardedBatch(NamedTuple):
    """This rank's share of one global batch.

    ``indices`` are the examples of this rank, ``global_size`` the examples of the whole batch
    over all ranks, and ``loss_weight`` the factor ``len(indices) * world_size / global_size``
    for the mean loss over ``indices`` (exactly 1.0 in one process and for even shares).
    ``global_indices`` is the whole batch and ``share`` this rank's positions in it, so
    ``global_indices[share]`` equals ``indices``. Image augmentation draws for the whole batch
    and keeps the share, so that every rank's generator advances alike.
    """

    indices: torch.Tensor
    global_size: int
    loss_weight: float
    global_indices: torch.Tensor
    share: slice


class ShardedBatchSampler:
    """Batches of one epoch in a random order, each split into contiguous shares per rank.

    Each iteration draws one permutation of ``range(num_examples)`` with
    ``torch.randperm(num_examples, generator=generator)``, the call a one-process run makes, and
    cuts it into global batches of ``batch_size`` (the last one shorter when ``batch_size`` does
    not divide ``num_examples``). Ranks whose generators are in the same state therefore see the
    same global batches, and the union of their shares is the one-process batch, in order.
    Shares are never padded with repeated examples.

    Args:
        num_examples: size of the training set.
        batch_size: examples per global batch, summed over the ranks.
        generator: the generator of the data order; each iteration advances it by one permutation.
        rank, world_size: this process and the number of processes; default the process group's.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        generator: torch.Generator,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples={num_examples} must be at least 1; pass the size of the training set")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1; pass the examples per global batch")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.generator = generator
        self.world_size = _group_world_size() if world_size is None else world_size
        self.rank = _group_rank() if rank is None else rank
        # shard_bounds raises ValueError for an invalid rank or world_size.
        shard_bounds(0, self.rank, self.world_size)

    def __len__(self) -> int:
        """Number of global batches per epoch."""
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[ShardedBatch]:
        order = torch.randperm(self.num_examples, generator=self.generator)
        for start in range(0, self.num_examples, self.batch_size):
            batch = order[start : start + self.batch_size]
            share_start, share_stop = shard_bounds(len(batch), self.rank, self.world_size)
            share = share_stop - share_start
            yield ShardedBatch(
                batch[share_start:share_stop],
                len(batch),
                share * self.world_size / len(batch),
                batch,
                slice(share_start, share_stop),
            )


def eval_batch_starts(num_examples: int, batch_size: int) -> range:
    """Return the start indices of this rank's evaluation batches of ``batch_size`` examples.

    The batches are those of one process, ``range(0, num_examples, batch_size)``, dealt out in
    contiguous runs by :func:`shard_bounds`. Each batch is therefore evaluated whole by one rank,
    so its float32 loss sum is the one a single process computes.
    """
    starts = range(0, num_examples, batch_size)
    first, stop = shard_bounds(len(starts), _group_rank(), _group_world_size())
    return starts[first:stop]
