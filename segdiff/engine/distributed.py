"""The end of a data-parallel (torchrun) training run, shared by every bundle's multi_gpu_train overlays."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import torch.distributed


def end_distributed_run(exit_process: bool | None = None, exit_function: Callable[[int], None] = os._exit) -> None:
    """Wait for every rank, destroy the process group, and under torchrun end the process at once with status 0.

    A rank that tears the group down while a peer still writes (rank 0 writes the last checkpoint) can abort, so every
    rank first waits at a barrier. Even so, in 2 of 9 CI runs a rank of a 2-process gloo run on CPU aborted at exit,
    after the group had been destroyed and every file had been written ("terminate called without an active
    exception", SIGABRT; torch 2.13; not reproduced in 28 local runs of the same tests, 8 of them under full CPU
    load). We take it to happen while Python finalizes objects that still hold the group (the DDP wrappers the config
    keeps; PyTorch reports the same abort from gloo threads at interpreter shutdown), so a rank launched by torchrun
    flushes its logs and leaves with ``os._exit(0)`` instead: by then the run's work is done and written, and torchrun
    reads the status.

    Args:
        exit_process: end the process after the teardown; by default when the group has more than one rank and the
            process was started by torchrun (``TORCHELASTIC_RUN_ID`` is set), never in a one-process group inside
            a test or a notebook.
        exit_function: how the process ends (``os._exit``; a recorder in tests).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    several_ranks = torch.distributed.get_world_size() > 1
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if exit_process is None:
        exit_process = several_ranks and "TORCHELASTIC_RUN_ID" in os.environ
    if exit_process:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        exit_function(0)
