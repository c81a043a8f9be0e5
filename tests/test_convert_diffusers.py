"""Converting diffusers UNet2DModel checkpoints (Konz et al.'s released seg-guided-diffusion models) for mask_to_image:
the converted network computes what the diffusers one does, unsupported configurations are named, and a converted
model samples through the documented inference command the way the original DDIM-50 loop does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import diffusers  # the test extra; the converter itself never imports it
import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import REPO

from segdiff.cli import main
from segdiff.convert import (
    DIFFUSERS_UNET_DEFAULTS,
    UnsupportedConfigError,
    convert_diffusers_unet,
    read_diffusers_config,
    unet_parameters,
)

#: the released block layout (the original main.py's UNet2DModel) with narrow widths: attention at level 5 and in the middle
RELEASED_LAYOUT = {
    "sample_size": 32,
    "in_channels": 2,  # one image channel + one mask channel (class_index / 255)
    "out_channels": 1,
    "block_out_channels": (8, 8, 16, 16, 32, 32),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
#: tensors of the released network (450, also measured on the full widths): the narrow copy has the same count
RELEASED_NUM_TENSORS = 450
OLDER_ATTENTION_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
#: fields that diffusers releases before ~0.20 did not write to config.json (the converter fills the defaults)
NEWER_CONFIG_FIELDS = ("time_embedding_dim", "mid_block_type", "downsample_type", "upsample_type", "dropout",
                       "attn_norm_num_groups", "num_train_timesteps")
INFERENCE_YAML = "bundles/mask_to_image/configs/inference.yaml"


def diffusers_unet(seed: int = 0, perturb: bool = True, **changes) -> torch.nn.Module:
    """A random UNet2DModel in eval mode; ``perturb`` shifts every tensor (norms included) off its initial value so
    that a swapped or skipped weight changes the output."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**{**RELEASED_LAYOUT, **changes}).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_unet(model, folder, weights: str = "safetensors", names: str = "current"):
    """Save as diffusers does (``save_pretrained``); ``names="older"``: as an older diffusers did, ``.bin`` with the
    attention tensors named query/key/value/proj_attn and a config.json without the newer fields; ``names="lone"``:
    a checkpoint shared as ``<name>.safetensors`` with the minimal config.json the docs tell users to write."""
    model.save_pretrained(str(folder), safe_serialization=weights == "safetensors")
    if names == "lone":
        (folder / "diffusion_pytorch_model.safetensors").rename(folder / "ddim-breast_mri-256-segguided.safetensors")
        # the docs' config.json of the released architecture, with the narrow test widths (and 8 norm groups for them)
        minimal = {k: RELEASED_LAYOUT[k] for k in ("sample_size", "in_channels", "out_channels", "layers_per_block",
                                                   "block_out_channels", "down_block_types", "up_block_types")}
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **minimal, "norm_num_groups": 8}))
    if names == "older":
        for f in folder.glob("diffusion_pytorch_model.*"):
            f.unlink()
        state = {}
        for key, tensor in model.state_dict().items():
            for new, old in OLDER_ATTENTION_NAMES.items():
                key = key.replace(new, old)
            state[key] = tensor
        torch.save(state, folder / "diffusion_pytorch_model.bin")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in NEWER_CONFIG_FIELDS}))
    return folder


def converted_network(parameters: dict, model_path) -> torch.nn.Module:
    """The DiffusionModelUNet a conversion describes, with the weights it wrote, loaded strictly."""
    from monai.networks.nets import DiffusionModelUNet

    network = DiffusionModelUNet(**parameters)
    network.load_state_dict(torch.load(model_path, weights_only=True), strict=True)
    return network.eval()


def write_config(folder, **changes):
    """Only a config.json (the configuration is checked before any weight is read)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.21.4", **DIFFUSERS_UNET_DEFAULTS,
              **{k: list(v) if isinstance(v, tuple) else v for k, v in RELEASED_LAYOUT.items()}}
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def mask_array(size: int = 32) -> np.ndarray:
    """Classes 0..3 in nested boxes, uint8 as the original code's mask PNGs."""
    mask = np.zeros((size, size), np.uint8)
    mask[4:28, 6:26] = 1
    mask[10:20, 8:16] = 2
    mask[22:27, 18:25] = 3
    return mask


def original_ddim_50(network, mask: np.ndarray, noise: torch.Tensor) -> torch.Tensor:
    """Konz et al.'s sampling loop, written with diffusers: DDIMScheduler(num_train_timesteps=1000) and its default
    config, 50 steps (eta 0), the mask as class_index / 255 concatenated after the image channels at every step."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(50)
    condition = torch.from_numpy(mask).float().div(255)[None, None]  # what torchvision's ToTensor makes of a PNG
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(network(torch.cat([x, condition], dim=1), t.reshape(1)), t, x, eta=0.0).prev_sample
    return x


# ---------------------------------------------------------------------------------------------- forward equality
@pytest.mark.parametrize(
    "changes, weights, names",
    [
        ({}, "safetensors", "current"),
        ({}, "bin", "current"),
        ({}, "bin", "older"),
        ({"attention_head_dim": None}, "safetensors", "current"),  # one head as wide as the block
        ({}, "safetensors", "lone"),
    ],
    ids=["safetensors", "bin", "older-attention-names-and-config", "attention-head-dim-null", "lone-file-minimal-config"],
)
def test_converted_network_matches_the_diffusers_forward(tmp_path, changes, weights, names):
    model = diffusers_unet(**changes)
    result = convert_diffusers_unet(save_unet(model, tmp_path / "unet", weights, names), tmp_path / "bundle")
    network = converted_network(result.network_parameters, result.model_path)
    assert result.num_tensors == len(model.state_dict()) == RELEASED_NUM_TENSORS
    assert result.num_parameters == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    for timesteps in ([0, 0], [1, 1], [500, 500], [999, 999], [20, 980]):
        t = torch.tensor(timesteps)
        with torch.no_grad():
            expected = model(x, t).sample
            actual = network(x, timesteps=t)
        assert actual.shape == expected.shape == (2, 1, 32, 32)
        assert (actual - expected).abs().max().item() < 1e-5, f"timesteps {timesteps}"


def test_accepted_fields_at_their_released_or_default_values_give_the_same_network():
    base = unet_parameters({**DIFFUSERS_UNET_DEFAULTS, **RELEASED_LAYOUT})
    assert base == {
        "spatial_dims": 2, "in_channels": 2, "out_channels": 1, "channels": [8, 8, 16, 16, 32, 32],
        "attention_levels": [False, False, False, False, True, False], "num_res_blocks": 2, "num_head_channels": 8,
        "norm_num_groups": 8, "norm_eps": 1e-5,
    }
    equivalent = {"act_fn": "swish", "attn_norm_num_groups": 8, "time_embedding_dim": 32, "num_train_timesteps": 1000,
                  "dropout": 0, "mid_block_scale_factor": 1.0, "_diffusers_version": "0.21.4", "_name_or_path": "x"}
    assert unet_parameters({**DIFFUSERS_UNET_DEFAULTS, **RELEASED_LAYOUT, **equivalent}) == base


# ------------------------------------------------------------------------------------------ rejected configurations
_LAYOUT_DOWN, _LAYOUT_UP = list(RELEASED_LAYOUT["down_block_types"]), list(RELEASED_LAYOUT["up_block_types"])
UNSUPPORTED = [
    # (changes to the released layout, fragments the message must contain)
    ({"_class_name": "UNet2DConditionModel"}, ['_class_name = "UNet2DConditionModel"', "only UNet2DModel"]),
    ({"center_input_sample": True}, ["center_input_sample = true", "supported: false"]),
    ({"time_embedding_type": "fourier"}, ['time_embedding_type = "fourier"', 'supported: "positional"']),
    ({"time_embedding_dim": 64}, ["time_embedding_dim = 64", "null or 4 x block_out_channels[0] = 32"]),
    ({"freq_shift": 1}, ["freq_shift = 1", "supported: 0"]),
    ({"flip_sin_to_cos": False}, ["flip_sin_to_cos = false", "supported: true"]),
    ({"mid_block_type": None}, ["mid_block_type = null", 'supported: "UNetMidBlock2D"']),
    ({"mid_block_scale_factor": 2}, ["mid_block_scale_factor = 2", "supported: 1.0"]),
    ({"downsample_padding": 0}, ["downsample_padding = 0", "supported: 1"]),
    ({"downsample_type": "resnet"}, ['downsample_type = "resnet"', 'supported: "conv"']),
    ({"upsample_type": "resnet"}, ['upsample_type = "resnet"', 'supported: "conv"']),
    ({"dropout": 0.1}, ["dropout = 0.1", "supported: 0.0", "no dropout"]),
    ({"act_fn": "gelu"}, ['act_fn = "gelu"', 'supported: "silu" or "swish"']),
    ({"resnet_time_scale_shift": "scale_shift"}, ['resnet_time_scale_shift = "scale_shift"', 'supported: "default"']),
    ({"add_attention": False}, ["add_attention = false", "supported: true"]),
    ({"class_embed_type": "timestep"}, ['class_embed_type = "timestep"', "supported: null"]),
    ({"num_class_embeds": 10}, ["num_class_embeds = 10", "supported: null"]),
    ({"attn_norm_num_groups": 4}, ["attn_norm_num_groups = 4", "null or norm_num_groups (8)"]),
    ({"norm_num_groups": 3}, ["norm_num_groups = 3", "divisor of every block_out_channels [8, 8, 16, 16, 32, 32]"]),
    ({"attention_head_dim": 12}, ["attention_head_dim = 12", "divisor of the channels of every attention block and the middle block [32]"]),
    ({"in_channels": 5}, ["in_channels = 5", "out_channels + 1 = 2", "class_index / 255"]),
    ({"layers_per_block": [2] * 6}, ["layers_per_block = [2, 2, 2, 2, 2, 2]", "one positive integer"]),
    ({"block_out_channels": [8, 16]}, ["down_block_types = ", "one block per entry of block_out_channels (2)"]),
    ({"down_block_types": _LAYOUT_DOWN[:4] + ["CrossAttnDownBlock2D", "DownBlock2D"]},
     ['down_block_types[4] = "CrossAttnDownBlock2D"', "supported: DownBlock2D or AttnDownBlock2D"]),
    ({"up_block_types": ["AttnUpBlock2D", "UpBlock2D"] + _LAYOUT_UP[2:]},
     ['up_block_types[0] = "AttnUpBlock2D"', "down_block_types[5] is 'DownBlock2D'", "expected 'UpBlock2D'"]),
    ({"sample_size": [32, 32, 32]}, ["sample_size = [32, 32, 32]", "null, an integer or [height, width]"]),
    ({"cross_attention_dim": 64}, ["cross_attention_dim = 64", "not a UNet2DModel field this converter knows"]),
]


@pytest.mark.parametrize("changes, fragments", UNSUPPORTED, ids=[next(iter(c)) for c, _ in UNSUPPORTED])
def test_unsupported_configuration_is_rejected_naming_field_value_and_what_is_supported(tmp_path, changes, fragments):
    unet = write_config(tmp_path / "unet", **changes)
    with pytest.raises(UnsupportedConfigError) as info:
        convert_diffusers_unet(unet, tmp_path / "bundle")
    message = str(info.value)
    assert message.startswith(str(unet / "config.json"))
    for fragment in fragments:
        assert fragment in message
    assert not (tmp_path / "bundle").exists()  # stopped before writing anything


def test_weights_that_do_not_fit_the_config_are_rejected_naming_the_file(tmp_path):
    unet = save_unet(diffusers_unet(perturb=False), tmp_path / "unet")
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "layers_per_block": 1}))
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors: the weights do not fit .* not used"):
        convert_diffusers_unet(unet, tmp_path / "bundle")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        convert_diffusers_unet(unet, tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "models" / "model.pt").exists()


def test_conversion_refuses_to_overwrite_an_earlier_one_unless_asked(tmp_path):
    unet = save_unet(diffusers_unet(perturb=False), tmp_path / "unet")
    first = convert_diffusers_unet(unet, tmp_path / "bundle")
    with pytest.raises(FileExistsError, match="model.pt already exists; pass --overwrite"):
        convert_diffusers_unet(unet, tmp_path / "bundle")
    os.utime(first.model_path, (0, 0))
    again = convert_diffusers_unet(unet, tmp_path / "bundle", overwrite=True)
    assert os.path.getmtime(again.model_path) > 0


def test_cli_converts_a_pipeline_folder_without_diffusers_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    save_unet(diffusers_unet(perturb=False), tmp_path / "download" / "unet")  # a whole pipeline: unet/, scheduler/...
    # the converter must not need diffusers: make it unimportable and import the converter afresh
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for name in [n for n in sys.modules if n.startswith("segdiff.convert")]:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "bundle"
    assert main(["convert-diffusers", str(tmp_path / "download"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"'{out / 'configs' / 'converted.yaml'}'" in printed and f"--bundle_root {out}" in printed
    assert (out / "models" / "model.pt").is_file()
    assert main(["convert-diffusers", str(tmp_path / "download"), str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "already exists; pass --overwrite" in error


# ---------------------------------------------------------------------------------------- sampling as the original
def test_legacy_encoding_is_class_index_over_255_exactly():
    from segdiff.transforms import EncodeMask

    mask = mask_array()
    encoded = EncodeMask(num_classes=4, encoding="legacy")(torch.from_numpy(mask)[None])
    assert encoded.shape == (1, 32, 32) and encoded.dtype == torch.float32
    assert torch.equal(encoded, torch.from_numpy(mask).float().div(255)[None])  # torchvision's ToTensor of the PNG
    assert encoded.max().item() == np.float32(3 / 255)


def test_overlay_gives_legacy_encoding_epsilon_and_the_original_ddim_timesteps(tmp_path, write_nifti):
    """The overlay on inference.yaml: the network sees [noise, class_index / 255] at timesteps 980, 960, ..., 0."""
    from monai.bundle import ConfigParser

    result = convert_diffusers_unet(save_unet(diffusers_unet(), tmp_path / "unet"), tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config([str(REPO / INFERENCE_YAML), str(result.config_path)])
    parser.update({"bundle_root": str(tmp_path / "bundle"), "num_classes": 4, "device": "$torch.device('cpu')"})
    assert parser.get_parsed_content("mask_encoding") == "legacy"
    assert parser.get_parsed_content("amp") is False
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(result.model_path, weights_only=True), strict=True)
    assert network.in_channels == 2 and network.out_channels == 1
    inferer = parser.get_parsed_content("inferer")
    assert inferer.scheduler.prediction_type == "epsilon" and inferer.image_size == (32, 32)
    original = diffusers.DDIMScheduler(num_train_timesteps=1000)
    assert torch.allclose(inferer.scheduler.alphas_cumprod, original.alphas_cumprod)  # linear betas 1e-4..0.02

    mask = mask_array()
    sample = parser.get_parsed_content("preprocessing")({"label": write_nifti(tmp_path / "masks" / "a.nii.gz", mask)})
    seen: list[tuple[torch.Tensor, int]] = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))  # the sampler asks for the device of a parameter

        def forward(self, x, timesteps):
            seen.append((x.clone(), int(timesteps[0])))
            return torch.zeros_like(x[:, :1])

    inferer.model_record = None  # the recorder is not the converted network its record describes
    inferer(sample["label"][None], Recorder())
    original.set_timesteps(50)
    assert [t for _, t in seen] == original.timesteps.tolist() == list(range(980, -1, -20))
    first = seen[0][0]
    assert first.shape == (1, 2, 32, 32)
    assert torch.equal(first[0, 1], torch.from_numpy(mask).float().div(255))  # the mask after the image channel
    noise = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first[:, :1], noise)  # the image channel starts from the seeded noise


def test_unconditional_model_gets_num_classes_0_and_loads_into_the_bundle_network(tmp_path):
    from monai.bundle import ConfigParser

    model = diffusers_unet(perturb=False, in_channels=1)
    result = convert_diffusers_unet(save_unet(model, tmp_path / "unet"), tmp_path / "bundle")
    assert result.overlay["num_classes"] == 0 and "mask_encoding" not in result.overlay
    assert "--num_classes" not in result.config_path.read_text()
    parser = ConfigParser()
    parser.read_config([str(REPO / INFERENCE_YAML), str(result.config_path)])
    parser.update({"bundle_root": str(tmp_path / "bundle")})
    assert parser.get_parsed_content("condition_channels") == 0
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(result.model_path, weights_only=True), strict=True)
    assert network.in_channels == network.out_channels == 1


@pytest.mark.slow
def test_documented_command_generates_what_the_original_ddim_loop_makes_from_a_nifti_mask(tmp_path, affine, capsys):
    """`segdiff convert-diffusers`, then the documented `python -m monai.bundle run` from the repository root on a
    folder of NIfTI masks. The image equals the original DDIM-50 loop from the same starting noise. Both loops run the
    converted network (its forward equals diffusers' to ~1e-6, pinned above): a random network makes 50 DDIM steps
    chaotic, so a 1e-6 difference in the network would grow, while the sampling procedures agree bit for bit."""
    unet = save_unet(diffusers_unet(), tmp_path / "unet")
    out = tmp_path / "converted"
    assert main(["convert-diffusers", str(unet), str(out)]) == 0
    capsys.readouterr()
    mask = mask_array()
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "masks" / "case1.nii.gz"))

    command = [sys.executable, "-m", "monai.bundle", "run",
               "--config_file", f"['{INFERENCE_YAML}','{out / 'configs' / 'converted.yaml'}']",
               "--bundle_root", str(out), "--mask_dir", str(tmp_path / "masks"), "--num_classes", "4"]
    # on the CPU, like the reference below (a GPU run would differ by float rounding, which the chaos amplifies)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    written = nib.load(str(out / "outputs" / "generated" / "case1_image.nii.gz"))
    assert written.shape == mask.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    noise = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(0))  # the bundle's seed 0
    network = converted_network(unet_parameters(read_diffusers_config(unet)[0]), out / "models" / "model.pt")
    expected = original_ddim_50(network, mask, noise)[0, 0].numpy()
    generated = written.get_fdata(dtype=np.float32)
    assert np.abs(generated - expected).max() < 1e-5
    assert generated.std() > 0.1  # an image, not a constant

