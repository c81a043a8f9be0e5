"""Bring models trained elsewhere into the bundles: diffusers ``UNet2DModel`` checkpoints (Konz et al.'s released
segmentation-guided models) -> a ``DiffusionModelUNet`` state dict and a config overlay for mask_to_image."""

from .diffusers_unet import (
    CONFIG_NAME,
    DIFFUSERS_UNET_DEFAULTS,
    OVERLAY_NAME,
    WEIGHTS_NAMES,
    ConvertedModel,
    UnsupportedConfigError,
    convert_diffusers_unet,
    find_unet_dir,
    load_diffusers_weights,
    read_diffusers_config,
    rename_diffusers_weights,
    run_command,
    unet_parameters,
)
