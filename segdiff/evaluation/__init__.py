"""Evaluation: reference segmenters and the faithfulness of generated images to their masks."""

from .faithfulness import check_generated_exist, evaluate_faithfulness, markdown_table
from .segmenter import SegmenterInferer, per_class_dice, per_class_iou, segment_case
from .ensemble_metrics import expected_calibration_error, segmentation_scores, summarize, uncertainty_error_auroc
from .ensemble_report import check_segmentation_outputs, ensemble_markdown, evaluate_ensemble
from . import downstream, image_quality
from .downstream import run_downstream
from .image_quality import fid, mmd, ms_ssim_diversity
