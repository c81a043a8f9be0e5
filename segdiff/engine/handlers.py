"""Ignite handlers the MONAI/Ignite stock lacks: gradient clipping, resumable atomic checkpoints, sample grids."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from segdiff.visualize import make_panel

__all__ = [
    "CopyWeights",
    "GradientClipping",
    "LearningRateLogger",
    "SampleGridHandler",
    "TrainingCheckpoint",
    "WallTimeLimit",
    "atomic_torch_save",
]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class GradientClipping:
    """Clip the global gradient norm right before every optimizer step.

    Registered as an optimizer step pre-hook, so with a CUDA ``GradScaler`` it sees the unscaled gradients
    (``scaler.step`` unscales before calling ``optimizer.step``).

    Args:
        optimizer: the trainer's optimizer.
        max_norm: maximum L2 norm of all gradients together (1.0 in Konz et al.); None or <= 0 disables clipping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float | None = 1.0) -> None:
        self.optimizer = optimizer
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        if not self.max_norm or self.max_norm <= 0:
            return
        optimizer = self.optimizer

        def clip(opt, args, kwargs):
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)

        optimizer.register_step_pre_hook(clip)


class LearningRateLogger:
    """Log the optimizer's learning rate (first parameter group) to TensorBoard as ``lr`` every ``interval``
    iterations, so the warm-up and decay of the schedule can be checked beside the loss."""

    def __init__(self, summary_writer: Any, optimizer: torch.optim.Optimizer, interval: int = 1) -> None:
        self.writer = summary_writer
        self.optimizer = optimizer
        self.interval = max(int(interval), 1)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        self.writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], engine.state.iteration)


class WallTimeLimit:
    """Stop training after ``seconds`` of wall time (Ignite's ``TimeLimit``, attachable from a bundle handler list),
    e.g. to give a baseline the same time budget as the model it is compared with."""

    def __init__(self, seconds: float) -> None:
        from ignite.handlers import TimeLimit

        self.limit = TimeLimit(limit_sec=int(seconds))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.limit)


class CopyWeights:
    """Copy ``source``'s weights into ``target`` when training starts.

    The EMA copy of a network is made when the config is parsed, from the freshly initialised weights. A handler that
    loads weights into the network when training starts (MONAI Label inserts a ``CheckpointLoader`` of
    ``models/model.pt`` first in ``train#handlers`` to fine-tune the served model) would leave the EMA, and so the
    ``model.pt`` written at the end, on random weights. Put this after such loaders and before
    :class:`TrainingCheckpoint`, whose resume loads both networks from ``checkpoint.pt``.

    Args:
        source: the trained network.
        target: the network that starts from its weights (the EMA copy).
    """

    def __init__(self, source: torch.nn.Module, target: torch.nn.Module) -> None:
        self.source = source.module if isinstance(source, torch.nn.parallel.DistributedDataParallel) else source
        self.target = target

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.target.load_state_dict(self.source.state_dict())


class TrainingCheckpoint:
    """Save everything needed to resume training, atomically, and resume from it after a crash.

    Every ``save_interval`` epochs and at the end, writes ``<save_dir>/checkpoint.pt`` (every object of ``save_dict``:
    network, EMA network, optimizer, lr scheduler, trainer state) and ``<save_dir>/model.pt`` (only the state dict of
    ``export_model``, the weights inference loads). Both writes go through a temporary file and a rename. In
    data-parallel training every rank resumes, rank 0 alone writes.

    Args:
        save_dir: the bundle's ``models`` folder.
        save_dict: name -> object with ``state_dict``/``load_state_dict``; the trainer it is attached to is added as
            ``"trainer"`` (epoch and iteration).
        export_model: the network whose weights become ``model.pt`` (the EMA copy of ``network_def``); None when
            another handler writes ``model.pt`` (e.g. a CheckpointSaver keeping the best validation model).
        resume: continue from ``checkpoint.pt`` if it exists. If it exists and ``resume`` and ``overwrite`` are
            False, training stops before it starts instead of overwriting the earlier run.
        save_interval: epochs between checkpoints.
        model_filename: name of the exported weights.
        final_model: with ``export_model`` None, the network written as ``model.pt`` when training completes if no
            other handler wrote ``model.pt`` during the run (no validation ran: fewer epochs than the validation
            interval, as in a short MONAI Label run), so that a finished run always leaves the weights it trained.
        overwrite: start a new run over an earlier run's ``checkpoint.pt`` instead of stopping (MONAI Label trains
            the same bundle folder again and again); ignored when ``resume`` is True.
    """

    checkpoint_filename = "checkpoint.pt"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        export_model: torch.nn.Module | None,
        resume: bool = False,
        save_interval: int = 1,
        model_filename: str = "model.pt",
        final_model: torch.nn.Module | None = None,
        overwrite: bool = False,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.export_model = export_model
        self.final_model = final_model
        self.resume = resume
        self.save_interval = max(int(save_interval), 1)
        self.model_path = self.save_dir / model_filename
        self.checkpoint_path = self.save_dir / self.checkpoint_filename
        if self.checkpoint_path.exists() and not resume and not overwrite:
            raise FileExistsError(
                f"{self.checkpoint_path} exists from an earlier training run. Set 'resume' to true to continue it, "
                "'overwrite' to true to start a new run over it, or move that folder's checkpoint.pt and model.pt away."
            )

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        if self.resume and self.checkpoint_path.exists():
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)
        if self.export_model is None and self.final_model is not None:
            engine.add_event_handler(Events.STARTED, self._note_model_file)
            engine.add_event_handler(Events.COMPLETED, self._export_final_model)

    def _model_file_state(self) -> tuple | None:
        """Identity of the current ``model.pt`` (inode, size, mtime): any write, in place or by rename, changes it."""
        try:
            stat = self.model_path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _note_model_file(self, engine: Engine) -> None:
        self._model_at_start = self._model_file_state()

    def _export_final_model(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return
        if self.model_path.exists() and self._model_file_state() != getattr(self, "_model_at_start", None):
            return  # written during this run (the best validation model): keep it
        atomic_torch_save(self.final_model.state_dict(), self.model_path)
        logger.info(f"epoch {engine.state.epoch}: nothing wrote {self.model_path} in this run; saved the final weights")

    def load(self, engine: Engine) -> None:
        checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.save_dict, checkpoint=checkpoint)
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(
                f"{self.checkpoint_path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}: "
                "raise max_epochs to train further."
            )
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {self.checkpoint_path} at epoch {engine.state.epoch}")

    def save(self, engine: Engine) -> None:
        if engine.state.epoch == getattr(self, "_last_saved_epoch", None):
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return  # data-parallel training: rank 0 writes
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        atomic_torch_save(state, self.checkpoint_path)
        saved = [self.checkpoint_path]
        if self.export_model is not None:
            atomic_torch_save(self.export_model.state_dict(), self.model_path)
            saved.append(self.model_path)
        self._last_saved_epoch = engine.state.epoch
        logger.info(f"epoch {engine.state.epoch}: saved " + " and ".join(map(str, saved)))


class SampleGridHandler:
    """Every ``interval`` epochs, sample from the first validation batch and log a grid to TensorBoard.

    Each row shows one validation case: the condition, a sample and the real target (mid-slice for 3D).

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        data_loader: validation data loader; its first batch is used every time.
        network: the network to sample with (the EMA copy).
        sampler: a :class:`segdiff.engine.ConditionalDiffusionSampler` (few DDIM steps keep this quick).
        condition_key, target_key: batch keys.
        condition_kind, target_kind: how to draw each: ``"image"`` (grey scale) or ``"onehot"`` (label colours).
        num_images: rows of the grid.
        interval: epochs between grids.
        tag: TensorBoard tag.
    """

    def __init__(
        self,
        summary_writer: Any,
        data_loader: Any,
        network: torch.nn.Module,
        sampler: Any,
        condition_key: str = "label",
        target_key: str = "image",
        condition_kind: str = "onehot",
        target_kind: str = "image",
        num_images: int = 4,
        interval: int = 5,
        tag: str = "samples (condition | generated | real)",
    ) -> None:
        self.writer = summary_writer
        self.data_loader = data_loader
        self.network = network
        self.sampler = sampler
        self.keys = (condition_key, target_key)
        self.kinds = (condition_kind, target_kind)
        self.num_images = num_images
        self.interval = max(int(interval), 1)
        self.tag = tag
        self._batch: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if self._batch is None:
            self._batch = next(iter(self.data_loader))
        condition = torch.as_tensor(self._batch[self.keys[0]])[: self.num_images]
        target = torch.as_tensor(self._batch[self.keys[1]])[: self.num_images]
        device = next(self.network.parameters()).device
        samples = self.sampler(condition.to(device), self.network)[:, : target.shape[1]].cpu()
        columns, kinds = [samples, target], [self.kinds[1], self.kinds[1]]
        if condition.shape[1] > 0:  # an unconditional model has no condition to show
            columns, kinds = [condition] + columns, [self.kinds[0]] + kinds
        panel = make_panel(columns, kinds=kinds)
        self.writer.add_image(self.tag, panel, engine.state.epoch, dataformats="HWC")
        self.writer.flush()
