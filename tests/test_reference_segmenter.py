"""evaluate.yaml's reference segmenter trains until its validation Dice stops improving (segmenter_patience),
segmenter_epochs or segmenter_max_minutes, keeps the best validation weights, and the faithfulness report says how
it was trained. Tiny data and a tiny UNet; the generated images are copies of the real test images."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from bundle_utils import run_bundle, write_dataset
from ignite.engine import Events

from segdiff.transforms.io import sample_output_paths

BUNDLE = "mask_to_image"
pytestmark = pytest.mark.slow


def write_data(root, splits=None):
    """A tiny data set and, as its 'generated' images, copies of the real test images named as inference names them."""
    datalist = write_dataset(root / "data", shape=(16, 16, 4), splits=splits)
    (root / "generated").mkdir()
    for entry in json.loads(datalist.read_text())["test"]:
        [target] = sample_output_paths(entry["label"], str(root / "generated"), 1, "image")
        shutil.copy(root / "data" / entry["image"], target)
    return root


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path)


def evaluate(root, report="report", **overrides):
    """Run evaluate.yaml with a tiny segmenter; returns faithfulness.json."""
    settings = dict(
        dataset_dir=str(root / "data"), bundle_root=str(root / "bundle"), output_dir=str(root / "generated"),
        report_dir=str(root / report), num_classes=3, image_size=[16, 16], num_workers=0, slices_per_volume=4,
        segmenter_batch_size=8, segmenter_val_interval=1, **{"segmenter_def#channels": [4, 8, 16]},
    )
    run_bundle(BUNDLE, ["evaluate.yaml"], **{**settings, **overrides})  # logs to stdout (logging.conf)
    return json.loads((root / report / "faithfulness.json").read_text())


def test_training_stops_by_patience_when_validation_dice_cannot_improve(data, capsys):
    # lr 0: the weights, and so the validation Dice, never change; patience 1 stops at the second validation
    report = evaluate(data, segmenter_epochs=20, segmenter_patience=1, segmenter_learning_rate=0.0)
    segmenter = report["segmenter"]
    assert segmenter["trained_in_this_run"] and segmenter["stopped_by"] == "patience"
    assert segmenter["epochs"] == 2 and segmenter["max_epochs"] == 20 and segmenter["best_epoch"] == 1
    assert 0.0 <= segmenter["best_val_mean_dice"] <= 1.0 and segmenter["validation_cases"] == 1
    assert "stopped by patience" in (data / "report" / "faithfulness.md").read_text()
    assert "stopped at epoch 2 of at most 20 by no better validation Dice in the last 1 validations" in capsys.readouterr().out


def test_a_reused_segmenter_reports_the_validation_dice_of_its_record(data):
    trained = evaluate(data, segmenter_epochs=2)["segmenter"]
    reused = evaluate(data, report="again", segmenter_epochs=2)["segmenter"]
    assert not reused["trained_in_this_run"] and reused["stopped_by"] is None
    assert reused["best_val_mean_dice"] == trained["best_val_mean_dice"] and reused["best_epoch"] == trained["best_epoch"]


class ScheduledDice:
    """MeanDice's output_transform with the validation Dice chosen per validation: 1 (prediction := truth) at the
    validations listed in ``perfect``, 0 (the complement of the truth) at the others. One validation case: one call
    per validation."""

    def __init__(self, perfect):
        self.perfect, self.calls = set(perfect), 0

    def __call__(self, output):
        self.calls += 1
        labels = [item["label"] for item in output]
        return (labels if self.calls in self.perfect else [1 - label for label in labels]), labels


def test_the_best_validation_weights_are_kept_not_the_last(data, monkeypatch):
    weights = {}

    def keep_weights(trainer):  # each epoch's weights, after its validation
        weights[trainer.state.epoch] = {k: v.clone() for k, v in trainer.network.state_dict().items()}

    from monai.engines import SupervisedTrainer

    run = SupervisedTrainer.run

    def run_keeping_weights(self, *args, **kwargs):
        self.add_event_handler(Events.EPOCH_COMPLETED, keep_weights)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(SupervisedTrainer, "run", run_keeping_weights)
    report = evaluate(data, segmenter_epochs=10, segmenter_patience=2, segmenter_learning_rate=1e-2,
                      **{"segmenter_validate#evaluator#key_val_metric#val_mean_dice#output_transform": ScheduledDice([2])})
    segmenter = report["segmenter"]
    assert (segmenter["best_epoch"], segmenter["epochs"], segmenter["stopped_by"]) == (2, 4, "patience")
    assert segmenter["best_val_mean_dice"] == 1.0
    saved = torch.load(data / "bundle" / "models" / "segmenter.pt", weights_only=True)
    assert all(torch.equal(saved[k], weights[2][k]) for k in saved)
    assert not all(torch.equal(saved[k], weights[4][k]) for k in saved)
    record = json.loads((data / "bundle" / "models" / "segmenter.json").read_text())
    assert record["training"]["best_metric"] == 1.0 and record["training"]["best_metric_epoch"] == 2


def test_the_wall_time_bound_stops_training(data):
    # 1 s of training (0.02 min, whole seconds) long before 100000 epochs or any validation
    report = evaluate(data, segmenter_epochs=100000, segmenter_val_interval=100000, segmenter_max_minutes=0.02)
    segmenter = report["segmenter"]
    assert segmenter["stopped_by"] == "wall_time" and 1 <= segmenter["epochs"] < 100000
    assert segmenter["best_val_mean_dice"] is None
    assert (data / "bundle" / "models" / "segmenter.pt").exists()  # the last weights, as no validation ran


def test_without_a_validation_split_it_trains_for_segmenter_epochs_and_says_so(tmp_path, capsys):
    write_data(tmp_path, splits={"training": 3, "test": 2})
    segmenter = evaluate(tmp_path, segmenter_epochs=3, segmenter_patience=1)["segmenter"]
    assert (segmenter["epochs"], segmenter["stopped_by"], segmenter["best_val_mean_dice"]) == (3, "epochs", None)
    assert segmenter["validation_cases"] == 0
    assert "the datalist has no validation split: training for 3 epochs" in capsys.readouterr().out
