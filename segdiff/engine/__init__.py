"""The conditional-diffusion engine shared by every bundle: batch preparation, sampling, training handlers."""

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
from .objective import (
    DIFFUSIONS,
    LOSS_WEIGHTINGS,
    TIMESTEP_SAMPLINGS,
    DiffusionLoss,
    check_objective,
    min_snr_weights,
    training_scheduler,
)
from .provenance import ModelRecord, describe_network, describe_transform, label_names_of, read_record, record_path
from .prepare import ConditionalDiffusionPrepareBatch, SamplingPrepareBatch
from .progress import TrainingProgress
from .sampler import CONDITION_KINDS, DDPM_SAMPLERS, SAMPLERS, ConditionalDiffusionSampler, build_scheduler
