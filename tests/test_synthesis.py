"""Synthetic labelled pairs (segdiff.synthesis, bundles/mask_to_image/configs/synthesize.yaml): the filter's decisions
on scripted scores, mask deformation, the per-mask loop with a toy generator and a toy judge (records, determinism,
resume without overwriting, refusal of other settings), and the bundle flow end to end on tiny networks."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, TINY_NETWORK, raises_with, run_bundle, write_dataset
from synthesis_toys import ToyGenerator, toy_judge, toy_synthesizer
from monai.data import MetaTensor

from segdiff.synthesis import (
    FilterCriteria,
    RandMaskDeform,
    RandMaskDeformd,
    SegmenterJudge,
    build_judge,
    candidates_to_keep,
    derive_seed,
    pair_scores,
    select_tries,
)

NAN = math.nan


# ---- the filter: scores and decisions ---------------------------------------------------------------------------
def test_pair_scores_counts_a_class_the_label_lacks_but_the_judge_finds_as_zero():
    label = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]])
    prediction = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 3]])  # class 1: 3 of 4 voxels; class 3 invented; 2 absent
    dice = pair_scores(prediction, label, num_classes=4)
    assert dice[0] == pytest.approx(2 * 3 / (3 + 4))
    assert np.isnan(dice[1])  # absent from both: not scored
    assert dice[2] == 0.0  # the label would not describe the image


def test_pair_scores_rejects_maps_of_different_shapes():
    raises_with("differs from the label's", pair_scores, torch.zeros(3, 4), torch.zeros(4, 3), 3)


def test_select_tries_keeps_the_best_k_passing_tries_by_mean_dice():
    criteria = FilterCriteria(num_classes=3, min_class_dice=0.8, min_mean_dice=0.85, keep_k=2)
    scores = [[0.90, 0.90], [0.79, 0.99], [0.95, 0.97], [0.86, 0.86], [0.90, 0.90]]
    decisions = select_tries(scores, criteria, ["CSF", "GM"])
    assert [d.passed for d in decisions] == [True, False, True, True, True]
    assert [d.kept for d in decisions] == [True, False, True, False, False]
    assert [d.rank for d in decisions] == [1, None, 0, None, None]  # try 2 ranks first; try 0 beats its tie, try 4
    assert decisions[1].reason == "rejected: CSF Dice 0.790 < 0.80"
    assert decisions[3].reason == "rejected: passed, but the 2 kept tries scored a higher mean Dice (keep_k=2)"
    assert decisions[2].reason == "kept: passed, rank 1 of 4 passing"
    assert all(d.relax_level == 0 and d.min_class_dice == [0.8, 0.8] and d.min_mean_dice == 0.85 for d in decisions)


def test_select_tries_relaxes_all_thresholds_by_relax_step_until_enough_pass():
    criteria = FilterCriteria(num_classes=3, min_class_dice=0.8, min_mean_dice=0.9, relax_step=0.1, max_relax_steps=3,
                              keep_k=2, min_kept_per_mask=2)
    scores = [[0.75, 0.87], [0.65, 0.99], [0.50, 0.99]]  # level 1 (0.7 / 0.8): only try 0; level 2 (0.6 / 0.7): 0, 1
    decisions = select_tries(scores, criteria)
    assert {d.relax_level for d in decisions} == {2}
    assert decisions[0].min_class_dice == [0.6, 0.6] and decisions[0].min_mean_dice == 0.7
    assert [d.kept for d in decisions] == [True, True, False]
    assert decisions[1].reason == "kept: passed (relaxed 2 steps), rank 1 of 2 passing"  # mean 0.82 > 0.81
    assert decisions[2].reason == "rejected: class_1 Dice 0.500 < 0.60 (relaxed 2 steps)"


def test_select_tries_keeps_nothing_when_the_last_relaxation_level_is_not_enough():
    criteria = FilterCriteria(num_classes=2, min_class_dice=0.9, min_mean_dice=0.9, relax_step=0.1, max_relax_steps=1)
    decisions = select_tries([[0.5], [0.79]], criteria)
    assert not any(d.kept or d.passed for d in decisions)
    assert decisions[1].reason == "rejected: class_1 Dice 0.790 < 0.80; mean Dice 0.790 < 0.80 (relaxed 1 step)"


def test_select_tries_scores_only_the_classes_a_pair_has_and_passes_an_empty_pair():
    criteria = FilterCriteria(num_classes=3, min_class_dice=0.8, min_mean_dice=0.8, keep_k=1)
    decisions = select_tries([[NAN, 0.9], [NAN, NAN]], criteria)
    assert decisions[0].kept and decisions[1].passed and not decisions[1].kept  # a scored pass ranks before
    only_empty = select_tries([[NAN, NAN]], criteria)[0]
    assert only_empty.kept and "nothing to score" in only_empty.reason


def test_per_class_thresholds_apply_to_their_own_class():
    criteria = FilterCriteria(num_classes=3, min_class_dice=[0.2, 0.9], min_mean_dice=0.5, max_relax_steps=0)
    assert [d.passed for d in select_tries([[0.25, 0.95], [0.95, 0.25]], criteria)] == [True, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_class_dice": [0.5]}, "must be one number or 2 numbers"),
        ({"min_class_dice": 1.2}, "min_class_dice must lie in [0, 1]"),
        ({"min_mean_dice": -0.1}, "min_mean_dice must lie in [0, 1]"),
        ({"keep_k": 0}, "keep_k must be >= 1"),
        ({"keep_k": 2, "min_kept_per_mask": 3}, "min_kept_per_mask must lie in [1, keep_k=2]"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
    ],
)
def test_invalid_filter_settings_are_refused_with_the_key_named(kwargs, message):
    raises_with(message, FilterCriteria, **{"num_classes": 3, **kwargs})


def test_candidates_to_keep_never_drops_a_try_the_final_decision_keeps():
    rng = np.random.default_rng(0)
    criteria = FilterCriteria(num_classes=3, min_class_dice=0.7, min_mean_dice=0.8, max_relax_steps=2, keep_k=2,
                              min_kept_per_mask=2)
    for _ in range(100):
        scores = [rng.uniform(0.4, 1.0, 2) for _ in range(int(rng.integers(1, 12)))]
        held: set[int] = set()
        for n in range(1, len(scores) + 1):  # pruned after every try, as the loop does
            held = (held | {n - 1}) & candidates_to_keep(scores[:n], criteria)
        kept = {i for i, d in enumerate(select_tries(scores, criteria)) if d.kept}
        assert kept <= held and len(held) <= criteria.keep_k * (criteria.max_relax_steps + 1)


def test_round_seeds_depend_on_seed_case_and_round_only():
    assert derive_seed(0, "case1", 3) == derive_seed(0, "case1", 3)
    seeds = {derive_seed(s, c, r) for s in (0, 1) for c in ("case1", "case2") for r in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)


# ---- mask variety -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 40, 48), (1, 24, 32, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", ["affine_prob", "elastic_prob"])
def test_mask_deformation_moves_classes_on_the_same_grid_and_is_seeded(shape, kind, affine):
    label = torch.zeros(shape)
    label[(slice(None), *[slice(s // 5, s - s // 5) for s in shape[1:]])] = 1
    label[(slice(None), *[slice(s // 3, s - s // 3) for s in shape[1:]])] = 2
    mask = MetaTensor(label, affine=torch.as_tensor(affine))
    deform = RandMaskDeform(**{kind: 1.0})
    first = deform.set_random_state(seed=3)(mask)
    again = deform.set_random_state(seed=3)(mask)
    other = deform.set_random_state(seed=4)(mask)
    assert first.shape == mask.shape and set(torch.unique(first).tolist()) <= {0.0, 1.0, 2.0}
    torch.testing.assert_close(first.affine, mask.affine)  # the anatomy moves, not the grid
    assert torch.equal(first.as_tensor(), again.as_tensor()) and not torch.equal(first.as_tensor(), other.as_tensor())
    assert 0.005 < (first != mask).float().mean() < 0.3
    assert torch.equal(RandMaskDeform().set_random_state(seed=3)(mask).as_tensor(), label)  # probabilities 0: unchanged


def test_mask_and_image_get_the_same_deformation():
    label = torch.zeros(1, 32, 32)
    label[:, 8:24, 10:20] = 1
    data = {"label": label, "image": label * 3.0}
    out = RandMaskDeformd(["label", "image"], affine_prob=1.0, rotate_range=0.3, mode=["nearest", "nearest"],
                          padding_mode=["zeros", "zeros"]).set_random_state(seed=0)(data)
    assert not torch.equal(out["label"], label)
    torch.testing.assert_close(out["image"], out["label"] * 3.0)


# ---- the per-mask loop with a toy generator and a toy judge -------------------------------------------------------
@pytest.fixture(scope="module")
def toy_masks(tmp_path_factory):
    """Five 2D masks (24 x 20) with two foreground classes, on a non-trivial affine."""
    root = tmp_path_factory.mktemp("toy")
    write_dataset(root, shape=(24, 20), splits={"training": 5})
    return [{"label": str(root / "labels" / f"case{i}.nii.gz")} for i in range(5)]


def read_rows(output_dir):
    with open(output_dir / "tries.csv") as f:
        return list(csv.DictReader(f))


def test_toy_run_keeps_only_pairs_that_pass_and_records_every_try(tmp_path, toy_masks):
    labels = {"0": "background", "1": "outer", "2": "inner"}
    summary = toy_synthesizer(tmp_path / "out", class_names=["outer", "inner"], labels=labels).run(toy_masks)
    journal = json.loads((tmp_path / "out" / "tries.json").read_text())
    tries = journal["tries"]
    assert summary["masks"] == 5 and summary["tries"] == len(tries) == len(read_rows(tmp_path / "out"))
    assert 0 < summary["pairs"] < len(tries)  # the filter really chose
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert datalist["labels"] == labels
    assert list(read_rows(tmp_path / "out")[0])[7:10] == ["dice_outer", "dice_inner", "mean_dice"]
    datalist = datalist["training"]
    assert len(datalist) == summary["pairs"] == sum(t["kept"] for t in tries)
    for entry in datalist:
        thresholds = entry["min_class_dice"]
        assert all(d is None or d >= t for d, t in zip(entry["dice"].values(), thresholds))
        assert entry["mean_dice"] >= entry["min_mean_dice"]
        image = nib.load(str(tmp_path / "out" / entry["image"]))
        label = nib.load(str(tmp_path / "out" / entry["label"]))
        mask = nib.load(entry["mask"])
        assert image.shape == label.shape == mask.shape
        np.testing.assert_allclose(image.affine, mask.affine, atol=1e-6)
        np.testing.assert_allclose(label.affine, mask.affine, atol=1e-6)
        # the written pair scores what was recorded: the judge on the image file against the label file
        rescored = pair_scores(toy_judge(torch.as_tensor(image.get_fdata())[None].float()), label.get_fdata(), 3)
        np.testing.assert_allclose(rescored, [np.nan if v is None else v for v in entry["dice"].values()], atol=1e-4)
    for t in tries:
        assert t["reason"].startswith("kept" if t["kept"] else "rejected")
        assert (t["image"] is not None) == t["kept"]


def test_toy_run_is_reproducible_and_independent_of_mask_order(tmp_path, toy_masks):
    toy_synthesizer(tmp_path / "a").run(toy_masks)
    toy_synthesizer(tmp_path / "b").run(list(reversed(toy_masks[2:])))
    rows_a = {(r["case"], r["try"]): r for r in read_rows(tmp_path / "a")}
    rows_b = read_rows(tmp_path / "b")
    assert rows_b and all(rows_a[(r["case"], r["try"])] == r for r in rows_b)
    for image in (tmp_path / "b" / "images").glob("*.nii.gz"):
        np.testing.assert_array_equal(nib.load(str(image)).get_fdata(),
                                      nib.load(str(tmp_path / "a" / "images" / image.name)).get_fdata())


def test_stop_early_ends_a_mask_once_keep_k_tries_pass(tmp_path, toy_masks):
    easy = FilterCriteria(num_classes=3, min_class_dice=0.0, min_mean_dice=0.0, keep_k=2)
    generator = ToyGenerator()
    toy_synthesizer(tmp_path / "early", generator, easy).run(toy_masks[:1])
    assert [n for _, n in generator.calls] == [3]  # one round of 3 images, 2 of them kept
    generator = ToyGenerator()
    toy_synthesizer(tmp_path / "all", generator, easy, stop_early=False, max_tries_per_mask=7).run(toy_masks[:1])
    assert [n for _, n in generator.calls] == [3, 3, 1]  # up to max_tries_per_mask, the last round shorter


def test_resume_skips_finished_masks_and_overwrites_nothing(tmp_path, toy_masks):
    out = tmp_path / "out"
    toy_synthesizer(out).run(toy_masks[:3])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    generator = ToyGenerator()
    summary = toy_synthesizer(out, generator).run(toy_masks)
    assert summary["masks"] == 5
    assert {seed for seed, _ in generator.calls} <= {derive_seed(5, c, r) for c in ("case3", "case4") for r in range(3)}
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    reference = toy_synthesizer(tmp_path / "uninterrupted")
    reference.run(toy_masks)
    assert read_rows(out) == read_rows(tmp_path / "uninterrupted")  # resuming changes nothing in the records


def test_an_interrupted_mask_is_redone_and_its_partial_files_cleaned(tmp_path, toy_masks):
    out = tmp_path / "out"
    toy_synthesizer(out).run(toy_masks[:1])
    stale = out / "images" / ".case1_syn0.partial.nii.gz"  # written before a crash, mask never recorded
    stale.write_bytes(b"half a file")
    recorded = json.loads((out / "tries.json").read_text())["masks"]["case0"]["files"][0]
    os.replace(out / recorded, out / recorded.replace("images/", "images/.").replace(".nii.gz", ".partial.nii.gz"))
    toy_synthesizer(out).run(toy_masks[:2])  # crash after recording case0 but before its rename: completed
    assert not stale.exists() and (out / recorded).exists()
    assert json.loads((out / "tries.json").read_text())["masks"].keys() == {"case0", "case1"}


def test_a_foreign_file_in_the_way_of_an_unfinished_mask_stops_the_run_untouched(tmp_path, toy_masks):
    out = tmp_path / "out"
    toy_synthesizer(out).run(toy_masks[:1])
    foreign = out / "labels" / "case1_syn1.nii.gz"
    foreign.write_bytes(b"not ours")
    generator = ToyGenerator()
    raises_with("case1_syn1.nii.gz exists but case1 is not recorded", toy_synthesizer(out, generator).run, toy_masks)
    assert foreign.read_bytes() == b"not ours" and not generator.calls


def test_a_rerun_with_other_settings_is_refused_naming_the_difference(tmp_path, toy_masks):
    out = tmp_path / "out"
    toy_synthesizer(out, settings={"seed": 0, "keep_k": 2}).run(toy_masks[:1])
    raises_with("keep_k: 2 there, 3 now", toy_synthesizer(out, settings={"seed": 0, "keep_k": 3}).run, toy_masks)
    (tmp_path / "other" / "images").mkdir(parents=True)
    (tmp_path / "other" / "images" / "x.nii.gz").write_bytes(b"")
    raises_with("holds outputs without synthesis records", toy_synthesizer(tmp_path / "other").run, toy_masks)


def test_masks_with_the_same_file_name_are_refused(tmp_path, toy_masks):
    twin = tmp_path / "elsewhere" / "case0.nii.gz"
    twin.parent.mkdir()
    twin.write_bytes(Path(toy_masks[0]["label"]).read_bytes())
    raises_with("would be shared by several inputs under 'label'", toy_synthesizer(tmp_path / "out").run, [toy_masks[0], {"label": str(twin)}])


# ---- the bundle: inference.yaml + synthesize.yaml on tiny networks -------------------------------------------------
BUNDLE = "mask_to_image"
CONFIGS = ["inference.yaml", "synthesize.yaml"]
#: TINY_NETWORK as DiffusionModelUNet arguments, for weights saved without training
TINY_UNET = {k.split("#")[1]: v for k, v in TINY_NETWORK.items()}


def save_tiny_weights(bundle_root, num_classes=3):
    """Untrained tiny weights for the generator (models/model.pt) and the default judge (models/segmenter.pt)."""
    from monai.networks.nets import DiffusionModelUNet, UNet

    torch.manual_seed(0)
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    generator = DiffusionModelUNet(spatial_dims=2, in_channels=1 + num_classes, out_channels=1, **TINY_UNET)
    torch.save(generator.state_dict(), bundle_root / "models" / "model.pt")
    judge = UNet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=(32, 64, 128), strides=(2, 2),
                 num_res_units=2)  # evaluate.yaml's segmenter_def
    torch.save(judge.state_dict(), bundle_root / "models" / "segmenter.pt")
    return judge


def bundle_settings(root, **extra):
    return dict(dataset_dir=str(root / "data"), bundle_root=str(root / "b"), num_classes=3, image_size=[16, 16],
                num_inference_steps=2, samples_per_mask=2, max_tries_per_mask=4, **TINY_NETWORK, **extra)


@pytest.mark.slow
def test_bundle_synthesizes_filtered_pairs_on_the_mask_grid_and_resumes(tmp_path):
    write_dataset(tmp_path / "data")  # 3D volumes (20 x 16 x 12), generated and judged slice by slice
    save_tiny_weights(tmp_path / "b")
    settings = bundle_settings(tmp_path, affine_prob=1.0, class_ablation_prob=0.5, min_class_dice=0.1,
                               min_mean_dice=0.2, strength=0.6)  # SDEdit from the real image, deformed with its mask
    run_bundle(BUNDLE, CONFIGS, **settings)
    out = tmp_path / "b" / "outputs" / "synthetic"
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["training"]
    from segdiff.data.checks import check_datalist

    assert check_datalist(str(out / "datalist.json"), str(out), 3, 1, splits=["training"]) == len(datalist["training"])
    judge_weights = str(tmp_path / "b" / "models" / "segmenter.pt")
    judge = SegmenterJudge(save_tiny_weights(tmp_path / "judge"), judge_weights, 2, [16, 16])
    for entry in datalist["training"]:
        image, label = nib.load(str(out / entry["image"])), nib.load(str(out / entry["label"]))
        mask = nib.load(entry["mask"])
        assert image.shape == label.shape == mask.shape
        np.testing.assert_allclose(image.affine, mask.affine, atol=1e-5)
        dice = pair_scores(judge(torch.as_tensor(image.get_fdata()).float()[None]), label.get_fdata(), 3)
        np.testing.assert_allclose(dice, [np.nan if v is None else v for v in entry["dice"].values()], atol=1e-3)
        assert np.nanmin(dice) >= entry["min_class_dice"][0] and np.nanmean(dice) >= entry["min_mean_dice"]
        changed = (np.asarray(label.dataobj) != np.asarray(mask.dataobj)).mean()  # the label is the deformed mask
        assert changed == pytest.approx(entry["mask_changed"], abs=1e-6)
    tries = json.loads((out / "tries.json").read_text())
    assert tries["settings"]["affine_prob"] == 1.0 and tries["settings"]["judge"]["kind"] == "unet"
    assert any(t["mask_changed"] > 0 for t in tries["tries"]) and any(t["unspecified_classes"] for t in tries["tries"])
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    run_bundle(BUNDLE, CONFIGS, **settings)  # rerun: every mask is finished, nothing is generated or rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == written
    assert json.loads((out / "tries.json").read_text()) == tries
    raises_with("min_mean_dice: 0.2 there, 0.3 now", run_bundle, BUNDLE, CONFIGS, **{**settings, "min_mean_dice": 0.3})


@pytest.mark.slow
def test_bundle_with_an_image_to_mask_judge_from_a_folder_of_masks(tmp_path):
    from monai.networks.nets import DiffusionModelUNet

    write_dataset(tmp_path / "data", shape=(16, 16, 6))
    save_tiny_weights(tmp_path / "b")
    torch.manual_seed(1)
    segmenter = DiffusionModelUNet(spatial_dims=2, in_channels=3 + 1, out_channels=3, **TINY_UNET)
    (tmp_path / "i2m" / "models").mkdir(parents=True)
    torch.save(segmenter.state_dict(), tmp_path / "i2m" / "models" / "model.pt")
    judge_overrides = {"bundle_root": str(tmp_path / "i2m"), "num_members": 2, "num_inference_steps": 2, **TINY_NETWORK,
                       "condition_encoder": False, "prediction_type": "v_prediction"}  # the plain network saved above
    settings = bundle_settings(tmp_path, judge="image_to_mask", judge_bundle=str(BUNDLES / "image_to_mask"),
                               judge_overrides=judge_overrides, min_class_dice=0.0, min_mean_dice=0.0,
                               mask_dir=str(tmp_path / "data" / "labels"), output_dir=str(tmp_path / "syn"))
    run_bundle(BUNDLE, CONFIGS, **settings)
    tries = json.loads((tmp_path / "syn" / "tries.json").read_text())
    assert len(tries["masks"]) == 6 and tries["settings"]["judge"]["kind"] == "image_to_mask"
    judge = build_judge("image_to_mask", None, "", str(BUNDLES / "image_to_mask"), judge_overrides, 3, 1, 2, [16, 16])
    image = torch.as_tensor(nib.load(str(tmp_path / "syn" / "images" / "case0_syn0.nii.gz")).get_fdata()).float()[None]
    prediction = judge(image)
    assert prediction.shape == image.shape[1:] and torch.equal(prediction, judge(image))  # seeded ensemble
    assert set(prediction.unique().tolist()) <= {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize(
    "problem, message",
    [
        ("no_judge", "no judge weights there"),
        ("no_model", "no trained weights there"),
        ("label_out_of_range", "case1.nii.gz: expected class indices in [0, 3) for num_classes=3, found 5"),
        ("bad_threshold", "min_class_dice must be one number or 2 numbers"),
    ],
)
def test_bundle_stops_before_any_work_when_an_input_is_wrong(tmp_path, problem, message):
    write_dataset(tmp_path / "data", splits={"training": 2})
    save_tiny_weights(tmp_path / "b")
    extra = {}
    if problem == "no_judge":
        (tmp_path / "b" / "models" / "segmenter.pt").unlink()
    elif problem == "no_model":
        (tmp_path / "b" / "models" / "model.pt").unlink()
    elif problem == "label_out_of_range":
        path = tmp_path / "data" / "labels" / "case1.nii.gz"
        label = nib.load(str(path))
        data = np.asarray(label.dataobj).copy()
        data[0, 0, 0] = 5
        nib.save(nib.Nifti1Image(data, label.affine), str(path))
    else:
        extra["min_class_dice"] = [0.5, 0.5, 0.5]
    raises_with(message, run_bundle, BUNDLE, CONFIGS, **bundle_settings(tmp_path, **extra))
    assert not list((tmp_path / "b").rglob("*_syn*.nii.gz"))
