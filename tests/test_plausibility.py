"""Plausibility of generated masks (segdiff.synthesis.plausibility): statistics of hand-drawn training masks against
hand counts, each rejection rule on a mask that breaks only that rule, json round trips and the input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segdiff.synthesis.plausibility import ClassStatistics, MaskStatistics, PlausibilityFilter

NAMES = ["csf", "white_matter", "lesion"]


def drawn(*rows: str) -> np.ndarray:
    """A 2D label map drawn as text: one string per row, ``.`` for background, digits for classes."""
    return np.array([[0 if ch == "." else int(ch) for ch in row] for row in rows], dtype=np.int64)


# 10 x 10 masks: classes 1 and 2 are in every mask, class 3 only in the last; class 2 has two parts in TRAIN_2D[1]
TRAIN_2D = [
    drawn(
        "..........",
        ".111......",
        ".111......",
        "..........",
        "..........",
        ".....22...",
        ".....22...",
        "..........",
        "..........",
        "..........",
    ),
    drawn(
        "..........",
        ".111......",
        ".111......",
        ".111......",
        "..........",
        ".2...22...",
        ".....22...",
        "..........",
        "..........",
        "..........",
    ),
    drawn(
        "..........",
        ".11.......",
        ".11.......",
        "..........",
        "...3......",
        ".....22...",
        ".....22...",
        "..........",
        "..........",
        "..........",
    ),
]
SUPPORT_2D = drawn(
    "..........",
    ".111......",
    ".111......",
    ".111......",
    "...1......",
    ".1...11...",
    ".....11...",
    "..........",
    "..........",
    "..........",
).astype(bool)


@pytest.fixture
def stats_2d() -> MaskStatistics:
    return MaskStatistics.from_masks(TRAIN_2D, num_classes=4)


def with_voxels(mask: np.ndarray, value: int, *positions: tuple[int, ...]) -> np.ndarray:
    out = mask.copy()
    for position in positions:
        out[position] = value
    return out


# ---- statistics -----------------------------------------------------------------------------------------------
def test_statistics_of_2d_masks_equal_the_hand_counts(stats_2d):
    assert stats_2d.num_masks == 3 and stats_2d.shape == (10, 10) and stats_2d.spacing is None
    assert stats_2d.classes == {
        1: ClassStatistics(masks_with_class=3, min_voxels=4, max_voxels=9, max_components=1),
        2: ClassStatistics(masks_with_class=3, min_voxels=4, max_voxels=5, max_components=2),
        3: ClassStatistics(masks_with_class=1, min_voxels=1, max_voxels=1, max_components=1),
    }
    np.testing.assert_array_equal(stats_2d.support, SUPPORT_2D)
    assert stats_2d.always_present() == [1, 2]


def test_statistics_of_3d_masks_count_diagonal_neighbours_as_one_component():
    first = np.zeros((4, 5, 5), dtype=np.int64)
    first[0, 0, 0] = first[1, 1, 1] = 1  # touch at a corner only: one part with 26-connectivity
    first[3, 3, 3] = first[3, 3, 1] = 2  # a voxel apart: two parts
    second = np.zeros((1, 4, 5, 5), dtype=np.int64)  # with a channel axis
    second[0, :2, :2, :2] = 1
    stats = MaskStatistics.from_masks([torch.as_tensor(first), second], num_classes=3)
    assert stats.shape == (4, 5, 5)
    assert stats.classes == {
        1: ClassStatistics(masks_with_class=2, min_voxels=2, max_voxels=8, max_components=1),
        2: ClassStatistics(masks_with_class=1, min_voxels=2, max_voxels=2, max_components=2),
    }
    expected = np.zeros((4, 5, 5), dtype=bool)
    expected[:2, :2, :2] = expected[3, 3, 3] = expected[3, 3, 1] = True
    np.testing.assert_array_equal(stats.support, expected)
    assert stats.always_present() == [1]


def test_statistics_read_the_spacing_from_metatensor_affines_and_an_explicit_spacing_wins():
    affine = torch.diag(torch.tensor([2.0, 1.5, 1.0, 1.0], dtype=torch.float64))
    metas = [MetaTensor(torch.as_tensor(m)[None], affine=affine) for m in TRAIN_2D]
    from_affine = MaskStatistics.from_masks(metas, num_classes=4)
    assert from_affine.spacing == (2.0, 1.5) and from_affine.voxel_volume_mm3 == 3.0
    assert from_affine.classes == MaskStatistics.from_masks(TRAIN_2D, num_classes=4).classes
    assert MaskStatistics.from_masks(metas, num_classes=4, spacing=0.5).spacing == (0.5, 0.5)
    assert MaskStatistics.from_masks(TRAIN_2D, num_classes=4, spacing=[1.0, 3.0]).voxel_volume_mm3 == 3.0


def test_statistics_refuse_metatensors_of_different_spacings():
    first = MetaTensor(torch.as_tensor(TRAIN_2D[0]), affine=torch.diag(torch.tensor([2.0, 1.5, 1.0, 1.0])))
    second = MetaTensor(torch.as_tensor(TRAIN_2D[1]), affine=torch.eye(4))
    with pytest.raises(ValueError, match=r"training mask 2 has spacing \(1.0, 1.0\).*mask 0 has \(2.0, 1.5\)"):
        MaskStatistics.from_masks([first, TRAIN_2D[2], second], num_classes=4)


def test_statistics_refuse_an_empty_list():
    with pytest.raises(ValueError, match="no training masks were given"):
        MaskStatistics.from_masks([], num_classes=4)


def test_statistics_name_the_mask_of_another_shape_and_both_shapes():
    with pytest.raises(ValueError, match=r"training mask 2 has spatial shape \(10, 9\), mask 0 has \(10, 10\)"):
        MaskStatistics.from_masks([TRAIN_2D[0], TRAIN_2D[1], TRAIN_2D[2][:, :9]], num_classes=4)


def test_statistics_name_the_values_outside_the_classes():
    bad = with_voxels(TRAIN_2D[1], 7, (0, 0))
    bad[9, 9] = -1
    with pytest.raises(ValueError, match=r"training mask 1 holds values \[-1, 7\] outside \[0, 4\) \(num_classes=4\)"):
        MaskStatistics.from_masks([TRAIN_2D[0], bad], num_classes=4)


def test_statistics_refuse_fractional_class_ids_and_masks_that_are_not_2d_or_3d():
    fractional = TRAIN_2D[0].astype(np.float32)
    fractional[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"training mask 0: expected integer class ids, found values \[0.5\]"):
        MaskStatistics.from_masks([fractional], num_classes=4)
    with pytest.raises(ValueError, match=r"2 or 3 spatial axes, got shape \(2, 3, 4, 5\)"):
        MaskStatistics.from_masks([np.zeros((2, 3, 4, 5), dtype=np.int64)], num_classes=4)


def test_statistics_refuse_a_spacing_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"spacing must be one number or 2 .* got \[1.0, 1.0, 1.0\]"):
        MaskStatistics.from_masks(TRAIN_2D, num_classes=4, spacing=[1.0, 1.0, 1.0])


# ---- json ---------------------------------------------------------------------------------------------------------
def test_json_round_trip_gives_equal_statistics_in_2d_with_a_spacing(tmp_path):
    stats = MaskStatistics.from_masks(TRAIN_2D, num_classes=4, spacing=(2.0, 1.5))
    path = stats.to_json(tmp_path / "generator" / "mask_statistics.json")
    loaded = MaskStatistics.from_json(path)
    assert loaded == stats and loaded.spacing == (2.0, 1.5)
    written = json.loads(path.read_text())
    assert written["classes"]["1"] == {
        "masks_with_class": 3,
        "min_voxels": 4,
        "max_voxels": 9,
        "max_components": 1,
        "min_mm3": 12.0,
        "max_mm3": 27.0,
    }


def test_json_round_trip_keeps_a_3d_support_whose_size_is_not_a_multiple_of_8(tmp_path):
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 3, size=(3, 5, 7)) * (rng.random((3, 5, 7)) < 0.2) for _ in range(2)]
    stats = MaskStatistics.from_masks(masks, num_classes=3)
    assert 0 < stats.support.sum() < stats.support.size  # a support with both values, 105 bits
    loaded = MaskStatistics.from_json(stats.to_json(tmp_path / "stats.json"))
    assert loaded == stats
    np.testing.assert_array_equal(loaded.support, np.any(np.stack(masks) > 0, axis=0))


def test_statistics_that_differ_in_the_support_only_are_not_equal(stats_2d):
    other = MaskStatistics.from_dict(stats_2d.to_dict())
    other.support[9, 9] = True
    assert other != stats_2d


def test_from_json_refuses_a_file_of_another_format(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something_else", "version": 1}))
    with pytest.raises(ValueError, match="expected format 'segdiff.mask_statistics' version 1, got format 'something"):
        MaskStatistics.from_json(path)


# ---- the filter -------------------------------------------------------------------------------------------------
def test_every_training_mask_passes(stats_2d):
    check = PlausibilityFilter(stats_2d)
    for mask in TRAIN_2D:
        assert check(mask) == (True, [])
    assert check(torch.as_tensor(TRAIN_2D[2])[None]) == (True, [])  # a (1, H, W) tensor


def test_a_class_too_small_fails_naming_the_class_and_the_numbers(stats_2d):
    small = with_voxels(TRAIN_2D[2], 0, (2, 2))  # class 1: 3 voxels, the range is [4, 9] +- 20% = [3.2, 10.8]
    assert PlausibilityFilter(stats_2d, class_names=NAMES)(small) == (
        False,
        ["class 1 (csf): volume 3 voxels outside the training range [4, 9] +- 20% = [3.2, 10.8]"],
    )
    assert PlausibilityFilter(stats_2d, volume_tolerance=0.25)(small) == (True, [])  # 4 * 0.75 = 3


def test_a_class_too_large_fails_naming_the_class_and_the_numbers(stats_2d):
    large = with_voxels(TRAIN_2D[1], 1, (0, 1), (0, 2), (0, 3))  # class 1: 12 voxels
    assert PlausibilityFilter(stats_2d)(large) == (
        False,
        ["class 1: volume 12 voxels outside the training range [4, 9] +- 20% = [3.2, 10.8]"],
    )
    assert PlausibilityFilter(stats_2d, volume_tolerance=0.4)(large)[0]  # 9 * 1.4 = 12.6


def test_a_volume_exactly_at_the_bound_passes():
    train = np.zeros((4, 4), dtype=np.int64)
    train.flat[:10] = 1  # class 1: 10 voxels; with tolerance 0.7 the lower bound is 3 (3.0000000000000004 in floats)
    stats = MaskStatistics.from_masks([train], num_classes=2)
    three = drawn("111.", "....", "....", "....")
    assert PlausibilityFilter(stats, volume_tolerance=0.7)(three) == (True, [])
    assert not PlausibilityFilter(stats, volume_tolerance=0.69)(three)[0]


def test_volumes_in_mm3_report_the_numbers_in_mm3():
    stats = MaskStatistics.from_masks(TRAIN_2D, num_classes=4, spacing=(2.0, 1.5))  # 3 mm3 per voxel
    small = with_voxels(TRAIN_2D[2], 0, (2, 2))
    assert PlausibilityFilter(stats, volume_unit="mm3")(small) == (
        False,
        ["class 1: volume 9 mm3 outside the training range [12, 27] +- 20% = [9.6, 32.4]"],
    )


def test_mm3_without_a_spacing_is_refused(stats_2d):
    with pytest.raises(ValueError, match="volume_unit='mm3' needs statistics with a spacing"):
        PlausibilityFilter(stats_2d, volume_unit="mm3")


def test_an_extra_disconnected_blob_fails_on_components(stats_2d):
    blob = with_voxels(TRAIN_2D[0], 1, (4, 1))  # class 1: 7 voxels, a second part one row below the block
    assert PlausibilityFilter(stats_2d, class_names=NAMES)(blob) == (
        False,
        ["class 1 (csf): 2 connected components, at most 1 in training"],
    )
    diagonal = with_voxels(TRAIN_2D[0], 1, (3, 4))  # touches the block's corner (2, 3): still one part
    assert PlausibilityFilter(stats_2d)(diagonal) == (True, [])


def test_max_components_overrides_the_training_maximum(stats_2d):
    blob = with_voxels(TRAIN_2D[0], 1, (4, 1))
    assert PlausibilityFilter(stats_2d, max_components=2)(blob) == (True, [])
    assert PlausibilityFilter(stats_2d, max_components={2: 1})(blob)[1] == [
        "class 1: 2 connected components, at most 1 in training"
    ]
    # class 2's two parts in TRAIN_2D[1] pass by the training maximum, fail by an explicit limit of 1
    assert PlausibilityFilter(stats_2d, max_components={2: 1})(TRAIN_2D[1]) == (
        False,
        ["class 2: 2 connected components, at most 1 allowed (max_components)"],
    )


def test_a_blob_outside_the_dilated_body_fails_and_passes_without_the_body_check(stats_2d):
    # the support reaches (6, 6); (9, 9) is 3 voxels away along both axes, beyond the margin of 2
    outside = with_voxels(TRAIN_2D[0], 3, (9, 9))
    assert PlausibilityFilter(stats_2d, class_names=NAMES)(outside) == (
        False,
        ["class 3 (lesion): 1 voxel outside the body (training support dilated by 2 voxels)"],
    )
    assert PlausibilityFilter(stats_2d, body="none")(outside) == (True, [])
    assert PlausibilityFilter(stats_2d, body_margin=3)(outside) == (True, [])


def test_a_blob_inside_the_margin_passes(stats_2d):
    inside = with_voxels(TRAIN_2D[0], 3, (8, 8))  # 2 voxels from (6, 6) along both axes: within a margin of 2
    assert PlausibilityFilter(stats_2d)(inside) == (True, [])
    assert PlausibilityFilter(stats_2d, body_margin=1)(inside) == (
        False,
        ["class 3: 1 voxel outside the body (training support dilated by 1 voxel)"],
    )
    assert not PlausibilityFilter(stats_2d, body_margin=0)(with_voxels(TRAIN_2D[0], 3, (7, 7)))[0]


def test_a_missing_always_present_class_fails_and_a_missing_occasional_class_does_not(stats_2d):
    no_white_matter = np.where(TRAIN_2D[2] == 2, 0, TRAIN_2D[2])
    assert PlausibilityFilter(stats_2d, class_names=NAMES)(no_white_matter) == (
        False,
        ["class 2 (white_matter): absent, but present in all 3 training masks"],
    )
    no_lesion = np.where(TRAIN_2D[2] == 3, 0, TRAIN_2D[2])
    assert PlausibilityFilter(stats_2d)(no_lesion) == (True, [])


def test_a_class_no_training_mask_contains_fails():
    stats = MaskStatistics.from_masks(TRAIN_2D, num_classes=5)
    assert stats.classes[4] == ClassStatistics(masks_with_class=0, min_voxels=None, max_voxels=None, max_components=0)
    unseen = with_voxels(TRAIN_2D[0], 4, (4, 4), (4, 5))
    assert PlausibilityFilter(stats)(unseen) == (
        False,
        ["class 4: volume 2 voxels, but the class is in none of the training masks"],
    )


def test_several_failures_are_all_reported(stats_2d):
    bad = np.where(TRAIN_2D[0] == 2, 0, TRAIN_2D[0])
    bad = with_voxels(bad, 1, (9, 0))
    passed, reasons = PlausibilityFilter(stats_2d)(bad)
    assert not passed
    assert reasons == [
        "class 1: 2 connected components, at most 1 in training",
        "class 1: 1 voxel outside the body (training support dilated by 2 voxels)",
        "class 2: absent, but present in all 3 training masks",
    ]


def test_the_filter_in_3d_dilates_the_body_along_every_axis():
    train = np.zeros((2, 6, 6, 6), dtype=np.int64)
    train[0, 1:3, 1:3, 1:3] = 1
    train[1, 1:3, 1:3, 1:4] = 1  # the support: the block [1:3, 1:3, 1:4], its far corner (2, 2, 3)
    stats = MaskStatistics.from_masks(list(train), num_classes=2)
    assert stats.classes[1] == ClassStatistics(masks_with_class=2, min_voxels=8, max_voxels=12, max_components=1)
    assert PlausibilityFilter(stats)(train[0]) == (True, [])
    # a diagonal chain off the block's corner (2, 2, 2): one part of 11 voxels, 1, 2 and 3 voxels from the support
    # (the largest distance along an axis; in city-block distance they would be 2, 4 and 6)
    chain = with_voxels(train[0], 1, (3, 3, 3), (4, 4, 4), (5, 5, 5))
    assert PlausibilityFilter(stats, body_margin=1)(chain) == (
        False,
        ["class 1: 2 voxels outside the body (training support dilated by 1 voxel)"],
    )
    assert PlausibilityFilter(stats, body_margin=2)(chain)[1] == [
        "class 1: 1 voxel outside the body (training support dilated by 2 voxels)"
    ]
    assert PlausibilityFilter(stats, body_margin=3)(chain) == (True, [])


def test_the_filter_names_both_shapes_when_the_mask_is_on_another_grid(stats_2d):
    expected = r"generated mask has spatial shape \(10, 9\), the statistics' grid is \(10, 10\)"
    with pytest.raises(ValueError, match=expected):
        PlausibilityFilter(stats_2d)(TRAIN_2D[0][:, :9])


def test_the_filter_names_values_outside_the_classes(stats_2d):
    with pytest.raises(ValueError, match=r"generated mask holds values \[4\] outside \[0, 4\)"):
        PlausibilityFilter(stats_2d)(with_voxels(TRAIN_2D[0], 4, (0, 0)))


def test_the_filter_refuses_bad_settings(stats_2d):
    with pytest.raises(ValueError, match="body must be 'training_support' or 'none', got 'hull'"):
        PlausibilityFilter(stats_2d, body="hull")
    with pytest.raises(ValueError, match="volume_tolerance must be >= 0, got -0.1"):
        PlausibilityFilter(stats_2d, volume_tolerance=-0.1)
    with pytest.raises(ValueError, match="class_names must name the 3 foreground classes"):
        PlausibilityFilter(stats_2d, class_names=["csf"])
    with pytest.raises(ValueError, match=r"max_components names class 7, the foreground classes are \[1, 2, 3\]"):
        PlausibilityFilter(stats_2d, max_components={7: 1})


def test_describe_returns_the_settings(stats_2d):
    check = PlausibilityFilter(stats_2d, volume_tolerance=0.3, max_components={2: 1}, body_margin=1, class_names=NAMES)
    described = check.describe()
    assert described == {
        "volume_tolerance": 0.3,
        "volume_unit": "voxels",
        "max_components": {"2": 1},
        "allowed_components": {"1": 1, "2": 1, "3": 1},
        "body": "training_support",
        "body_margin": 1,
        "class_names": NAMES,
        "num_classes": 4,
        "grid": [10, 10],
        "spacing": None,
        "num_training_masks": 3,
    }
    assert json.loads(json.dumps(described)) == described
