"""Per-case ensemble scores against values worked out by hand (and sklearn for the AUROC on random data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from segdiff.evaluation.ensemble_metrics import (
    paired_pooled_dice_bootstrap,
    TopLabelCalibrationError,
    UncertaintyErrorAUROC,
    expected_calibration_error,
    segmentation_scores,
    summarize,
    uncertainty_error_auroc,
)

# ---------------------------------------------------------------- Dice and HD95


def _two_lines(shape=(8, 8)):
    """One-voxel-thick horizontal lines of class 1, three rows apart: every boundary voxel is 3 rows from the other."""
    prediction, truth = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    prediction[2, 1:7] = 1
    truth[5, 1:7] = 1
    return prediction, truth


def test_dice_of_half_a_box_is_two_thirds():
    truth = np.zeros((8, 8), np.int64)
    truth[2:6, 2:6] = 1  # 16 voxels
    prediction = np.zeros_like(truth)
    prediction[2:4, 2:6] = 1  # 8 voxels, all inside: 2 * 8 / (8 + 16)
    assert segmentation_scores(prediction, truth, num_classes=2)["dice"] == pytest.approx([2 / 3])


def test_hd95_of_parallel_lines_is_their_distance_in_voxels():
    scores = segmentation_scores(*_two_lines(), num_classes=2)
    assert scores["dice"] == [0.0]
    assert scores["hd95"] == pytest.approx([3.0])


def test_hd95_uses_anisotropic_spacing_along_each_axis():
    prediction, truth = _two_lines()  # lines 3 voxels apart along axis 0
    assert segmentation_scores(prediction, truth, 2, spacing=(2.0, 0.5))["hd95"] == pytest.approx([6.0])
    assert segmentation_scores(prediction, truth, 2, spacing=(0.5, 2))["hd95"] == pytest.approx([1.5])
    assert segmentation_scores(prediction, truth, 2, spacing=1.5)["hd95"] == pytest.approx([4.5])


def test_hd95_in_3d_with_anisotropic_spacing_is_euclidean_in_mm():
    prediction, truth = np.zeros((6, 6, 8), np.int64), np.zeros((6, 6, 8), np.int64)
    prediction[1, 1, 1] = 1
    truth[4, 1, 5] = 1  # 3 voxels along axis 0 and 4 along axis 2
    scores = segmentation_scores(torch.as_tensor(prediction), torch.as_tensor(truth), 2, spacing=(1.0, 1.0, 2.0))
    assert scores["hd95"] == pytest.approx([math.sqrt(3**2 + 8**2)])


def test_hd95_ignores_one_outlier_voxel_among_twenty_one():
    truth = np.zeros((5, 30), np.int64)
    truth[1, 0:20] = 1
    prediction = truth.copy()
    prediction[3, 25] = 1  # 20 boundary voxels at distance 0, one at sqrt(2^2 + 6^2): the 95th percentile of 21 is 0
    assert segmentation_scores(prediction, truth, 2)["hd95"] == pytest.approx([0.0])


def test_absent_classes_score_nan_and_a_missed_class_scores_dice_zero():
    truth = np.zeros((10, 10), np.int64)
    truth[1:4, 1:4] = 1  # class 1: matched exactly
    truth[6:9, 6:9] = 3  # class 3: missed by the prediction
    prediction = np.zeros_like(truth)
    prediction[1:4, 1:4] = 1
    prediction[6:8, 1:3] = 4  # class 4: only in the prediction; class 2 in neither
    scores = segmentation_scores(prediction, truth, num_classes=5)
    np.testing.assert_equal(scores["dice"], [1.0, np.nan, 0.0, np.nan])
    np.testing.assert_equal(scores["hd95"], [0.0, np.nan, np.nan, np.nan])


def test_segmentation_scores_names_both_shapes_on_mismatch():
    with pytest.raises(ValueError, match=r"truth shape \(8, 9\) differs from prediction shape \(8, 8\)"):
        segmentation_scores(np.zeros((8, 8)), np.zeros((8, 9)), 2)


def test_segmentation_scores_refuses_labels_beyond_num_classes():
    truth = np.zeros((4, 4), np.int64)
    truth[0, 0] = 3
    with pytest.raises(ValueError, match=r"truth labels must lie in 0..2 \(num_classes=3\), found values 0..3"):
        segmentation_scores(np.zeros((4, 4), np.int64), truth, 3)


def test_segmentation_scores_refuses_spacing_of_the_wrong_length():
    with pytest.raises(ValueError, match="spacing has 3 values but the label maps have 2 spatial dimensions"):
        segmentation_scores(*_two_lines(), 2, spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- uncertainty AUROC


def _errors_and_maps(seed=0, shape=(6, 7, 5)):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, shape)
    prediction = np.where(rng.random(shape) < 0.3, rng.integers(0, 3, shape), truth)
    return prediction, truth, prediction != truth


def test_auroc_is_one_when_uncertainty_is_high_exactly_on_errors():
    prediction, truth, error = _errors_and_maps()
    assert uncertainty_error_auroc(error.astype(float), prediction, truth) == 1.0
    assert uncertainty_error_auroc(-error.astype(float), prediction, truth) == 0.0


def test_auroc_of_a_constant_uncertainty_is_one_half():
    prediction, truth, _ = _errors_and_maps()
    assert uncertainty_error_auroc(np.full(truth.shape, 0.7), prediction, truth) == 0.5


def test_auroc_counts_ties_between_an_error_and_a_correct_voxel_as_one_half():
    # errors at 0.5 and 0.9, correct voxels at 0.1, 0.5, 0.5: pairs won 1 + 0.5 + 0.5 + 3 = 5 of 6
    uncertainty = np.array([[0.5, 0.9, 0.1, 0.5, 0.5]])
    truth = np.zeros((1, 5), np.int64)
    prediction = np.array([[1, 1, 0, 0, 0]])
    assert uncertainty_error_auroc(uncertainty, prediction, truth) == pytest.approx(5 / 6)


def test_auroc_matches_sklearn_on_random_maps_with_ties():
    prediction, truth, error = _errors_and_maps(seed=1)
    uncertainty = np.round(np.random.default_rng(2).random(truth.shape) + 0.4 * error, 1)  # rounding makes ties
    expected = roc_auc_score(error.ravel(), uncertainty.ravel())
    assert uncertainty_error_auroc(torch.as_tensor(uncertainty), prediction, truth) == pytest.approx(
        expected, abs=1e-12
    )


def test_auroc_is_nan_when_all_voxels_are_correct_or_all_wrong():
    truth = np.zeros((3, 3), np.int64)
    uncertainty = np.arange(9.0).reshape(3, 3)
    assert math.isnan(uncertainty_error_auroc(uncertainty, truth, truth))
    assert math.isnan(uncertainty_error_auroc(uncertainty, truth + 1, truth))


def test_auroc_scores_only_the_voxels_inside_the_mask():
    # the last correct voxel has the highest uncertainty; masking it out leaves a perfect ranking
    uncertainty = np.array([[0.8, 0.9, 0.1, 0.2, 1.0]])
    truth = np.zeros((1, 5), np.int64)
    prediction = np.array([[1, 1, 0, 0, 0]])
    assert uncertainty_error_auroc(uncertainty, prediction, truth) == pytest.approx(4 / 6)
    mask = np.array([[True, True, True, True, False]])
    assert uncertainty_error_auroc(uncertainty, prediction, truth, mask=mask) == 1.0
    mask[0, :2] = False  # no error left inside
    assert math.isnan(uncertainty_error_auroc(uncertainty, prediction, truth, mask=mask))


def test_auroc_names_both_shapes_on_mismatch():
    with pytest.raises(ValueError, match=r"prediction shape \(4, 4\) differs from uncertainty shape \(4, 5\)"):
        uncertainty_error_auroc(np.zeros((4, 5)), np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"mask shape \(4,\) differs from uncertainty shape \(4, 5\)"):
        uncertainty_error_auroc(np.zeros((4, 5)), np.zeros((4, 5)), np.zeros((4, 5)), mask=np.ones(4, bool))


def test_auroc_refuses_a_non_boolean_mask():
    with pytest.raises(ValueError, match="mask must be boolean, got dtype int64"):
        uncertainty_error_auroc(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), mask=np.ones((2, 2), np.int64))


# ---------------------------------------------------------------- expected calibration error


def _two_class_case(confidences, correct):
    """Probabilities ``(2, 1, N)`` whose top label is class 0 with the given confidences, and truth that agrees with it
    where ``correct`` is true."""
    confidences = np.asarray(confidences, dtype=np.float64)
    probabilities = np.stack([confidences, 1.0 - confidences])[:, None, :]
    truth = np.where(np.asarray(correct), 0, 1)[None, :]
    return probabilities, truth


def test_ece_is_zero_when_each_bin_is_right_as_often_as_it_is_confident():
    # 10 voxels at 0.8 with 8 right, 4 voxels at 0.75 with 3 right
    probabilities, truth = _two_class_case([0.8] * 10 + [0.75] * 4, [1] * 8 + [0] * 2 + [1] * 3 + [0])
    assert expected_calibration_error(probabilities, truth) == pytest.approx(0.0, abs=1e-12)


def test_ece_weights_each_bins_gap_by_its_share_of_voxels():
    # 4 voxels at 0.9 all right: gap 0.1, weight 0.4; 6 voxels at 0.6 with 2 right: gap 0.6 - 1/3, weight 0.6
    probabilities, truth = _two_class_case([0.9] * 4 + [0.6] * 6, [1] * 4 + [1] * 2 + [0] * 4)
    assert expected_calibration_error(probabilities, truth) == pytest.approx(0.4 * 0.1 + 0.6 * (0.6 - 1 / 3))


def test_ece_pools_confidences_that_share_a_bin():
    probabilities, truth = _two_class_case([0.61, 0.65], [1, 0])
    # 15 bins: both in [9/15, 10/15), accuracy 0.5 against mean confidence 0.63
    assert expected_calibration_error(probabilities, truth) == pytest.approx(0.13)
    # 100 bins: separate, (0.39 + 0.65) / 2
    assert expected_calibration_error(probabilities, truth, num_bins=100) == pytest.approx(0.52)


def test_ece_counts_confidence_one_in_the_last_bin():
    truth = np.array([[0, 1, 2, 1]])
    probabilities = np.moveaxis(np.eye(3)[truth], -1, 0)
    assert expected_calibration_error(probabilities, truth) == 0.0
    assert expected_calibration_error(torch.as_tensor(probabilities), (truth + 1) % 3) == 1.0


def test_ece_accepts_sums_within_tolerance_and_refuses_beyond():
    probabilities, truth = _two_class_case([0.8, 0.7], [1, 1])
    probabilities[0, 0, 0] += 5e-4
    expected_calibration_error(probabilities, truth)
    probabilities[0, 0, 1] += 1e-2
    with pytest.raises(ValueError, match=r"sum to 1 .*tolerance 0.001.*found a sum of 1.010000 at voxel \(0, 1\)"):
        expected_calibration_error(probabilities, truth)


def test_ece_names_both_shapes_on_mismatch():
    with pytest.raises(ValueError, match=r"probabilities shape \(2, 3, 4\) must be .* truth shape \(3, 5\)"):
        expected_calibration_error(np.full((2, 3, 4), 0.5), np.zeros((3, 5), np.int64))


# ---------------------------------------------------------------- summary over cases


def test_summarize_takes_nanmean_per_class_then_over_classes():
    cases = [
        {"image": "case0.nii.gz", "dice": [1.0, np.nan], "hd95": [2.0, np.nan], "auroc": 0.9, "ece": 0.1},
        {"image": "case1.nii.gz", "dice": [0.5, 0.25], "hd95": [4.0, np.nan], "auroc": np.nan, "ece": 0.3},
    ]
    summary = summarize(cases)
    assert summary["num_cases"] == 2 and "image" not in summary
    assert summary["dice"]["per_class"] == pytest.approx([0.75, 0.25])
    assert summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["hd95"]["per_class"][0] == pytest.approx(3.0) and math.isnan(summary["hd95"]["per_class"][1])
    assert summary["hd95"]["mean"] == pytest.approx(3.0)
    assert summary["auroc"] == {"mean": pytest.approx(0.9)}
    assert summary["ece"] == {"mean": pytest.approx(0.2)}


def test_summarize_accepts_the_output_of_the_scoring_functions():
    prediction, truth = _two_lines()
    case = {**segmentation_scores(prediction, truth, 2), "auroc": 0.5}
    assert summarize([case, case])["hd95"] == {"mean": pytest.approx(3.0), "per_class": pytest.approx([3.0])}


def test_summarize_refuses_cases_with_different_class_counts_or_missing_scores():
    with pytest.raises(ValueError, match=r"score 'dice' must be .* found \[\(2,\), \(3,\)\]"):
        summarize([{"dice": [1.0, 1.0]}, {"dice": [1.0, 1.0, 1.0]}])
    with pytest.raises(KeyError, match="case 1 has no score 'ece'"):
        summarize([{"ece": 0.1}, {"auroc": 0.5}])
    with pytest.raises(ValueError, match="at least one case"):
        summarize([])


# ---------------------------------------------------------------- the two as MONAI metrics


def _random_cases(count=3, shape=(6, 7), num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        truth = rng.integers(0, num_classes, shape)
        prediction = np.where(rng.random(shape) < 0.3, rng.integers(0, num_classes, shape), truth)
        uncertainty = (prediction != truth) * 0.4 + rng.random(shape)
        logits = rng.normal(size=(num_classes, *shape))
        probabilities = np.exp(logits) / np.exp(logits).sum(0)
        yield prediction, truth, uncertainty, probabilities


def test_auroc_metric_buffers_the_function_per_case_and_averages_them():
    metric, expected = UncertaintyErrorAUROC(), []
    for prediction, truth, uncertainty, _ in _random_cases():
        batch = lambda x: torch.as_tensor(x)[None, None]  # noqa: E731
        metric(y_pred=batch(prediction), y=batch(truth), uncertainty=batch(uncertainty))
        expected.append(uncertainty_error_auroc(uncertainty, prediction, truth))
    assert metric.get_buffer().shape == (3, 1) and metric.get_buffer().dtype == torch.float64
    assert metric.get_buffer()[:, 0].tolist() == expected  # the same numbers, not approximately
    assert metric.aggregate().item() == pytest.approx(np.mean(expected), rel=1e-6)  # MONAI reduces in float32


def test_auroc_metric_skips_cases_without_errors_in_the_mean():
    metric = UncertaintyErrorAUROC()
    truth = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    metric(y_pred=truth, y=truth, uncertainty=torch.rand(1, 1, 4, 4))  # no error: NaN
    prediction = truth.clone()
    prediction[..., 0, 0] = 1
    uncertainty = torch.zeros(1, 1, 4, 4)
    uncertainty[..., 0, 0] = 1.0
    metric(y_pred=prediction, y=truth, uncertainty=uncertainty)  # the one error is the most uncertain voxel
    assert math.isnan(metric.get_buffer()[0, 0].item()) and metric.aggregate().item() == 1.0


def test_auroc_metric_refuses_a_missing_uncertainty_map():
    with pytest.raises(ValueError, match=r"uncertainty must be a batch-first tensor \(B, 1, \*spatial\)"):
        UncertaintyErrorAUROC()(y_pred=torch.zeros(1, 1, 4, 4), y=torch.zeros(1, 1, 4, 4))


def test_calibration_metric_buffers_the_function_per_case_and_averages_them():
    metric, expected = TopLabelCalibrationError(num_bins=10), []
    for _, truth, _, probabilities in _random_cases():
        metric(y_pred=torch.as_tensor(probabilities)[None], y=torch.as_tensor(truth)[None, None])
        expected.append(expected_calibration_error(probabilities, truth, num_bins=10))
    assert metric.get_buffer()[:, 0].tolist() == expected
    assert metric.aggregate().item() == pytest.approx(np.mean(expected), rel=1e-6)  # MONAI reduces in float32
    metric.reset()
    assert len(metric) == 0


# ---- paired bootstrap of the pooled mean Dice ----------------------------------------------------------------------
def test_paired_bootstrap_difference_matches_hand_computed_pooled_dice():
    # 2 slices of 4 voxels, classes 0..2. Truth: slice 0 = [1, 1, 2, 0], slice 1 = [1, 0, 2, 2].
    truth = np.array([[1, 1, 2, 0], [1, 0, 2, 2]])
    reference = truth.copy()
    prediction = np.array([[1, 0, 2, 0], [1, 0, 2, 1]])
    # prediction, pooled over both slices: class 1 overlap 2, sizes 3 + 3 -> Dice 4/6; class 2 overlap 2, sizes 2 + 3
    # -> Dice 4/5; mean 0.7333; the reference is the truth (1.0): difference -0.2667
    result = paired_pooled_dice_bootstrap(prediction, reference, truth, num_classes=3, draws=500, seed=1)
    assert result["difference"] == pytest.approx((4 / 6 + 4 / 5) / 2 - 1.0)
    assert result["slices"] == 2
    low, high = result["ci95"]
    assert low <= result["difference"] <= high < 0  # every resample (of these two slices) loses to the truth
    # swapping the roles flips the sign
    swapped = paired_pooled_dice_bootstrap(reference, prediction, truth, num_classes=3, draws=500, seed=1)
    assert swapped["difference"] == pytest.approx(-result["difference"])


def test_paired_bootstrap_of_identical_predictions_is_exactly_zero_and_ignores_absent_classes():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(6, 5, 5))  # class 3 never occurs: left out, not scored as 0
    prediction = rng.integers(0, 3, size=(6, 5, 5))
    result = paired_pooled_dice_bootstrap(torch.as_tensor(prediction), prediction, truth, num_classes=4, draws=200)
    assert result == {"difference": 0.0, "ci95": [0.0, 0.0], "slices": 6}


def test_paired_bootstrap_interval_straddles_zero_when_slices_disagree():
    # slice 0: prediction right, reference wrong; slice 1 the other way round: equal on average, either way by chance
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    prediction = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    reference = np.array([[0, 0, 0, 0], [1, 1, 0, 0]])
    result = paired_pooled_dice_bootstrap(prediction, reference, truth, num_classes=2, draws=1000, seed=0)
    assert result["difference"] == pytest.approx(0.0)
    low, high = result["ci95"]
    assert low < 0 < high and low == pytest.approx(-1.0) and high == pytest.approx(1.0)


def test_paired_bootstrap_refuses_mismatched_shapes_and_labels():
    truth = np.zeros((2, 4), dtype=int)
    with pytest.raises(ValueError, match="reference shape"):
        paired_pooled_dice_bootstrap(truth, np.zeros((3, 4), dtype=int), truth, num_classes=2)
    with pytest.raises(ValueError, match=r"prediction labels must lie in 0..1"):
        paired_pooled_dice_bootstrap(truth + 2, truth, truth, num_classes=2)
    with pytest.raises(ValueError, match="draws must be at least 1"):
        paired_pooled_dice_bootstrap(truth, truth, truth, num_classes=2, draws=0)
