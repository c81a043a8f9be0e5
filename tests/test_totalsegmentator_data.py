"""TotalSegmentator's example CT and MR as a data set: one shared label space, slabs in place, refusals that name the
missing file or class. Built on a tiny fake sdist made here; never the network."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import nibabel as nib
import numpy as np
import pytest

from segdiff.cli import main
from segdiff.data.checks import check_datalist
from segdiff.data.datalist import InputNotFoundError
from segdiff.data.totalsegmentator import (
    SdistDownloadError,
    SdistError,
    default_cache_dir,
    find_sdist,
    map_labels,
    read_class_map,
    sdist_filename,
    write_reference_data,
)

TOP = "totalsegmentator-2.18.0"
REF = "tests/reference_files"
# the ids of the real 2.18.0 map_to_binary.py for the classes used here (aorta differs between the tasks)
TOTAL = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
         10: "lung_upper_lobe_left", 52: "aorta"}
TOTAL_MR = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
            7: "pancreas", 10: "lung_left", 23: "aorta"}
SHARED = {"liver": 1, "spleen": 2, "kidney": 3, "stomach": 4, "pancreas": 5, "gallbladder": 6, "aorta": 7}
CT_AFFINE = np.array([[3.0, 0, 0, -178.0], [0, 3.0, 0, 11.3], [0, 0, 2.5, 94.3], [0, 0, 0, 1]])
# LPS and rotated in-plane, so that an origin shift done on the wrong axis or sign cannot pass
_c, _s = np.cos(0.3), np.sin(0.3)
MR_AFFINE = np.array([[-3.0 * _c, 3.0 * _s, 0, 168.6], [-3.0 * _s, -3.0 * _c, 0, 166.4], [0, 0, 4.0, 29.0],
                      [0, 0, 0, 1]])
DEPTH = 12


def _map_to_binary(total=TOTAL, total_mr=TOTAL_MR):
    # as in the real file: the dict first, then statements that are not literals (never evaluated by the reader)
    return (
        f"class_map = {{\n    'total_v1': {{1: 'spleen'}},\n    'total': {total!r},\n"
        f"    'total_mr': {total_mr!r},\n}}\n"
        "class_map['total_v3'] = class_map['total'].copy()\n"
        "commercial_models = {'heartchambers_highres': 301}\n"
    )


def _segmentation(ids):
    """An 8 x 7 x DEPTH volume with a few voxels of each class id in every slice."""
    seg = np.zeros((8, 7, DEPTH), dtype=np.uint8)
    for n, cid in enumerate(ids):
        seg[n % 8, n // 8 :: 3, :] = cid
    return seg


CT_SEG = _segmentation([5, 1, 2, 3, 6, 7, 4, 52, 10])
MR_SEG = _segmentation([5, 1, 2, 3, 6, 7, 4, 23, 10])


def _nifti_bytes(data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=2)
    return img.to_bytes()


def _image(seed, dtype=np.int16):
    return np.random.default_rng(seed).integers(-1000, 1000, size=(8, 7, DEPTH)).astype(dtype)


CT_IMAGE = _image(0)
MR_IMAGE = _image(1)


def make_sdist(folder, omit=(), map_text=None, ct_seg=CT_SEG, mr_seg=MR_SEG):
    """Write a fake ``totalsegmentator-2.18.0.tar.gz`` into ``folder`` (members gzip'd as in the real one)."""
    import gzip

    members = {
        "totalsegmentator/map_to_binary.py": (map_text or _map_to_binary()).encode(),
        "LICENSE": b"Apache License\nVersion 2.0, January 2004\n",
        f"{REF}/example_ct_sm.nii.gz": gzip.compress(_nifti_bytes(CT_IMAGE, CT_AFFINE)),
        f"{REF}/example_seg.nii.gz": gzip.compress(_nifti_bytes(ct_seg, CT_AFFINE)),
        f"{REF}/example_mr_sm.nii.gz": gzip.compress(_nifti_bytes(MR_IMAGE, MR_AFFINE)),
        f"{REF}/example_seg_mr.nii.gz": gzip.compress(_nifti_bytes(mr_seg, MR_AFFINE)),
    }
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, sdist_filename())
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if name in omit:
                continue
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist(tmp_path):
    return make_sdist(str(tmp_path / "cache"))


def _load(root, rel):
    img = nib.load(os.path.join(root, rel))
    return img, np.asarray(img.dataobj)


def _written(root):
    with open(os.path.join(root, "datalist.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- class names
def test_class_map_is_read_from_the_text_without_running_it():
    classes = read_class_map(_map_to_binary() + "import totalsegmentator_not_installed\n")
    assert classes["total"][52] == "aorta" and classes["total_mr"][23] == "aorta"
    assert set(classes) == {"total", "total_mr"}


def test_map_labels_merges_kidneys_and_drops_other_classes():
    ids = {"liver": [5], "spleen": [1], "kidney": [2, 3], "aorta": [52]}
    out = map_labels(np.array([0, 5, 1, 2, 3, 52, 10, 200]), ids)
    assert out.tolist() == [0, 1, 2, 3, 3, 4, 0, 0] and out.dtype == np.uint8


@pytest.mark.parametrize("modality, seg, task_ids", [("ct", CT_SEG, TOTAL), ("mr", MR_SEG, TOTAL_MR)])
def test_both_tasks_land_in_one_label_space(tmp_path, sdist, modality, seg, task_ids):
    root = str(tmp_path / modality)
    write_reference_data(root, modality=modality, sdist=sdist)
    datalist = _written(root)
    by_name = {name: cid for cid, name in task_ids.items()}
    expected = np.zeros_like(seg)
    for name, k in SHARED.items():
        members = ["kidney_left", "kidney_right"] if name == "kidney" else [name]
        for member in members:
            expected[seg == by_name[member]] = k
    if modality == "mr":  # the LPS source written in RAS voxel order
        expected = expected[::-1, ::-1]
    for case, slab in datalist["slabs"].items():
        _, label = _load(root, f"labels/{case}.nii.gz")
        first = slab["first_slice"]
        np.testing.assert_array_equal(label, expected[:, :, first : first + slab["num_slices"]])
        assert label.dtype == np.uint8
    assert datalist["labels"] == {"0": "background", **{str(k): n for n, k in SHARED.items()}}
    assert datalist["source"]["class_ids"]["aorta"] == [52 if modality == "ct" else 23]
    assert datalist["source"]["class_ids"]["kidney"] == [2, 3]


# ---------------------------------------------------------------------------------------------- slab grids
@pytest.mark.parametrize("modality, affine, image", [("ct", CT_AFFINE, CT_IMAGE), ("mr", MR_AFFINE, MR_IMAGE)])
def test_every_slab_voxel_keeps_its_world_position_and_value(tmp_path, sdist, modality, affine, image):
    # every written voxel sits at the world position of the source voxel with the same value; the files are in RAS
    # voxel order whatever the source's (the MR here is LPS: x and y flipped, no resampling)
    root = str(tmp_path / modality)
    write_reference_data(root, modality=modality, sdist=sdist)
    written = _written(root)
    assert written["orientation"] == "RAS"
    flips = [a != b for a, b in zip(nib.aff2axcodes(affine), "RAS")]
    assert flips == ([False, False, False] if modality == "ct" else [True, True, False])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (8, 7)], indexing="ij"), -1).reshape(-1, 2)
    for case, slab in written["slabs"].items():
        img, data = _load(root, f"images/{case}.nii.gz")
        first, n = slab["first_slice"], slab["num_slices"]
        assert data.shape == (8, 7, n) and data.dtype == np.int16
        assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
        for k in range(n):
            voxels = np.column_stack([grid, np.full(len(grid), k), np.ones(len(grid))])
            source = voxels.copy()
            source[:, 2] += first
            for axis, size in ((0, 8), (1, 7)):
                if flips[axis]:
                    source[:, axis] = size - 1 - source[:, axis]
            np.testing.assert_allclose(voxels @ img.affine.T, source @ affine.T, atol=1e-4)
            src = source[:, :3].astype(int)
            np.testing.assert_array_equal(data[grid[:, 0], grid[:, 1], k], image[src[:, 0], src[:, 1], src[:, 2]])
        lbl, _ = _load(root, f"labels/{case}.nii.gz")
        np.testing.assert_allclose(lbl.affine, img.affine)


def test_ct_and_mr_slices_share_one_voxel_order(tmp_path, sdist):
    # the bundles work on voxel arrays: a CT and an MR slab must not be mirrored against each other
    for modality in ("ct", "mr"):
        write_reference_data(tmp_path / modality, modality=modality, sdist=sdist)
    affines = [_load(str(tmp_path / m), f"images/{m}_slab_00.nii.gz")[0].affine for m in ("ct", "mr")]
    for a in affines:
        assert np.all(np.diag(a)[:3] > 0), a  # voxel axes point to R, A and S in both
    check_datalist({"training": [{"image": f"{m}/images/{m}_slab_00.nii.gz", "label": f"{m}/labels/{m}_slab_00.nii.gz"}
                                 for m in ("ct", "mr")]}, str(tmp_path), 8, splits=("training",))


def test_slabs_tile_the_volume_without_gaps(tmp_path, sdist):
    write_reference_data(tmp_path / "ct", sdist=sdist)
    slabs = sorted(_written(tmp_path / "ct")["slabs"].values(), key=lambda s: s["first_slice"])
    assert len(slabs) == 6 and slabs[0]["first_slice"] == 0
    assert sum(s["num_slices"] for s in slabs) == DEPTH
    for a, b in zip(slabs[:-1], slabs[1:]):
        assert a["first_slice"] + a["num_slices"] == b["first_slice"]


# ------------------------------------------------------------------------------------------------ datalist
def test_datalist_splits_by_slab_with_modality_and_passes_the_check(tmp_path, sdist):
    root = tmp_path / "mr"
    write_reference_data(root, modality="mr", sdist=sdist)
    datalist = _written(root)
    names = {s: [e["image"] for e in datalist[s]] for s in ("training", "validation", "test")}
    assert names == {
        "training": ["images/mr_slab_00.nii.gz", "images/mr_slab_02.nii.gz", "images/mr_slab_05.nii.gz"],
        "validation": ["images/mr_slab_03.nii.gz"],
        "test": ["images/mr_slab_01.nii.gz", "images/mr_slab_04.nii.gz"],
    }
    for split in ("training", "validation", "test"):
        for entry in datalist[split]:
            assert entry == {"image": entry["image"], "label": entry["image"].replace("images/", "labels/"),
                             "modality": "mr"}
    assert datalist["channel_names"] == {"0": "MR"} and datalist["source"]["task"] == "total_mr"
    assert datalist["source"]["orientation"] == "LPS" and datalist["orientation"] == "RAS"
    slab = datalist["slabs"]["mr_slab_05"]
    _, label = _load(root, "labels/mr_slab_05.nii.gz")
    assert slab["voxels"]["aorta"] == int((label == 7).sum()) and sum(slab["voxels"].values()) == label.size
    assert (root / "LICENSE.txt").read_text().startswith("Apache License")
    check_datalist(str(root / "datalist.json"), str(root), 8, splits=("training", "validation", "test"))


def test_cli_writes_the_set_from_a_given_sdist(tmp_path, sdist, capsys):
    assert main(["totalseg-data", str(tmp_path / "ct"), "--sdist", sdist, "--num-slabs", "4"]) == 0
    assert "datalist" in capsys.readouterr().out
    assert len(_written(tmp_path / "ct")["slabs"]) == 4


def test_non_empty_folder_is_refused_unless_overwrite(tmp_path, sdist):
    write_reference_data(tmp_path / "ct", sdist=sdist)
    with pytest.raises(FileExistsError, match="not empty"):
        write_reference_data(tmp_path / "ct", sdist=sdist)
    write_reference_data(tmp_path / "ct", sdist=sdist, num_slabs=4, overwrite=True)
    assert sorted(os.listdir(tmp_path / "ct" / "images")) == [f"ct_slab_0{i}.nii.gz" for i in range(4)]


# ------------------------------------------------------------------------------------------------ refusals
def test_missing_file_in_the_archive_is_named(tmp_path):
    path = make_sdist(str(tmp_path), omit=(f"{REF}/example_seg_mr.nii.gz",))
    with pytest.raises(SdistError, match=f"has no {TOP}/{REF}/example_seg_mr.nii.gz"):
        write_reference_data(tmp_path / "mr", modality="mr", sdist=path)
    write_reference_data(tmp_path / "ct", modality="ct", sdist=path)  # the CT files are all there


def test_class_missing_from_the_task_is_named(tmp_path):
    no_aorta = {k: v for k, v in TOTAL_MR.items() if v != "aorta"}
    path = make_sdist(str(tmp_path), map_text=_map_to_binary(total_mr=no_aorta))
    with pytest.raises(SdistError, match=r"'aorta'.*class_map\['total_mr'\]"):
        write_reference_data(tmp_path / "mr", modality="mr", sdist=path)


def test_class_without_voxels_in_the_segmentation_is_named(tmp_path):
    path = make_sdist(str(tmp_path), ct_seg=np.where(CT_SEG == 4, 0, CT_SEG).astype(np.uint8))
    with pytest.raises(SdistError, match=r"example_seg\.nii\.gz: shared class 'gallbladder' .*\[4\]\) has no voxel"):
        write_reference_data(tmp_path / "ct", sdist=path)


def test_map_without_class_map_dict_is_refused(tmp_path):
    path = make_sdist(str(tmp_path), map_text="classes = {}\n")
    with pytest.raises(SdistError, match="top-level `class_map"):
        write_reference_data(tmp_path / "ct", sdist=path)


def test_given_sdist_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(InputNotFoundError, match="sdist not found"):
        find_sdist(tmp_path / "nowhere.tar.gz")


def test_cached_sdist_is_used_without_downloading(tmp_path, monkeypatch):
    path = make_sdist(str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded although cached"))
    assert find_sdist(cache_dir=tmp_path) == path


def test_missing_cache_without_download_names_the_pip_command(tmp_path):
    command = r"pip download --no-deps --no-binary :all: totalsegmentator==2\.18\.0"
    with pytest.raises(InputNotFoundError, match=command):
        find_sdist(cache_dir=tmp_path, download=False)


def test_failed_download_names_the_command_and_pip_s_error(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(SdistDownloadError, match=r"python -m pip download .*exited with 1 .*no network"):
        find_sdist(cache_dir=tmp_path / "cache")
    assert calls[0][1:4] == ["-m", "pip", "download"] and calls[0][-1] == str(tmp_path / "cache")


def test_cli_reports_a_failed_download_on_one_line(tmp_path, monkeypatch, capsys):
    def no_pip(command, **kwargs):
        raise FileNotFoundError("No such file or directory: 'python'")

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "segdiff")
    assert main(["totalseg-data", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not run `python -m pip download" in err and "--sdist FILE" in err


# ------------------------------------------------------------------------------------------- the real sdist
_REAL = os.path.join(default_cache_dir(), sdist_filename())


@pytest.mark.skipif(not os.path.isfile(_REAL), reason=f"the real sdist is not cached at {_REAL}")
def test_real_sdist_gives_all_seven_organs_in_ct_and_mr(tmp_path):
    for modality, shape, axes in (("ct", (122, 101, 30), "RAS"), ("mr", (117, 91, 20), "LPS")):
        root = tmp_path / modality
        write_reference_data(root, modality=modality, sdist=_REAL)
        datalist = _written(root)
        assert datalist["source"]["shape"] == list(shape) and datalist["source"]["orientation"] == axes
        assert datalist["orientation"] == "RAS"
        totals = {name: sum(s["voxels"][name] for s in datalist["slabs"].values()) for name in SHARED}
        assert all(v > 0 for v in totals.values()), totals
        train = {name: sum(s["voxels"][name] for s in datalist["slabs"].values() if s["split"] == "training")
                 for name in SHARED}
        assert all(v > 0 for v in train.values()), train  # every class can be learnt from the training slabs
        check_datalist(str(root / "datalist.json"), str(root), 8, image_channels=1,
                       splits=("training", "validation", "test"))
