"""scripts/benchmark_recipes.py on tiny networks and a tiny data set: every recipe trains through the bundle and is
scored at the evaluation points; results accumulate (a finished recipe is not trained again); table and plot."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from bundle_utils import REPO, write_dataset

TINY = ["num_classes=3", "image_size=[16,16]", "network_channels=[8,8]", "attention_levels=[False,False]",
        "num_head_channels=8", "norm_num_groups=4", "slices_per_volume=4", "batch_size=8", "warmup_steps=1",
        "val_interval=100", "segmenter_epochs=1", "segmenter_batch_size=8"]


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_recipes", REPO / "scripts" / "benchmark_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run(tmp_path, bundle, recipes, extra=()):
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, shape=(12, 16, 16), splits={"training": 4, "validation": 1, "test": 1})
    arguments = ["--bundle", bundle, "--steps", "4", "--eval-every", "2", "--recipes", *recipes, "--eval-sampler", "ddim:2",
                 "--members", "2", "--data", str(data), "--output", str(tmp_path / "out"), "--override", *TINY, *extra]
    assert load_script().main(arguments) == 0
    return json.loads((tmp_path / "out" / "results.json").read_text()), arguments


def check_points(run, steps=(2, 4)):
    assert run["steps"] == steps[-1] and [p["step"] for p in run["points"]] == list(steps)
    for point in run["points"]:
        assert 0.0 <= point["mean_dice"] <= 1.0 and len(point["per_class_dice"]) == 2
        assert point["train_seconds"] > 0
    assert run["points"][-1]["train_seconds"] > run["points"][0]["train_seconds"]


@pytest.mark.slow
def test_mask_to_image_recipes_are_scored_at_each_point_swept_and_not_trained_twice(tmp_path, capsys):
    """A DDPM recipe with min-SNR weights and a rectified flow; then, again, a sampling sweep of the flow."""
    results, arguments = tiny_run(tmp_path, "mask_to_image", ["v+min_snr", "rflow"])
    assert results["bundle"] == "mask_to_image" and set(results["recipes"]) == {"v+min_snr", "rflow"}
    for name, sampler in (("v+min_snr", "ddim-2"), ("rflow", "euler-2")):
        assert results["recipes"][name]["sampler"] == sampler
        check_points(results["recipes"][name])
    assert 0.0 <= results["ceiling"]["mean_dice"] <= 1.0
    table = (tmp_path / "out" / "recipes.md").read_text()
    assert table.startswith("faithfulness") and "| v+min_snr | ddim-2 |" in table and "| rflow | euler-2 |" in table
    assert (tmp_path / "out" / "recipes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert load_script().main(arguments + ["--sweep", "euler:1", "euler:3", "ddim:2", "--sweep-recipe", "rflow"]) == 0
    out = capsys.readouterr().out
    assert "v+min_snr: done before" in out and "rflow: done before" in out
    sweep = json.loads((tmp_path / "out" / "results.json").read_text())["sweeps"]["rflow"]
    assert [r["sampler"] for r in sweep] == ["euler-1", "euler-3"]  # ddim does not sample a rectified flow
    assert all(r["seconds_per_slice"] > 0 and 0.0 <= r["mean_dice"] <= 1.0 for r in sweep)
    assert "| euler-3 |" in (tmp_path / "out" / "recipes.md").read_text()


@pytest.mark.slow
def test_image_to_mask_recipes_are_scored_by_the_fused_ensemble_with_and_without_ema(tmp_path):
    results, _ = tiny_run(tmp_path, "image_to_mask", ["v+min_snr"], extra=["--online"])
    assert results["bundle"] == "image_to_mask" and "ceiling" not in results
    run = results["recipes"]["v+min_snr"]
    check_points(run)
    for point in run["points"]:  # --online: the weights being trained are scored beside the EMA weights
        assert 0.0 <= point["online"]["mean_dice"] <= 1.0 and len(point["online"]["per_class_dice"]) == 2
    table = (tmp_path / "out" / "recipes.md").read_text()
    assert table.startswith("fused ensemble mean Dice")
    assert "| v+min_snr (online weights, no EMA) | ddim-2 |" in table


@pytest.mark.slow
def test_image_to_mask_condition_encoder_recipes_and_the_encoder_alone_are_scored(tmp_path):
    results, _ = tiny_run(tmp_path, "image_to_mask", ["v+min_snr+encoder+x0", "encoder_alone"])
    check_points(results["recipes"]["v+min_snr+encoder+x0"])
    for point in results["recipes"]["v+min_snr+encoder+x0"]["points"]:  # the encoder inside, alone and fused with
        for part in ("encoder", "with_encoder"):
            assert 0.0 <= point[part]["mean_dice"] <= 1.0 and len(point[part]["per_class_dice"]) == 2
    alone = results["recipes"]["encoder_alone"]
    check_points(alone)
    assert alone["sampler"] == "argmax" and alone["overrides"] == {"baseline": True, "max_wall_time": 0}
    # the baseline really trained train_baseline.yaml's network: its weights and record are where that config writes
    assert (tmp_path / "out" / "encoder_alone" / "models" / "baseline.pt").exists()
    table = (tmp_path / "out" / "recipes.md").read_text()
    assert "| encoder_alone | argmax |" in table
    assert "| v+min_snr+encoder+x0 (its condition encoder alone, argmax) |" in table

    # the sampling sweep, batched and as the published protocol (sequential chains), on a subset of the slices
    _, arguments = tiny_run(tmp_path, "image_to_mask", ["v+min_snr+encoder+x0"])
    sweep = ["--sweep", "ddim:2", "ddim:2:sequential", "--sweep-slices", "3"]
    assert load_script().main(arguments + sweep) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["sweeps"]["v+min_snr+encoder+x0"]
    assert [r["sampler"] for r in rows] == ["ddim-2", "ddim-2, 2 sequential chains"]
    assert [r["slices"] for r in rows] == [3, 3] and all(0.0 <= r["mean_dice"] <= 1.0 for r in rows)
    assert "| ddim-2, 2 sequential chains |" in (tmp_path / "out" / "recipes.md").read_text()
    # the one-batch row against the published protocol (the sequential chains), paired over the same 3 slices
    against = rows[0]["against_published"]
    assert against["difference"] == pytest.approx(rows[0]["mean_dice"] - rows[1]["mean_dice"], abs=2e-4)
    assert against["ci95"][0] <= against["difference"] <= against["ci95"][1]
    assert "against_published" not in rows[1]
    saved = torch.load(tmp_path / "out" / "v_min_snr_encoder_x0" / "sweep_predictions.pt")
    assert set(saved) == {"truth", "ddim-2", "ddim-2, 2 sequential chains"} and saved["truth"].shape[0] == 3


def test_sequential_members_stack_each_chain_per_slice_in_member_order():
    import torch

    class Constant:  # a "sampler" drawing one sample per slice: the slice's value plus its member id
        def __init__(self, member):
            self.member = member

        def __call__(self, condition, network):
            return condition[:, :1] + 10 * self.member

    stacked = load_script().SequentialMembers([Constant(0), Constant(1), Constant(2)])(
        torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 2, 3, 3), None)
    assert stacked.shape == (4, 3, 3, 3)
    assert stacked[:, :, 0, 0].tolist() == [[0, 10, 20], [1, 11, 21], [2, 12, 22], [3, 13, 23]]


def test_unknown_recipes_are_refused_with_the_known_names(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--recipes", "v", "x0", "--output", str(tmp_path)])
    assert "unknown recipe(s) ['x0']; known: epsilon, v, sample" in capsys.readouterr().err


def test_times_keep_four_significant_figures_so_a_fast_sampler_is_not_rounded_to_zero():
    significant = load_script().significant
    assert significant(0.000123456) == 0.0001235 and significant(52.00349) == 52.0 and significant(1234.56) == 1235.0
