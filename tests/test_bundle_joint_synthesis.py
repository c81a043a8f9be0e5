"""mask_to_image's synthesize_joint.yaml on tiny trained models: pairs from the joint model and masks from the mask
generator, on the reference grid, classes in range, filtered by plausibility, resumable; and the masks feed
synthesize.yaml's mask -> image synthesis."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY_NETWORK, TINY_TRAINING, raises_with, run_bundle, write_dataset

BUNDLE = "mask_to_image"
SYNTHESIZE = ["inference.yaml", "synthesize.yaml", "synthesize_joint.yaml"]
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The joint model and the mask generator, trained for one epoch on tiny 3D volumes cut into 2D slices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("joint_synthesis")
    write_dataset(root / "data", shape=(20, 16, 6))
    common = {"dataset_dir": str(root / "data"), "bundle_root": str(root / "bundle"), "num_classes": NUM_CLASSES,
              "image_size": [16, 16], **TINY_NETWORK, **TINY_TRAINING, "max_epochs": 1}
    for overlay in ("train_joint.yaml", "train_mask_generator.yaml"):
        run_bundle(BUNDLE, ["train.yaml", overlay], run_id="training", **common)
    yield root, {k: v for k, v in common.items() if k not in TINY_TRAINING}
    torch.set_num_threads(threads)


def synthesize(settings, **extra):
    options = {"num_generated": 3, "max_tries_per_case": 2, "num_inference_steps": 2, "volume_tolerance": 5.0,
               "body_margin": 20, "max_components": 1000}  # lenient: an untrained model's masks are speckled
    run_bundle(BUNDLE, SYNTHESIZE, **{**settings, **options, **extra})


@pytest.mark.parametrize("generate", ["pairs", "masks"])
def test_generated_samples_lie_on_the_reference_grid_with_classes_in_range(trained, generate):
    root, settings = trained
    out = root / f"out_{generate}"
    synthesize(settings, generate=generate, output_dir=str(out))
    journal = json.loads((out / "tries.json").read_text())
    assert list(journal["masks"]) == ["gen00000", "gen00001", "gen00002"]
    assert journal["settings"]["generate"] == generate and journal["settings"]["seed"] == 0
    entries = json.loads((out / "datalist.json").read_text())["training"]
    assert len(entries) == sum(m["kept"] for m in journal["masks"].values()) == 3
    reference = nib.load(str(root / "data" / "labels" / "case0.nii.gz"))  # the first training mask, middle slice
    expected = reference.affine.copy()
    expected[:3, 3] += 3 * reference.affine[:3, 2]
    for entry in entries:
        label = nib.load(str(out / entry["label"]))
        assert label.shape == (20, 16)
        np.testing.assert_allclose(label.affine, expected, atol=1e-5)
        assert set(np.unique(label.get_fdata())) <= set(range(NUM_CLASSES))
        if generate == "pairs":
            image = nib.load(str(out / entry["image"]))
            assert image.shape == (20, 16) and np.allclose(image.affine, expected, atol=1e-5)
        else:
            assert "image" not in entry
    for row in journal["tries"]:  # every draw recorded with its decision
        assert row["reason"].startswith("kept" if row["kept"] else "rejected")


def test_a_rerun_resumes_and_other_settings_are_refused(trained):
    root, settings = trained
    out = root / "out_resume"
    synthesize(settings, output_dir=str(out), num_generated=2)
    first = (out / "tries.json").read_text()
    synthesize(settings, output_dir=str(out), num_generated=3)  # one more case; the first two untouched
    journal = json.loads((out / "tries.json").read_text())
    assert list(journal["masks"]) == ["gen00000", "gen00001", "gen00002"]
    assert json.loads(first)["tries"] == journal["tries"][: len(json.loads(first)["tries"])]
    raises_with("volume_tolerance: 5.0 there, 0.5 now", synthesize, settings, output_dir=str(out), volume_tolerance=0.5)


def test_a_joint_model_is_not_taken_for_a_mask_generator(trained):
    root, settings = trained
    raises_with("target: trained \"image+mask\", configured \"mask\"", synthesize, settings, generate="masks",
                output_dir=str(root / "wrong"), model_path=str(root / "bundle" / "models" / "joint" / "model.pt"))


def test_the_plausibility_filter_rejects_the_speckled_masks_of_an_untrained_model_saying_why(trained):
    root, settings = trained
    out = root / "out_strict"
    synthesize(settings, output_dir=str(out), num_generated=1, max_components=None)
    rows = json.loads((out / "tries.json").read_text())["tries"]
    assert len(rows) == 2 and not any(r["kept"] for r in rows)
    assert all("connected components, at most 1 in training" in r["reason"] for r in rows)
