"""segdiff.engine (batch preparation, sampler, grids, handlers) and segdiff.visualize, with tiny networks on CPU."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from PIL import Image

from segdiff.engine import (
    ConditionalDiffusionPrepareBatch,
    ConditionalDiffusionSampler,
    CopyWeights,
    GradientClipping,
    SampleGridHandler,
    ModelRecord,
    SamplingPrepareBatch,
    TrainingCheckpoint,
    atomic_torch_save,
    build_scheduler,
    check_run_folder,
)
from segdiff.engine.provenance import state_dict_sha256
from segdiff.errors import ModelMismatchError, RunFolderError
from segdiff.engine.grid import from_network_units, resize, to_network_units
from segdiff.transforms import EncodeMask, SaveSamplesd
from segdiff.visualize import LABEL_COLOURS, UNSPECIFIED_COLOUR, make_panel, render, save_png


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


class SpyNetwork(torch.nn.Module):
    """Predicts zero noise (which makes DDIM's arithmetic checkable by hand) and records what it is given."""

    def __init__(self, target_channels: int = 1) -> None:
        super().__init__()
        self.target_channels = target_channels
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the sampler reads the device off the parameters
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.training_modes: list[bool] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        self.timesteps.append(timesteps.clone())
        self.training_modes.append(self.training)
        return torch.zeros(x.shape[0], self.target_channels, *x.shape[2:])


#: the bundles' noise schedule (their noise_schedule key), epsilon prediction
LINEAR = dict(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")


def scheduler_for(name: str, **changes):
    return build_scheduler(name, **{**LINEAR, **changes})


def sampler(**kwargs) -> ConditionalDiffusionSampler:
    """A quiet DDIM sampler with few steps; keyword arguments override."""
    kwargs.setdefault("scheduler", scheduler_for("ddim"))
    kwargs.setdefault("num_inference_steps", 5)
    kwargs.setdefault("progress", False)
    return ConditionalDiffusionSampler(**kwargs)


def slice_indexed_condition(shape, axis):
    """A (1, 1, *shape) condition whose every voxel holds the index of its slice along ``axis``."""
    index = torch.arange(shape[axis], dtype=torch.float32)
    view = [1, 1, 1]
    view[axis] = -1
    return index.view(*view).expand(*shape).reshape(1, 1, *shape).clone()


# ---- build_scheduler ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)])
def test_build_scheduler_returns_the_named_scheduler_with_the_training_schedule(name, cls):
    scheduler = scheduler_for(name, num_train_timesteps=500, beta_start=2e-4, beta_end=3e-2, clip_sample=False)
    assert type(scheduler) is cls
    assert scheduler.num_train_timesteps == 500
    assert len(scheduler.betas) == 500
    assert scheduler.betas[0].item() == pytest.approx(2e-4)
    assert scheduler.betas[-1].item() == pytest.approx(3e-2)
    assert scheduler.clip_sample is False


def test_build_scheduler_rejects_an_unknown_name_naming_the_key():
    with pytest.raises(ValueError, match=r"'sampler' must be one of 'ddpm', 'ddim', 'dpm_solver', 'euler'; got 'heun'"):
        scheduler_for("heun")
    with pytest.raises(ValueError, match=r"'prediction_type' must be one of 'epsilon', 'v_prediction', 'sample'; got 'x0'"):
        scheduler_for("ddim", prediction_type="x0")


def test_build_scheduler_has_no_default_noise_schedule():
    # the schedule comes from the bundle config's one noise_schedule key, never from Python defaults
    with pytest.raises(TypeError):
        build_scheduler("ddim", prediction_type="epsilon")


# ---- ConditionalDiffusionSampler: shapes and grids -------------------------------------------------------------
def test_2d_samples_are_batch_by_num_samples_times_target_channels(tiny_unet):
    network = tiny_unet(in_channels=2 + 3, out_channels=2)
    out = sampler(target_channels=2, num_samples=3)(torch.rand(2, 3, 16, 16), network)
    assert out.shape == (2, 6, 16, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_2d_model_over_a_volume_samples_each_slice_at_image_size_and_returns_on_the_input_grid(axis):
    shape = (4, 6, 5)
    network = SpyNetwork()
    out = sampler(image_size=(8, 8), num_samples=2, slice_axis=axis)(torch.rand(1, 2, *shape), network)
    assert out.shape == (1, 2, *shape)
    assert all(x.shape == (shape[axis] * 2, 1 + 2, 8, 8) for x in network.inputs)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_2d_model_sees_the_slices_along_slice_axis_in_order(axis):
    shape = (4, 6, 5)
    network = SpyNetwork()
    sampler(image_size=(8, 8), num_samples=2, slice_axis=axis)(slice_indexed_condition(shape, axis), network)
    expected = torch.arange(shape[axis], dtype=torch.float32).repeat_interleave(2).view(-1, 1, 1).expand(-1, 8, 8)
    assert torch.equal(network.inputs[0][:, 1], expected)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_sampled_slice_returns_to_the_slice_it_was_drawn_for(axis):
    # with strength 0.01 and 50 DDIM steps only t = 0 is run: the output is the initial image plus ~1% noise
    shape = (4, 6, 5)
    initial = slice_indexed_condition(shape, axis) / 10.0 - 0.2
    s = sampler(num_inference_steps=50, strength=0.01, image_size=(8, 8), slice_axis=axis)
    out = s(torch.zeros(1, 1, *shape), SpyNetwork(), initial=initial)
    assert out.shape == initial.shape
    assert torch.allclose(out, initial, atol=0.05)


def test_3d_model_samples_the_volume_at_image_size_and_returns_on_the_input_grid():
    network = SpyNetwork(target_channels=2)
    s = sampler(spatial_dims=3, target_channels=2, image_size=(8, 8, 8), num_samples=3)
    out = s(torch.rand(1, 2, 4, 6, 5), network)
    assert out.shape == (1, 6, 4, 6, 5)
    assert all(x.shape == (3, 2 + 2, 8, 8, 8) for x in network.inputs)


def test_3d_model_rejects_2d_input():
    with pytest.raises(ValueError, match=r"3D model needs .* 3 spatial dims; got shape \(2, 6, 5"):
        sampler(spatial_dims=3)(torch.rand(1, 2, 6, 5), SpyNetwork())


def test_output_is_a_metatensor_carrying_the_inputs_affine(loaded_label, affine):
    inputs = list_data_collate([EncodeMask(3)(loaded_label)])
    out = sampler(image_size=(8, 8), num_samples=2)(inputs, SpyNetwork())
    assert isinstance(out, MetaTensor)
    assert out.is_batch
    assert torch.equal(out.affine, inputs.affine)
    case = decollate_batch(out)[0]
    assert np.allclose(np.asarray(case.affine), affine)
    assert case.meta["filename_or_obj"].endswith("case7.nii.gz")


def test_samples_of_a_loaded_mask_are_saved_on_its_grid(tmp_path, loaded_label, affine):
    inputs = list_data_collate([EncodeMask(3)(loaded_label)])
    out = sampler(image_size=(8, 8), num_samples=2)(inputs, SpyNetwork())
    SaveSamplesd("pred", str(tmp_path), num_samples=2)({"pred": decollate_batch(out)[0]})
    for k in range(2):
        written = nib.load(str(tmp_path / f"case7_sample{k}_image.nii.gz"))
        assert written.shape == (6, 5, 4)
        assert np.allclose(written.affine, affine)
        assert np.allclose(written.get_fdata(), out[0, k].numpy(), atol=1e-6)


# ---- ConditionalDiffusionSampler: randomness ---------------------------------------------------------------------
def test_seeded_sampling_gives_identical_samples_on_every_call(tiny_unet):
    network = tiny_unet(in_channels=1 + 3, out_channels=1)
    s = sampler(scheduler=scheduler_for("ddpm"), num_samples=2, seed=7)
    condition = torch.rand(1, 3, 16, 16)
    assert torch.equal(s(condition, network), s(condition, network))


def test_different_seeds_give_different_samples(tiny_unet):
    network = tiny_unet(in_channels=1 + 3, out_channels=1)
    condition = torch.rand(1, 3, 16, 16)
    a = sampler(seed=1)(condition, network)
    b = sampler(seed=2)(condition, network)
    assert (a - b).abs().mean() > 0.1


def test_members_of_one_call_differ_from_each_other(tiny_unet):
    network = tiny_unet(in_channels=1 + 3, out_channels=1)
    out = sampler(num_samples=3)(torch.rand(1, 3, 16, 16), network)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert (out[0, i] - out[0, j]).abs().mean() > 0.1


def test_seed_none_follows_torchs_global_seed(tiny_unet):
    network = tiny_unet(in_channels=1 + 3, out_channels=1)
    s = sampler(seed=None)
    condition = torch.rand(1, 3, 16, 16)
    torch.manual_seed(3)
    a = s(condition, network)
    torch.manual_seed(3)
    assert torch.equal(s(condition, network), a)


@pytest.mark.parametrize("volume", [False, True])
def test_chunked_sampling_equals_sampling_in_one_chunk(tiny_unet, volume):
    network = tiny_unet(in_channels=1 + 3, out_channels=1)
    condition = torch.rand(1, 3, 3, 16, 16) if volume else torch.rand(1, 3, 16, 16)
    whole = sampler(num_samples=2, slice_axis=0, batch_size=16)(condition, network)
    chunked = sampler(num_samples=2, slice_axis=0, batch_size=4)(condition, network)
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_chunked_sampling_equals_one_chunk_for_any_image_size():
    condition = torch.rand(1, 3, 12, 10)  # 120 voxels per member
    whole = sampler(num_samples=3, batch_size=16)(condition, SpyNetwork())
    chunked = sampler(num_samples=3, batch_size=1)(condition, SpyNetwork())
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_a_cases_samples_do_not_depend_on_the_other_cases_of_the_batch():
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    alone = sampler()(b, SpyNetwork())
    after_another = sampler()(torch.cat([a, b]), SpyNetwork())
    assert torch.allclose(after_another[1:], alone, atol=1e-5)


# ---- ConditionalDiffusionSampler: strength (partial noise) -------------------------------------------------------
def start_timestep(scheduler, num_inference_steps, strength):
    scheduler.set_timesteps(num_inference_steps)
    start = round(strength * (scheduler.num_train_timesteps - 1))
    return int(scheduler.timesteps[scheduler.timesteps <= start][0])


@pytest.mark.parametrize("strength", [0.02, 0.05])
def test_ddim_with_zero_noise_prediction_returns_the_initial_image_plus_the_start_noise(strength):
    # with eps = 0, DDIM (eta 0) keeps x0 = x_t / sqrt(abar_t) fixed, so the output is
    # initial + sqrt((1 - abar_s) / abar_s) * noise at the start timestep s (clipped to [-1, 1], which these small
    # strengths hardly reach)
    scheduler = scheduler_for("ddim")
    s = start_timestep(scheduler, 50, strength)
    abar = scheduler.alphas_cumprod[s].item()
    noise_std = np.sqrt((1 - abar) / abar)
    initial = torch.rand(1, 1, 16, 16) - 0.5
    out = sampler(scheduler=scheduler, num_inference_steps=50, strength=strength, num_samples=8)(
        torch.zeros(1, 2, 16, 16), SpyNetwork(), initial=initial
    )
    deviation = out - initial
    assert deviation.std().item() == pytest.approx(noise_std, rel=0.15)
    assert deviation.mean().abs().item() < 0.2 * noise_std


def test_ddim_with_zero_noise_prediction_keeps_its_first_x0_prediction():
    # x_T / sqrt(abar_999) is clipped to +-1 almost everywhere; with eps = 0 every later step must keep that x0
    out = sampler(num_inference_steps=50, num_samples=2)(torch.zeros(1, 2, 16, 16), SpyNetwork())
    assert out.abs().median().item() == pytest.approx(1.0, abs=0.01)


def test_lower_strength_keeps_more_of_the_initial_image():
    initial = torch.rand(1, 1, 16, 16) - 0.5

    def deviation(strength):
        s = sampler(num_inference_steps=50, strength=strength, num_samples=4)
        return (s(torch.zeros(1, 2, 16, 16), SpyNetwork(), initial=initial) - initial).abs().mean().item()

    small, large = deviation(0.05), deviation(0.5)
    assert small < 0.15
    assert large > 2 * small


def test_partial_noise_runs_only_the_timesteps_below_the_start():
    network = SpyNetwork()
    scheduler = scheduler_for("ddim")
    initial = torch.zeros(1, 1, 16, 16)
    s = sampler(scheduler=scheduler, num_inference_steps=50, strength=0.05)
    s(torch.zeros(1, 2, 16, 16), network, initial=initial)
    expected = [t for t in scheduler.timesteps.tolist() if t <= round(0.05 * 999)]
    assert len(expected) == 3
    assert [int(t[0]) for t in network.timesteps] == expected


def test_partial_noise_without_an_initial_image_raises():
    with pytest.raises(ValueError, match="strength < 1 needs a real image"):
        sampler(strength=0.5)(torch.zeros(1, 2, 16, 16), SpyNetwork())


# ---- ConditionalDiffusionSampler: what the network sees ----------------------------------------------------------
def test_network_sees_the_noisy_target_then_the_nearest_resized_mask_condition_at_every_step():
    network = SpyNetwork(target_channels=2)
    condition = torch.randint(0, 2, (2, 3, 12, 10)).float()
    sampler(target_channels=2, image_size=(16, 16), num_samples=2)(condition, network)
    assert len(network.inputs) == 2 * 5  # 2 cases x 5 steps
    for call, x in enumerate(network.inputs):
        case = call // 5
        expected = F.interpolate(condition[case : case + 1], size=(16, 16), mode="nearest").expand(2, -1, -1, -1)
        assert x.shape == (2, 2 + 3, 16, 16)
        assert torch.equal(x[:, 2:], expected)


def test_an_image_condition_is_resized_as_training_resizes_images():
    # image_to_mask: the condition is the image; training resizes it with MONAI's Resized (bilinear, anti-aliased),
    # so the sampler must hand the network exactly that, not a nearest-neighbour copy
    from monai.transforms import Resized

    network = SpyNetwork(target_channels=3)
    image = torch.rand(1, 1, 40, 36, generator=torch.Generator().manual_seed(3))
    sampler(target_channels=3, image_size=(16, 16), condition_kind="image")(image, network)
    expected = Resized(keys="image", spatial_size=(16, 16), mode="bilinear", anti_aliasing=True)({"image": image[0]})["image"]
    seen = network.inputs[0][0, 3:]
    assert torch.allclose(seen, torch.as_tensor(expected), atol=1e-6)
    nearest = F.interpolate(image, size=(16, 16), mode="nearest")[0]
    assert (seen - nearest).abs().max() > 0.05  # a thin-structure-destroying nearest resize would differ


def test_unknown_condition_kind_is_refused():
    with pytest.raises(ValueError, match=r"condition_kind must be one of \('mask', 'image'\), got 'label'"):
        sampler(condition_kind="label")


def test_network_is_called_at_the_schedulers_timesteps_in_eval_mode():
    network = SpyNetwork()
    network.train()
    scheduler = scheduler_for("ddim")
    sampler(scheduler=scheduler, num_inference_steps=5)(torch.zeros(1, 2, 16, 16), network)
    assert [int(t[0]) for t in network.timesteps] == scheduler.timesteps.tolist()
    assert not any(network.training_modes)
    assert network.training  # restored after sampling


def test_unconditional_sampler_passes_no_condition():
    network = SpyNetwork(target_channels=1)
    out = sampler(conditional=False, num_samples=2)(torch.zeros(1, 3, 16, 16), network)
    assert out.shape == (1, 2, 16, 16)
    assert all(x.shape == (2, 1, 16, 16) for x in network.inputs)


def test_unconditional_sampler_accepts_a_condition_without_channels_at_another_size():
    out = sampler(conditional=False, image_size=(16, 16))(torch.zeros(1, 0, 12, 10), SpyNetwork())
    assert out.shape == (1, 1, 12, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3, got 1"),
        ({"image_size": (16,)}, r"image_size \[16\] must have 2 entries for spatial_dims=2"),
        ({"spatial_dims": 3, "image_size": (16, 16)}, r"must have 3 entries"),
        ({"strength": 0.0}, r"strength must lie in \(0, 1\], got 0.0"),
        ({"strength": 1.5}, r"strength must lie in \(0, 1\], got 1.5"),
        ({"num_samples": 0}, "num_samples and batch_size must be >= 1"),
        ({"batch_size": 0}, "num_samples and batch_size must be >= 1"),
    ],
)
def test_bad_sampler_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampler(**kwargs)


# ---- grid ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_to_slices_and_back_round_trips(axis):
    case = torch.rand(2, 4, 6, 5)
    units = to_network_units(case, spatial_dims=2, slice_axis=axis)
    assert units.shape[0] == case.shape[axis + 1] and units.shape[1] == 2
    assert torch.equal(units[1], case.select(axis + 1, 1))
    assert torch.equal(from_network_units(units, case.ndim, spatial_dims=2, slice_axis=axis), case)


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 6, 5)), (3, (2, 4, 6, 5))])
def test_case_matching_the_model_is_one_network_unit(spatial_dims, shape):
    case = torch.rand(*shape)
    units = to_network_units(case, spatial_dims)
    assert units.shape == (1, *shape)
    assert torch.equal(from_network_units(units, case.ndim, spatial_dims), case)


def test_to_network_units_rejects_the_wrong_dimensionality():
    with pytest.raises(ValueError, match=r"2D model needs .* \(or a 3D volume, which is sliced\); got shape \(2, 5\)"):
        to_network_units(torch.rand(2, 5), spatial_dims=2)


def test_nearest_resize_keeps_label_values():
    labels = torch.randint(0, 5, (2, 1, 7, 5), generator=torch.Generator().manual_seed(0)).float()
    out = resize(labels, (16, 13), "nearest")
    assert out.shape == (2, 1, 16, 13)
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    corner = labels[:, :, :4, :4]
    assert torch.equal(resize(corner, (8, 8), "nearest"), corner.repeat_interleave(2, 2).repeat_interleave(2, 3))


@pytest.mark.parametrize("shape, size", [((1, 2, 7, 5), (16, 13)), ((1, 2, 4, 6, 5), (8, 8, 8))])
def test_linear_resize_keeps_constant_images_constant(shape, size):
    out = resize(torch.full(shape, 0.3), size)
    assert out.shape == (*shape[:2], *size)
    assert torch.allclose(out, torch.full_like(out, 0.3))


@pytest.mark.parametrize("shape, size", [((3, 2, 40, 50), (20, 25)), ((1, 1, 12, 10, 8), (6, 5, 4))])
def test_image_resize_equals_monai_resized_as_used_in_training(shape, size):
    from monai.transforms import Resized

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    mode = "bilinear" if len(size) == 2 else "trilinear"
    resized = Resized(keys="x", spatial_size=size, mode=mode, anti_aliasing=True)
    expected = torch.stack([torch.as_tensor(resized({"x": case})["x"]) for case in x])
    out = resize(x, size, "image")
    assert type(out) is torch.Tensor and out.shape == (*shape[:2], *size)
    assert torch.allclose(out, expected, atol=1e-6)


def test_probabilities_resize_is_plain_linear_interpolation():
    x = torch.rand(2, 3, 8, 8)
    expected = F.interpolate(x, size=(16, 12), mode="bilinear", align_corners=False)
    assert torch.equal(resize(x, (16, 12), "probabilities"), expected)


def test_unknown_resize_role_is_refused():
    with pytest.raises(ValueError, match="resize role must be one of"):
        resize(torch.rand(1, 1, 4, 4), (8, 8), "bicubic")


def test_resize_to_no_size_or_the_same_size_returns_the_input():
    x = torch.rand(1, 1, 6, 5)
    assert resize(x, None) is x
    assert resize(x, (6, 5)) is x


# ---- batch preparation --------------------------------------------------------------------------------------------
def mask_image_batch(batch_size=2):
    label = torch.randint(0, 3, (batch_size, 1, 16, 16)).float()
    return {"image": torch.rand(batch_size, 1, 16, 16), "label": torch.cat([(label == c).float() for c in range(3)], 1)}


def test_prepare_batch_noises_the_target_and_concatenates_the_condition():
    batch = mask_image_batch()
    target, loss_target, args, kwargs = ConditionalDiffusionPrepareBatch(1000)(batch)
    assert torch.equal(target, batch["image"])
    assert args == ()
    assert set(kwargs) == {"noise", "timesteps", "condition", "mode"}
    assert torch.equal(loss_target, kwargs["noise"])
    assert kwargs["noise"].shape == target.shape
    assert torch.equal(kwargs["condition"], batch["label"])
    assert kwargs["mode"] == "concat"


def test_prepare_batch_draws_one_training_timestep_per_sample():
    timesteps = ConditionalDiffusionPrepareBatch(50)(mask_image_batch(64))[3]["timesteps"]
    assert timesteps.shape == (64,) and timesteps.dtype == torch.long
    assert 0 <= timesteps.min() and timesteps.max() < 50
    assert len(timesteps.unique()) > 10


def test_prepare_batch_swaps_roles_for_image_to_mask():
    batch = mask_image_batch()
    target, _, _, kwargs = ConditionalDiffusionPrepareBatch(1000, target_key="label", condition_key="image")(batch)
    assert torch.equal(target, batch["label"])
    assert torch.equal(kwargs["condition"], batch["image"])


def test_prepare_batch_without_condition_key_passes_no_condition():
    _, _, _, kwargs = ConditionalDiffusionPrepareBatch(1000, condition_key=None)(mask_image_batch())
    assert set(kwargs) == {"noise", "timesteps"}


def test_prepared_batch_drives_the_diffusion_inferer(tiny_unet):
    target, _, args, kwargs = ConditionalDiffusionPrepareBatch(1000)(mask_image_batch())
    inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=1000))
    prediction = inferer(target, tiny_unet(in_channels=1 + 3, out_channels=1), *args, **kwargs)
    assert prediction.shape == target.shape


def test_prepared_batch_trains_a_supervised_trainer_step(tiny_unet):
    network = tiny_unet(in_channels=1 + 3, out_channels=1)
    before = [p.detach().clone() for p in network.parameters()]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[mask_image_batch()],
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=torch.nn.MSELoss(),
        inferer=DiffusionInferer(DDPMScheduler(num_train_timesteps=1000)),
        prepare_batch=ConditionalDiffusionPrepareBatch(1000),
    )
    trainer.run()
    assert np.isfinite(float(trainer.state.output[0]["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))


def test_sampling_prepare_batch_passes_the_condition_and_the_initial_image():
    batch = mask_image_batch()
    condition, target, args, kwargs = SamplingPrepareBatch("label", initial_key="image")(batch)
    assert torch.equal(condition, batch["label"]) and target is None and args == ()
    assert torch.equal(kwargs["initial"], batch["image"])
    assert SamplingPrepareBatch("label")(batch)[3] == {}


# ---- handlers -----------------------------------------------------------------------------------------------------
def test_atomic_torch_save_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "new" / "weights.pt"
    atomic_torch_save({"w": torch.arange(3.0)}, path)
    atomic_torch_save({"w": torch.arange(4.0)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(4.0))
    assert os.listdir(path.parent) == ["weights.pt"]


def big_gradient_step(max_norm):
    """One SGD step (lr 1) on a Linear whose gradients have a norm far above 1; returns (update, raw gradients)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    GradientClipping(optimizer, max_norm).attach(Engine(lambda engine, batch: None))
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.full((8, 4), 10.0)).sum() * 100).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], grads


def test_gradient_clipping_scales_the_step_to_max_norm():
    update, grads = big_gradient_step(max_norm=1.0)
    total_norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert total_norm > 100
    for u, g in zip(update, grads):
        assert torch.allclose(u, -g * (1.0 / total_norm), atol=1e-5)
    assert torch.sqrt(sum((u**2).sum() for u in update)).item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("max_norm", [None, 0.0])
def test_gradient_clipping_off_leaves_the_step_unclipped(max_norm):
    update, grads = big_gradient_step(max_norm)
    for u, g in zip(update, grads):
        assert torch.allclose(u, -g)


def linear_training(model, data_seed=0):
    """An ignite Engine training ``model`` with SGD on 3 fixed batches per epoch; returns (engine, optimizer, data)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(data_seed)
    data = [(torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(3)]

    def step(engine, batch):
        optimizer.zero_grad()
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step), optimizer, data


def train_with_checkpoint(save_dir, max_epochs, resume=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    engine, optimizer, data = linear_training(model)
    save_dict = {"network": model, "optimizer": optimizer}
    TrainingCheckpoint(save_dir, save_dict, export_model=model, resume=resume, **kwargs).attach(engine)
    return engine, model, data


def test_checkpoint_and_exported_weights_are_written_after_training(tmp_path):
    engine, model, data = train_with_checkpoint(tmp_path, max_epochs=2)
    engine.run(data, max_epochs=2)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert set(checkpoint) == {"network", "optimizer", "trainer"}
    assert checkpoint["trainer"]["iteration"] == 6
    exported = torch.load(tmp_path / "model.pt")
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "model.pt"]


def test_exported_weights_are_those_of_the_export_model(tmp_path):
    model, ema = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    engine, optimizer, data = linear_training(model)
    TrainingCheckpoint(tmp_path, {"network": model, "ema": ema}, export_model=ema).attach(engine)
    engine.run(data, max_epochs=1)
    exported = torch.load(tmp_path / "model.pt")
    assert all(torch.equal(exported[k], v) for k, v in ema.state_dict().items())


def test_checkpoint_is_written_every_save_interval_epochs(tmp_path):
    engine, _, data = train_with_checkpoint(tmp_path, max_epochs=3, save_interval=2)
    written_after_epoch = {}

    @engine.on(Events.EPOCH_COMPLETED)
    def record(engine):
        written_after_epoch[engine.state.epoch] = (tmp_path / "checkpoint.pt").exists()

    engine.run(data, max_epochs=3)
    assert written_after_epoch == {1: False, 2: True, 3: True}
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trainer"]["iteration"] == 9


def test_existing_checkpoint_without_resume_stops_before_training(tmp_path):
    engine, _, data = train_with_checkpoint(tmp_path, max_epochs=1)
    engine.run(data, max_epochs=1)
    engine, model, data = train_with_checkpoint(tmp_path, max_epochs=1, seed=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match=rf"{tmp_path / 'checkpoint.pt'} exist\(s\) from an earlier run"):
        engine.run(data, max_epochs=1)
    assert engine.state.iteration == 0 and (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_lone_model_pt_is_protected_like_a_checkpoint(tmp_path):
    # released weights, or a run whose checkpoint was moved away: a new run must not replace them silently
    atomic_torch_save(torch.nn.Linear(3, 1).state_dict(), tmp_path / "model.pt")
    with pytest.raises(RunFolderError, match=r"model\.pt exist\(s\) from an earlier run or release.*'overwrite' to true"):
        check_run_folder(tmp_path)
    check_run_folder(tmp_path, overwrite=True)  # said explicitly: allowed
    check_run_folder(tmp_path / "elsewhere")  # an empty folder: nothing to lose


def test_resume_without_a_checkpoint_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(RunFolderError, match=rf"resume is true but there is no checkpoint at {tmp_path / 'checkpoint.pt'}"):
        check_run_folder(tmp_path, resume=True)
    engine, _, data = train_with_checkpoint(tmp_path, max_epochs=1, resume=True)
    with pytest.raises(RunFolderError, match="no checkpoint"):
        engine.run(data, max_epochs=1)


def test_resume_restores_epoch_and_weights_and_trains_to_max_epochs(tmp_path):
    engine, first_model, data = train_with_checkpoint(tmp_path, max_epochs=2)
    engine.run(data, max_epochs=2)
    trained = {k: v.clone() for k, v in first_model.state_dict().items()}

    engine, model, data = train_with_checkpoint(tmp_path, max_epochs=3, resume=True, seed=1)
    assert not torch.equal(model.weight, trained["weight"])
    at_start, epochs_run = {}, []

    @engine.on(Events.STARTED)
    def record_start(engine):  # registered after the checkpoint's loader, so it sees the restored state
        at_start["epoch"] = engine.state.epoch
        at_start["weights"] = {k: v.clone() for k, v in model.state_dict().items()}

    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    engine.run(data, max_epochs=3)
    assert at_start["epoch"] == 2
    assert all(torch.equal(at_start["weights"][k], v) for k, v in trained.items())
    assert epochs_run == [3]
    assert (engine.state.epoch, engine.state.iteration) == (3, 9)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trainer"]["iteration"] == 9


def test_resume_beyond_max_epochs_raises(tmp_path):
    engine, _, data = train_with_checkpoint(tmp_path, max_epochs=3)
    engine.run(data, max_epochs=3)
    engine, _, data = train_with_checkpoint(tmp_path, max_epochs=2, resume=True)
    with pytest.raises(ValueError, match="at epoch 3, beyond max_epochs=2"):
        engine.run(data, max_epochs=2)


class FakeSummaryWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image, step, dataformats))

    def flush(self):
        pass


def test_sample_grid_handler_logs_a_condition_sample_real_grid_every_interval(tiny_unet):
    batch = mask_image_batch(3)
    writer = FakeSummaryWriter()
    handler = SampleGridHandler(
        writer, [batch], tiny_unet(in_channels=1 + 3, out_channels=1), sampler(num_inference_steps=2), num_images=2,
        interval=2,
    )
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.run([0], max_epochs=4)
    assert [step for _, _, step, _ in writer.images] == [2, 4]
    panel = writer.images[0][1]
    assert panel.shape == (2 * (16 + 2), 3 * (16 + 2), 3) and panel.dtype == np.uint8
    assert writer.images[0][3] == "HWC"


def test_sample_grid_of_an_unconditional_model_shows_only_sample_and_real(tiny_unet):
    batch = {"image": torch.rand(3, 1, 16, 16), "label": torch.zeros(3, 0, 16, 16)}
    writer = FakeSummaryWriter()
    network = tiny_unet(in_channels=1, out_channels=1)
    s = sampler(num_inference_steps=2, conditional=False)
    handler = SampleGridHandler(writer, [batch], network, s, num_images=2)
    handler(Engine(lambda engine, batch: None))
    assert writer.images[0][1].shape == (2 * (16 + 2), 2 * (16 + 2), 3)


def test_sample_grid_of_a_joint_image_and_mask_target_draws_each_part_without_a_condition(tiny_unet):
    """condition_key None (no condition in the batch at all) and a target of 1 image channel + a 3-class mask: the
    row is generated image | generated mask | real image | real mask, the masks in label colours."""
    mask = torch.zeros(3, 3, 16, 16)
    mask[:, 2] = 1.0  # every pixel class 2
    batch = {"image": torch.cat([torch.rand(3, 1, 16, 16), mask * 2 - 1], dim=1)}
    writer = FakeSummaryWriter()
    s = sampler(num_inference_steps=2, conditional=False, target_channels=4)
    handler = SampleGridHandler(writer, [batch], tiny_unet(in_channels=4, out_channels=4), s, condition_key=None,
                                target_kind=["image", "onehot"], target_channels=[1, 3], num_images=2)
    handler(Engine(lambda engine, batch: None))
    panel = writer.images[0][1]
    assert panel.shape == (2 * (16 + 2), 4 * (16 + 2), 3)
    real_mask = panel[:16, 3 * 18 : 3 * 18 + 16]
    assert (real_mask == LABEL_COLOURS[2]).all()


def test_sample_grid_refuses_target_kinds_without_their_channel_counts(tiny_unet):
    with pytest.raises(ValueError, match="target_channels must give the channels of each"):
        SampleGridHandler(FakeSummaryWriter(), [], tiny_unet(in_channels=4, out_channels=4), sampler(),
                          condition_key=None, target_kind=["image", "onehot"])


# ---- visualize ----------------------------------------------------------------------------------------------------
def test_render_image_maps_minus_one_to_black_and_one_to_white():
    picture = render(torch.tensor([[[-1.0, 0.0, 1.0, 3.0]]]))
    assert picture.shape == (4, 1, 3) and picture.dtype == np.uint8
    # rotated 90 degrees counter-clockwise: the last column comes first
    assert picture[:, 0, 0].tolist() == [255, 255, 127, 0]
    assert (picture == picture[..., :1]).all()


def test_render_onehot_draws_label_colours_and_unspecified_voxels_grey():
    mask = torch.zeros(3, 1, 4)
    mask[0, 0, 0] = 1  # background
    mask[1, 0, 1] = 1
    mask[2, 0, 2] = 1  # voxel 3 has no channel set: unspecified
    picture = render(mask, "onehot")[::-1, 0]  # undo the rotation
    assert picture.tolist() == [*LABEL_COLOURS[:3].tolist(), UNSPECIFIED_COLOUR.tolist()]


def test_render_onehot_in_minus_one_to_one_range_treats_all_minus_one_as_unspecified():
    mask = torch.full((3, 1, 2), -1.0)
    mask[2, 0, 0] = 1.0
    picture = render(mask, "onehot")[::-1, 0]
    assert picture.tolist() == [LABEL_COLOURS[2].tolist(), UNSPECIFIED_COLOUR.tolist()]


def test_render_label_draws_the_colour_of_each_value_wrapping_the_palette():
    picture = render(torch.tensor([[[0.0, 3.0, 12.0]]]), "label")[::-1, 0]
    assert picture.tolist() == [LABEL_COLOURS[0].tolist(), LABEL_COLOURS[3].tolist(), LABEL_COLOURS[2].tolist()]


def test_render_draws_the_middle_slice_of_a_volume():
    volume = torch.rand(1, 4, 6, 5) * 2 - 1
    assert np.array_equal(render(volume, slice_axis=0), render(volume[:, 2]))
    assert np.array_equal(render(volume, slice_axis=2), render(volume[..., 2]))


def test_render_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'image', 'onehot' or 'label', got 'rgb'"):
        render(torch.zeros(1, 2, 2), "rgb")


def test_make_panel_has_one_row_per_case_and_one_column_per_entry():
    images = torch.zeros(2, 1, 16, 8)
    masks = torch.zeros(2, 3, 16, 8)
    panel = make_panel([masks, images, images], kinds=["onehot", "image", "image"])
    assert panel.shape == (2 * (8 + 2), 3 * (16 + 2), 3)
    assert (panel[8:10] == 255).all()  # the white gap between the rows


def test_make_panel_rejects_a_kind_count_that_differs_from_the_columns():
    with pytest.raises(ValueError, match="got 2 columns but 1 kinds"):
        make_panel([torch.zeros(1, 1, 4, 4)] * 2, kinds=["image"])


def test_save_png_writes_the_panel_upscaled(tmp_path):
    panel = make_panel([torch.rand(2, 1, 6, 5) * 2 - 1], kinds=["image"])
    save_png(panel, str(tmp_path / "panel.png"), scale=3)
    with Image.open(tmp_path / "panel.png") as picture:
        assert picture.size == (panel.shape[1] * 3, panel.shape[0] * 3)
        assert np.array_equal(np.asarray(picture.convert("RGB"))[::3, ::3], panel)


def test_file_panel_scales_images_between_percentiles_and_keeps_labels(tmp_path):
    import nibabel as nib

    from segdiff.visualize import load_for_panel, save_file_panel

    ramp = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)  # 0..999: percentiles 0.5 -> 4.995, 99.5 -> 994.005
    nib.save(nib.Nifti1Image(ramp, np.eye(4)), str(tmp_path / "image.nii.gz"))
    labels = (ramp % 3).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "label.nii.gz"))
    image = load_for_panel(str(tmp_path / "image.nii.gz"), "image")
    assert image.shape == (1, 10, 10, 10) and image.min() == -1.0 and image.max() == 1.0
    assert image[0, 5, 0, 0] == pytest.approx((500 - 4.995) / (994.005 - 4.995) * 2 - 1, abs=1e-5)
    np.testing.assert_array_equal(load_for_panel(str(tmp_path / "label.nii.gz"), "label")[0], labels)
    rows = [(str(tmp_path / "label.nii.gz"), str(tmp_path / "image.nii.gz"))] * 2
    save_file_panel(rows, ["label", "image"], str(tmp_path / "panel.png"), scale=1)
    with Image.open(tmp_path / "panel.png") as picture:
        assert picture.size == (2 * (10 + 2), 2 * (10 + 2))  # two rows, two columns, 2-pixel gaps


def test_overwrite_starts_a_new_run_over_an_earlier_checkpoint(tmp_path):
    engine, _, data = train_with_checkpoint(tmp_path, max_epochs=2)
    engine.run(data, max_epochs=2)
    engine, model, data = train_with_checkpoint(tmp_path, max_epochs=1, overwrite=True, seed=1)
    engine.run(data, max_epochs=1)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trainer"]["iteration"] == 3
    exported = torch.load(tmp_path / "model.pt")
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())


class ScriptedValidator:
    """A validator whose key metric follows a script: one value per validation run."""

    def __init__(self, scores):
        self.engine = Engine(lambda e, b: None)
        self.scores = list(scores)
        self.engine.state.best_metric, self.engine.state.best_metric_epoch = -1, -1
        self.engine.state.key_metric_name = "val_mean_dice"

        @self.engine.on(Events.EPOCH_COMPLETED)
        def compare(engine):  # as MONAI's Workflow does
            current = self.scores.pop(0)
            if engine.state.best_metric_epoch == -1 or current > engine.state.best_metric:
                engine.state.best_metric, engine.state.best_metric_epoch = current, engine.state.epoch

    def attach_to(self, trainer):
        @trainer.on(Events.EPOCH_COMPLETED)
        def validate(trainer):  # as MONAI's ValidationHandler does: the validator runs at the trainer's epoch
            self.engine.state.max_epochs = trainer.state.epoch
            self.engine.state.epoch = trainer.state.epoch - 1
            self.engine.run([0], max_epochs=trainer.state.epoch)


def test_with_best_of_model_pt_holds_the_best_validated_weights(tmp_path):
    model = torch.nn.Linear(3, 1)
    engine, _, data = linear_training(model)
    validator = ScriptedValidator([0.5, 0.9, 0.7])
    validator.attach_to(engine)
    TrainingCheckpoint(tmp_path, {"network": model}, export_model=model, best_of=validator.engine).attach(engine)
    weights_at = {}
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: weights_at.update({e.state.epoch: model.weight.clone()}))
    engine.run(data, max_epochs=3)
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], weights_at[2])  # epoch 2 scored best
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["best_metric"] == (0.9, 2)


def test_with_best_of_and_no_validation_the_final_weights_are_written(tmp_path):
    model = torch.nn.Linear(3, 1)
    engine, _, data = linear_training(model)
    validator = ScriptedValidator([])  # never run (fewer epochs than the validation interval)
    TrainingCheckpoint(tmp_path, {"network": model}, export_model=model, best_of=validator.engine).attach(engine)
    engine.run(data, max_epochs=1)
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], model.weight)


def test_training_writes_the_model_record_beside_the_weights_and_into_the_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1)
    engine, _, data = linear_training(model)
    record = ModelRecord({"num_classes": 3, "prediction_type": "v_prediction"}, label_names={"1": "liver"}, bundle="demo")
    TrainingCheckpoint(tmp_path, {"network": model}, export_model=model, record=record).attach(engine)
    engine.run(data, max_epochs=1)
    stored = json.loads((tmp_path / "model.json").read_text())
    assert stored["settings"] == {"bundle": "demo", "num_classes": 3, "prediction_type": "v_prediction"}
    assert stored["label_names"] == {"1": "liver"}
    assert stored["network"]["class"] == "torch.nn.modules.linear.Linear"
    assert stored["network"]["arguments"] == {"in_features": 3, "out_features": 1}
    assert stored["weights"] == "model.pt"
    assert stored["weights_sha256"] == state_dict_sha256(torch.load(tmp_path / "model.pt"))
    assert stored["training"]["epoch"] == 1 and stored["training"]["iteration"] == 3
    assert {"segdiff", "monai", "torch", "python"} <= set(stored["versions"])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["record"]["settings"] == stored["settings"]


def test_resume_with_other_settings_is_refused_naming_the_key(tmp_path):
    model = torch.nn.Linear(3, 1)
    engine, _, data = linear_training(model)
    TrainingCheckpoint(tmp_path, {"network": model}, export_model=model, record=ModelRecord({"prediction_type": "epsilon"})).attach(engine)
    engine.run(data, max_epochs=1)
    engine, _, data = linear_training(model)
    changed = ModelRecord({"prediction_type": "v_prediction"})
    TrainingCheckpoint(tmp_path, {"network": model}, export_model=model, record=changed, resume=True).attach(engine)
    with pytest.raises(ModelMismatchError, match=r'prediction_type: trained "epsilon", configured "v_prediction"'):
        engine.run(data, max_epochs=2)


def test_copy_weights_starts_the_target_from_the_sources_weights_when_training_starts():
    source, target = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    engine = Engine(lambda e, b: None)
    # a loader changes the source after the target was made (as MONAI Label's CheckpointLoader does)
    engine.add_event_handler(Events.STARTED, lambda e: source.weight.data.fill_(3.0))
    CopyWeights(source, target).attach(engine)
    engine.run([0], max_epochs=1)
    assert torch.equal(target.weight, torch.full((1, 3), 3.0))
    assert torch.equal(target.bias, source.bias)


def test_wall_time_cosine_schedule_warms_up_by_steps_then_decays_by_elapsed_time_and_resumes():
    from segdiff.engine import WallTimeCosineSchedule

    now = [100.0]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WallTimeCosineSchedule(optimizer, warmup_steps=2, seconds=10, clock=lambda: now[0])
    lrs = [optimizer.param_groups[0]["lr"]]
    for advance in (0.0, 5.0, 5.0, 5.0):  # step 1 starts the clock; then half the time, all of it, past it
        now[0] += advance
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # step 0 and 1: warm-up (0, 1/2 of 2.0); step 2: 5 s of 10 -> cos(pi/2) -> 1.0; 10 s -> 0; past the end stays 0
    assert lrs == pytest.approx([0.0, 1.0, 1.0, 0.0, 0.0], abs=1e-12)
    state = schedule.state_dict()
    assert state["elapsed_before"] == pytest.approx(15.0) and "clock" not in state and "optimizer" not in state

    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    resumed = WallTimeCosineSchedule(resumed_optimizer, warmup_steps=2, seconds=40, clock=lambda: now[0])
    resumed.load_state_dict(dict(state, seconds=40.0))  # 15 s already spent of 40
    resumed.step()
    now[0] += 5.0  # 20 s of 40 -> 1/2 -> lr 1.0
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1.0)


def test_wall_time_cosine_schedule_refuses_a_missing_wall_time_and_the_factory_picks_by_it():
    from monai.optimizers import WarmupCosineSchedule

    from segdiff.engine import WallTimeCosineSchedule, warmup_cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="seconds must be > 0, got 0"):
        WallTimeCosineSchedule(optimizer, 1, 0)
    assert isinstance(warmup_cosine_schedule(optimizer, 1, 100, max_wall_time=0), WarmupCosineSchedule)
    assert isinstance(warmup_cosine_schedule(optimizer, 1, 100, max_wall_time=60), WallTimeCosineSchedule)
