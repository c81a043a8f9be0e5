"""TrainingProgress: ignite's progress bar on a terminal, a few lines with ETA in a log file."""

from __future__ import annotations

import io

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar

from segdiff.engine import TrainingProgress
from segdiff.engine import progress as progress_module
from segdiff.engine.progress import format_duration
from segdiff.errors import SegdiffError


class FakeClock:
    """time.monotonic for the module under test: each training iteration takes one second."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def one_second_trainer(clock: FakeClock) -> Engine:
    def step(engine, batch):
        clock.now += 1.0
        return {"loss": torch.tensor(float(engine.state.iteration))}

    return Engine(step)


def test_a_log_file_gets_one_line_per_interval_each_with_epoch_loss_elapsed_and_eta(clock):
    stream = io.StringIO()
    trainer = one_second_trainer(clock)
    progress = TrainingProgress(interval_seconds=30, stream=stream)
    progress.attach(trainer)
    trainer.run(range(20), max_epochs=5)  # 100 iterations of one second

    lines = stream.getvalue().splitlines()
    assert progress.bar is None
    assert len(lines) == 4  # at 30 s, 60 s and 90 s, and the final line
    assert lines[0] == "Engine: epoch 2/5, iteration 30/100, loss 15.5, elapsed 30s, ETA 1m10s"
    assert all("ETA" in line for line in lines[:3])
    assert lines[-1] == "Engine: finished epoch 5/5 (iteration 100) in 1m40s, last loss 95.5"


def test_interval_epochs_adds_a_line_after_every_so_many_epochs(clock):
    stream = io.StringIO()
    trainer = one_second_trainer(clock)
    TrainingProgress(interval_seconds=None, interval_epochs=2, stream=stream).attach(trainer)
    trainer.run(range(10), max_epochs=4)

    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines[:-1]] == ["Engine: epoch 2/4", "Engine: epoch 4/4"]
    assert "ETA 20s" in lines[0]


def test_a_resumed_run_estimates_from_the_iterations_of_this_run(clock):
    stream = io.StringIO()
    trainer = one_second_trainer(clock)
    TrainingProgress(interval_seconds=10, stream=stream).attach(trainer)
    trainer.load_state_dict({"epoch": 2, "epoch_length": 10, "max_epochs": 4})  # 20 of 40 iterations done
    trainer.run(range(10), max_epochs=4)

    first = stream.getvalue().splitlines()[0]
    # 10 s for this run's first 10 iterations: 10 s for the last 10 (not 10 s / 30 iterations since iteration 0)
    assert first == "Engine: epoch 3/4, iteration 30/40, loss 25.5, elapsed 10s, ETA 10s"


def test_a_terminal_gets_ignites_progress_bar_and_no_log_lines(clock):
    stream = FakeTerminal()
    trainer = one_second_trainer(clock)
    progress = TrainingProgress(interval_seconds=1, stream=stream)
    progress.attach(trainer)
    trainer.run(range(4), max_epochs=2)

    assert isinstance(progress.bar, ProgressBar)
    text = stream.getvalue()
    assert "Epoch [2/2]" in text and "loss=" in text  # tqdm's bar on our stream, with the loss
    assert "ETA" not in text and "finished" not in text


@pytest.mark.parametrize("settings", [{"interval_seconds": -1}, {"interval_epochs": 0}])
def test_a_negative_or_zero_interval_is_refused_naming_the_key(settings):
    with pytest.raises(SegdiffError, match=next(iter(settings))):
        TrainingProgress(**settings)


def test_format_duration_uses_the_fewest_units():
    assert [format_duration(s) for s in (0, 45, 125, 3723)] == ["0s", "45s", "2m05s", "1h02m03s"]
