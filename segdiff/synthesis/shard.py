"""Synthesis across processes: which share of the masks this process works on, and the lock the processes share.

``torchrun --nproc_per_node=N`` starts N copies of the same synthesis command. Each copy is one *rank*; it takes every
N-th mask of the list (the shares depend only on the list and N, and a rank may have none), writes its own journal, and merges all journals into the folder's ``tries.json`` and
``datalist.json`` under a file lock after every mask (see :mod:`segdiff.synthesis.records`). Every random draw is
seeded from ``(seed, case, round)``, so the pairs do not depend on N.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock

__all__ = ["LOCK_NAME", "folder_lock", "process_shard", "shard_of"]

T = TypeVar("T")

#: the lock file in a synthesis output folder: held while a process reads or rewrites the shared records
LOCK_NAME = ".records.lock"


def process_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the arguments if given, else the initialised ``torch.distributed``
    group, else torchrun's ``RANK`` / ``WORLD_SIZE`` environment variables, else ``(0, 1)`` (a single process)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}: the rank must be in [0, world_size).")
    return rank, world_size


def shard_of(entries: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The entries rank ``rank`` of ``world_size`` works on: every ``world_size``-th entry, starting at ``rank``
    (all of them for a single process); together the shares hold every entry exactly once."""
    return list(entries)[rank::world_size]


def folder_lock(root: str | os.PathLike, timeout: float = 600.0) -> FileLock:
    """The lock the processes of one synthesis folder share (a file lock, released if its process dies)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return FileLock(str(Path(root) / LOCK_NAME), timeout=timeout)
