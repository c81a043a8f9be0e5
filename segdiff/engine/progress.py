"""Training progress on the console, readable both in a terminal and in a log file.

In a terminal, ignite's ``ProgressBar`` (one bar per epoch with its ETA) is the right display. In a log file, a pipe
or CI, tqdm cannot redraw in place: every update becomes another chunk of text in the log. :class:`TrainingProgress`
chooses by the stream it writes to: the bar when it is a terminal, otherwise one short line every
``interval_seconds`` (and, optionally, every ``interval_epochs``) with epoch, iteration, mean loss, elapsed time and
ETA, and a last line when training ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from ignite.engine import Engine, Events

from segdiff.errors import ConfigKeyError

__all__ = ["TrainingProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``1h02m03s``: a duration in the fewest units that show it."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def engine_loss(output: Any) -> float | None:
    """The loss in a trainer's output: MONAI's ``{"loss": ...}`` (or a list of them, one per item), or a number."""
    if isinstance(output, Sequence) and not isinstance(output, str) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss")
    try:
        return float(output.item() if hasattr(output, "item") else output)
    except (TypeError, ValueError, RuntimeError):  # no loss in this output (or a tensor with several values)
        return None


class TrainingProgress:
    """Show a trainer's progress: a progress bar on a terminal, a few log lines elsewhere.

    Attach it as a train handler (``train#handlers`` of a bundle config, in place of ``ignite.handlers.ProgressBar``).

    Args:
        interval_seconds: without a terminal, write a line at the first iteration that ends at least this many seconds
            after the previous line (or the start); default 60. None or 0: no time-based lines.
        interval_epochs: without a terminal, also write a line after every this many epochs; default None (only the
            time-based lines).
        stream: where to write; default ``sys.stderr`` at the time of :meth:`attach` (where tqdm writes too).
        tty: force the choice: True for the bar, False for lines; default None: the bar when ``stream.isatty()``.
        persist: keep each epoch's bar on the terminal after the epoch ends (ignite's ``persist``); default False.
        output_transform: the loss from the engine's output; default :func:`engine_loss` (MONAI's ``output["loss"]``).

    A line reads, e.g. ``training: epoch 3/150, iteration 12/600, loss 0.1234, elapsed 1m02s, ETA 50m28s``: the loss
    is the mean over the iterations since the previous line; the ETA assumes the remaining iterations of this run
    take as long as those done so far (validation included).
    """

    def __init__(
        self,
        interval_seconds: float | None = 60.0,
        interval_epochs: int | None = None,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        persist: bool = False,
        output_transform: Callable[[Any], float | None] = engine_loss,
    ) -> None:
        if interval_seconds is not None and interval_seconds < 0:
            raise ConfigKeyError(f"TrainingProgress: interval_seconds must be >= 0 or null, got {interval_seconds}")
        if interval_epochs is not None and int(interval_epochs) < 1:
            raise ConfigKeyError(f"TrainingProgress: interval_epochs must be >= 1 or null, got {interval_epochs}")
        self.interval_seconds = interval_seconds or None
        self.interval_epochs = int(interval_epochs) if interval_epochs else None
        self.stream = stream
        self.tty = tty
        self.persist = persist
        self.output_transform = output_transform
        self.bar = None  # the ProgressBar, when a terminal shows one
        self._reset(time.monotonic(), 0)

    def _reset(self, now: float, iteration: int) -> None:
        self._started = self._last_line = now
        self._start_iteration = iteration
        self._losses: list[float] = []

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    def is_terminal(self) -> bool:
        """True when the bar is shown: ``tty`` if given, else whether the stream is a terminal."""
        if self.tty is not None:
            return bool(self.tty)
        isatty = getattr(self._out(), "isatty", None)
        try:
            return bool(isatty and isatty())
        except (ValueError, OSError):  # a closed stream
            return False

    def attach(self, engine: Engine) -> None:
        if self.is_terminal():
            from ignite.handlers import ProgressBar

            self.bar = ProgressBar(persist=self.persist, file=self._out())
            self.bar.attach(engine, output_transform=lambda output: {"loss": self.output_transform(output)})
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        if self.interval_epochs:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval_epochs), self._write_line)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_started(self, engine: Engine) -> None:
        self._reset(time.monotonic(), engine.state.iteration)  # a resumed run counts from where it resumed

    def _on_iteration(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if loss is not None:
            self._losses.append(loss)
        if self.interval_seconds and time.monotonic() - self._last_line >= self.interval_seconds:
            self._write_line(engine)

    def _total_iterations(self, engine: Engine) -> int | None:
        state = engine.state
        if state.max_epochs is None or not state.epoch_length:
            return None
        return state.max_epochs * state.epoch_length

    def line(self, engine: Engine) -> str:
        """The progress line for the engine's current state (the losses since the previous line)."""
        state, now = engine.state, time.monotonic()
        elapsed = now - self._started
        total = self._total_iterations(engine)
        parts = [f"epoch {state.epoch}/{state.max_epochs}", f"iteration {state.iteration}/{total or '?'}"]
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.4g}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = state.iteration - self._start_iteration
        if total and done > 0:
            parts.append(f"ETA {format_duration(elapsed / done * max(total - state.iteration, 0))}")
        return f"{engine.__class__.__name__}: " + ", ".join(parts)

    def _write_line(self, engine: Engine) -> None:
        out = self._out()
        out.write(self.line(engine) + "\n")
        out.flush()
        self._last_line = time.monotonic()
        self._losses = []

    def _on_completed(self, engine: Engine) -> None:
        state = engine.state
        out = self._out()
        loss = f", last loss {sum(self._losses) / len(self._losses):.4g}" if self._losses else ""
        out.write(
            f"{engine.__class__.__name__}: finished epoch {state.epoch}/{state.max_epochs} (iteration "
            f"{state.iteration}) in {format_duration(time.monotonic() - self._started)}{loss}\n"
        )
        out.flush()
