"""The shared report writer and the evaluations' refusals: what is written, logged once, and what stops a run with a
SegdiffError naming the file or key."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.metrics import DiceMetric
from monai.transforms import LoadImaged

import test_evaluation_fixture as fx
from segdiff.data.datalist import resolve_datalist
from segdiff.errors import ConfigKeyError, SegdiffError
from segdiff.evaluation import evaluate_ensemble, output_entries
from segdiff.evaluation.downstream import arm_data
from segdiff.evaluation.faithfulness import check_same_grid, generated_entries
from segdiff.evaluation.report import (
    EvaluationInputError,
    MissingOutputsError,
    case_meta,
    class_means,
    foreground_names,
    markdown_table,
    rounded,
    write_report,
)


def test_report_writes_json_with_null_for_nan_and_markdown_with_title_and_table(tmp_path):
    table = markdown_table(["arm", "Dice", "n"], [["real", 0.12345, "2"], ["synthetic", None, "0"]])
    assert table == "| arm | Dice | n |\n|---|---|---|\n| real | 0.123 | 2 |\n| synthetic | n/a | 0 |\n"
    report = write_report(tmp_path, "x", {"mean": np.float32(np.nan), "per_class": np.array([0.5, np.inf])}, "T", table,
                          before="caption\n\n", after="\nend\n")
    assert report == {"mean": None, "per_class": [0.5, None]}
    assert json.loads((tmp_path / "x.json").read_text()) == report
    assert (tmp_path / "x.md").read_text() == "# T\n\ncaption\n\n" + table + "\nend\n"


def test_report_table_is_logged_once_and_not_printed(tmp_path, caplog, capsys):
    table = markdown_table(["a"], [[1.0]])
    with caplog.at_level(logging.INFO, logger="segdiff.evaluation"):
        write_report(tmp_path, "x", {}, "T", table)
    assert sum(table in record.getMessage() for record in caplog.records) == 1
    assert table not in capsys.readouterr().out


def test_class_means_skip_absent_classes_and_weigh_classes_equally():
    per_class, mean = class_means(np.array([[1.0, np.nan, np.nan], [0.5, 0.2, np.nan]], np.float32))
    np.testing.assert_allclose(per_class[:2], [0.75, 0.2], rtol=1e-6)
    assert math.isnan(per_class[2]) and mean == pytest.approx(0.475)
    assert class_means(np.full((2, 2), np.nan))[1] is None
    assert rounded([0.123456, float("nan"), None, np.float32(1.0)]) == [0.1235, None, None, 1.0]


def test_case_meta_names_each_case_of_a_decollated_batch_for_metrics_saver():
    assert case_meta("case")([{"case": "/a/x.nii.gz", "image": torch.zeros(1)}]) == [{"filename_or_obj": "/a/x.nii.gz"}]


def test_wrong_number_of_class_names_is_a_config_key_refusal():
    assert foreground_names(None, 3) == ["class_1", "class_2"]
    with pytest.raises(ConfigKeyError, match=r"class_names has 1 names .*num_classes=3 needs 2"):
        foreground_names(["liver"], 3)


def test_missing_generated_images_are_refused_naming_the_first_and_what_to_run(tmp_path):
    datalist = fx.write_real(tmp_path / "real")
    test = resolve_datalist(datalist, None, "test")
    generated = fx.write_generated(datalist, tmp_path / "generated", samples_per_mask=1)
    assert [item["image"].split("/")[-1] for item in generated_entries(test, str(generated))] == [
        "case2_image.nii.gz", "case3_image.nii.gz"]
    with pytest.raises(MissingOutputsError, match=r"4 generated image\(s\) missing .*case2_sample0_image.nii.gz: run "
                                                  r"inference.yaml first .*num_samples 2") as error:
        generated_entries(test, str(generated), samples_per_mask=2)
    assert isinstance(error.value, SegdiffError) and isinstance(error.value, FileNotFoundError)


def test_a_generated_image_off_its_masks_grid_is_refused_naming_it():
    data = {"image": torch.zeros(1, 4, 4), "label": torch.zeros(1, 4, 5), "case": "/out/case2_image.nii.gz"}
    with pytest.raises(EvaluationInputError, match=r"/out/case2_image.nii.gz has shape \(4, 4\), its mask \(4, 5\)"):
        check_same_grid(data)


def test_missing_inference_outputs_are_refused_naming_the_first(tmp_path):
    datalist, out = fx.write_outputs(tmp_path / "data")
    (out / "case1_prob.nii.gz").unlink()
    with pytest.raises(MissingOutputsError, match=r"1 inference output\(s\) missing, e.g. .*case1_prob.nii.gz: run "
                                                  r"inference.yaml .*--save_probabilities True"):
        output_entries(resolve_datalist(datalist, None, "test"), str(out))


def test_labels_beyond_num_classes_are_refused_naming_the_file(tmp_path):
    datalist, out = fx.write_outputs(tmp_path / "data")
    items = output_entries(resolve_datalist(datalist, None, "test"), str(out))
    dataset = Dataset(items, LoadImaged(keys=["label", "seg", "uncertainty", "prob", "members"], image_only=True,
                                        ensure_channel_first=True, allow_missing_keys=True))
    with pytest.raises(EvaluationInputError, match=r"labels/case0.nii.gz: labels must be integers in 0..1 \(num_classes=2\)"):
        evaluate_ensemble(dataset, 2, str(tmp_path / "report"), {"dice": DiceMetric(include_background=False)})
    assert not (tmp_path / "report").exists()


def test_unknown_and_empty_arms_are_config_key_refusals():
    real = [{"image": "a.nii.gz", "label": "a.nii.gz"}]
    with pytest.raises(ConfigKeyError, match="downstream_arms: unknown arm 'fake'"):
        arm_data(["fake"], real, None)
    with pytest.raises(ConfigKeyError, match="downstream_arms is empty"):
        arm_data([], real, None)
