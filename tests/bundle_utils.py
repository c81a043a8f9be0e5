"""Helpers for running the bundles in tests: tiny networks, small synthetic data sets with non-trivial affines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"

#: overrides that make any bundle's diffusion network tiny (seconds per epoch on a CPU)
TINY_NETWORK = {
    "network_def#channels": [8, 16],
    "network_def#attention_levels": [False, True],
    "network_def#num_res_blocks": 1,
    "network_def#num_head_channels": 8,
    "network_def#norm_num_groups": 8,
}
TINY_TRAINING = {
    "batch_size": 8,
    "slices_per_volume": 4,
    "val_interval": 1,
    "num_inference_steps": 3,
    "num_workers": 0,
    "warmup_steps": 2,
}


def anisotropic_affine(shift: float = 0.0) -> np.ndarray:
    """Spacing 1.5 x 2 x 3 mm, an offset and a small rotation: a lost or altered affine cannot pass for identity."""
    angle = 0.1
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 3.0])
    affine[:3, 3] = [-20.0 + shift, 10.0, 5.0]
    return affine


def phantom(shape: tuple[int, ...], num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A label map of nested boxes (classes 1..num_classes-1) and an image whose intensity rises with the class."""
    label = np.zeros(shape, dtype=np.uint8)
    for c in range(1, num_classes):
        margin = [max(1, int(s * 0.12 * c)) for s in shape]
        jitter = [int(rng.integers(0, 2)) for _ in shape]
        box = tuple(slice(m + j, s - m + j) for m, j, s in zip(margin, jitter, shape))
        label[box] = c
    image = label.astype(np.float32) * 100.0 + rng.normal(0, 10.0, shape).astype(np.float32)
    return image, label


def write_dataset(
    root: Path,
    shape: tuple[int, ...] = (20, 16, 12),
    num_classes: int = 3,
    splits: dict[str, int] | None = None,
    image_channels: int = 1,
    seed: int = 0,
) -> Path:
    """Write ``images/``, ``labels/`` and ``datalist.json`` (relative paths); returns the datalist path."""
    rng = np.random.default_rng(seed)
    splits = splits or {"training": 3, "validation": 1, "test": 2}
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    datalist: dict[str, list] = {}
    case = 0
    for split, count in splits.items():
        datalist[split] = []
        for _ in range(count):
            image, label = phantom(shape, num_classes, rng)
            affine = anisotropic_affine(shift=case)
            if image_channels == 1:
                image_entry = f"images/case{case}.nii.gz"
                nib.save(nib.Nifti1Image(image, affine), str(root / image_entry))
            else:  # one file per channel, nnU-Net style
                image_entry = [f"images/case{case}_{k:04d}.nii.gz" for k in range(image_channels)]
                for k, path in enumerate(image_entry):
                    nib.save(nib.Nifti1Image(image * (k + 1), affine), str(root / path))
            nib.save(nib.Nifti1Image(label, affine), str(root / "labels" / f"case{case}.nii.gz"))
            datalist[split].append({"image": image_entry, "label": f"labels/case{case}.nii.gz"})
            case += 1
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def raises_with(message: str, function, *args, **kwargs) -> BaseException:
    """Call ``function`` and check that it raises an error whose message, or the message of an error it was raised
    from (MONAI wraps config errors), contains ``message``; returns that error."""
    try:
        function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        chain, current = [], error
        while current is not None:
            chain.append(current)
            current = current.__cause__ or current.__context__
        for item in chain:
            if message in str(item):
                return item
        raise AssertionError(f"no error in the chain mentions {message!r}: {[str(c)[:200] for c in chain]}") from error
    raise AssertionError(f"expected an error mentioning {message!r}, nothing was raised")


def run_bundle(bundle: str, configs: list[str], run_id: str | None = None, **overrides) -> None:
    """Run a bundle config in this process, as ``python -m monai.bundle run`` does."""
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(BUNDLES / bundle)
    try:
        kwargs = {"run_id": run_id} if run_id else {}
        run(config_file=[f"configs/{c}" for c in configs], **kwargs, **overrides)
    finally:
        os.chdir(cwd)


def run_bundle_cli(bundle: str, configs: list[str], run_id: str | None = None, launcher: list[str] | None = None,
                   timeout: int = 600, **overrides) -> subprocess.CompletedProcess:
    """Run a bundle config with the command line a user types; returns the finished process (output captured)."""
    command = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run"] + ([run_id] if run_id else [])
    command += ["--config_file", repr([f"configs/{c}" for c in configs])]
    for key, value in overrides.items():
        command += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    return subprocess.run(command, cwd=BUNDLES / bundle, capture_output=True, text=True, timeout=timeout)


#: ``python -m torch.distributed.run`` with two processes (gloo on a CPU), as ``torchrun`` would start them
TORCHRUN_TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def missing_properties(bundle: str, **overrides) -> dict[str, list[str]]:
    """``ConfigWorkflow(...).check_properties()`` of the bundle's train and inference configs after ``initialize``
    (which needs data and weights, given by ``overrides``); returns config name -> missing required properties."""
    from monai.bundle import ConfigWorkflow

    missing = {}
    configs = BUNDLES / bundle / "configs"
    for config, kind in (("train.yaml", "train"), ("inference.yaml", "infer")):
        workflow = ConfigWorkflow(
            config_file=str(configs / config),
            meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"),
            workflow_type=kind,
            **overrides,
        )
        workflow.initialize()
        missing[config] = workflow.check_properties()
    return missing


def workflow_missing_properties(bundle: str, configs: list[str], workflow_type: str, **overrides) -> list[str]:
    """``check_properties()`` of one workflow made of ``configs`` (a base config and its overlays, merged in order)
    after ``initialize``, then ``finalize`` (which closes writers and, for multi_gpu_train.yaml, the process group)."""
    from monai.bundle import ConfigWorkflow

    folder = BUNDLES / bundle / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(folder / c) for c in configs],
        meta_file=str(folder / "metadata.json"),
        logging_file=str(folder / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    try:
        return workflow.check_properties()
    finally:
        workflow.finalize()


def write_synthetic_set(root: Path, real_datalist: Path, samples: int = 2, split: str = "training", seed: int = 1) -> Path:
    """Stand-in for synthesize.yaml's output: for every ``split`` case of ``real_datalist``, ``samples`` noisy copies
    of its image as ``images/<case>_syn<k>.nii.gz`` with its label as ``labels/<case>_syn<k>.nii.gz`` (on the real
    grid) and ``datalist.json`` (paths relative to ``root``); returns the datalist path."""
    rng = np.random.default_rng(seed)
    real_root = real_datalist.parent
    real = json.loads(real_datalist.read_text())
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    entries = []
    for entry in real[split]:
        image_file = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
        case = Path(entry["label"]).name[: -len(".nii.gz")]
        image, label = nib.load(str(real_root / image_file)), nib.load(str(real_root / entry["label"]))
        for k in range(samples):
            data = image.get_fdata().astype(np.float32) + rng.normal(0, 5.0, image.shape).astype(np.float32)
            nib.save(nib.Nifti1Image(data, image.affine), str(root / "images" / f"{case}_syn{k}.nii.gz"))
            nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine), str(root / "labels" / f"{case}_syn{k}.nii.gz"))
            # the scores synthesize.yaml records with each pair (nested, with nulls) ride along, as in its datalist
            entries.append({"image": f"images/{case}_syn{k}.nii.gz", "label": f"labels/{case}_syn{k}.nii.gz",
                            "case": case, "dice": {"class_1": 0.9, "class_2": None}, "mean_dice": 0.9})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries, "labels": real.get("labels", {})}, indent=1))
    return path
