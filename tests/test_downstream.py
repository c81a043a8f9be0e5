"""Downstream evaluation: the real subset, the synthetic pairs, IoU, reproducible training, and the whole flow (three
arms trained from one initialisation, scored on the real test split) as a bundle overlay on tiny networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bundle_utils import raises_with, run_bundle, write_dataset, write_synthetic_set
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandGaussianNoised,
    Resized,
)
from PIL import Image

from segdiff.data.datalist import resolve_datalist
from segdiff.evaluation.downstream import (
    arm_colours,
    arm_data,
    arm_title,
    per_class_iou,
    real_subset,
    source_case,
    source_sets,
    synthetic_entries,
    train_segmenter,
)
from segdiff.evaluation.segmenter import per_class_dice
from segdiff.transforms import RandSliced

DOWNSTREAM = "../../../configs/downstream.yaml"  # run_bundle prefixes configs/ of the bundle folder


def cases(n):
    return [{"image": f"/d/images/c{i}.nii.gz", "label": f"/d/labels/c{i}.nii.gz"} for i in range(n)]


def test_real_subset_takes_a_seeded_fraction_of_the_cases_in_datalist_order():
    entries = cases(10)
    subset = real_subset(entries, real_fraction=0.3, seed=1)
    assert len(subset) == 3 and subset == real_subset(entries, real_fraction=0.3, seed=1)
    assert [entries.index(e) for e in subset] == sorted(entries.index(e) for e in subset)
    assert len(real_subset(entries, real_fraction=0.01)) == 1  # at least one case
    assert len(real_subset(entries, real_fraction=0.5, num_cases=4)) == 4  # a count overrides the fraction
    assert {e["label"] for e in real_subset(entries, 0.3, seed=1)} != {e["label"] for e in real_subset(entries, 0.3, seed=2)}


def test_real_subset_rejects_an_empty_split_and_bad_sizes():
    raises_with("real training split is empty", real_subset, [], 0.1)
    raises_with("real_fraction must be in (0, 1]", real_subset, cases(4), 0.0)
    raises_with("real_cases must be in [1, 4]", real_subset, cases(4), 0.1, 5)


def test_synthetic_pairs_can_be_limited_to_those_made_from_the_subsets_masks(tmp_path):
    real = write_dataset(tmp_path / "real", splits={"training": 3, "test": 1})
    synthetic = write_synthetic_set(tmp_path / "syn", real, samples=2)
    subset = resolve_datalist(real, None, "training")[1:2]  # case1
    kept = synthetic_entries(str(synthetic), only_from=subset)
    assert [e["image"].split("/")[-1] for e in kept] == ["case1_syn0.nii.gz", "case1_syn1.nii.gz"]
    assert len(synthetic_entries(str(synthetic))) == 6
    assert source_case({"image": "x/a.nii.gz", "label": "y/a.nii.gz", "mask": "/m/slab_02.nii.gz"}, "mask") == "slab_02"
    assert source_case({"image": "x/a_syn0.nii.gz", "label": "y/a_syn0.nii.gz", "case": "slab_07"}) == "slab_07"
    assert source_case({"image": "x/slab_03_syn1.nii.gz", "label": "y/slab_03_syn1.nii.gz"}) == "slab_03"
    other = [{"image": str(tmp_path / "images" / "zz.nii.gz"), "label": str(tmp_path / "labels" / "zz.nii.gz")}]
    raises_with("none of the 6 synthetic pairs was generated from the real subset", synthetic_entries, str(synthetic), only_from=other)
    raises_with("synthetic_datalist is not set", synthetic_entries, None)


def test_arms_are_real_synthetic_and_both():
    real, synthetic = cases(2), [{"image": "s.nii.gz", "label": "s.nii.gz"}]
    data = arm_data(["real", "synthetic", "mixed"], real, synthetic)
    assert data["real"] == real and data["synthetic"] == synthetic and data["mixed"] == real + synthetic
    raises_with("unknown arm 'fake'", arm_data, ["fake"], real, synthetic)
    raises_with("needs synthetic pairs", arm_data, ["mixed"], real, None)


def test_further_synthetic_sources_add_their_own_arms_named_after_them(tmp_path):
    real, synthetic = cases(2), [{"image": "s.nii.gz", "label": "s.nii.gz"}]
    joint = [{"image": "j.nii.gz", "label": "j.nii.gz", "mean_dice": 0.9}]
    data = arm_data(["real", "synthetic_joint", "mixed_joint", "mixed"], real, synthetic, {"joint": joint})
    assert list(data) == ["real", "synthetic_joint", "mixed_joint", "mixed"]
    assert data["synthetic_joint"] == [{"image": "j.nii.gz", "label": "j.nii.gz"}]
    assert data["mixed_joint"] == real + data["synthetic_joint"] and data["mixed"] == real + synthetic
    raises_with("unknown arm 'mixed_masks': expected some of ['real', 'synthetic', 'mixed', 'synthetic_joint', "
                "'mixed_joint']", arm_data, ["mixed_masks"], real, None, {"joint": joint})
    assert arm_title("mixed_generated_masks") == "real + generated masks" and arm_title("synthetic_joint") == "joint only"
    colours = arm_colours(["real", "mixed", "mixed_joint", "synthetic_joint"])
    assert len(set(colours.values())) == 4 and colours["real"] == (55, 110, 190)
    datalist = tmp_path / "joint" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"training": [{"image": "images/a.nii.gz", "label": "labels/a.nii.gz"}]}))
    sets = source_sets({"joint": str(datalist)})
    assert sets["joint"][0]["image"] == str(tmp_path / "joint" / "images" / "a.nii.gz")  # relative to its folder
    raises_with("synthetic_sources: 'mixed' is not a usable source name", source_sets, {"mixed": str(datalist)})


def test_iou_per_class_on_known_label_maps_is_the_twin_of_dice():
    truth = np.zeros((6, 6), int)
    truth[:3, :] = 1  # 18 voxels of class 1
    truth[3:, :2] = 2  # 6 voxels of class 2
    prediction = np.zeros((6, 6), int)
    prediction[:2, :] = 1  # 12 voxels, all inside the truth's class 1
    prediction[3:, :4] = 2  # 12 voxels, 6 of them class 2 in the truth
    iou = per_class_iou(prediction, truth, 3)
    np.testing.assert_allclose(iou, [12 / 18, 6 / 12])
    dice = per_class_dice(prediction, truth, 3)
    np.testing.assert_allclose(dice, 2 * iou / (1 + iou))
    assert np.isnan(per_class_iou(prediction, np.zeros((6, 6), int), 3)).all()  # absent from the truth: NaN


def training_transform():
    return Compose([
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        RandSliced(keys=["image", "label"], num_samples=2),
        Resized(keys=["image", "label"], spatial_size=(16, 16), mode=["bilinear", "nearest"]),
        RandGaussianNoised(keys="image", prob=1.0, std=5.0),
    ])


def test_one_seed_gives_the_same_trained_weights_so_arms_differ_only_by_their_data(tmp_path):
    entries = resolve_datalist(write_dataset(tmp_path / "d", splits={"training": 3}), None, "training")
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        network = UNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
        loss = lambda p, y: torch.nn.functional.cross_entropy(p, y[:, 0].long())  # noqa: E731
        optimizer = lambda params: torch.optim.Adam(params, lr=1e-2)  # noqa: E731
        train_segmenter(network, entries, training_transform(), 5, 2, optimizer, loss, "cpu", seed=3, progress=False)
        results.append(network.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    real = write_dataset(root / "real", splits={"training": 4, "validation": 1, "test": 2})
    synthetic = write_synthetic_set(root / "syn", real, samples=2)
    return root, real, synthetic


def settings(root, real, **extra):
    return dict(
        dataset_dir=str(real.parent), bundle_root=str(root / "bundle"), num_classes=3, image_size=[16, 16],
        **{"segmenter_def#channels": [4, 8, 16]}, segmenter_batch_size=4, slices_per_volume=2, num_workers=0,
        downstream_iterations=3, **extra,
    )


@pytest.mark.slow
def test_three_arms_are_trained_equally_and_scored_per_class_on_the_real_test_split(data):
    root, real, synthetic = data
    out = root / "report"
    run_bundle("mask_to_image", ["evaluate.yaml", DOWNSTREAM],
               **settings(root, real, synthetic_datalist=str(synthetic), real_fraction=0.5, synthetic_from_subset=True,
                          downstream_dir=str(out)))
    report = json.loads((out / "downstream.json").read_text())
    assert list(report["arms"]) == ["real", "synthetic", "mixed"]
    assert report["classes"] == ["class_1", "class_2"]
    assert report["settings"]["num_iterations"] == 3 and len(report["settings"]["real_subset"]) == 2
    counts = {arm: (v["real_cases"], v["synthetic_pairs"]) for arm, v in report["arms"].items()}
    assert counts == {"real": (2, 0), "synthetic": (0, 4), "mixed": (2, 4)}  # only pairs made from the subset's masks
    for arm in report["arms"].values():
        for metric in ("dice", "iou"):
            assert set(arm[metric]) == {"class_1", "class_2"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in arm[metric].values())
    assert len(report["cases"]) == 2 and set(report["cases"][0]) >= {"real", "synthetic", "mixed"}
    quality = report["image_quality"]
    assert quality["num_masks_with_several_samples"] == 2 and 0.0 < quality["ms_ssim_diversity"] <= 1.0
    assert quality["fid"] >= 0.0 and quality["num_real_images"] == 2 * 12  # 2 volumes x 12 slices along axis 2
    table = (out / "downstream.md").read_text()
    assert "| real only | 2 | 0 |" in table and "| synthetic only | 0 | 4 |" in table and "| real + synthetic | 2 | 4 |" in table
    assert Image.open(out / "downstream.png").format == "PNG"
    assert sorted(p.name for p in out.glob("segmenter_*.pt")) == ["segmenter_mixed.pt", "segmenter_real.pt", "segmenter_synthetic.pt"]


@pytest.mark.slow
def test_a_further_source_is_trained_and_reported_in_its_own_arm(data):
    root, real, synthetic = data
    out = root / "report_sources"
    run_bundle("mask_to_image", ["evaluate.yaml", DOWNSTREAM],
               **settings(root, real, synthetic_sources={"joint": str(synthetic)}, real_fraction=0.5,
                          downstream_arms=["real", "mixed_joint"], image_quality=False, downstream_dir=str(out)))
    report = json.loads((out / "downstream.json").read_text())
    counts = {arm: (v["real_cases"], v["synthetic_pairs"]) for arm, v in report["arms"].items()}
    assert counts == {"real": (2, 0), "mixed_joint": (2, 8)}  # all 8 pairs: a further source is not filtered by the subset
    assert report["settings"]["synthetic_sources"] == {"joint": str(synthetic)}
    assert "| real + joint | 2 | 8 |" in (out / "downstream.md").read_text()
    assert sorted(p.name for p in out.glob("segmenter_*.pt")) == ["segmenter_mixed_joint.pt", "segmenter_real.pt"]


@pytest.mark.slow
def test_missing_synthetic_datalist_and_missing_files_stop_with_a_clear_message(data, tmp_path):
    root, real, synthetic = data
    raises_with("synthetic_datalist is not set", run_bundle, "mask_to_image", ["evaluate.yaml", DOWNSTREAM],
                **settings(root, real, downstream_dir=str(tmp_path / "a")))
    broken = json.loads(synthetic.read_text())
    broken["training"][0]["image"] = "images/gone.nii.gz"
    (synthetic.parent / "broken.json").write_text(json.dumps(broken))
    raises_with("file not found: images/gone.nii.gz", run_bundle, "mask_to_image", ["evaluate.yaml", DOWNSTREAM],
                **settings(root, real, synthetic_datalist=str(synthetic.parent / "broken.json"), downstream_dir=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()
