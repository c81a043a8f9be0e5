"""Demo data: real MNI152 tissue classes, slabs in the right world position, splits by slab."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from segdiff.data.checks import check_datalist
from segdiff.data.demo import MIN_SLAB_SLICES, _slab_bounds, demo_slab_splits, tissue_labels, write_demo_data

nilearn_datasets = pytest.importorskip("nilearn.datasets")

SPLITS = ("training", "validation", "test")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo data set (10 slabs), written once for the module (about 4 s)."""
    root = tmp_path_factory.mktemp("demo")
    path = write_demo_data(root / "out")
    with open(path) as f:
        return root / "out", json.load(f)


@pytest.fixture(scope="module")
def template():
    return nib.as_closest_canonical(nilearn_datasets.load_mni152_template(resolution=1))


def load(root, rel):
    img = nib.load(str(root / rel))
    return img, np.asarray(img.dataobj)


def test_datalist_has_relative_paths_names_and_licence(demo):
    root, datalist = demo
    assert datalist["labels"] == {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
    assert datalist["channel_names"] == {"0": "T1"}
    assert "MNI ICBM152 2009" in datalist["description"]
    assert "Collins" in datalist["licence"] and "Fonov" in datalist["reference"]
    assert (root / "NOTICE.txt").read_text().count("Copyright") == 1
    for split in SPLITS:
        for entry in datalist[split]:
            assert not entry["image"].startswith("/") and entry["image"].startswith("images/slab_")
            assert entry["label"] == entry["image"].replace("images/", "labels/")


def test_default_split_is_seven_one_two_slabs_as_documented(demo):
    _, datalist = demo
    names = {s: [e["image"][len("images/") : -len(".nii.gz")] for e in datalist[s]] for s in SPLITS}
    assert names == {
        "training": ["slab_00", "slab_01", "slab_03", "slab_04", "slab_06", "slab_08", "slab_09"],
        "validation": ["slab_05"],
        "test": ["slab_02", "slab_07"],
    }
    assert {k: v["split"] for k, v in datalist["slabs"].items()}["slab_05"] == "validation"


def test_slabs_are_16_slices_contiguous_and_do_not_overlap(demo):
    _, datalist = demo
    slabs = sorted(datalist["slabs"].values(), key=lambda s: s["first_slice"])
    assert len(slabs) == 10
    assert all(s["num_slices"] == MIN_SLAB_SLICES for s in slabs)
    for a, b in zip(slabs[:-1], slabs[1:]):
        assert a["first_slice"] + a["num_slices"] == b["first_slice"]


def test_slab_sits_where_it_was_in_the_template_in_world_coordinates(demo, template):
    root, datalist = demo
    t1 = template.get_fdata(dtype=np.float32)
    for name, slab in datalist["slabs"].items():
        img, data = load(root, f"images/{name}.nii.gz")
        lbl, _ = load(root, f"labels/{name}.nii.gz")
        first = slab["first_slice"]
        expected = template.affine @ np.array([0, 0, first, 1.0])
        np.testing.assert_allclose(img.affine @ np.array([0, 0, 0, 1.0]), expected, atol=1e-4)
        np.testing.assert_allclose(img.affine[:3, :3], template.affine[:3, :3], atol=1e-6)
        np.testing.assert_allclose(lbl.affine, img.affine, atol=1e-6)
        np.testing.assert_array_equal(data, t1[:, :, first : first + slab["num_slices"]])
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")  # last axis = inferior -> superior


def test_one_slab_has_the_documented_shape_and_dtypes(demo):
    root, _ = demo
    img, data = load(root, "images/slab_05.nii.gz")
    lbl, labels = load(root, "labels/slab_05.nii.gz")
    assert data.shape == labels.shape == (197, 233, 16)
    assert img.get_data_dtype() == np.float32 and lbl.get_data_dtype() == np.uint8


def test_every_split_holds_all_four_tissue_classes(demo):
    root, datalist = demo
    for split in SPLITS:
        present = set()
        for entry in datalist[split]:
            present |= set(np.unique(load(root, entry["label"])[1]).tolist())
        assert present == {0, 1, 2, 3}, split


def test_mean_t1_rises_csf_grey_white(demo):
    root, datalist = demo
    sums, counts = np.zeros(4), np.zeros(4)
    for entry in datalist["training"]:
        t1 = load(root, entry["image"])[1]
        labels = load(root, entry["label"])[1]
        for c in range(4):
            sums[c] += t1[labels == c].sum()
            counts[c] += (labels == c).sum()
    means = sums / counts
    assert means[0] == 0.0  # background is outside the skull-stripped brain
    assert means[1] < means[2] < means[3]


def test_demo_data_passes_the_checks(demo):
    root, datalist = demo
    assert check_datalist(str(root / "datalist.json"), None, 4, 1, splits=SPLITS) == 10


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_data(tmp_path)


def test_overwrite_replaces_old_slabs_and_keeps_other_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "slab_99.nii.gz").write_bytes(b"stale")
    (tmp_path / "mine.txt").write_text("keep")
    path = write_demo_data(tmp_path, num_slabs=4, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"slab_{i:02d}.nii.gz" for i in range(4)]
    assert (tmp_path / "mine.txt").read_text() == "keep"
    with open(path) as f:
        datalist = json.load(f)
    assert [len(datalist[s]) for s in SPLITS] == [1, 1, 2]
    assert all(s["num_slices"] >= 38 for s in datalist["slabs"].values())  # 155 brain slices / 4


def test_missing_nilearn_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(ImportError, match=r'pip install "monai-segdiff\[demo\]"'):
        write_demo_data(tmp_path)


# --------------------------------------------------------------------------------------- pure functions
def test_tissue_labels_is_the_argmax_over_background_csf_grey_white():
    t1 = np.array([0.0, 0.5, 0.5, 0.5, 0.5])
    gm = np.array([0.9, 0.1, 0.6, 0.3, 0.0])
    wm = np.array([0.0, 0.1, 0.3, 0.6, 0.0])
    np.testing.assert_array_equal(tissue_labels(t1, gm, wm), [0, 1, 2, 3, 1])


@pytest.mark.parametrize("num_slabs", range(4, 21))
def test_slab_splits_partition_with_non_adjacent_test_slabs(num_slabs):
    splits = demo_slab_splits(num_slabs)
    assert sorted(sum(splits.values(), [])) == list(range(num_slabs))
    assert len(splits["validation"]) == 1 and len(splits["training"]) >= 1
    first, second = splits["test"]
    assert second - first >= 2


def test_fewer_than_four_slabs_is_an_error():
    with pytest.raises(ValueError, match="num_slabs must be >= 4"):
        demo_slab_splits(3)


def test_short_brain_range_is_widened_to_16_slices_per_slab_inside_the_volume():
    assert _slab_bounds(0, 155, 189, 10) == [(16 * i, 16 * (i + 1)) for i in range(10)]
    bounds = _slab_bounds(100, 120, 189, 4)  # widened on both sides: 22 slices below, 22 above
    assert bounds[0][0] == 78 and bounds[-1][1] == 142
    assert _slab_bounds(180, 189, 189, 2)[-1][1] == 189  # shifted back inside the volume


def test_too_thin_volume_warns_and_uses_every_slice():
    with pytest.warns(UserWarning, match="thinner than 16 slices"):
        bounds = _slab_bounds(5, 30, 40, 4)
    assert bounds == [(0, 10), (10, 20), (20, 30), (30, 40)]
