"""Synthetic labelled data: images generated from masks, filtered by a judge segmenter, written as training pairs.

- :mod:`~segdiff.synthesis.filter`: per-class Dice of a pair and the pure, deterministic keep/reject decision
  (thresholds, relaxation, best ``keep_k``);
- :mod:`~segdiff.synthesis.variety`: random deformation of masks (affine, elastic; nearest interpolation);
- :mod:`~segdiff.synthesis.judges`: the segmenters that re-segment generated images;
- :mod:`~segdiff.synthesis.synthesize`: the per-mask loop (rounds of generation, judging, decision), resumable;
- :mod:`~segdiff.synthesis.records`: the output folder (pairs, datalist, records of every try, settings).
- :mod:`~segdiff.synthesis.shard`: the share of the masks of each process under torchrun;
- :mod:`~segdiff.synthesis.generate`: image/mask pairs (joint model) or masks (mask generator) drawn from noise,
  filtered and written like the pairs above;
- :mod:`~segdiff.synthesis.plausibility`: whether a generated mask looks like the training masks (volumes,
  connected components, body);
- :mod:`~segdiff.synthesis.latent_generator`: the latent_mask_to_image bundle's sampler as the synthesizer's generator
  (source-modality masks -> target-modality images).

``bundles/mask_to_image/configs/synthesize.yaml`` wires them to the bundle's model and sampler,
``bundles/latent_mask_to_image/configs/synthesize.yaml`` to the latent bundle's.
"""

from segdiff.synthesis.filter import (
    FilterCriteria,
    TryDecision,
    candidates_to_keep,
    enough_passed,
    pair_scores,
    select_tries,
)
from segdiff.synthesis.generate import (
    NoiseGenerator,
    SampleSynthesizer,
    generated_case_names,
    masks_on_grid,
    reference_grid,
    split_joint_sample,
)
from segdiff.synthesis.judges import (
    JUDGES,
    DiffusionEnsembleJudge,
    SegmenterJudge,
    build_judge,
    load_weights,
)
from segdiff.synthesis.latent_generator import LatentGenerator, source_mask_entries
from segdiff.synthesis.plausibility import ClassStatistics, MaskStatistics, PlausibilityFilter
from segdiff.synthesis.records import SynthesisRecords, file_digest, pair_names
from segdiff.synthesis.shard import process_shard, shard_of
from segdiff.synthesis.synthesize import (
    DiffusionGenerator,
    Synthesizer,
    case_name,
    derive_seed,
)
from segdiff.synthesis.variety import (
    DEFAULT_ELASTIC_2D,
    DEFAULT_ELASTIC_3D,
    RandMaskDeform,
    RandMaskDeformd,
)

__all__ = [
    "DEFAULT_ELASTIC_2D",
    "DEFAULT_ELASTIC_3D",
    "ClassStatistics",
    "MaskStatistics",
    "NoiseGenerator",
    "PlausibilityFilter",
    "JUDGES",
    "DiffusionEnsembleJudge",
    "DiffusionGenerator",
    "FilterCriteria",
    "LatentGenerator",
    "RandMaskDeform",
    "RandMaskDeformd",
    "SampleSynthesizer",
    "SegmenterJudge",
    "SynthesisRecords",
    "Synthesizer",
    "TryDecision",
    "build_judge",
    "candidates_to_keep",
    "case_name",
    "derive_seed",
    "enough_passed",
    "file_digest",
    "generated_case_names",
    "load_weights",
    "pair_names",
    "pair_scores",
    "process_shard",
    "masks_on_grid",
    "reference_grid",
    "select_tries",
    "shard_of",
    "source_mask_entries",
    "split_joint_sample",
]
