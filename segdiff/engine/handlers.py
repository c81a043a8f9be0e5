"""Ignite handlers the MONAI/Ignite stock lacks: gradient clipping, resumable atomic checkpoints, sample grids."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
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
    "check_run_folder",
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
    e.g. to give a baseline the same time budget as the model it is compared with.

    The clock starts when the run starts (not when the config builds the handler, which may be before a dataset is
    cached); afterwards ``reached`` says whether this limit stopped the run.

    Args:
        seconds: wall time of the run, at least 1 (whole seconds).
    """

    def __init__(self, seconds: float) -> None:
        from ignite.handlers import TimeLimit

        self.limit = TimeLimit(limit_sec=int(seconds))
        self.reached = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.limit.start_time = time.time()
        self.reached = False

    def __call__(self, engine: Engine) -> None:
        if time.time() - self.limit.start_time > self.limit.limit_sec:
            self.reached = True
        self.limit(engine)


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


def check_run_folder(
    save_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    model_filename: str = "model.pt",
    checkpoint_filename: str = "checkpoint.pt",
    quiet: bool = False,
) -> None:
    """Refuse a training run that would silently replace an earlier run's files, before anything is cached or written.

    The run's files are ``<save_dir>/<model_filename>``, its record (``.json``) and ``<save_dir>/<checkpoint_filename>``.
    Without ``resume`` or ``overwrite``, any of them existing stops the run (released weights alone count too). With
    ``resume``, the checkpoint must exist. With ``overwrite``, the earlier files are replaced (logged).
    """
    from segdiff.engine.provenance import record_path
    from segdiff.errors import RunFolderError

    save_dir = Path(save_dir)
    model_path, checkpoint_path = save_dir / model_filename, save_dir / checkpoint_filename
    if resume:
        if not checkpoint_path.is_file():
            raise RunFolderError(
                f"resume is true but there is no checkpoint at {checkpoint_path}: check bundle_root "
                f"({save_dir.parent}) or start a new run without resume."
            )
        return
    earlier = [p for p in (model_path, record_path(model_path), checkpoint_path) if p.exists()]
    if earlier and not overwrite:
        raise RunFolderError(
            f"{', '.join(map(str, earlier))} exist(s) from an earlier run or release; a new training run would replace "
            "them. Set 'resume' to true to continue that run (needs its checkpoint), 'overwrite' to true to replace "
            "them, or choose another bundle_root (e.g. --bundle_root runs/new)."
        )
    if earlier and not quiet:
        logger.warning(f"overwrite is true: this run replaces {', '.join(map(str, earlier))}")


class TrainingCheckpoint:
    """The one writer of a training run's files: resumable checkpoint, the weights inference loads, their record.

    Every ``save_interval`` epochs and at the end, writes ``<save_dir>/checkpoint.pt`` (every object of ``save_dict``:
    network, EMA network, optimizer, lr scheduler, trainer state, the best validation metric so far, and the model
    record) atomically. ``<save_dir>/model.pt`` (the state dict of ``export_model``, e.g. the EMA network) and its record
    ``model.json`` are written with every checkpoint, or, with ``best_of`` set, whenever that validator's key metric
    improves (the best model; and at the end of a run in which no validation ran, so that a finished run always leaves
    weights). In data-parallel training every rank resumes, rank 0 alone writes.

    Args:
        save_dir: the bundle's ``models`` folder.
        save_dict: name -> object with ``state_dict``/``load_state_dict``; the trainer it is attached to is added as
            ``"trainer"`` (epoch and iteration).
        export_model: the network whose weights become ``model.pt``.
        record: the :class:`segdiff.engine.ModelRecord` of the run's config (settings written as ``model.json`` and
            into the checkpoint; checked against the checkpoint on resume). None writes no record.
        best_of: a validator (``SupervisedEvaluator`` with a key metric): ``model.pt`` is the best-scoring model.
        resume: continue from the checkpoint (it must exist).
        overwrite: start a new run over an earlier run's files (MONAI Label trains the same folder again and again);
            without it or ``resume``, earlier files stop the run (see :func:`check_run_folder`).
        save_interval: epochs between checkpoints.
        model_filename, checkpoint_filename: the files' names.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        export_model: torch.nn.Module,
        record: Any = None,
        best_of: Engine | None = None,
        resume: bool = False,
        overwrite: bool = False,
        save_interval: int = 1,
        model_filename: str = "model.pt",
        checkpoint_filename: str = "checkpoint.pt",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.overwrite = overwrite
        self.save_dict = dict(save_dict)
        self.export_model = export_model
        self.record = record
        self.best_of = best_of
        self.resume = resume
        self.save_interval = max(int(save_interval), 1)
        self.model_path = self.save_dir / model_filename
        self.checkpoint_path = self.save_dir / checkpoint_filename
        self._model_written = False
        self._last_saved_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        # checked when training starts, not when the config is parsed: a config may build a trainer it does not run
        # (evaluate.yaml reuses an existing segmenter); bundle configs check earlier, in initialize
        engine.add_event_handler(Events.STARTED, self._check_folder)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)
        if self.best_of is not None:
            self.best_of.add_event_handler(Events.COMPLETED, self._save_if_best, engine)
            engine.add_event_handler(Events.COMPLETED, self._save_final_if_none)

    def _check_folder(self, engine: Engine) -> None:
        check_run_folder(self.save_dir, self.resume, self.overwrite, self.model_path.name, self.checkpoint_path.name, quiet=True)

    # -- helpers ------------------------------------------------------------------------------------------------
    @staticmethod
    def _rank0() -> bool:
        return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0

    def _training_info(self, engine: Engine) -> dict[str, Any]:
        info = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        if self.best_of is not None and getattr(self.best_of.state, "best_metric", -1) != -1:
            info.update(best_metric=self.best_of.state.best_metric, best_metric_epoch=self.best_of.state.best_metric_epoch)
        return info

    def _record(self, engine: Engine) -> dict | None:
        if self.record is None:
            return None
        if self.record.data_orientation is None:  # the voxel order of the images this trainer reads, found once
            from segdiff.data.checks import data_orientation

            entries = getattr(getattr(getattr(engine, "data_loader", None), "dataset", None), "data", None)
            if isinstance(entries, Sequence):
                self.record.data_orientation = data_orientation(entries)
        return self.record.build(self.export_model, self._training_info(engine))

    def _write_model(self, engine: Engine) -> None:
        from segdiff.engine.provenance import save_weights

        save_weights(self.export_model.state_dict(), self.model_path, self._record(engine))
        self._model_written = True

    # -- events -------------------------------------------------------------------------------------------------
    def _save_if_best(self, validator: Engine, trainer: Engine) -> None:
        if self._rank0() and validator.state.best_metric_epoch == trainer.state.epoch:
            self._write_model(trainer)
            logger.info(
                f"epoch {trainer.state.epoch}: best {validator.state.key_metric_name} "
                f"{validator.state.best_metric:.4f}, saved {self.model_path}"
            )

    def _save_final_if_none(self, engine: Engine) -> None:
        if self._rank0() and not self._model_written and not (self.resume and self.model_path.exists()):
            self._write_model(engine)
            logger.info(f"epoch {engine.state.epoch}: no validation ran in this run; saved the final weights as {self.model_path}")

    def load(self, engine: Engine) -> None:
        checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        stored = checkpoint.pop("record", None)
        if self.record is not None and stored is not None:
            self.record.check(stored, self.checkpoint_path, self.export_model)
        best = checkpoint.pop("best_metric", None)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.save_dict, checkpoint=checkpoint)
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(
                f"{self.checkpoint_path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}: "
                "raise max_epochs to train further."
            )
        engine.state.max_epochs = max_epochs
        if best is not None and self.best_of is not None:  # a resumed run keeps the best model unless it beats it
            self.best_of.state.best_metric, self.best_of.state.best_metric_epoch = best
        logger.info(f"resumed from {self.checkpoint_path} at epoch {engine.state.epoch}")

    def save(self, engine: Engine) -> None:
        if engine.state.epoch == self._last_saved_epoch or not self._rank0():
            return
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        if self.record is not None:
            state["record"] = self._record(engine)
        if self.best_of is not None and getattr(self.best_of.state, "best_metric", -1) != -1:
            state["best_metric"] = (self.best_of.state.best_metric, self.best_of.state.best_metric_epoch)
        atomic_torch_save(state, self.checkpoint_path)
        saved = [self.checkpoint_path]
        if self.best_of is None:
            self._write_model(engine)
            saved.append(self.model_path)
        first = self._last_saved_epoch is None
        self._last_saved_epoch = engine.state.epoch
        log = logger.info if first or engine.state.epoch == engine.state.max_epochs else logger.debug
        log(f"epoch {engine.state.epoch}: saved " + " and ".join(map(str, saved)))


class SampleGridHandler:
    """Every ``interval`` epochs, sample from the first validation batch and log a grid to TensorBoard.

    Each row shows one validation case: the condition, a sample and the real target (mid-slice for 3D). A target made
    of parts (a joint image + mask target) is drawn part by part: the sample's parts, then the real target's.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        data_loader: validation data loader; its first batch is used every time.
        network: the network to sample with (the EMA copy).
        sampler: a :class:`segdiff.engine.ConditionalDiffusionSampler` (few DDIM steps keep this quick).
        condition_key, target_key: batch keys; ``condition_key`` None for an unconditional model (the sampler is
            then ``conditional=False`` and the target only gives the grid).
        condition_kind, target_kind: how to draw each: ``"image"`` (grey scale) or ``"onehot"`` (label colours);
            ``target_kind`` may list one kind per part of the target, e.g. ``["image", "onehot"]``.
        target_channels: with several target kinds, the channels of each part in order, e.g. ``[1, 4]`` for one
            image channel followed by a 4-class one-hot mask; None (default) with a single kind.
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
        condition_key: str | None = "label",
        target_key: str = "image",
        condition_kind: str = "onehot",
        target_kind: str | Sequence[str] = "image",
        target_channels: Sequence[int] | None = None,
        num_images: int = 4,
        interval: int = 5,
        tag: str = "samples (condition | generated | real)",
    ) -> None:
        self.writer = summary_writer
        self.data_loader = data_loader
        self.network = network
        self.sampler = sampler
        self.keys = (condition_key, target_key)
        target_kinds = [target_kind] if isinstance(target_kind, str) else list(target_kind)
        if len(target_kinds) > 1 and (target_channels is None or len(target_channels) != len(target_kinds)):
            raise ValueError(
                f"target_kind {target_kinds} has {len(target_kinds)} parts: target_channels must give the channels "
                f"of each, found {target_channels!r}."
            )
        self.target_parts = list(zip(target_kinds, [None] if target_channels is None else list(target_channels)))
        self.condition_kind = condition_kind
        self.num_images = num_images
        self.interval = max(int(interval), 1)
        self.tag = tag
        self._batch: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if self._batch is None:
            self._batch = next(iter(self.data_loader))
        target = torch.as_tensor(self._batch[self.keys[1]])[: self.num_images]
        # unconditional: the target only gives the sampler the grid (a conditional=False sampler reads its shape)
        condition = target if self.keys[0] is None else torch.as_tensor(self._batch[self.keys[0]])[: self.num_images]
        device = next(self.network.parameters()).device
        samples = self.sampler(condition.to(device), self.network)[:, : target.shape[1]].cpu()
        columns, kinds = [], []
        for tensor in (samples, target):
            start = 0
            for kind, channels in self.target_parts:
                stop = tensor.shape[1] if channels is None else start + int(channels)
                columns.append(tensor[:, start:stop])
                kinds.append(kind)
                start = stop
        if self.keys[0] is not None and condition.shape[1] > 0:  # an unconditional model has no condition to show
            columns, kinds = [condition] + columns, [self.condition_kind] + kinds
        panel = make_panel(columns, kinds=kinds)
        self.writer.add_image(self.tag, panel, engine.state.epoch, dataformats="HWC")
        self.writer.flush()
