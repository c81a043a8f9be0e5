"""MONAI transforms for mask-conditioned diffusion: mask encodings, class ablation, slice sampling."""

from .mask import (
    MASK_ENCODINGS,
    MASK_VALUE_RANGES,
    EncodeMask,
    EncodeMaskd,
    MaskAblation,
    MaskAblationd,
    RandMaskAblation,
    RandMaskAblationd,
    encode_probabilities,
    encoded_mask_channels,
    mask_probabilities,
)
from .slicing import RandSliced
from .orientation import RequireOrientationd
from .io import SaveSamplesd, check_outputs_free, existing_outputs, sample_output_paths
from .ensemble import (
    FUSIONS,
    UNCERTAINTIES,
    EnsembleUncertainty,
    EnsembleUncertaintyd,
    FuseEnsemble,
    FuseEnsembled,
    MeanProbability,
    MeanProbabilityd,
    MemberLabels,
    MemberLabelsd,
    member_probabilities,
)
