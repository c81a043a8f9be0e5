"""The conditional-diffusion engine shared by every bundle: batch preparation, sampling, training handlers."""

from .handlers import (
    CopyWeights,
    GradientClipping,
    LearningRateLogger,
    SampleGridHandler,
    TrainingCheckpoint,
    WallTimeLimit,
    atomic_torch_save,
)
from .prepare import ConditionalDiffusionPrepareBatch, SamplingPrepareBatch
from .sampler import SAMPLERS, ConditionalDiffusionSampler, build_scheduler
