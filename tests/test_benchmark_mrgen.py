"""scripts/benchmark_mrgen.py without training: the protocol's datalists (MR labels and MR test slabs kept away from
the generator), the round-0 datalist, a failed step's error and the report's Markdown."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_totalsegmentator_data import make_sdist

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mrgen():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("benchmark_mrgen", REPO / "scripts" / "benchmark_mrgen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generator_never_sees_an_mr_label_or_an_mr_test_slab(tmp_path, mrgen):
    paths = mrgen.write_data(tmp_path / "data", make_sdist(str(tmp_path / "cache")))
    generator = json.loads(paths["generator"].read_text())
    assert generator["modalities"] == {"ct": 0, "mr": 1}
    entries = generator["training"] + generator["validation"]
    mr = [e for e in entries if e["modality"] == "mr"]
    assert mr and all("label" not in e for e in mr)
    assert all("label" in e for e in entries if e["modality"] == "ct")
    mr_test = json.loads(paths["mr_ceiling"].read_text())["test"]
    assert {e["image"] for e in mr_test}.isdisjoint(e["image"] for e in entries)
    assert json.loads(paths["ct_to_mr"].read_text())["test"] == mr_test  # every arm is scored on the same MR slabs
    ceiling = json.loads(paths["mr_ceiling"].read_text())["training"]
    assert ceiling and all(e["modality"] == "mr" and "label" in e for e in ceiling)
    ct_masks = json.loads(paths["ct_training_masks"].read_text())["test"]
    assert [e["label"] for e in ct_masks] == [e["label"] for e in generator["training"] if e["modality"] == "ct"]
    for entry in entries + mr_test:
        assert (tmp_path / "data" / entry["image"]).is_file()


def test_round0_datalist_pairs_every_image_with_its_ct_mask_and_names_a_missing_one(tmp_path, mrgen):
    masks = [{"label": "ct/labels/ct_slab_00.nii.gz"}, {"label": "ct/labels/ct_slab_02.nii.gz"}]
    for seed in range(2):
        (tmp_path / "round0" / f"seed{seed}").mkdir(parents=True)
        for case in ("ct_slab_00", "ct_slab_02"):
            (tmp_path / "round0" / f"seed{seed}" / f"{case}_image.nii.gz").touch()
    path = mrgen.round0_datalist(tmp_path / "round0", 2, masks, tmp_path / "data")
    training = json.loads(path.read_text())["training"]
    assert [e["case"] for e in training] == ["ct_slab_00_s0", "ct_slab_02_s0", "ct_slab_00_s1", "ct_slab_02_s1"]
    assert training[3]["label"] == str(tmp_path / "data" / "ct/labels/ct_slab_02.nii.gz")
    assert training[3]["image"] == str(tmp_path / "round0" / "seed1" / "ct_slab_02_image.nii.gz")
    with pytest.raises(mrgen.StepError, match="seed2.*ct_slab_00_image.nii.gz was not written"):
        mrgen.round0_datalist(tmp_path / "round0", 3, masks, tmp_path / "data")


def test_a_failed_step_names_its_log_and_ends_with_its_last_lines(tmp_path, mrgen):
    with pytest.raises(mrgen.StepError) as error:
        mrgen.run_bundle(tmp_path, ["configs/missing.yaml"], {"seed": 1}, tmp_path / "logs" / "step.log")
    message = str(error.value)
    assert str(tmp_path / "logs" / "step.log") in message and "missing.yaml" in message
    assert message.splitlines()[-1].strip() == (tmp_path / "logs" / "step.log").read_text().splitlines()[-1].strip()


def test_markdown_reports_every_arm_the_margin_and_the_image_quality(mrgen):
    arm = lambda name, mean: {"arm": name, "data": "d", "slices": 9, "mean_dice": mean,  # noqa: E731
                              "dice": {"liver": mean, "spleen": None}}
    report = {"command": "python scripts/benchmark_mrgen.py", "hardware": "cpu", "classes": ["liver", "spleen"],
              "settings": {"downstream_iterations": 400, "image_size": [64, 64]},
              "arms": [arm("(a) CT only", 0.1), arm("(b) synthetic MR, judged", 0.35)],
              "margin_synthetic_over_ct": 0.25, "image_quality_features": "encoder",
              "image_quality": {"synthetic": {"fid": 1.5, "mmd": None, "ms_ssim_diversity": 0.2,
                                              "num_real_images": 8, "num_synthetic_images": 30}},
              "reconstruction": {"mr": {"psnr": 25.0, "ssim": 0.8}},
              "steps": [{"step": "autoencoder", "settings": "max_epochs 300", "seconds": 600.0}],
              "synthesis": {"masks": 3, "tries": 36, "kept": 6, "kept_slices": 30, "seconds_per_slice": 0.5}}
    text = mrgen.markdown(report)
    assert "| (b) synthetic MR, judged | d | 9 | **0.350** | 0.350 | n/a |" in text
    assert "**+0.250** mean Dice" in text
    assert "| synthetic | 30 | 1.5 | n/a | 0.2 |" in text
    assert "mr PSNR 25.00 dB, SSIM 0.800" in text and "| autoencoder | max_epochs 300 | 10.0 min |" in text


@pytest.fixture(scope="module")
def pixel_vs_latent(mrgen):
    spec = importlib.util.spec_from_file_location("benchmark_pixel_vs_latent", REPO / "scripts" / "benchmark_pixel_vs_latent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pixel_vs_latent_gives_every_demo_entry_one_modality_and_reports_both_models(tmp_path, pixel_vs_latent):
    datalist = {"labels": {"0": "background", "1": "CSF"}, "training": [{"image": "a.nii.gz", "label": "b.nii.gz"}],
                "test": [{"image": "c.nii.gz", "label": "d.nii.gz"}]}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    written = json.loads(pixel_vs_latent.latent_datalist(tmp_path).read_text())
    assert written["modalities"] == {"t1": 0}
    assert written["training"] == [{"image": "a.nii.gz", "label": "b.nii.gz", "modality": "t1"}]
    assert written["test"][0]["modality"] == "t1" and written["validation"] == []
    assert json.loads((tmp_path / "datalist.json").read_text()) == datalist  # the demo datalist is left as it was
    rows = [{"model": "pixel", "training": "600 steps", "mean_dice": 0.6, "dice": {"CSF": 0.25}, "seconds_per_slice": 0.5},
            {"model": "real", "training": "", "mean_dice": 0.7, "dice": {"CSF": None}, "seconds_per_slice": None}]
    text = pixel_vs_latent.markdown({"command": "c", "hardware": "h", "classes": ["CSF"], "rows": rows})
    assert "| pixel | 600 steps | **0.600** | 0.250 | 0.500 |" in text and "| real |  | **0.700** | n/a |  |" in text
