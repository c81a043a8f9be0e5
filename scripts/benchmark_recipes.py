#!/usr/bin/env python
"""Quality versus training steps for the training recipes of the shared engine (prediction type, min-SNR loss
weighting, rectified flow), on the built-in demo data, at equal steps, with the wall time of each run.

Each recipe trains the bundle's own train.yaml (plus a preset) from scratch for the same number of steps, through the
bundle's trainer (data pipeline, EMA, handlers), and is evaluated on every foreground slice of the demo's test slabs
every ``--eval-every`` steps, with the EMA weights:

- mask_to_image: faithfulness, the mean Dice (foreground classes) of a reference UNet segmenter, trained once on the
  real training images by evaluate.yaml, on images generated from the test masks; the same segmenter on the real
  test images gives the ceiling;
- image_to_mask: the mean Dice of the fused ensemble (``--members`` samples, mean probability, argmax).

Samples are drawn with ``--eval-sampler`` (default: DDIM-50 for mask_to_image, DPM-Solver++-10 for image_to_mask;
Euler with the same step count for rectified-flow recipes), from the same seeded noise for every recipe. Results
accumulate in ``<output>/results.json`` (a finished recipe is not trained again), with a Markdown table and a PNG plot
(quality versus steps, one line per recipe).

    python scripts/benchmark_recipes.py --bundle mask_to_image --steps 400 --eval-every 100 \\
        --recipes epsilon v v+min_snr rflow+logit_normal --output benchmarks/recipes_mask_to_image
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

#: recipe name -> the documented bundle keys it sets (everything else as in train.yaml and the preset)
RECIPES: dict[str, dict] = {
    "epsilon": {"prediction_type": "epsilon"},
    "v": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "epsilon+min_snr": {"prediction_type": "epsilon", "loss_weighting": "min_snr"},
    "v+min_snr": {"prediction_type": "v_prediction", "loss_weighting": "min_snr"},
    "sample+min_snr": {"prediction_type": "sample", "loss_weighting": "min_snr"},
    "rflow": {"diffusion": "rflow", "prediction_type": "v_prediction", "timestep_sampling": "uniform", "sampler": "euler"},
    "rflow+logit_normal": {"diffusion": "rflow", "prediction_type": "v_prediction", "timestep_sampling": "logit_normal",
                           "sampler": "euler"},
    # image_to_mask only: the condition encoder, the x0 segmentation loss and recycling (issue 12) ...
    "v+min_snr+encoder": {"prediction_type": "v_prediction", "loss_weighting": "min_snr", "condition_encoder": True},
    "v+min_snr+encoder+x0": {"prediction_type": "v_prediction", "loss_weighting": "min_snr", "condition_encoder": True,
                             "x0_loss_weight": 1.0},
    "sample+encoder+x0+recycling": {"prediction_type": "sample", "condition_encoder": True, "x0_loss_weight": 1.0,
                                    "recycling": True},
    "sample+encoder+x0+recycling+features": {"prediction_type": "sample", "condition_encoder": True,
                                             "x0_loss_weight": 1.0, "recycling": True, "encoder_features": True},
    # ... and the condition encoder trained alone (train_baseline.yaml: the same network as encoder_def, DiceCE),
    # scored by the argmax of its softmax, for as many steps as the diffusion recipes
    "encoder_alone": {"baseline": True, "max_wall_time": 0},
}
BASELINE_CONFIG = "train_baseline.yaml"
#: image_to_mask keys every recipe starts from (its earlier defaults, with which the recipes were measured): a recipe
#: switches on what it names
IMAGE_TO_MASK_BASE = {"condition_encoder": False, "x0_loss_weight": 0.0, "recycling": False, "prediction_type": "v_prediction"}
DEFAULT_SAMPLER = {"mask_to_image": "ddim:50", "image_to_mask": "dpm_solver:10"}


def bundle_parser(bundle: str, config: str | list[str], presets: list[str], overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    configs = [config] if isinstance(config, str) else config
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / c) for c in configs] + [str(REPO / p) for p in presets])
    parser.update(overrides)
    return parser


# ---- the fixed evaluation set -------------------------------------------------------------------------------------
def test_slices(parser) -> dict[str, torch.Tensor]:
    """Every slice with a labelled voxel of the test split, loaded and scaled as in training and resized to the
    model size: ``image`` (N, C, H, W) in [-1, 1] and ``label`` (N, 1, H, W) class indices."""
    from monai.transforms import Compose

    from segdiff.data.datalist import resolve_datalist
    from segdiff.engine.grid import resize, to_network_units

    load = Compose(parser.get_parsed_content("load_transforms"))
    size, axis = parser.get_parsed_content("image_size"), parser.get_parsed_content("slice_axis")
    images, labels = [], []
    for entry in resolve_datalist(parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir"), "test"):
        item = load(dict(entry))
        image = to_network_units(torch.as_tensor(item["image"]).float(), 2, axis)
        label = to_network_units(torch.as_tensor(item["label"]).float(), 2, axis)
        keep = label.flatten(1).amax(dim=1) > 0
        images.append(resize(image[keep], size, "image"))
        labels.append(resize(label[keep], size, "mask"))
    return {"image": torch.cat(images), "label": torch.cat(labels).round().long()}


def dice_per_class(prediction: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[float | None]:
    """Dice of each foreground class over all evaluation slices together (None where the class is absent in both)."""
    scores = []
    for c in range(1, num_classes):
        p, t = prediction == c, truth == c
        total = int(p.sum() + t.sum())
        scores.append(None if total == 0 else 2.0 * float((p & t).sum()) / total)
    return scores


def significant(seconds: float) -> float:
    """A time to four significant figures: a fixed number of decimals would round a fast sampler's time to zero."""
    return float(f"{seconds:.4g}")


def summary(scores: list[float | None]) -> dict:
    present = [s for s in scores if s is not None]
    return {"mean_dice": round(sum(present) / len(present), 4) if present else None,
            "per_class_dice": [None if s is None else round(s, 4) for s in scores]}


def sampler_for(parser, spec: str, recipe: dict, members: int, bundle: str, batch_size: int = 64, seed: int = 0):
    """The bundle's sampler for ``sampler:steps``; ``batch_size`` units (slice x member) per network call."""
    from segdiff.engine import ConditionalDiffusionSampler, build_scheduler

    name, steps = spec.split(":")[:2]
    diffusion = recipe.get("diffusion", "ddpm")
    if diffusion == "rflow":
        name = "euler"
    scheduler = build_scheduler(name, diffusion=diffusion, prediction_type=parser.get_parsed_content("prediction_type"),
                                **parser.get_parsed_content("noise_schedule"))
    mask_to_image = bundle == "mask_to_image"
    return ConditionalDiffusionSampler(
        scheduler, int(steps),
        target_channels=parser.get_parsed_content("image_channels") if mask_to_image else parser.get_parsed_content("num_classes"),
        spatial_dims=2, image_size=parser.get_parsed_content("image_size"), num_samples=1 if mask_to_image else members,
        batch_size=batch_size, condition_kind="mask" if mask_to_image else "image", seed=seed, progress=False,
    ), f"{name}-{steps}"


class SequentialMembers:
    """The published image_to_mask protocol: the ensemble's members drawn as separate chains, one after the other,
    one slice at a time (``samplers``: one per member, each drawing 1 sample with its own seed); called like a
    sampler, it returns the members stacked along the channels as the batched sampler does."""

    def __init__(self, samplers: list) -> None:
        self.samplers = samplers

    def __call__(self, condition: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return torch.cat([torch.cat([sampler(condition[i:i + 1], network) for sampler in self.samplers], dim=1)
                          for i in range(len(condition))])


class Evaluation:
    """Scores a network on the fixed test slices: faithfulness (mask_to_image) or fused ensemble Dice (image_to_mask)."""

    def __init__(self, bundle: str, parser, slices: dict, segmenter: torch.nn.Module | None, members: int) -> None:
        from segdiff.transforms import EncodeMask

        self.bundle, self.parser, self.slices, self.segmenter, self.members = bundle, parser, slices, segmenter, members
        self.num_classes = parser.get_parsed_content("num_classes")
        role = "condition" if bundle == "mask_to_image" else "target"
        encode = EncodeMask(self.num_classes, parser.get_parsed_content("mask_encoding"), role=role) if bundle == "mask_to_image" else None
        self.condition = (torch.stack([encode(m) for m in slices["label"].float()]) if encode is not None else slices["image"])

    def subset(self, count: int) -> "Evaluation":
        """The same evaluation on ``count`` slices spread evenly over the test slices (all of them if fewer)."""
        if count <= 0 or count >= len(self.slices["image"]):
            return self
        keep = torch.linspace(0, len(self.slices["image"]) - 1, count).round().long()
        return Evaluation(self.bundle, self.parser, {k: v[keep] for k, v in self.slices.items()}, self.segmenter, self.members)

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        self.segmenter.eval()
        return torch.cat([self.segmenter(images[i:i + 64]).argmax(dim=1, keepdim=True) for i in range(0, len(images), 64)])

    def ceiling(self) -> dict:
        return summary(dice_per_class(self.segment(self.slices["image"]), self.slices["label"], self.num_classes))

    def __call__(self, network: torch.nn.Module, sampler) -> dict:
        from segdiff.transforms.ensemble import member_probabilities

        started = time.perf_counter()
        samples = sampler(self.condition, network)
        if self.bundle == "mask_to_image":
            prediction = self.segment(samples.clamp(-1, 1))
        else:
            mean_probabilities = torch.stack([member_probabilities(s, self.members).mean(dim=0) for s in samples])
            prediction = mean_probabilities.argmax(dim=1, keepdim=True)
        result = summary(dice_per_class(prediction, self.slices["label"], self.num_classes))
        result["eval_seconds"] = significant(time.perf_counter() - started)
        self.last_prediction = prediction  # for paired comparisons between samplers (sampling_sweep)
        if self.bundle == "image_to_mask" and hasattr(network, "encoder"):
            # a condition encoder inside: its own segmentation, and the diffusion ensemble fused with it (1:1)
            with torch.no_grad():
                encoder = torch.cat([network(self.condition[i:i + 64]).softmax(dim=1) for i in range(0, len(samples), 64)])
            truth = self.slices["label"]
            result["encoder"] = summary(dice_per_class(encoder.argmax(dim=1, keepdim=True), truth, self.num_classes))
            both = (mean_probabilities + encoder).argmax(dim=1, keepdim=True)
            result["with_encoder"] = summary(dice_per_class(both, truth, self.num_classes))
        return result

    @torch.no_grad()
    def segmenter_scores(self, network: torch.nn.Module) -> dict:
        """image_to_mask baseline: the argmax of a plain segmenter's logits on the test slices."""
        started, images = time.perf_counter(), self.slices["image"]
        was_training = network.training
        network.eval()
        prediction = torch.cat([network(images[i:i + 64]).argmax(dim=1, keepdim=True) for i in range(0, len(images), 64)])
        network.train(was_training)
        result = summary(dice_per_class(prediction, self.slices["label"], self.num_classes))
        result["eval_seconds"] = significant(time.perf_counter() - started)
        return result


def reference_segmenter(data_dir: Path, output: Path, presets: list[str], extra: dict) -> torch.nn.Module:
    """evaluate.yaml's reference segmenter, trained once on the real training images (reused when it exists)."""
    parser = bundle_parser("mask_to_image", "evaluate.yaml", presets,
                           {**extra, "dataset_dir": str(data_dir), "bundle_root": str(output / "reference"), "num_workers": 0})
    path = parser.get_parsed_content("segmenter_path")
    segmenter = parser.get_parsed_content("segmenter")
    if not os.path.exists(path):
        print("training the reference segmenter (evaluate.yaml) on the real training images ...", flush=True)
        parser.get_parsed_content("segmenter_train#trainer").run()
    segmenter.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return segmenter.cpu().eval()


# ---- one recipe ---------------------------------------------------------------------------------------------------
def train_recipe(bundle: str, name: str, presets: list[str], data_dir: Path, output: Path, steps: int, eval_every: int,
                 evaluation: Evaluation, sampler_spec: str, members: int, extra: dict, online: bool = False) -> dict:
    from ignite.engine import Events

    import math

    recipe = {**(IMAGE_TO_MASK_BASE if bundle == "image_to_mask" else {}), **RECIPES[name]}
    baseline = recipe.pop("baseline", False)
    if baseline and bundle != "image_to_mask":
        raise SystemExit(f"recipe {name} is image_to_mask's baseline")
    configs = ["train.yaml", BASELINE_CONFIG] if baseline else "train.yaml"
    root = output / name.replace("+", "_")
    overrides = {"dataset_dir": str(data_dir), "bundle_root": str(root), "overwrite": True, "num_workers": 0, **extra, **recipe}
    probe = bundle_parser(bundle, configs, presets, overrides)  # steps per epoch, without building anything
    cases = len(probe.get_parsed_content("train#dataset#data"))
    steps_per_epoch = math.ceil(cases / probe.get_parsed_content("cases_per_batch"))
    epochs = max(1, round(steps / steps_per_epoch))
    parser = bundle_parser(bundle, configs, presets, {**overrides, "max_epochs": epochs})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    online_network = parser.get_parsed_content("network")
    if baseline:  # a plain segmenter: no EMA, no sampler
        ema_network, sampler, sampler_name = None, None, "argmax"
    else:
        parser.get_parsed_content("ema").attach(trainer)
        ema_network = parser.get_parsed_content("ema_network")
        sampler, sampler_name = sampler_for(parser, sampler_spec, recipe, members, bundle)
    points: list[dict] = []
    clock = {"train": 0.0, "since": time.time()}

    def evaluate(engine) -> None:
        clock["train"] += time.time() - clock["since"]
        result = evaluation.segmenter_scores(online_network) if baseline else evaluation(ema_network, sampler)
        points.append({"step": engine.state.iteration, "train_seconds": round(clock["train"], 3), **result})
        print(f"  {name}: step {engine.state.iteration}, {clock['train']:.0f} s of training: mean Dice "
              f"{result['mean_dice']} {result['per_class_dice']}", flush=True)
        for part in ("encoder", "with_encoder"):
            if part in result:
                print(f"  {name}: step {engine.state.iteration}, {part}: mean Dice {result[part]['mean_dice']} "
                      f"{result[part]['per_class_dice']}", flush=True)
        if online and not baseline:  # the weights being trained, without the EMA's averaging (and its lag)
            was_training = online_network.training
            scores = evaluation(online_network, sampler)
            online_network.train(was_training)
            points[-1]["online"] = {k: scores[k] for k in ("mean_dice", "per_class_dice")}
            print(f"  {name}: step {engine.state.iteration}, online weights: mean Dice {scores['mean_dice']} "
                  f"{scores['per_class_dice']}", flush=True)
        clock["since"] = time.time()

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=eval_every), evaluate)
    if (epochs * steps_per_epoch) % eval_every:
        trainer.add_event_handler(Events.COMPLETED, evaluate)
    print(f"\n== {bundle} recipe {name} ({recipe}): {epochs} epochs x {steps_per_epoch} steps", flush=True)
    trainer.run()
    parser.get_parsed_content("summary_writer").close()
    return {"recipe": name, "overrides": RECIPES[name], "steps": epochs * steps_per_epoch, "sampler": sampler_name,
            "points": points}


def sampling_sweep(bundle: str, name: str, presets: list[str], data_dir: Path, output: Path, specs: list[str],
                   evaluation: Evaluation, members: int, extra: dict) -> list[dict]:
    """Quality and seconds per slice of one trained recipe's EMA weights (its models/model.pt) for each sampler:steps."""
    recipe = {**(IMAGE_TO_MASK_BASE if bundle == "image_to_mask" else {}), **RECIPES[name]}
    root = output / name.replace("+", "_")
    parser = bundle_parser(bundle, "train.yaml", presets,
                           {"dataset_dir": str(data_dir), "bundle_root": str(root), "num_workers": 0, **extra, **recipe})
    network = parser.get_parsed_content("network_def")
    weights = root / "models" / "model.pt"
    record = parser.get_parsed_content("model_record")
    record.verify(network, weights)  # the config rebuilds the network the recipe trained
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    network.eval()
    rows, predictions = [], {}
    for spec in specs:
        sampler_name, steps, *mode = spec.split(":")
        if (sampler_name == "euler") != (recipe.get("diffusion") == "rflow"):
            continue  # euler samples rectified flows only, the others DDPM-trained models
        if bundle == "image_to_mask" and mode == ["sequential"]:  # the published protocol: one chain at a time
            chains = [sampler_for(parser, spec, recipe, 1, bundle, batch_size=1, seed=k)[0] for k in range(members)]
            sampler, label = SequentialMembers(chains), f"{sampler_name}-{steps}, {members} sequential chains"
        elif mode:
            raise SystemExit(f"--sweep {spec}: the third field can only be 'sequential' (image_to_mask)")
        else:  # image_to_mask: one slice's members in one batch
            sampler, label = sampler_for(parser, spec, recipe, members, bundle,
                                         batch_size=members if bundle == "image_to_mask" else 64)
        result = evaluation(network, sampler)
        result["seconds_per_slice"] = significant(result["eval_seconds"] / len(evaluation.condition))
        result["slices"] = len(evaluation.condition)
        rows.append({"sampler": label, **result})
        predictions[label] = evaluation.last_prediction[:, 0]
        print(f"  {name} {label}: mean Dice {result['mean_dice']}, {result['seconds_per_slice']} s per slice", flush=True)
    torch.save({"truth": evaluation.slices["label"][:, 0], **predictions}, root / "sweep_predictions.pt")
    compare_with_published(rows, predictions, evaluation.slices["label"][:, 0], evaluation.num_classes)
    return rows


def compare_with_published(rows: list[dict], predictions: dict, truth: torch.Tensor, num_classes: int) -> None:
    """Each row's mean Dice minus the published protocol's (the last sequential-chains row, e.g. ddpm:1000:sequential,
    if swept) on the same slices, with a 95% paired bootstrap interval over slices (``row["against_published"]``)."""
    from segdiff.evaluation import paired_pooled_dice_bootstrap

    published = [r["sampler"] for r in rows if r["sampler"].endswith("sequential chains")]
    if not published:
        return
    reference = published[-1]
    for row in rows:
        if row["sampler"] != reference:
            comparison = paired_pooled_dice_bootstrap(predictions[row["sampler"]], predictions[reference], truth,
                                                      num_classes, draws=2000, seed=0)
            row["against_published"] = {"difference": round(comparison["difference"], 4),
                                        "ci95": [round(v, 4) for v in comparison["ci95"]]}
            print(f"  {row['sampler']} minus {reference}: {row['against_published']}", flush=True)


# ---- reporting ----------------------------------------------------------------------------------------------------
#: extra scores of an evaluation point -> their row label
PARTS = {"online": "online weights, no EMA", "encoder": "its condition encoder alone, argmax",
         "with_encoder": "ensemble + its encoder's softmax, 1:1"}


def write_table(results: dict, path: Path) -> str:
    runs = results["recipes"]
    steps = sorted({p["step"] for r in runs.values() for p in r["points"]})
    quality = "faithfulness mean Dice" if results["bundle"] == "mask_to_image" else "fused ensemble mean Dice"
    lines = [f"{quality} by training step ({results['setting']})", "",
             "| recipe | sampler | " + " | ".join(f"step {s}" for s in steps) + " | per class (last) | training s |",
             "|---|---|" + "---|" * len(steps) + "---|---|"]
    for name, run in runs.items():
        by_step = {p["step"]: p for p in run["points"]}
        cells = [str(by_step[s]["mean_dice"]) if s in by_step else "" for s in steps]
        last = run["points"][-1]
        lines.append(f"| {name} | {run['sampler']} | " + " | ".join(cells) + f" | {last['per_class_dice']} | {last['train_seconds']:.1f} |")
        for part, label in PARTS.items():
            if part in last:
                cells = [str(by_step[s][part]["mean_dice"]) if s in by_step and part in by_step[s] else "" for s in steps]
                lines.append(f"| {name} ({label}) | {run['sampler']} | " + " | ".join(cells)
                             + f" | {last[part]['per_class_dice']} | |")
    for name, rows in results.get("sweeps", {}).items():
        lines += ["", f"sampling steps for recipe {name} (its weights after the last step; seconds per slice on this machine, "
                      + ("a slice's ensemble members drawn in one batch unless the row says sequential chains"
                         if results["bundle"] == "image_to_mask" else "one image per slice")
                      + ")", "", "| sampler | mean Dice | per class | s per slice | slices | minus the published protocol (95% "
                      "paired bootstrap interval over slices) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['sampler']} | {r['mean_dice']} | {r['per_class_dice']} | {r['seconds_per_slice']} | {r.get('slices', '')} | "
                  + (f"{r['against_published']['difference']:+.4f} [{r['against_published']['ci95'][0]:+.4f}, "
                     f"{r['against_published']['ci95'][1]:+.4f}]" if "against_published" in r else "") + " |"
                  for r in rows]
    if results.get("ceiling"):
        lines += ["", f"real-image ceiling (the reference segmenter on the real test slices): mean Dice "
                      f"{results['ceiling']['mean_dice']}, per class {results['ceiling']['per_class_dice']}"]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, run in results["recipes"].items():
        points = [p for p in run["points"] if p["mean_dice"] is not None]
        line, = axes.plot([p["step"] for p in points], [p["mean_dice"] for p in points], marker="o", label=name)
        online = [p for p in points if p.get("online", {}).get("mean_dice") is not None]
        if online:
            axes.plot([p["step"] for p in online], [p["online"]["mean_dice"] for p in online], marker=".", linestyle=":",
                      color=line.get_color(), label=f"{name} (online weights)")
    if results.get("ceiling"):
        axes.axhline(results["ceiling"]["mean_dice"], color="grey", linestyle="--", label="real-image ceiling")
    axes.set_xlabel("training steps")
    axes.set_ylabel("faithfulness mean Dice" if results["bundle"] == "mask_to_image" else "fused ensemble mean Dice")
    axes.set_title(f"{results['bundle']}: quality vs training steps", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", choices=sorted(DEFAULT_SAMPLER), default="mask_to_image")
    parser.add_argument("--preset", action="append", help="preset config(s) relative to the repo root (default: configs/demo_cpu.yaml)")
    parser.add_argument("--recipes", nargs="+", default=["epsilon", "v", "v+min_snr", "rflow+logit_normal"],
                        help=f"from {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=400, help="training steps of every recipe")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--eval-sampler", help="sampler:steps for DDPM recipes (rflow recipes use euler with the same steps)")
    parser.add_argument("--members", type=int, default=5, help="image_to_mask: ensemble members fused")
    parser.add_argument("--data", help="demo data folder (written there if missing; default <output>/data)")
    parser.add_argument("--output", default="benchmarks/recipes", help="folder for runs and results")
    parser.add_argument("--online", action="store_true", help="also score the online (non-EMA) weights at every point")
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value (Python literal) for every recipe")
    parser.add_argument("--sweep", nargs="*", default=[], help="sampler:steps entries to score the --sweep-recipe's final "
                        "weights with, e.g. ddim:5 ddim:10 dpm_solver:10 ddpm:1000 (euler:N for rflow recipes)")
    parser.add_argument("--sweep-recipe", help="the recipe whose weights the sweep uses (default: the first of --recipes)")
    parser.add_argument("--sweep-slices", type=int, default=0, help="score the sweep on this many test slices, spread "
                        "evenly (default 0: all); for slow rows such as ddpm:1000:sequential")
    args = parser.parse_args(argv)

    import ast

    from segdiff.data.demo import write_demo_data

    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    presets = args.preset or ["configs/demo_cpu.yaml"]
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data).resolve() if args.data else output / "data"
    if not (data_dir / "datalist.json").exists():
        write_demo_data(data_dir)
    extra = {}
    for item in args.override:
        key, _, value = item.partition("=")
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value
    sampler_spec = args.eval_sampler or DEFAULT_SAMPLER[args.bundle]

    results_path = output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    setting = (f"demo data, presets {presets}, overrides {extra}, {args.steps} steps, evaluated every {args.eval_every}, "
               f"torch {torch.__version__}, {os.cpu_count()} CPU cores ({platform.machine()}), threads {torch.get_num_threads()}")
    if results.get("bundle") not in (None, args.bundle):
        raise SystemExit(f"{results_path} holds results of {results['bundle']}: choose another --output.")
    results.update(bundle=args.bundle, setting=setting)
    results.setdefault("recipes", {})

    base = bundle_parser(args.bundle, "train.yaml", presets, {"dataset_dir": str(data_dir), "num_workers": 0, **extra})
    slices = test_slices(base)
    segmenter = reference_segmenter(data_dir, output, presets, extra) if args.bundle == "mask_to_image" else None
    evaluation = Evaluation(args.bundle, base, slices, segmenter, args.members)
    if segmenter is not None:
        results["ceiling"] = evaluation.ceiling()
    print(f"{len(slices['image'])} test slices; " + (f"ceiling {results['ceiling']}" if segmenter is not None else ""), flush=True)

    for name in args.recipes:
        done = results["recipes"].get(name)
        if done and done["steps"] >= args.steps and done.get("extra", {}) == extra:
            print(f"{name}: done before ({results_path}), not trained again")
            continue
        torch.manual_seed(0)
        run = train_recipe(args.bundle, name, presets, data_dir, output, args.steps, args.eval_every, evaluation,
                           sampler_spec, args.members, extra, online=args.online)
        run["extra"] = extra
        results["recipes"][name] = run
        results_path.write_text(json.dumps(results, indent=1))

    if args.sweep:
        name = args.sweep_recipe or args.recipes[0]
        if RECIPES[name].get("baseline"):
            raise SystemExit(f"--sweep-recipe {name} is a plain segmenter: it has no sampler to sweep.")
        if name not in results["recipes"]:
            raise SystemExit(f"--sweep-recipe {name} has not been trained in {output}: add it to --recipes.")
        print(f"\n== sampling sweep of {name}", flush=True)
        results.setdefault("sweeps", {})[name] = sampling_sweep(args.bundle, name, presets, data_dir, output, args.sweep,
                                                                evaluation.subset(args.sweep_slices), args.members, extra)
        results_path.write_text(json.dumps(results, indent=1))

    print("\n" + write_table(results, output / "recipes.md"))
    write_plot(results, output / "recipes.png")
    print(f"results: {results_path}, table: {output / 'recipes.md'}, plot: {output / 'recipes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
