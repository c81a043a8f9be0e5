"""Convert a diffusers ``UNet2DModel`` checkpoint to a MONAI ``DiffusionModelUNet`` for the mask_to_image bundle.

Konz et al. released their segmentation-guided models (breast MRI, CT organs) as a diffusers folder: ``config.json``
plus ``diffusion_pytorch_model.safetensors`` (or ``.bin`` from older diffusers). The architecture maps one to one
onto ``DiffusionModelUNet``; only the tensor names differ. This module reads the folder without diffusers itself
(json, safetensors and torch only), checks every configuration field against what ``DiffusionModelUNet`` computes,
renames the weights, proves they load strictly, and writes

    OUT/models/model.pt           the state dict of ``network_def`` (what inference.yaml's CheckpointLoader loads)
    OUT/configs/converted.yaml    an overlay for inference.yaml: network, image size and channels, the legacy mask
                                  encoding (class_index / 255), epsilon prediction, DDIM-50 in fp32

so that ``--config_file "['.../mask_to_image/configs/inference.yaml','OUT/configs/converted.yaml']" --bundle_root
OUT`` samples with the released weights the way the original code does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "CONFIG_NAME",
    "DIFFUSERS_UNET_DEFAULTS",
    "OVERLAY_NAME",
    "WEIGHTS_NAMES",
    "ConvertedModel",
    "UnsupportedConfigError",
    "convert_diffusers_unet",
    "find_unet_dir",
    "load_diffusers_weights",
    "read_diffusers_config",
    "rename_diffusers_weights",
    "run_command",
    "unet_parameters",
]

CONFIG_NAME = "config.json"
#: weight files in the order diffusers prefers them
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: the overlay's file name under ``OUT/configs``
OVERLAY_NAME = "converted.yaml"

#: ``UNet2DModel``'s defaults: diffusers fills a field missing from ``config.json`` with these (older releases wrote
#: fewer fields), so the converter does the same before checking.
DIFFUSERS_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,  # only used by learned time embeddings, which are rejected
}

#: fields whose only accepted value is the one DiffusionModelUNet computes: field -> (accepted values, why)
_FIXED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "center_input_sample": ((False,), "DiffusionModelUNet takes its input as it is (no 2x - 1 rescaling)"),
    "time_embedding_type": (("positional",), "DiffusionModelUNet has sinusoidal (positional) timestep embeddings"),
    "freq_shift": ((0,), "DiffusionModelUNet's sinusoidal embedding divides the frequencies by half_dim (freq_shift 0)"),
    "flip_sin_to_cos": ((True,), "DiffusionModelUNet's timestep embedding puts cos before sin (flip_sin_to_cos true)"),
    "mid_block_type": (("UNetMidBlock2D",), "DiffusionModelUNet always has a middle block of resnet, attention, resnet"),
    "mid_block_scale_factor": ((1.0,), "DiffusionModelUNet's middle block does not rescale its outputs"),
    "downsample_padding": ((1,), "DiffusionModelUNet downsamples with a stride-2 3x3 convolution padded by 1"),
    "downsample_type": (("conv",), "DiffusionModelUNet downsamples with a convolution, not a resnet block"),
    "upsample_type": (("conv",), "DiffusionModelUNet upsamples by nearest interpolation and a convolution"),
    "dropout": ((0.0,), "DiffusionModelUNet's resnet blocks have no dropout"),
    "act_fn": (("silu", "swish"), "DiffusionModelUNet uses SiLU (swish) activations"),
    "resnet_time_scale_shift": (("default",), "DiffusionModelUNet adds the timestep embedding (no scale-shift norm)"),
    "add_attention": ((True,), "DiffusionModelUNet's middle block always has attention"),
    "class_embed_type": ((None,), "class-conditional models are not what mask_to_image samples"),
    "num_class_embeds": ((None,), "class-conditional models are not what mask_to_image samples"),
}
_DOWN, _ATTN_DOWN, _UP, _ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

# diffusers name -> DiffusionModelUNet name, applied in order to every key; the attention tensors come under two
# generations of names: to_q/to_k/to_v/to_out.0 (current diffusers) and query/key/value/proj_attn (older releases)
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^conv_in\.", "conv_in.conv."),
    (r"^time_embedding\.linear_1\.", "time_embed.0."),
    (r"^time_embedding\.linear_2\.", "time_embed.2."),
    (r"^mid_block\.resnets\.0\.", "middle_block.resnet_1."),
    (r"^mid_block\.resnets\.1\.", "middle_block.resnet_2."),
    (r"^mid_block\.attentions\.0\.", "middle_block.attention."),
    (r"\.downsamplers\.0\.conv\.", ".downsampler.op.conv."),
    (r"\.upsamplers\.0\.conv\.", ".upsampler.postconv.conv."),
    (r"(\.resnets\.\d+|\.resnet_[12])\.(conv1|conv2)\.", r"\1.\2.conv."),
    (r"(\.resnets\.\d+|\.resnet_[12])\.conv_shortcut\.", r"\1.skip_connection.conv."),
    (r"(\.attentions\.\d+|\.attention)\.group_norm\.", r"\1.norm."),
    (r"(\.attentions\.\d+|\.attention)\.(?:to_q|query)\.", r"\1.attn.to_q."),
    (r"(\.attentions\.\d+|\.attention)\.(?:to_k|key)\.", r"\1.attn.to_k."),
    (r"(\.attentions\.\d+|\.attention)\.(?:to_v|value)\.", r"\1.attn.to_v."),
    (r"(\.attentions\.\d+|\.attention)\.(?:to_out\.0|proj_attn)\.", r"\1.attn.out_proj."),
    (r"^conv_norm_out\.", "out.0."),
    (r"^conv_out\.", "out.2.conv."),
)


class UnsupportedConfigError(ValueError):
    """A diffusers configuration field whose value ``DiffusionModelUNet`` cannot reproduce."""


class ConvertedModel(NamedTuple):
    """What :func:`convert_diffusers_unet` wrote and from what."""

    model_path: Path
    config_path: Path
    network_parameters: dict[str, Any]
    overlay: dict[str, Any]
    num_tensors: int
    num_parameters: int
    source_config: Path
    source_weights: Path


# ------------------------------------------------------------------------------------------------------ reading
def find_unet_dir(path: str | os.PathLike) -> Path:
    """The folder holding ``config.json``: ``path`` itself, or its ``unet/`` subfolder (a whole pipeline download)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"diffusers model folder not found: {path}")
    for candidate in (path, path / "unet"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no {CONFIG_NAME} there nor in {path / 'unet'}; a diffusers UNet2DModel folder has one (for a lone "
        "weights file, write it as bundles/mask_to_image/docs/released_checkpoints.md shows)"
    )


def read_diffusers_config(unet_dir: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """``config.json`` of a diffusers UNet folder with diffusers' defaults filled in; returns it and its path."""
    path = find_unet_dir(unet_dir) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return {**DIFFUSERS_UNET_DEFAULTS, **config}, path


def _weights_file(folder: Path) -> Path:
    """diffusers' file name, safetensors first; else the folder's only ``.safetensors`` / ``.bin`` file (checkpoints
    shared as ``<name>.safetensors``)."""
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return folder / name
    for suffix in (".safetensors", ".bin"):
        found = sorted(folder.glob(f"*{suffix}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{folder}: several {suffix} files ({', '.join(f.name for f in found)}) and none named "
                             f"{' or '.join(WEIGHTS_NAMES)}: keep the one to convert")
    raise FileNotFoundError(f"{folder}: no weights file ({' or '.join(WEIGHTS_NAMES)})")


def load_diffusers_weights(unet_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a diffusers UNet folder (safetensors preferred, else ``.bin`` read with
    ``weights_only=True``); returns it and the file it came from."""
    path = _weights_file(find_unet_dir(unet_dir))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), path
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as e:  # a damaged or foreign file: say which one
        raise ValueError(f"cannot read the weights in {path}: {e}") from e


# ----------------------------------------------------------------------------------------------- configuration
def _unsupported(source: Path | str, field: str, value: Any, supported: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{source}: {field} = {json.dumps(value)} is not supported; {supported}.")


def _same(value: Any, accepted: Any) -> bool:
    """``value == accepted`` without Python's ``True == 1`` and ``None``-versus-falsy confusions."""
    if accepted is None or isinstance(accepted, bool) or isinstance(value, bool) or value is None:
        return value is accepted
    return type(value) in (int, float, str) and value == accepted


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def unet_parameters(config: Mapping[str, Any], source: Path | str = CONFIG_NAME) -> dict[str, Any]:
    """The ``DiffusionModelUNet`` arguments equivalent to a diffusers ``UNet2DModel`` configuration.

    Every field is checked; a value DiffusionModelUNet does not compute the same way raises
    :class:`UnsupportedConfigError` naming ``source``, the field, its value and what is supported.

    Args:
        config: the configuration, defaults filled in (see :func:`read_diffusers_config`).
        source: where it came from, for the messages.
    """
    known = set(DIFFUSERS_UNET_DEFAULTS)
    for field in config:
        if field.startswith("_") or field in known:
            continue
        raise _unsupported(source, field, config[field], f"it is not a UNet2DModel field this converter knows "
                           f"(known: {', '.join(sorted(known))})")
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise _unsupported(source, "_class_name", class_name, "only UNet2DModel maps onto DiffusionModelUNet")
    for field, (accepted, why) in _FIXED_FIELDS.items():
        value = config[field]
        if not any(_same(value, a) for a in accepted):
            allowed = " or ".join(json.dumps(a) for a in accepted)
            raise _unsupported(source, field, value, f"supported: {allowed} ({why})")

    channels = config["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels or not all(_positive_int(c) for c in channels):
        raise _unsupported(source, "block_out_channels", channels, "expected a list of positive integers")
    channels = [int(c) for c in channels]
    levels = len(channels)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for field, blocks, allowed in (("down_block_types", down, (_DOWN, _ATTN_DOWN)), ("up_block_types", up, (_UP, _ATTN_UP))):
        if len(blocks) != levels:
            raise _unsupported(source, field, blocks, f"expected one block per entry of block_out_channels ({levels})")
        for i, block in enumerate(blocks):
            if block not in allowed:
                raise _unsupported(source, f"{field}[{i}]", block, f"supported: {' or '.join(allowed)}")
    attention_levels = [block == _ATTN_DOWN for block in down]
    for i, block in enumerate(up):
        level = levels - 1 - i
        if (block == _ATTN_UP) != attention_levels[level]:
            raise _unsupported(
                source, f"up_block_types[{i}]", block,
                f"down_block_types[{level}] is {down[level]!r} and DiffusionModelUNet has attention at the same levels "
                f"on the way down and up: expected {(_ATTN_UP if attention_levels[level] else _UP)!r}",
            )

    layers = config["layers_per_block"]
    if not _positive_int(layers):
        raise _unsupported(source, "layers_per_block", layers, "expected one positive integer for every level")
    out_channels, in_channels = config["out_channels"], config["in_channels"]
    if not _positive_int(out_channels):
        raise _unsupported(source, "out_channels", out_channels, "expected a positive integer (the image channels)")
    if not _positive_int(in_channels) or in_channels - out_channels not in (0, 1):
        raise _unsupported(
            source, "in_channels", in_channels,
            f"expected out_channels + 1 = {out_channels + 1} (the image channels, then one mask channel holding "
            f"class_index / 255, as Konz et al.'s models) or out_channels = {out_channels} (an unconditional model)",
        )

    groups = config["norm_num_groups"]
    if not _positive_int(groups) or any(c % groups for c in channels):
        raise _unsupported(source, "norm_num_groups", groups, f"expected a positive divisor of every block_out_channels {channels}")
    attn_groups = config["attn_norm_num_groups"]
    if attn_groups is not None and attn_groups != groups:
        raise _unsupported(
            source, "attn_norm_num_groups", attn_groups,
            f"supported: null or norm_num_groups ({groups}); DiffusionModelUNet normalises attention inputs with "
            "the same groups as its resnets",
        )
    eps = config["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise _unsupported(source, "norm_eps", eps, "expected a positive number")
    embedding_dim = config["time_embedding_dim"]
    if embedding_dim is not None and embedding_dim != 4 * channels[0]:
        raise _unsupported(
            source, "time_embedding_dim", embedding_dim,
            f"supported: null or 4 x block_out_channels[0] = {4 * channels[0]} (DiffusionModelUNet's width)",
        )

    # diffusers' attention_head_dim is the width of one head (heads = channels // attention_head_dim), which is
    # MONAI's num_head_channels; null means one head as wide as the block
    head_dim = config["attention_head_dim"]
    if head_dim is None:
        head_channels: int | list[int] = list(channels)
    else:
        attended = sorted({channels[i] for i in range(levels) if attention_levels[i]} | {channels[-1]})
        if not _positive_int(head_dim) or any(c % head_dim for c in attended):
            raise _unsupported(
                source, "attention_head_dim", head_dim,
                f"expected null or a positive divisor of the channels of every attention block and the middle block "
                f"{attended} (it is the width of one head)",
            )
        head_channels = int(head_dim)

    return {
        "spatial_dims": 2,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "channels": channels,
        "attention_levels": attention_levels,
        "num_res_blocks": int(layers),
        "num_head_channels": head_channels,
        "norm_num_groups": int(groups),
        "norm_eps": float(eps),
    }


def _image_size(config: Mapping[str, Any], source: Path | str) -> list[int] | None:
    size = config["sample_size"]
    if size is None:
        return None
    if _positive_int(size):
        return [int(size), int(size)]
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(s) for s in size):
        return [int(s) for s in size]  # (height, width): our first array axis is the height, as in diffusers
    raise _unsupported(source, "sample_size", size, "expected null, an integer or [height, width]")


# ----------------------------------------------------------------------------------------------------- weights
def rename_diffusers_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DModel`` state dict (current or older attention names) to ``DiffusionModelUNet``'s
    names; floating tensors become float32. Keys no rule matches keep their name (a strict load then reports them)."""
    renamed = {}
    for key, tensor in state_dict.items():
        new = key
        for pattern, replacement in _RENAMES:
            new = re.sub(pattern, replacement, new)
        if new in renamed:
            raise ValueError(f"two weights map onto {new!r} (one of them is {key!r}): mixed old and new names?")
        renamed[new] = tensor.float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
    return renamed


def _check_loads(network: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: Path) -> None:
    """Raise with the first differences if ``weights`` do not fit ``network`` name for name and shape for shape."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for what, items in (("missing", missing), ("not used", unexpected), ("wrong shape", wrong)) if items]
        raise ValueError(f"{source}: the weights do not fit the architecture its config.json describes "
                         f"({len(missing)} missing, {len(unexpected)} not used, {len(wrong)} of the wrong shape); "
                         + "; ".join(parts))
    network.load_state_dict(weights, strict=True)


# ------------------------------------------------------------------------------------------------------ overlay
def _yaml_value(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # PyYAML reads 1e-05 as a string, 1.0e-05 as a float
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str) and re.fullmatch(r"[a-z_]+", value):
        return value  # plain words need no quotes
    return json.dumps(value)  # null, true/false, integers, strings and flat lists are valid YAML flow values


def _overlay(parameters: Mapping[str, Any], image_size: list[int] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The overlay's keys (in order) and a comment for each."""
    conditional = parameters["in_channels"] > parameters["out_channels"]
    keys: dict[str, Any] = {"spatial_dims": 2}
    comments = {"spatial_dims": "a UNet2DModel; 3D masks are sampled slice by slice along slice_axis"}
    if image_size is not None:
        keys["image_size"] = image_size
        comments["image_size"] = "sample_size: masks are resized to it (nearest) and the images back (linear)"
    keys["image_channels"] = parameters["out_channels"]
    comments["image_channels"] = "out_channels"
    if conditional:
        keys["mask_encoding"] = "legacy"
        comments["mask_encoding"] = "one channel holding class_index / 255, after the image channels (Konz et al.)"
    else:
        keys["num_classes"] = 0
        comments["num_classes"] = "an unconditional model: masks only give the output grid"
    keys.update(prediction_type="epsilon", num_train_timesteps=1000, sampler="ddim", num_inference_steps=50, amp=False)
    comments.update(
        prediction_type="the original training target (noise); linear betas 1e-4..0.02 are the bundle's schedule",
        num_train_timesteps="the original's training steps",
        sampler="DDIM on timesteps 980, 960, ..., 0 (eta 0), as the original's 50-step DDIM",
        num_inference_steps="--sampler ddpm --num_inference_steps 1000 for the original DDPM sampling",
        amp="fp32 like the original; --amp True is faster on a GPU but rounds differently",
    )
    for name in ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups", "norm_eps"):
        keys[f"network_def#{name}"] = parameters[name]
    comments["network_def#channels"] = "block_out_channels"
    comments["network_def#attention_levels"] = "levels with AttnDownBlock2D / AttnUpBlock2D"
    comments["network_def#num_res_blocks"] = "layers_per_block"
    comments["network_def#num_head_channels"] = "attention_head_dim: the width of one head"
    return keys, comments


def _record_settings(keys: Mapping[str, Any], conditional: bool) -> dict[str, Any]:
    """The converted model's record (models/model.json): what the original was trained with. Its class count and
    intensity scaling are not known from the release (any mask up to 255 classes fits the legacy encoding), so they are
    not recorded and not checked."""
    settings = {"spatial_dims": 2, "image_size": keys.get("image_size"), "roi_size": None,
                "image_channels": keys["image_channels"]}
    if conditional:
        settings.update(mask_encoding="legacy", mask_values=[0.0, 1.0])
    else:
        settings["num_classes"] = 0
    settings.update(
        prediction_type="epsilon",
        diffusion="ddpm",
        noise_schedule={"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                        "beta_end": 0.02},
        target="image",
        condition="label" if conditional else None,
    )
    return settings


def _overlay_text(keys: Mapping[str, Any], comments: Mapping[str, str], header: list[str]) -> str:
    lines = [f"# {line}".rstrip() for line in header]
    for key, value in keys.items():
        entry = f"{key}: {_yaml_value(value)}"
        comment = comments.get(key, "")
        lines.append(f"{entry:<49} # {comment}" if comment else entry)
    return "\n".join(lines) + "\n"


def _inference_config() -> str:
    """mask_to_image's inference.yaml in this checkout, or its path inside the repository."""
    path = Path(__file__).resolve().parents[2] / "bundles" / "mask_to_image" / "configs" / "inference.yaml"
    return str(path) if path.is_file() else "bundles/mask_to_image/configs/inference.yaml"


def run_command(bundle_dir: str | os.PathLike, conditional: bool = True) -> str:
    """The command that samples with a converted model in ``bundle_dir`` (as printed and written in the overlay)."""
    overlay = Path(bundle_dir) / "configs" / OVERLAY_NAME
    classes = " --num_classes N" if conditional else ""
    return (f"python -m monai.bundle run --config_file \"['{_inference_config()}','{overlay}']\" "
            f"--bundle_root {bundle_dir} --mask_dir MASKS{classes}")


# ------------------------------------------------------------------------------------------------------ convert
def convert_diffusers_unet(
    unet_dir: str | os.PathLike, bundle_dir: str | os.PathLike, overwrite: bool = False
) -> ConvertedModel:
    """Convert a diffusers ``UNet2DModel`` folder into ``bundle_dir/models/model.pt`` and
    ``bundle_dir/configs/converted.yaml`` (an overlay for mask_to_image's inference.yaml).

    Args:
        unet_dir: the folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``), or a
            pipeline folder holding it as ``unet/``.
        bundle_dir: the bundle root to write into (``--bundle_root`` of the inference run).
        overwrite: replace an earlier conversion; otherwise existing outputs stop the conversion before any work.
    """
    from monai.networks.nets import DiffusionModelUNet

    bundle_dir = Path(bundle_dir)
    model_path = bundle_dir / "models" / "model.pt"
    config_path = bundle_dir / "configs" / OVERLAY_NAME
    from segdiff.engine.provenance import ModelRecord, record_path, save_weights

    existing = [str(p) for p in (model_path, record_path(model_path), config_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite (overwrite=True) to replace it")

    config, source_config = read_diffusers_config(unet_dir)
    parameters = unet_parameters(config, source_config)
    image_size = _image_size(config, source_config)
    state_dict, source_weights = load_diffusers_weights(unet_dir)
    weights = rename_diffusers_weights(state_dict)
    network = DiffusionModelUNet(**parameters)
    _check_loads(network, weights, source_weights)

    keys, comments = _overlay(parameters, image_size)
    conditional = parameters["in_channels"] > parameters["out_channels"]
    num_parameters = sum(t.numel() for t in weights.values())
    version = config.get("_diffusers_version", "unknown")
    header = [
        "mask_to_image overlay for a diffusers UNet2DModel converted by `segdiff convert-diffusers`.",
        f"source: {source_config} + {source_weights.name} (diffusers {version})",
        f"weights: models/model.pt beside this configs/ folder ({len(weights)} tensors, {num_parameters:,} parameters)",
        "Run it after inference.yaml with this folder as bundle_root (command-line options still override it):",
        f"  {run_command(bundle_dir.resolve(), conditional)}",
        *(["--num_classes N: the classes of your masks (labels 0..N-1)."] if conditional else []),
        "",
    ]
    text = _overlay_text(keys, comments, header)

    import yaml

    if yaml.safe_load(text) != keys:  # the hand-written YAML must read back as the values it was made from
        raise RuntimeError(f"internal error: the overlay does not read back as written:\n{text}")
    record = ModelRecord(_record_settings(keys, conditional), bundle="mask_to_image").build(
        network, {"converted_from": str(source_weights), "diffusers_version": version}
    )
    save_weights(network.state_dict(), model_path, record)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(text)
    return ConvertedModel(model_path, config_path, parameters, keys, len(weights), num_parameters,
                          source_config, source_weights)
