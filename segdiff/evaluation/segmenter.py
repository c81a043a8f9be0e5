"""Running a segmentation network over whole cases, scoring label maps by per-class Dice, and how the reference
segmenter's training ended.

A reference segmenter trained on real images is the judge of mask -> image models (faithfulness: does the generated
image show the anatomy of its mask?). It sees cases the way the diffusion model does: 2D models slice by slice,
every slice resized to the model's ``image_size`` as training resized it (``segdiff.engine.grid.resize``, role
``"image"``) and the logits resized back to the case's grid.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from segdiff.engine.grid import from_network_units, resize, to_network_units
from segdiff.transforms.mask import encode_probabilities

__all__ = ["STOPPED_BY", "SegmenterInferer", "TrainingStopReport", "per_class_dice", "per_class_iou", "segment_case",
           "segmenter_training"]

logger = logging.getLogger("segdiff.evaluation")

#: what ended a training run, as :class:`TrainingStopReport` names it
STOPPED_BY = {
    "patience": "no better validation Dice in the last {patience} validations",
    "epochs": "the epoch bound ({max_epochs} epochs)",
    "wall_time": "the wall-time bound ({seconds:.0f} s)",
    "terminated": "another handler terminated it",
}


class SegmenterInferer:
    """``inferer(inputs, network)`` for a plain segmentation network over whole cases: class probabilities (softmax)
    on each case's own grid, ``(B, num_classes, *spatial)``; 2D networks run slice by slice over volumes, every slice
    resized to ``image_size`` and the logits back.

    Args:
        spatial_dims: 2 or 3, the network's spatial dimensions.
        image_size: the size the network was trained on (None: the case's own size).
        slice_axis: for a 2D network and 3D input, the spatial axis the volume is cut along.
        batch_size: network inputs per forward pass.
        as_target_encoding: map the probabilities to the value range of a diffusion segmentation member
            (``segdiff.transforms.encode_probabilities``), so the ensemble post-transforms (``num_members=1``) apply.
        model_record: a :class:`segdiff.engine.ModelRecord` with the weights' path, checked once before the first
            case (MONAI Label loads the weights itself and skips the config's ``initialize``).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: Sequence[int] | None,
        slice_axis: int = 2,
        batch_size: int = 32,
        as_target_encoding: bool = False,
        model_record: Any = None,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.image_size = image_size
        self.slice_axis = slice_axis
        self.batch_size = batch_size
        self.as_target_encoding = as_target_encoding
        self.model_record = model_record

    @torch.no_grad()
    def probabilities(self, network: torch.nn.Module, case: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(num_classes, *spatial)`` of one case ``(C, *spatial)``."""
        device = next(network.parameters()).device
        was_training = network.training
        network.eval()
        units = to_network_units(torch.as_tensor(case).float(), self.spatial_dims, self.slice_axis)
        case_size = units.shape[2:]
        logits = []
        for lo in range(0, units.shape[0], self.batch_size):
            chunk = resize(units[lo : lo + self.batch_size], self.image_size, "image").to(device)
            logits.append(resize(network(chunk).float(), case_size, "probabilities").cpu())
        network.train(was_training)
        return from_network_units(torch.cat(logits), case.ndim, self.spatial_dims, self.slice_axis).softmax(dim=0)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        if self.model_record is not None:
            self.model_record.verify_once(network)
        out = torch.stack([self.probabilities(network, case) for case in inputs]).to(inputs.device)
        if self.as_target_encoding:
            out = encode_probabilities(out, "target")
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
            out.is_batch = inputs.is_batch
        return out


def segment_case(
    segmenter: torch.nn.Module,
    image: torch.Tensor,
    spatial_dims: int,
    image_size: Sequence[int] | None,
    slice_axis: int = 2,
    batch_size: int = 32,
) -> torch.Tensor:
    """Label map ``(*spatial)`` (int64) of one case ``image (C, *spatial)`` on the case's own grid."""
    inferer = SegmenterInferer(spatial_dims, image_size, slice_axis, batch_size)
    return inferer.probabilities(segmenter, torch.as_tensor(image)).argmax(dim=0)


def _per_class_overlap(metric, prediction, truth, num_classes: int) -> np.ndarray:
    prediction, truth = torch.as_tensor(prediction).long().cpu(), torch.as_tensor(truth).long().cpu()
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from truth shape {tuple(truth.shape)}.")
    as_onehot = lambda x: one_hot(x[None, None], num_classes, dim=1)  # noqa: E731
    return metric(as_onehot(prediction), as_onehot(truth), include_background=False, ignore_empty=True)[0].numpy()


def per_class_dice(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of every foreground class ``1..num_classes-1`` between two label maps of one case (MONAI's
    ``compute_dice``); NaN where the class is absent from the truth."""
    return _per_class_overlap(compute_dice, prediction, truth, num_classes)


def per_class_iou(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """IoU of every foreground class ``1..num_classes-1`` between two label maps of one case (MONAI's
    ``compute_iou``); NaN where the class is absent from the truth. The twin of :func:`per_class_dice`."""
    return _per_class_overlap(compute_iou, prediction, truth, num_classes)


class TrainingStopReport:
    """Early stopping of a trainer on its validator, said out loud: binds MONAI's ``EarlyStopHandler`` (attached to
    the validator, which cannot name the trainer in a config without a cycle) to the trainer this is attached to, logs
    when training starts how it will stop, and when it ends the epoch, the best validation metric and what stopped it.
    ``summary`` keeps the same figures for a report (None until a run completed).

    Training stops at the first of: ``patience`` validations in a row without a better key metric of the validator
    (``"patience"``), ``max_epochs`` (``"epochs"``), the wall-time limit (``"wall_time"``). Without a validator
    (the datalist has no validation split) it trains for ``max_epochs`` and says so.

    Args:
        validator: the evaluator of the validation split, run by a ``ValidationHandler`` (its key metric decides the
            best weights kept by ``TrainingCheckpoint(best_of=...)``); None when there is no validation split.
        early_stop: MONAI's ``EarlyStopHandler`` in the validator's handlers, created with ``trainer`` None.
        time_limit: the :class:`segdiff.engine.WallTimeLimit` attached to the trainer (None: no wall-time bound).
        val_interval: epochs between validations (for the log).
        weights_path: the weights file the best (or, without validation, the last) weights are written to (for the log).
        name: what is trained, as the log lines name it.
    """

    def __init__(
        self,
        validator: Any = None,
        early_stop: Any = None,
        time_limit: Any = None,
        val_interval: int = 1,
        weights_path: str | os.PathLike | None = None,
        name: str = "reference segmenter",
    ) -> None:
        self.validator = validator
        self.early_stop = early_stop
        self.time_limit = time_limit
        self.val_interval = val_interval
        self.weights_path = weights_path
        self.name = name
        self.summary: dict[str, Any] | None = None
        self._started = 0.0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.early_stop is not None and self.validator is not None:
            self.early_stop.set_trainer(engine)
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _validation_cases(self) -> int:
        return 0 if self.validator is None else len(self.validator.data_loader.dataset)

    def started(self, engine: Any) -> None:
        self._started = time.time()
        bounds = f"at {engine.state.max_epochs} epochs"
        if self.time_limit is not None:
            bounds += f" or after {self.time_limit.limit.limit_sec} s"
        if not self._validation_cases():
            logger.info(f"{self.name}: the datalist has no validation split: training for {engine.state.max_epochs} "
                        f"epochs{'' if self.time_limit is None else f' (or {self.time_limit.limit.limit_sec} s)'} and "
                        "keeping the last weights")
            return
        patience = "" if self.early_stop is None else (
            f"stopping after {self.early_stop.patience} validations without a better Dice, or ")
        logger.info(f"{self.name}: validating every {self.val_interval} epochs on {self._validation_cases()} "
                    f"validation case(s), {patience}{bounds}; keeping the best weights")

    def stopped_by(self, engine: Any) -> str:
        """What ended the run that just completed: ``"patience"``, ``"wall_time"``, ``"epochs"`` or ``"terminated"``."""
        counter = getattr(getattr(self.early_stop, "_handler", None), "counter", 0)
        if self.early_stop is not None and self._validation_cases() and counter >= self.early_stop.patience:
            return "patience"
        if self.time_limit is not None and self.time_limit.reached:
            return "wall_time"
        if engine.state.epoch >= engine.state.max_epochs:
            return "epochs"
        return "terminated"

    def completed(self, engine: Any) -> None:
        stopped_by = self.stopped_by(engine)
        best = getattr(getattr(self.validator, "state", None), "best_metric", -1)
        validated = self._validation_cases() > 0 and best != -1
        self.summary = {
            "trained_in_this_run": True,
            "epochs": engine.state.epoch,
            "max_epochs": engine.state.max_epochs,
            "stopped_by": stopped_by,
            "best_val_mean_dice": round(float(best), 4) if validated else None,
            "best_epoch": self.validator.state.best_metric_epoch if validated else None,
            "validation_cases": self._validation_cases(),
            "minutes": round((time.time() - self._started) / 60, 2),
        }
        reason = STOPPED_BY[stopped_by].format(
            patience=getattr(self.early_stop, "patience", None), max_epochs=engine.state.max_epochs,
            seconds=getattr(getattr(self.time_limit, "limit", None), "limit_sec", 0))
        where = "" if self.weights_path is None else f" as {self.weights_path}"
        if validated:
            kept = (f"best validation mean Dice {self.summary['best_val_mean_dice']:.4f} at epoch "
                    f"{self.summary['best_epoch']}, kept{where}")
        elif self._validation_cases():
            kept = f"no validation ran, the last weights kept{where}"
        else:
            kept = f"no validation split, the last weights kept{where}"
        logger.info(f"{self.name}: stopped at epoch {engine.state.epoch} of at most {engine.state.max_epochs} by "
                    f"{reason} after {self.summary['minutes']:.1f} min; {kept}")


def segmenter_training(report: TrainingStopReport | None, weights_path: str | os.PathLike) -> dict[str, Any] | None:
    """How the segmenter used by an evaluation was trained, for its report: ``report.summary`` when it was trained in
    this run, otherwise what the record beside ``weights_path`` (``segmenter.json``) says: the best validation Dice
    and its epoch, or the last epoch when it was trained without validation (None where unknown). None when neither
    says anything (reused weights without a record)."""
    if report is not None and report.summary is not None:
        return dict(report.summary)
    from segdiff.engine.provenance import read_record

    training = (read_record(weights_path) or {}).get("training") or {}
    if "epoch" not in training:
        return None
    best = training.get("best_metric")
    return {
        "trained_in_this_run": False,
        "weights": str(weights_path),
        "epochs": None if best is not None else training.get("epoch"),
        "stopped_by": None,
        "best_val_mean_dice": None if best is None else round(float(best), 4),
        "best_epoch": training.get("best_metric_epoch"),
    }
