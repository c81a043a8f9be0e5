"""Evaluation: reference segmenters, the faithfulness of generated images to their masks, image -> mask ensembles,
image quality and the downstream value of synthetic data, all reported by :mod:`segdiff.evaluation.report`."""

from .segmenter import SegmenterInferer, TrainingStopReport, per_class_dice, per_class_iou, segment_case, segmenter_training
from .ensemble_metrics import (
    TopLabelCalibrationError,
    UncertaintyErrorAUROC,
    expected_calibration_error,
    paired_pooled_dice_bootstrap,
    segmentation_scores,
    summarize,
    uncertainty_error_auroc,
)
from . import report
from .report import EvaluationInputError, MissingOutputsError, write_report
from .faithfulness import check_generated_exist, faithfulness_markdown, generated_entries, write_faithfulness_report
from .ensemble_report import check_segmentation_outputs, ensemble_markdown, evaluate_ensemble, output_entries
from . import downstream, image_quality
from .image_quality import fid, mmd, ms_ssim_diversity
