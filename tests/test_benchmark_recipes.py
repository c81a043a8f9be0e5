"""scripts/benchmark_recipes.py on tiny networks and a tiny data set: every recipe trains through the bundle and is
scored at the evaluation points; results accumulate (a finished recipe is not trained again); table and plot."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bundle_utils import REPO, write_dataset

TINY = ["num_classes=3", "image_size=[16,16]", "network_channels=[8,8]", "attention_levels=[False,False]",
        "num_head_channels=8", "norm_num_groups=4", "slices_per_volume=4", "batch_size=8", "warmup_steps=1",
        "val_interval=100", "segmenter_epochs=1", "segmenter_batch_size=8"]


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_recipes", REPO / "scripts" / "benchmark_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("bundle, quality", [("mask_to_image", "faithfulness"), ("image_to_mask", "fused ensemble")])
def test_recipes_are_trained_scored_at_each_point_and_not_trained_twice(tmp_path, capsys, bundle, quality):
    """Both bundles, a DDPM recipe with min-SNR weights and a rectified flow; then a sampling sweep of the flow."""
    data = tmp_path / "data"
    write_dataset(data, shape=(12, 16, 16), splits={"training": 4, "validation": 1, "test": 1})
    script = load_script()
    arguments = ["--bundle", bundle, "--steps", "4", "--eval-every", "2", "--recipes", "v+min_snr", "rflow",
                 "--eval-sampler", "ddim:2", "--members", "2", "--data", str(data), "--output", str(tmp_path / "out"),
                 "--override", *TINY]
    assert script.main(arguments) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["bundle"] == bundle and set(results["recipes"]) == {"v+min_snr", "rflow"}
    for name, sampler in (("v+min_snr", "ddim-2"), ("rflow", "euler-2")):
        run = results["recipes"][name]
        assert run["steps"] == 4 and run["sampler"] == sampler
        assert [p["step"] for p in run["points"]] == [2, 4]
        for point in run["points"]:
            assert 0.0 <= point["mean_dice"] <= 1.0 and len(point["per_class_dice"]) == 2
            assert point["train_seconds"] > 0
        assert run["points"][1]["train_seconds"] > run["points"][0]["train_seconds"]
    if bundle == "mask_to_image":
        assert 0.0 <= results["ceiling"]["mean_dice"] <= 1.0
    table = (tmp_path / "out" / "recipes.md").read_text()
    assert table.startswith(quality) and "| v+min_snr | ddim-2 |" in table and "| rflow | euler-2 |" in table
    assert (tmp_path / "out" / "recipes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    # again, with a sampling sweep of the flow's weights: both recipes are done, nothing is retrained
    assert script.main(arguments + ["--sweep", "euler:1", "euler:3", "ddim:2", "--sweep-recipe", "rflow"]) == 0
    out = capsys.readouterr().out
    assert "v+min_snr: done before" in out and "rflow: done before" in out
    sweep = json.loads((tmp_path / "out" / "results.json").read_text())["sweeps"]["rflow"]
    assert [r["sampler"] for r in sweep] == ["euler-1", "euler-3"]  # ddim does not sample a rectified flow
    assert all(r["seconds_per_slice"] > 0 and 0.0 <= r["mean_dice"] <= 1.0 for r in sweep)
    assert "| euler-3 |" in (tmp_path / "out" / "recipes.md").read_text()


def test_unknown_recipes_are_refused_with_the_known_names(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--recipes", "v", "x0", "--output", str(tmp_path)])
    assert "unknown recipe(s) ['x0']; known: epsilon, v, sample" in capsys.readouterr().err
