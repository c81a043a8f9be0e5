"""segdiff.engine.end_distributed_run: the last step of every multi_gpu_train overlay (the torchrun runs themselves
are in tests/test_*multi_gpu*.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch.distributed

from segdiff.engine import end_distributed_run


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo group of one process, as torchrun would describe it; destroyed afterwards if a test left it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                            LOCAL_RANK="0", TORCHELASTIC_RUN_ID="test").items():
        monkeypatch.setenv(name, value)
    torch.distributed.init_process_group(backend="gloo")
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_without_a_process_group_it_does_nothing():
    exits = []
    assert not torch.distributed.is_initialized()
    end_distributed_run(exit_process=True, exit_function=exits.append)
    assert exits == []


def test_a_one_process_group_is_destroyed_and_the_process_goes_on(one_process_group):
    exits = []
    end_distributed_run(exit_function=exits.append)  # under torchrun, but one rank: a test or a notebook goes on
    assert not torch.distributed.is_initialized() and exits == []


def test_asked_to_exit_it_ends_with_status_0_after_the_group_is_gone(one_process_group):
    seen = []
    def record(status):
        seen.append((status, torch.distributed.is_initialized()))

    end_distributed_run(exit_process=True, exit_function=record)
    assert seen == [(0, False)]


def test_the_real_exit_keeps_what_was_printed(tmp_path):
    """With os._exit nothing is flushed at shutdown: the function flushes stdout itself (a pipe, block-buffered when
    PYTHONUNBUFFERED is not set); without that the child's last output is lost."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import os, socket
        import torch.distributed
        from segdiff.engine import end_distributed_run
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group(backend="gloo")
        print("printed before the exit", end="")
        end_distributed_run(exit_process=True)
        print("never printed")
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "printed before the exit"
