"""The evaluations rebuilt on MONAI's evaluators and metric classes give the numbers the hand-written loops gave.

The expected values were recorded by running the old drivers (``evaluate_faithfulness``, ``evaluate_ensemble``,
``run_downstream`` as last changed in commit 0129806) on the files of tests/test_evaluation_fixture.py; the per-case figures
of the reports are rounded to 4 decimals (as the reports always were), the ensemble summary is not. Paths are compared by
file name. The segmenter sees slices at their own size (``INFER_SIZE = None``), so these numbers do not depend on how
``segdiff.engine.grid.resize`` interpolates.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from bundle_utils import run_bundle, write_synthetic_set
from monai.data import DataLoader, Dataset
from monai.transforms import AsDiscreted

import test_evaluation_fixture as fx
from segdiff.data.datalist import resolve_datalist
from segdiff.evaluation import SegmenterInferer
from segdiff.evaluation.downstream import arm_data, real_subset, run_arms, score_arm, train_segmenter, write_downstream_report
from segdiff.evaluation.faithfulness import real_entries

TOLERANCE = 1e-6


def assert_same(found, expected, where="report"):
    """Equal structure, equal strings and None, numbers within TOLERANCE (relative, and absolute near 0)."""
    if isinstance(expected, dict):
        assert isinstance(found, dict) and list(found) == list(expected), f"{where}: keys {list(found)} != {list(expected)}"
        for key in expected:
            assert_same(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), f"{where}: {found} != {expected}"
        for i, (f, e) in enumerate(zip(found, expected)):
            assert_same(f, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert isinstance(found, (int, float)) and math.isclose(found, expected, rel_tol=TOLERANCE, abs_tol=TOLERANCE), \
            f"{where}: {found} != {expected}"
    else:
        assert found == expected, f"{where}: {found!r} != {expected!r}"


def by_file_name(report, keys):
    for case in report["cases"]:
        for key in keys:
            case[key] = Path(case[key]).name
    return report


OLD_FAITHFULNESS = {'classes': ['class_1', 'class_2'],
 'generated': {'per_class_dice': {'class_1': 0.9116, 'class_2': 0.842}, 'mean_dice': 0.8768, 'num_images': 4},
 'real': {'per_class_dice': {'class_1': 0.9826, 'class_2': 0.9863}, 'mean_dice': 0.9844, 'num_images': 2},
 'cases': [{'label': 'case2.nii.gz',
            'generated_dice': [[0.9953, 0.9974], [0.8496, 0.7238]],
            'real_dice': [0.9892, 0.9852]},
           {'label': 'case3.nii.gz',
            'generated_dice': [[0.9848, 0.9948], [0.8165, 0.6522]],
            'real_dice': [0.976, 0.9873]}]}

OLD_FAITHFULNESS_MD = ('# Faithfulness: Dice between each mask and the segmentation of the image generated from it\n'
 '\n'
 '| images | class_1 | class_2 | mean | n |\n'
 '|---|---|---|---|---|\n'
 '| generated (faithfulness) | 0.912 | 0.842 | 0.877 | 4 |\n'
 '| real test images (ceiling) | 0.983 | 0.986 | 0.984 | 2 |\n')

OLD_ENSEMBLE = {'classes': ['class_1', 'class_2'],
 'fused': {'num_cases': 2,
           'dice': {'mean': 0.6362398415803909, 'per_class': [0.8623919785022736, 0.4100877046585083]},
           'hd95': {'mean': 8.988961219787598, 'per_class': [5.25, 12.727922439575195]},
           'auroc': {'mean': 0.9256050072988179},
           'ece': {'mean': 0.08473552291591963}},
 'cases': [{'image': 'case0.nii.gz',
            'fused': {'dice': [0.9373, 0.8202], 'hd95': [4.5, 12.7279], 'auroc': 0.9312, 'ece': 0.0857},
            'single_member': {'dice': [0.8857, 0.8074], 'hd95': [4.0, 12.7279]}},
           {'image': 'case1.nii.gz',
            'fused': {'dice': [0.7875, 0.0], 'hd95': [6.0, None], 'auroc': 0.92, 'ece': 0.0838}}],
 'single_member': {'num_cases': 1,
                   'dice': {'mean': 0.846585601568222, 'per_class': [0.8857465982437134, 0.8074246048927307]},
                   'hd95': {'mean': 8.363961219787598, 'per_class': [4.0, 12.727922439575195]}}}

OLD_ENSEMBLE_MD = ('# Segmentation and uncertainty on the test split\n'
 '\n'
 '| segmentation | Dice class_1 | Dice class_2 | mean Dice | mean HD95 (mm) | uncertainty AUROC | ECE |\n'
 '|---|---|---|---|---|---|---|\n'
 '| fused ensemble | 0.862 | 0.410 | 0.636 | 8.989 | 0.926 | 0.085 |\n'
 '| single member | 0.886 | 0.807 | 0.847 | 8.364 |  |  |\n')

OLD_DOWNSTREAM = {'classes': ['class_1', 'class_2'],
 'arms': {'real': {'real_cases': 2,
                   'synthetic_pairs': 0,
                   'dice': {'class_1': 0.3295, 'class_2': 0.5082},
                   'mean_dice': 0.4189,
                   'iou': {'class_1': 0.1974, 'class_2': 0.3407},
                   'mean_iou': 0.2691},
          'synthetic': {'real_cases': 0,
                        'synthetic_pairs': 3,
                        'dice': {'class_1': 0.3249, 'class_2': 0.496},
                        'mean_dice': 0.4104,
                        'iou': {'class_1': 0.1939, 'class_2': 0.3299},
                        'mean_iou': 0.2619},
          'mixed': {'real_cases': 2,
                    'synthetic_pairs': 3,
                    'dice': {'class_1': 0.3437, 'class_2': 0.5539},
                    'mean_dice': 0.4488,
                    'iou': {'class_1': 0.2075, 'class_2': 0.383},
                    'mean_iou': 0.2953}},
 'cases': [{'image': 'case3.nii.gz',
            'label': 'case3.nii.gz',
            'real': {'dice': [0.3496, 0.5114], 'iou': [0.2118, 0.3436]},
            'synthetic': {'dice': [0.3289, 0.5094], 'iou': [0.1968, 0.3417]},
            'mixed': {'dice': [0.3429, 0.5585], 'iou': [0.207, 0.3874]}},
           {'image': 'case4.nii.gz',
            'label': 'case4.nii.gz',
            'real': {'dice': [0.3095, 0.505], 'iou': [0.1831, 0.3378]},
            'synthetic': {'dice': [0.3208, 0.4827], 'iou': [0.191, 0.3181]},
            'mixed': {'dice': [0.3444, 0.5493], 'iou': [0.208, 0.3786]}}]}

OLD_DOWNSTREAM_MD = ('# Downstream segmentation on the real test split, by training data\n'
 '\n'
 'Same network, initial weights, seed and iterations in every row (num_iterations 2, batch_size 2, seed 0).\n'
 '\n'
 '| training data | real cases | synthetic pairs | Dice class_1 | Dice class_2 | mean Dice | IoU class_1 | IoU '
 'class_2 | mean IoU |\n'
 '|---|---|---|---|---|---|---|---|---|\n'
 '| real only | 2 | 0 | 0.330 | 0.508 | 0.419 | 0.197 | 0.341 | 0.269 |\n'
 '| synthetic only | 0 | 3 | 0.325 | 0.496 | 0.410 | 0.194 | 0.330 | 0.262 |\n'
 '| real + synthetic | 2 | 3 | 0.344 | 0.554 | 0.449 | 0.207 | 0.383 | 0.295 |\n'
 '\n'
 '![Dice and IoU per class](downstream.png)\n')


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("faithfulness")
    datalist = fx.write_real(root / "real")
    generated_dir = fx.write_generated(datalist, root / "generated", samples_per_mask=2)
    torch.save(fx.FixedSegmenter().state_dict(), root / "segmenter.pt")
    return root, generated_dir


def run_evaluate(root, generated_dir, report_dir, **extra):
    run_bundle("mask_to_image", ["evaluate.yaml"], dataset_dir=str(root / "real"), bundle_root=str(root / "bundle"),
               num_classes=fx.NUM_CLASSES, image_size="$None", output_dir=str(generated_dir), report_dir=str(report_dir),
               segmenter_path=str(root / "segmenter.pt"), segmenter_def={"_target_": "test_evaluation_fixture.FixedSegmenter"},
               num_workers=0, **extra)
    return json.loads((report_dir / "faithfulness.json").read_text())


def test_faithfulness_through_evaluate_yaml_equals_the_old_loop(generated):
    root, generated_dir = generated
    report = run_evaluate(root, generated_dir, root / "report", samples_per_mask=2)
    assert_same(by_file_name(report, ["label"]), OLD_FAITHFULNESS)
    assert (root / "report" / "faithfulness.md").read_text() == OLD_FAITHFULNESS_MD


def test_faithfulness_accepts_the_old_key_num_samples_with_a_warning(generated):
    root, generated_dir = generated
    with pytest.warns(FutureWarning, match="'num_samples' is deprecated.*'samples_per_mask'"):
        report = run_evaluate(root, generated_dir, root / "report_old_key", num_samples=2)
    assert_same(by_file_name(report, ["label"]), OLD_FAITHFULNESS)


def test_ensemble_evaluation_through_evaluate_yaml_equals_the_old_loop(tmp_path):
    datalist, out = fx.write_outputs(tmp_path / "data")
    run_bundle("image_to_mask", ["evaluate.yaml"], dataset_dir=str(datalist.parent), bundle_root=str(tmp_path / "b"),
               num_classes=fx.NUM_CLASSES, output_dir=str(out), report_dir=str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "ensemble_evaluation.json").read_text())
    assert_same(by_file_name(report, ["image"]), OLD_ENSEMBLE)
    assert (tmp_path / "report" / "ensemble_evaluation.md").read_text() == OLD_ENSEMBLE_MD


def test_downstream_stages_equal_the_old_run_downstream(tmp_path):
    datalist = fx.write_real(tmp_path / "down", {"training": 3, "test": 2})
    synthetic = resolve_datalist(write_synthetic_set(tmp_path / "syn", datalist, samples=1), None, "training")
    real = real_subset(resolve_datalist(datalist, None, "training"), num_cases=2, seed=0)
    test = resolve_datalist(datalist, None, "test")
    train = functools.partial(train_segmenter, transform=fx.downstream_transform(), num_iterations=2, batch_size=2,
                              optimizer=fx.downstream_optimizer, loss_function=fx.downstream_loss, device="cpu", seed=0,
                              progress=False)
    loader = DataLoader(Dataset(real_entries(test), fx.load_real()), batch_size=1)
    postprocessing = AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[fx.NUM_CLASSES] * 2)
    score = functools.partial(score_arm, data_loader=loader, inferer=SegmenterInferer(2, fx.INFER_SIZE),
                              postprocessing=postprocessing, device="cpu", metrics_dir=str(tmp_path / "report"))
    arms = run_arms(arm_data(["real", "synthetic", "mixed"], real, synthetic), fx.downstream_network(), train, score,
                    len(real), str(tmp_path / "report"))
    settings = {"num_iterations": 2, "batch_size": 2, "seed": 0}
    report = write_downstream_report(arms, test, str(tmp_path / "report"), settings=settings)
    assert_same(by_file_name({k: report[k] for k in ("classes", "arms", "cases")}, ["image", "label"]), OLD_DOWNSTREAM)
    assert (tmp_path / "report" / "downstream.md").read_text() == OLD_DOWNSTREAM_MD
    assert (tmp_path / "report" / "real_dice_raw.csv").exists() and (tmp_path / "report" / "mixed_iou_raw.csv").exists()
