"""Datalist checks: every problem is found, and each message names split, index, key, file, expected, found."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from segdiff.data.checks import DataCheckError, check_datalist, find_problems

SHAPE = (8, 7, 4)


def affine(shift=0.0):
    a = np.diag([1.5, 1.5, 3.0, 1.0])
    a[:3, 3] = [-10.0 + shift, 5.0, 2.0]
    return a


def write_nifti(path, data, aff=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine() if aff is None else aff), str(path))
    return path


def image(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def label(shape=SHAPE, num_classes=3):
    return (np.arange(np.prod(shape)) % num_classes).reshape(shape).astype(np.uint8)


@pytest.fixture
def dataset(tmp_path):
    """Two good training cases and one validation case, one image channel, 3 classes."""
    for case in ("a", "b", "c"):
        write_nifti(tmp_path / "images" / f"{case}.nii.gz", image())
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", label())
    datalist = {
        "training": [
            {"image": "images/a.nii.gz", "label": "labels/a.nii.gz"},
            {"image": "images/b.nii.gz", "label": "labels/b.nii.gz"},
        ],
        "validation": [{"image": "images/c.nii.gz", "label": "labels/c.nii.gz"}],
    }
    return tmp_path, datalist


def only_problem(problems):
    assert len(problems) == 1, problems
    return problems[0]


def test_clean_datalist_has_no_problems_and_counts_entries(dataset):
    root, datalist = dataset
    assert find_problems(datalist, root, num_classes=3, image_channels=1) == []
    assert check_datalist(datalist, root, 3, 1) == 3


def test_missing_file_names_split_index_key_and_file(dataset):
    root, datalist = dataset
    datalist["training"][1]["label"] = "labels/gone.nii.gz"
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem.startswith("training[1] 'label': file not found: labels/gone.nii.gz")
    assert str(root / "labels" / "gone.nii.gz") in problem


def test_unreadable_file_reports_the_loader_error(dataset):
    root, datalist = dataset
    (root / "images" / "b.nii.gz").write_bytes(b"this is not a nifti file")
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem.startswith("training[1] 'image': cannot read images/b.nii.gz: ")
    assert "\n" not in problem


def test_spatial_shape_mismatch_reports_both_shapes(dataset):
    root, datalist = dataset
    write_nifti(root / "labels" / "c.nii.gz", label(shape=(8, 7, 5)))
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem.startswith("validation[0] 'label': labels/c.nii.gz:")
    assert "expected the image's spatial shape (8, 7, 4)" in problem
    assert "found (8, 7, 5)" in problem


def test_affine_mismatch_reports_both_affines(dataset):
    root, datalist = dataset
    write_nifti(root / "labels" / "a.nii.gz", label(), aff=affine(shift=0.5))
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem.startswith("training[0] 'label': labels/a.nii.gz: expected the image's affine")
    assert "[1.5, 0, 0, -10]" in problem  # the image's
    assert "[1.5, 0, 0, -9.5]" in problem  # the label's
    assert "max difference 0.5" in problem


def test_affine_difference_within_tolerance_is_accepted(dataset):
    root, datalist = dataset
    write_nifti(root / "labels" / "a.nii.gz", label(), aff=affine(shift=1e-4))
    assert find_problems(datalist, root, 3) == []


def test_label_values_outside_the_classes_are_listed(dataset):
    root, datalist = dataset
    bad = label()
    bad[0, 0, :] = [7, 5, 5, 9]
    write_nifti(root / "labels" / "b.nii.gz", bad)
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem == (
        "training[1] 'label': labels/b.nii.gz: expected class indices in [0, 3) for num_classes=3, found 5, 7, 9"
    )


def test_many_bad_label_values_are_truncated(dataset):
    root, datalist = dataset
    write_nifti(root / "labels" / "b.nii.gz", label(num_classes=12))
    problem = only_problem(find_problems(datalist, root, 3))
    assert "found 3, 4, 5, 6, 7 (and 4 more)" in problem


def test_non_integer_label_values_are_reported(dataset):
    root, datalist = dataset
    bad = label().astype(np.float32)
    bad[1, 1, 1] = 0.5
    write_nifti(root / "labels" / "a.nii.gz", bad)
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem == (
        "training[0] 'label': labels/a.nii.gz: expected integer class indices, found non-integer values 0.5"
    )


def test_num_classes_zero_skips_the_range_check_but_not_the_integer_check(dataset):
    root, datalist = dataset
    write_nifti(root / "labels" / "a.nii.gz", label(num_classes=200))
    assert find_problems(datalist, root, num_classes=0) == []
    bad = label().astype(np.float32)
    bad[0, 0, 0] = 1.25
    write_nifti(root / "labels" / "a.nii.gz", bad)
    assert "non-integer values 1.25" in only_problem(find_problems(datalist, root, num_classes=0))


def test_nan_and_inf_intensities_are_counted(dataset):
    root, datalist = dataset
    bad = image()
    bad[0, 0, 0] = np.nan
    bad[1, 0, 0] = np.nan
    bad[2, 0, 0] = np.inf
    write_nifti(root / "images" / "c.nii.gz", bad)
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem == (
        "validation[0] 'image': images/c.nii.gz: expected finite intensities, found 2 NaN and 1 Inf voxel(s) "
        "in channel 0"
    )


def test_wrong_image_channel_count_reports_expected_and_found(dataset):
    root, datalist = dataset
    problems = find_problems(datalist, root, 3, image_channels=2)
    assert len(problems) == 3
    assert problems[0].startswith("training[0] 'image': images/a.nii.gz: expected 2 image channel(s), found 1")


def test_label_with_two_channels_is_reported(dataset):
    root, datalist = dataset
    write_nifti(root / "labels" / "a.nii.gz", np.stack([label(), label()], axis=-1))
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem.startswith("training[0] 'label': labels/a.nii.gz: expected a label with 1 channel")
    assert "found 2 channels" in problem


def test_list_of_channel_files_is_stacked_and_names_the_bad_channel_file(tmp_path):
    write_nifti(tmp_path / "a_0000.nii.gz", image(1))
    bad = image(2)
    bad[0, 0, 0] = np.nan
    write_nifti(tmp_path / "a_0001.nii.gz", bad)
    write_nifti(tmp_path / "a.nii.gz", label())
    datalist = {"training": [{"image": ["a_0000.nii.gz", "a_0001.nii.gz"], "label": "a.nii.gz"}]}
    problem = only_problem(find_problems(datalist, tmp_path, 3, image_channels=2, splits=["training"]))
    assert problem.startswith("training[0] 'image': a_0001.nii.gz: expected finite intensities, found 1 NaN")
    assert "channel 1" in problem


def test_missing_channel_file_in_a_list_is_named(tmp_path):
    write_nifti(tmp_path / "a_0000.nii.gz", image())
    write_nifti(tmp_path / "a.nii.gz", label())
    datalist = {"training": [{"image": ["a_0000.nii.gz", "a_0001.nii.gz"], "label": "a.nii.gz"}]}
    problem = only_problem(find_problems(datalist, tmp_path, 3, splits=["training"]))
    assert problem.startswith("training[0] 'image': file not found: a_0001.nii.gz")


def test_missing_and_empty_splits_are_reported(dataset):
    root, datalist = dataset
    datalist["validation"] = []
    problems = find_problems(datalist, root, 3, splits=["training", "validation", "test"], datalist_name="d.json")
    assert problems == [
        "validation: split is empty: expected at least one entry",
        "test: split missing from d.json (its keys: ['training', 'validation'])",
    ]


def test_every_problem_is_reported_not_just_the_first(dataset):
    root, datalist = dataset
    datalist["training"][0]["image"] = "images/gone.nii.gz"
    write_nifti(root / "labels" / "b.nii.gz", label(num_classes=5))
    write_nifti(root / "labels" / "c.nii.gz", label(shape=(8, 7, 5)))
    problems = find_problems(datalist, root, 3)
    where = [p.split(":")[0] for p in problems]
    assert where == ["training[0] 'image'", "training[1] 'label'", "validation[0] 'label'"]


def test_entry_without_required_label_key_is_reported(dataset):
    root, datalist = dataset
    del datalist["training"][0]["label"]
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem == "training[0] 'label': expected a 'label' key, found keys ['image']"


def test_image_only_datalist_passes_without_require_label(dataset):
    root, datalist = dataset
    for split in ("training", "validation"):
        for entry in datalist[split]:
            del entry["label"]
    assert find_problems(datalist, root, 3, require_label=False) == []


def test_mask_only_datalist_passes_without_require_image(dataset):
    root, datalist = dataset
    for split in ("training", "validation"):
        for entry in datalist[split]:
            del entry["image"]
    assert find_problems(datalist, root, 3, require_image=False) == []


def test_png_pairs_are_read_like_training_reads_them(tmp_path):
    Image.fromarray((image(shape=(12, 10)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(label(shape=(12, 10), num_classes=4)).save(tmp_path / "m.png")
    Image.fromarray(label(shape=(12, 9))).save(tmp_path / "m_small.png")
    datalist = {
        "training": [{"image": "x.png", "label": "m.png"}],
        "validation": [{"image": "x.png", "label": "m_small.png"}],
    }
    problems = find_problems(datalist, tmp_path, num_classes=4, image_channels=1)
    assert problems == [
        "validation[0] 'label': m_small.png: expected the image's spatial shape (10, 12) (image x.png), found (9, 12)"
    ]


def test_check_datalist_raises_with_a_header_and_one_bullet_per_problem(dataset):
    root, datalist = dataset
    datalist["training"][0]["image"] = "images/gone.nii.gz"
    datalist["training"][1]["label"] = "labels/gone.nii.gz"
    with pytest.raises(DataCheckError) as info:
        check_datalist(datalist, root, 3, datalist_name="spleen.json")
    lines = str(info.value).splitlines()
    assert lines[0] == "spleen.json: 2 problem(s) found:"
    assert lines[1].startswith("  - training[0] 'image': file not found: images/gone.nii.gz")
    assert lines[2].startswith("  - training[1] 'label': file not found: labels/gone.nii.gz")
    assert isinstance(info.value, ValueError)
    assert len(info.value.problems) == 2


def test_check_datalist_accepts_a_path_and_defaults_to_its_folder(dataset):
    root, datalist = dataset
    (root / "datalist.json").write_text(json.dumps(datalist))
    assert check_datalist(str(root / "datalist.json"), None, 3) == 3


def test_check_datalist_names_the_file_it_was_given(dataset):
    root, datalist = dataset
    datalist["validation"] = []
    (root / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(DataCheckError, match=r"datalist\.json: 1 problem\(s\) found:"):
        check_datalist(str(root / "datalist.json"), None, 3)


def test_check_datalist_works_from_a_bundle_config_expression(dataset):
    from monai.bundle import ConfigParser

    root, datalist = dataset
    (root / "datalist.json").write_text(json.dumps(datalist))
    parser = ConfigParser(
        {
            # "$import segdiff" binds the name; "$import segdiff.data" makes sure the sub-package is loaded
            "imports": ["$import segdiff", "$import segdiff.data"],
            "dataset_dir": str(root),
            "datalist": "$@dataset_dir + '/datalist.json'",
            "num_classes": 3,
            "image_channels": 1,
            "check": "$segdiff.data.checks.check_datalist(segdiff.data.datalist.load_datalist(@datalist), "
            "@dataset_dir, @num_classes, @image_channels)",
        }
    )
    assert parser.get_parsed_content("check") == 3


def test_a_loaded_datalist_without_its_folder_is_refused_naming_it(dataset):
    from segdiff.data.datalist import DatalistError

    _, datalist = dataset
    with pytest.raises(DatalistError, match="spleen: dataset_dir is required"):
        find_problems(datalist, None, 3, datalist_name="spleen")


# ------------------------------------------------------------------------------------------- output names
def two_sites(tmp_path):
    """siteA/patient1 and siteB/patient1 (same file name, different folders) plus a uniquely named case."""
    for site in ("siteA", "siteB"):
        write_nifti(tmp_path / site / "images" / "patient1.nii.gz", image())
        write_nifti(tmp_path / site / "labels" / "patient1.nii.gz", label())
    write_nifti(tmp_path / "siteB" / "images" / "patient2.nii.gz", image())
    write_nifti(tmp_path / "siteB" / "labels" / "patient2.nii.gz", label())
    return [
        {"image": f"{site}/images/{case}.nii.gz", "label": f"{site}/labels/{case}.nii.gz"}
        for site, case in (("siteA", "patient1"), ("siteB", "patient2"), ("siteB", "patient1"))
    ]


def test_output_name_collisions_groups_files_that_share_a_name_across_folders(tmp_path):
    from segdiff.data.checks import OutputCollision, output_name_collisions

    entries = two_sites(tmp_path)
    assert output_name_collisions(entries, "label") == [
        OutputCollision("patient1", (0, 2), ("siteA/labels/patient1.nii.gz", "siteB/labels/patient1.nii.gz"))
    ]
    assert output_name_collisions(entries[:2], "label") == []


def test_output_names_of_per_channel_images_come_from_the_first_file():
    from segdiff.data.checks import output_name_collisions

    entries = [{"image": ["a/p_0000.nii.gz", "a/p_0001.nii.gz"]}, {"image": ["b/p_0000.nii.gz", "b/p_0001.nii.gz"]},
               {"image": "c/p_0001.nii.gz"}, {"label": "no image here"}]
    (collision,) = output_name_collisions(entries, "image")
    assert collision.output_name == "p_0000" and collision.files == ("a/p_0000.nii.gz", "b/p_0000.nii.gz")


def test_check_output_names_refuses_naming_both_files_the_output_and_what_to_do(tmp_path):
    from segdiff.data.checks import check_output_names
    from segdiff.errors import OutputCollisionError, SegdiffError

    with pytest.raises(OutputCollisionError) as info:
        check_output_names(two_sites(tmp_path), "label", "test.json")
    message = str(info.value)
    assert isinstance(info.value, SegdiffError)
    assert message.startswith("test.json: 1 output name(s) would be shared by several inputs under 'label'")
    assert "output 'patient1': entry 0 siteA/labels/patient1.nii.gz, entry 2 siteB/labels/patient1.nii.gz" in message
    assert "Rename the files" in message and "its own output_dir" in message


def test_check_output_names_passes_unique_names_through(tmp_path):
    from segdiff.data.checks import check_output_names

    entries = two_sites(tmp_path)[:2]
    assert check_output_names(iter(entries), "image") == entries


def test_the_same_file_listed_twice_is_a_collision_that_says_so():
    from segdiff.data.checks import check_output_names
    from segdiff.errors import OutputCollisionError

    with pytest.raises(OutputCollisionError, match="the same file listed more than once"):
        check_output_names([{"image": "a/x.nii.gz"}, {"image": "a/x.nii.gz"}], "image")


def test_find_problems_reports_shared_output_names_within_a_split_only_when_asked(tmp_path):
    entries = two_sites(tmp_path)
    datalist = {"training": entries, "validation": [entries[0]]}
    assert find_problems(datalist, tmp_path, 3) == []  # training writes no per-case outputs
    problems = find_problems(datalist, tmp_path, 3, output_keys=["label", "image"])
    assert len(problems) == 2, problems  # one per key; validation's patient1 does not collide with training's
    assert problems[0].startswith("training 'label': output 'patient1': entry 0 siteA/labels/patient1.nii.gz, "
                                  "entry 2 siteB/labels/patient1.nii.gz")
    assert "naming its outputs after 'label' (mask -> image)" in problems[0]
    assert problems[1].startswith("training 'image': output 'patient1'") and "(image -> mask)" in problems[1]


def test_modalities_are_checked_and_the_unlabelled_modality_needs_no_label(dataset):
    root, datalist = dataset
    datalist["modalities"] = {"ct": 0, "mr": 1}
    datalist["training"][0]["modality"] = "ct"
    datalist["training"][1] = {"image": "images/b.nii.gz", "modality": "mr"}  # MR: no label
    datalist["validation"][0]["modality"] = "ct"
    assert find_problems(datalist, root, 3, 1, unlabelled_modalities=["mr"]) == []
    assert "training[1] 'label': expected a 'label' key" in only_problem(find_problems(datalist, root, 3, 1))
    datalist["validation"][0]["modality"] = "pet"
    assert only_problem(find_problems(datalist, root, 3, 1, unlabelled_modalities=["mr"])) == (
        "validation[0] 'modality': 'pet' is not in the datalist's 'modalities' ['ct', 'mr']")
    del datalist["validation"][0]["modality"]
    assert "validation[0] 'modality': expected a 'modality' key naming one of ['ct', 'mr']" in only_problem(
        find_problems(datalist, root, 3, 1, unlabelled_modalities=["mr"]))
    datalist["validation"][0]["modality"] = "ct"
    datalist["modalities"] = {"ct": 0, "mr": 2}
    assert "modalities" in only_problem(find_problems(datalist, root, 3, 1, unlabelled_modalities=["mr"]))
    del datalist["modalities"]
    problems = find_problems(datalist, root, 3, 1, unlabelled_modalities=["mr"])
    assert any("unlabelled modalities ['mr'] given, but the datalist has no 'modalities' mapping" in p for p in problems)


def test_images_in_two_voxel_orientations_are_refused_naming_both_groups(dataset):
    # an LPS case among RAS ones: same world, but its arrays are the others' turned by 180 degrees in-plane
    root, datalist = dataset
    lps = np.diag([-1.5, -1.5, 3.0, 1.0])
    lps[:3, 3] = [10.0, 5.0, 2.0]
    write_nifti(root / "images" / "c.nii.gz", image(), aff=lps)
    write_nifti(root / "labels" / "c.nii.gz", label(), aff=lps)
    problem = only_problem(find_problems(datalist, root, 3))
    assert problem.startswith("orientation: expected every image in one voxel orientation, found ")
    assert "RAS (2: training[0] images/a.nii.gz, training[1] images/b.nii.gz)" in problem
    assert "LPS (1: validation[0] images/c.nii.gz)" in problem
    assert "nib.as_closest_canonical" in problem
    # the same files checked split by split have one orientation each
    assert find_problems(datalist, root, 3, splits=("training",)) == []
    assert find_problems(datalist, root, 3, splits=("validation",)) == []


def test_mask_only_entries_are_checked_for_orientation_by_their_masks(dataset):
    root, datalist = dataset
    write_nifti(root / "labels" / "b.nii.gz", label(), aff=np.diag([1.5, -1.5, 3.0, 1.0]))
    masks = {"training": [{"label": "labels/a.nii.gz"}, {"label": "labels/b.nii.gz"}]}
    problem = only_problem(find_problems(masks, root, 3, splits=("training",), require_image=False))
    assert "RAS (1: training[0] labels/a.nii.gz); RPS (1: training[1] labels/b.nii.gz)" in problem


def test_data_orientation_reads_the_headers_and_png_has_none(dataset, tmp_path):
    from segdiff.data.checks import data_orientation, file_orientation

    root, datalist = dataset
    entries = [{"image": str(root / e["image"])} for e in datalist["training"] + datalist["validation"]]
    assert data_orientation(entries) == "RAS" == file_orientation(entries[0]["image"])
    write_nifti(root / "images" / "c.nii.gz", image(), aff=np.diag([-1.5, 1.5, 3.0, 1.0]))
    assert file_orientation(entries[2]["image"]) == "LAS" and data_orientation(entries) == "RAS"  # the most common
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "slice.png")
    assert file_orientation(tmp_path / "slice.png") is None and file_orientation(tmp_path / "gone.nii.gz") is None
    assert data_orientation([{"image": str(tmp_path / "slice.png")}]) is None and data_orientation([]) is None
    assert data_orientation([{"image": [entries[0]["image"], str(tmp_path / "slice.png")]}]) == "RAS"  # first channel
