"""nnU-Net v2 export: folder layout, dataset.json field by field, file contents and geometry, checks before writing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import (
    anisotropic_affine,
    raises_with,
    write_dataset,
    write_synthetic_set,
)

from segdiff.cli import main
from segdiff.data.checks import DataCheckError
from segdiff.data.nnunet import (
    EXPORT_RECORD,
    dataset_folder_name,
    export_nnunet,
    parse_names,
)

NAMES = {"0": "background", "1": "CSF", "2": "grey matter"}


@pytest.fixture
def real(tmp_path):
    """3 training + 1 validation + 1 test case, 3 classes, rotated anisotropic affines, named labels and channel."""
    path = write_dataset(tmp_path / "real", splits={"training": 3, "validation": 1, "test": 1})
    datalist = json.loads(path.read_text())
    datalist.update(labels=NAMES, channel_names={"0": "T1"})
    path.write_text(json.dumps(datalist))
    return path


def export(datalist, tmp_path, **kwargs):
    return export_nnunet(datalist, tmp_path / "raw", kwargs.pop("dataset_id", 42), kwargs.pop("name", "Brain"),
                         progress=False, **kwargs)


def test_layout_and_dataset_json_field_by_field(real, tmp_path):
    folder = export(real, tmp_path)
    assert folder == str(tmp_path / "raw" / "Dataset042_Brain")
    assert sorted(p.name for p in (tmp_path / "raw" / "Dataset042_Brain" / "imagesTr").iterdir()) == [
        f"case{i}_0000.nii.gz" for i in range(4)
    ]
    assert sorted(p.name for p in (tmp_path / "raw" / "Dataset042_Brain" / "labelsTr").iterdir()) == [
        f"case{i}.nii.gz" for i in range(4)
    ]
    meta = json.loads((tmp_path / "raw" / "Dataset042_Brain" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"}
    assert meta["labels"] == {"background": 0, "CSF": 1, "grey matter": 2}
    assert meta["numTraining"] == 4  # training + validation; test is not exported by default
    assert meta["file_ending"] == ".nii.gz"
    assert meta["name"] == "Brain"
    assert "description" in meta


def test_image_is_copied_byte_for_byte_and_label_is_integer_on_the_image_header(real, tmp_path):
    export(real, tmp_path)
    out = tmp_path / "raw" / "Dataset042_Brain"
    assert (out / "imagesTr" / "case1_0000.nii.gz").read_bytes() == (real.parent / "images" / "case1.nii.gz").read_bytes()
    label, source = nib.load(str(out / "labelsTr" / "case1.nii.gz")), nib.load(str(real.parent / "labels" / "case1.nii.gz"))
    image = nib.load(str(out / "imagesTr" / "case1_0000.nii.gz"))
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(source.dataobj))
    np.testing.assert_array_equal(label.affine, image.affine)
    np.testing.assert_array_equal(label.header.get_zooms(), image.header.get_zooms())


def test_label_gets_the_image_geometry_exactly_when_affines_differ_within_tolerance(real, tmp_path):
    label_path = real.parent / "labels" / "case0.nii.gz"
    label = nib.load(str(label_path))
    shifted = label.affine.copy()
    shifted[0, 3] += 5e-4  # passes the datalist check (1e-3), would fail nnU-Net's np.allclose on the origin
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), str(label_path))
    export(real, tmp_path)
    out = tmp_path / "raw" / "Dataset042_Brain"
    exported = nib.load(str(out / "labelsTr" / "case0.nii.gz"))
    np.testing.assert_array_equal(exported.affine, nib.load(str(out / "imagesTr" / "case0_0000.nii.gz")).affine)


def test_names_from_the_labels_option_win_and_class_0_is_called_background(real, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"bg": 0, "fluid": 1, "tissue": 2}))
    export(real, tmp_path, labels=str(names), channel_names=["MR"])
    meta = json.loads((tmp_path / "raw" / "Dataset042_Brain" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "fluid": 1, "tissue": 2}
    assert meta["channel_names"] == {"0": "MR"}


def test_without_names_classes_are_counted_from_the_labels(tmp_path):
    datalist = write_dataset(tmp_path / "plain", num_classes=3, splits={"training": 2})
    export(datalist, tmp_path)
    meta = json.loads((tmp_path / "raw" / "Dataset042_Brain" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "class_1": 1, "class_2": 2}
    assert meta["channel_names"] == {"0": "image"}


def test_four_d_image_is_split_into_one_file_per_channel(tmp_path):
    root = tmp_path / "four"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    data = rng.random((10, 12, 8, 2)).astype(np.float32)
    affine = anisotropic_affine()
    nib.save(nib.Nifti1Image(data, affine), str(root / "images" / "p0.nii.gz"))
    nib.save(nib.Nifti1Image((data[..., 0] * 3).astype(np.uint8), affine), str(root / "labels" / "p0.nii.gz"))
    (root / "datalist.json").write_text(json.dumps({"training": [{"image": "images/p0.nii.gz", "label": "labels/p0.nii.gz"}]}))
    export(root / "datalist.json", tmp_path)
    out = tmp_path / "raw" / "Dataset042_Brain"
    for k in range(2):
        channel = nib.load(str(out / "imagesTr" / f"p0_{k:04d}.nii.gz"))
        assert channel.shape == (10, 12, 8)
        np.testing.assert_allclose(channel.get_fdata(), data[..., k], atol=1e-6)
        np.testing.assert_allclose(channel.affine, affine, atol=1e-5)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "channel_0", "1": "channel_1"}


def test_per_channel_file_lists_are_copied_as_they_are(tmp_path):
    datalist = write_dataset(tmp_path / "mc", image_channels=2, splits={"training": 2})
    export(datalist, tmp_path)
    out = tmp_path / "raw" / "Dataset042_Brain" / "imagesTr"
    assert sorted(p.name for p in out.iterdir()) == ["case0_0000.nii.gz", "case0_0001.nii.gz", "case1_0000.nii.gz", "case1_0001.nii.gz"]
    assert (out / "case1_0001.nii.gz").read_bytes() == (tmp_path / "mc" / "images" / "case1_0001.nii.gz").read_bytes()


def test_real_and_synthetic_datalists_export_together_with_distinct_case_names(real, tmp_path):
    synthetic = write_synthetic_set(tmp_path / "syn", real, samples=2)
    export([real, synthetic], tmp_path)
    out = tmp_path / "raw" / "Dataset042_Brain"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (out / "labelsTr").iterdir())
    assert cases == sorted([f"case{i}" for i in range(4)] + [f"case{i}_syn{k}" for i in range(3) for k in range(2)])
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 10
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["cases"]["case2_syn1"] == {
        "datalist": str(synthetic), "split": "training", "index": 5,
        "image": "images/case2_syn1.nii.gz", "label": "labels/case2_syn1.nii.gz",
    }
    assert any("split 'validation' not found" in note for note in record["notes"])


def test_a_loaded_datalist_exports_like_its_file_and_needs_its_folder(real, tmp_path):
    loaded = json.loads(real.read_text())
    raises_with("dataset_dir is required when the datalist is not a file", export, loaded, tmp_path)
    folder = export(loaded, tmp_path, dataset_dir=real.parent)
    assert sorted(p.name for p in (tmp_path / "raw" / "Dataset042_Brain" / "labelsTr").iterdir()) == [
        f"case{i}.nii.gz" for i in range(4)
    ]
    record = json.loads((tmp_path / "raw" / "Dataset042_Brain" / EXPORT_RECORD).read_text())
    assert record["sources"] == [{"datalist": "datalist", "dataset_dir": str(real.parent)}]
    assert folder == str(tmp_path / "raw" / "Dataset042_Brain")


def test_colliding_case_names_are_an_error_and_prefixes_resolve_them(real, tmp_path):
    raises_with("both become nnU-Net case 'case0'", export, [real, real], tmp_path)
    assert not (tmp_path / "raw" / "Dataset042_Brain").exists()
    export([real, real], tmp_path, case_prefix=["a_", "b_"])
    names = sorted(p.name for p in (tmp_path / "raw" / "Dataset042_Brain" / "labelsTr").iterdir())
    assert names[0] == "a_case0.nii.gz" and names[-1] == "b_case3.nii.gz" and len(names) == 8


def test_check_problems_stop_the_export_before_anything_is_written(real, tmp_path):
    bad = real.parent / "labels" / "case2.nii.gz"
    label = nib.load(str(bad))
    nib.save(nib.Nifti1Image(np.full(label.shape, 5, np.uint8), label.affine), str(bad))
    error = raises_with("expected class indices in [0, 3)", export, real, tmp_path)
    assert isinstance(error, DataCheckError) and "labels/case2.nii.gz" in str(error)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_existing_dataset_is_kept_unless_overwrite_which_keeps_other_files(real, tmp_path):
    export(real, tmp_path)
    raises_with("already exists", export, real, tmp_path)
    extra = tmp_path / "raw" / "Dataset042_Brain" / "imagesTs"
    extra.mkdir()
    (tmp_path / "raw" / "Dataset042_Brain" / "labelsTr" / "stale.nii.gz").write_bytes(b"")
    export(real, tmp_path, overwrite=True)
    assert extra.is_dir()
    assert not (tmp_path / "raw" / "Dataset042_Brain" / "labelsTr" / "stale.nii.gz").exists()


def test_a_second_folder_with_the_same_dataset_id_is_refused(real, tmp_path):
    export(real, tmp_path)
    raises_with("already has Dataset042_Brain with dataset id 42", export, real, tmp_path, name="Other")


@pytest.mark.parametrize("dataset_id,name,message", [(0, "A", "[1, 999]"), (1000, "A", "[1, 999]"), (5, "my data", "name")])
def test_dataset_id_and_name_are_validated(dataset_id, name, message):
    raises_with(message, dataset_folder_name, dataset_id, name)


def test_folder_name_pads_the_id_to_three_digits():
    assert dataset_folder_name(7, "Brain") == "Dataset007_Brain"


def test_label_names_are_read_in_every_form_and_must_be_consecutive(tmp_path):
    expected = {0: "background", 1: "a"}
    assert parse_names({"0": "background", "1": "a"}, "labels") == expected
    assert parse_names({"background": 0, "a": 1}, "labels") == expected
    assert parse_names(["background", "a"], "labels") == expected
    assert parse_names('{"labels": {"background": 0, "a": 1}}', "labels") == expected
    raises_with("expected indices 0..1 each once, found [0, 2]", parse_names, {"0": "x", "2": "y"}, "labels")
    raises_with("region labels", parse_names, {"background": 0, "whole": [1, 2]}, "labels")


def test_cli_writes_the_dataset_and_reports_check_problems_with_exit_1(real, tmp_path, capsys):
    args = ["export-nnunet", "--datalist", str(real), "--output", str(tmp_path / "raw"), "--id", "3", "--name", "Demo"]
    assert main(args) == 0
    assert "wrote " + str(tmp_path / "raw" / "Dataset003_Demo") + ": 4 training case(s)" in capsys.readouterr().out
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    (real.parent / "images" / "case0.nii.gz").unlink()
    assert main(args[:-4] + ["--id", "4", "--name", "Broken"]) == 1
    err = capsys.readouterr().err
    assert "file not found: images/case0.nii.gz" in err and "problem(s) found" in err


def test_export_refusals_are_segdiff_errors_of_the_usual_builtin_kinds(real, tmp_path):
    from segdiff.data.nnunet import ExportError, ExportFolderError
    from segdiff.errors import OutputCollisionError, SegdiffError

    collision = raises_with("both become nnU-Net case 'case0'", export, [real, real], tmp_path)
    assert isinstance(collision, OutputCollisionError)
    export(real, tmp_path)
    existing = raises_with("already exists", export, real, tmp_path)
    assert isinstance(existing, ExportFolderError) and isinstance(existing, FileExistsError)
    bad_prefix = raises_with("give one each", export, [real], tmp_path, name="Other", dataset_id=43,
                             case_prefix=["a_", "b_"])
    assert isinstance(bad_prefix, ExportError) and isinstance(bad_prefix, ValueError)
    assert all(isinstance(e, SegdiffError) for e in (collision, existing, bad_prefix))
