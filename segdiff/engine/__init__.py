"""The conditional-diffusion engine shared by every bundle: batch preparation, sampling, training handlers."""

from .autoencoder import (
    AutoencoderLoss,
    AutoencoderTrainingStep,
    LatentScaleFactor,
    ModalityReconstructionMetrics,
    ReconstructionInferer,
    ReconstructionMetricsHandler,
    ReconstructionPrepareBatch,
    kl_divergence,
    latent_scale_factor,
    read_latent_scale_factor,
    reconstruction_metrics,
    write_latent_scale_factor,
)
from .condition_encoder import ConditionEncoderDiffusion, describe_encoder, segmentation_diffusion_network
from .distributed import end_distributed_run
from .dpm_solver import DPMSolverScheduler
from .handlers import (
    CopyWeights,
    GradientClipping,
    LearningRateLogger,
    SampleGridHandler,
    TrainingCheckpoint,
    WallTimeLimit,
    atomic_torch_save,
    check_run_folder,
)
from .latent import (
    ControlNetDiffusion,
    EmptyLabeld,
    LatentDiffusionPrepareBatch,
    LatentDiffusionSampler,
    controlnet_from_unet,
    empty_mask,
    latent_geometry,
    modality_ids,
    null_class,
)
from .latent_inference import LatentGridSampler, check_model_grid, model_grid_divisor, trained_modalities
from .lr_schedule import WallTimeCosineSchedule, warmup_cosine_schedule
from .objective import (
    DIFFUSIONS,
    LOSS_WEIGHTINGS,
    TIMESTEP_SAMPLINGS,
    SEGMENTERS,
    DiffusionLoss,
    SegmentationDiffusionLoss,
    check_objective,
    check_segmentation_objective,
    check_segmenter,
    min_snr_weights,
    predicted_x0,
    training_scheduler,
    x0_from_output,
)
from .provenance import ModelRecord, describe_network, describe_transform, label_names_of, read_record, record_path
from .prepare import ConditionalDiffusionPrepareBatch, SamplingPrepareBatch
from .progress import TrainingProgress
from .sampler import CONDITION_KINDS, DDPM_SAMPLERS, SAMPLERS, ConditionalDiffusionSampler, EncoderMemberInferer, build_scheduler
