"""The latent diffusion + ControlNet engine (segdiff.engine.latent): modalities, training batches, the frozen-UNet
ControlNet wrapper and the latent sampler, on tiny 2D networks (16x16 images, 8x8 latents)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet

from segdiff.data.datalist import DatalistError
from segdiff.engine import DiffusionLoss, build_scheduler, training_scheduler
from segdiff.engine.latent import (
    ControlNetDiffusion,
    EmptyLabeld,
    LatentDiffusionPrepareBatch,
    LatentDiffusionSampler,
    _Guided,
    controlnet_from_unet,
    empty_mask,
    modality_ids,
    null_class,
)
from segdiff.errors import ConfigKeyError, ModelMismatchError
from segdiff.transforms import EncodeMaskd

MODALITIES = {"ct": 0, "mr": 1}
NUM_CLASSES = 3  # background + 2 organs
LATENT_CHANNELS = 3
SCALE = 0.7
SCHEDULE = dict(num_train_timesteps=100, schedule="linear_beta", beta_start=1e-4, beta_end=2e-2)


def make_autoencoder(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
                         latent_channels=LATENT_CHANNELS, num_res_blocks=1, norm_num_groups=4,
                         attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                         with_decoder_nonlocal_attn=False)


def make_unet(seed=0):
    """A stand-in for a trained latent UNet: MONAI zero-initialises the output convolution (the untrained UNet
    outputs zeros), so those parameters are drawn at random."""
    torch.manual_seed(seed)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                              channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4,
                              num_class_embeds=null_class(MODALITIES) + 1)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return unet


def make_controlnet(seed=1, channels=(8, 8)):
    torch.manual_seed(seed)
    return ControlNet(spatial_dims=2, in_channels=LATENT_CHANNELS, channels=channels, attention_levels=(False, False),
                      num_res_blocks=1, norm_num_groups=4, num_class_embeds=null_class(MODALITIES) + 1,
                      conditioning_embedding_in_channels=NUM_CLASSES, conditioning_embedding_num_channels=(8, 8))


def make_wrapper():
    return ControlNetDiffusion(make_unet(), controlnet_from_unet(make_unet(), make_controlnet()))


def one_hot(label):
    return EncodeMaskd("label", NUM_CLASSES)({"label": label})["label"]


def random_label(seed, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_CLASSES, (1, size, size), generator=g).float()


def scheduler(**kwargs):
    return training_scheduler("ddpm", prediction_type="epsilon", **SCHEDULE, **kwargs)


def prepare(**kwargs):
    return LatentDiffusionPrepareBatch(make_autoencoder(), SCALE, scheduler(), MODALITIES, **kwargs)


# ---- modalities ------------------------------------------------------------------------------------------------
def datalist(*modalities, mapping=MODALITIES):
    entries = [{"image": f"images/{i}.nii.gz", "modality": m} for i, m in enumerate(modalities)]
    return {"modalities": mapping, "training": entries, "validation": []}


def test_modality_ids_come_from_the_datalist_its_file_or_a_mapping(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist("ct", "mr")))
    assert modality_ids(datalist("ct", "mr")) == MODALITIES
    assert modality_ids(str(path)) == MODALITIES
    assert modality_ids({"mr": 1, "ct": 0}) == MODALITIES
    assert null_class(MODALITIES) == 2


def test_modality_ids_name_the_entry_whose_modality_is_unknown():
    with pytest.raises(DatalistError, match=r"training\[1\] has modality 'pet'.*known: ct, mr"):
        modality_ids(datalist("ct", "pet"))


def test_modality_ids_name_the_entry_without_a_modality():
    data = datalist("ct")
    data["validation"] = [{"image": "x.nii.gz"}]
    with pytest.raises(DatalistError, match=r"validation\[0\] has no 'modality'"):
        modality_ids(data)


def test_modality_ids_refuse_a_datalist_without_the_mapping():
    with pytest.raises(DatalistError, match="no 'modalities' mapping"):
        modality_ids({"training": [{"image": "x", "modality": "ct"}]})


@pytest.mark.parametrize("mapping", [{"ct": 0, "mr": 2}, {"ct": 0, "mr": 0}, {"ct": 1}, {"ct": "0"}])
def test_modality_ids_must_be_0_to_n_minus_1(mapping):
    with pytest.raises(ConfigKeyError, match="modality|integer"):
        modality_ids(mapping)


# ---- training batches ------------------------------------------------------------------------------------------
def image_batch(n=2, seed=0):
    return torch.rand((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_prepare_batch_noises_the_scaled_latent_of_the_image():
    prep = prepare()
    images = image_batch()
    noisy, target, args, kwargs = prep({"image": images, "modality": ["ct", "mr"]})
    latent = prep.autoencoder.encode(images)[0] * SCALE
    assert noisy.shape == (2, LATENT_CHANNELS, 8, 8)
    torch.testing.assert_close(prep.last_batch["target"], latent)
    torch.testing.assert_close(noisy, prep.scheduler.add_noise(latent, prep.last_batch["noise"], kwargs["timesteps"]))
    torch.testing.assert_close(target, prep.last_batch["noise"])  # epsilon prediction
    assert args == () and kwargs["class_labels"].tolist() == [0, 1] and "controlnet_cond" not in kwargs


def test_prepare_batch_with_rectified_flow_targets_the_velocity():
    flow = training_scheduler("rflow", prediction_type="v_prediction", **SCHEDULE)
    prep = LatentDiffusionPrepareBatch(make_autoencoder(), SCALE, flow, MODALITIES)
    _, target, _, _ = prep({"image": image_batch(), "modality": torch.tensor([0, 1])})
    torch.testing.assert_close(target, prep.last_batch["target"] - prep.last_batch["noise"])


@pytest.mark.parametrize("dropout, expected", [(0.0, 0.0), (1.0, 1.0), (0.3, 0.3)])
def test_modality_dropout_gives_the_null_class_at_its_rate(dropout, expected):
    torch.manual_seed(0)
    prep = prepare(modality_dropout=dropout)
    n = 4000
    labels = prep.class_labels({"modality": ["mr"] * n}, n, "cpu")
    rate = (labels == null_class(MODALITIES)).float().mean().item()
    assert abs(rate - expected) < 0.03
    assert set(labels.tolist()) <= {1, 2}


def test_prepare_batch_refuses_an_unknown_modality_in_the_batch():
    with pytest.raises(ValueError, match=r"\[1\] is modality 'pet'"):
        prepare()({"image": image_batch(), "modality": ["ct", "pet"]})


def test_empty_labeld_fills_a_background_label_that_encodes_to_the_empty_mask():
    entry = EmptyLabeld("label")({"image": torch.zeros(1, 16, 16), "modality": "mr"})
    assert entry["has_label"] is False
    torch.testing.assert_close(one_hot(entry["label"]), empty_mask(NUM_CLASSES, (16, 16)))
    assert EmptyLabeld("label")({"image": torch.zeros(1, 16, 16), "label": random_label(0)})["has_label"] is True


def test_unlabelled_entries_get_an_empty_one_hot_mask():
    prep = prepare(mask_key="label", num_classes=NUM_CLASSES)
    masks = torch.stack([one_hot(random_label(1)), one_hot(random_label(2))])
    batch = {"image": image_batch(), "modality": ["ct", "mr"], "label": masks, "has_label": torch.tensor([True, False])}
    cond = prep(batch)[3]["controlnet_cond"]
    torch.testing.assert_close(cond[0], masks[0])
    torch.testing.assert_close(cond[1], empty_mask(NUM_CLASSES, (16, 16)))
    # a batch of target-modality images only, without the mask key at all
    cond = prep({"image": image_batch(), "modality": ["mr", "mr"]})[3]["controlnet_cond"]
    torch.testing.assert_close(cond, empty_mask(NUM_CLASSES, (16, 16), batch=2))


# ---- the ControlNet ----------------------------------------------------------------------------------------------
def test_controlnet_from_unet_copies_the_unet_weights():
    unet, controlnet = make_unet(), make_controlnet()
    controlnet_from_unet(unet, controlnet)
    source = unet.state_dict()
    shared = [k for k in controlnet.state_dict() if not k.startswith("controlnet_")]
    assert len(shared) > 20 and "class_embedding.weight" in shared
    for key in shared:
        assert torch.equal(controlnet.state_dict()[key], source[key]), key


def test_controlnet_from_unet_refuses_a_different_architecture():
    with pytest.raises(ModelMismatchError, match="no equal-shaped UNet parameter"):
        controlnet_from_unet(make_unet(), make_controlnet(channels=(8, 16)))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, LATENT_CHANNELS, 8, 8), generator=g)
    mask = torch.stack([one_hot(random_label(seed)), one_hot(random_label(seed + 1))])
    return x, torch.tensor([10, 70]), torch.tensor([0, 1]), mask


def test_zero_initialised_controlnet_leaves_the_unet_output_unchanged():
    wrapper = make_wrapper().eval()
    x, t, labels, mask = inputs()
    with torch.no_grad():
        down, mid = wrapper.controlnet(x=x, timesteps=t, controlnet_cond=mask, class_labels=labels)
        assert all(not r.any() for r in down) and not mid.any()  # MONAI's zero convolutions
        plain = wrapper.unet(x, timesteps=t, class_labels=labels)
        assert plain.abs().mean() > 1e-3
        torch.testing.assert_close(wrapper(x, t, labels, mask), plain, rtol=0, atol=0)


def test_conditioning_scale_zero_is_the_plain_unet_even_for_a_trained_controlnet():
    wrapper = make_wrapper().eval()
    with torch.no_grad():
        for p in wrapper.controlnet.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x, t, labels, mask = inputs()
        plain = wrapper.unet(x, timesteps=t, class_labels=labels)
        assert not torch.allclose(wrapper(x, t, labels, mask), plain)
        wrapper.conditioning_scale = 0.0
        torch.testing.assert_close(wrapper(x, t, labels, mask), plain)


def test_controlnet_diffusion_refuses_a_mask_off_the_image_grid():
    x, t, labels, mask = inputs()
    with pytest.raises(ValueError, match="image resolution"):
        make_wrapper()(x, t, labels, mask[:, :, :8, :8])


def test_a_training_step_changes_the_controlnet_and_not_the_unet():
    wrapper = make_wrapper()
    assert {id(p) for p in wrapper.trainable_parameters()} == {id(p) for p in wrapper.controlnet.parameters()}
    assert not any(p.requires_grad for p in wrapper.unet.parameters())
    wrapper.train()
    assert wrapper.controlnet.training and not wrapper.unet.training
    unet_before = {k: v.clone() for k, v in wrapper.unet.state_dict().items()}
    controlnet_before = {k: v.clone() for k, v in wrapper.controlnet.state_dict().items()}
    pipeline = lambda d: one_hot_label(EmptyLabeld("label")(d))  # noqa: E731
    data = Dataset([{"image": image_batch(1, 0)[0], "label": random_label(3), "modality": "ct"},
                    {"image": image_batch(1, 1)[0], "modality": "mr"}], transform=pipeline)
    prep = prepare(mask_key="label", num_classes=NUM_CLASSES, modality_dropout=0.1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(data, batch_size=2), network=wrapper,
        optimizer=torch.optim.Adam(wrapper.trainable_parameters(), lr=1e-2), loss_function=DiffusionLoss(prep),
        prepare_batch=prep, inferer=SimpleInferer(),
    )
    trainer.run()
    assert prep.last_batch["class_labels"].shape == (2,)
    # the MR entry (no label) trained with the empty mask, the CT entry with its own
    torch.testing.assert_close(prep.last_batch["controlnet_cond"][1], empty_mask(NUM_CLASSES, (16, 16)))
    torch.testing.assert_close(prep.last_batch["controlnet_cond"][0], one_hot(random_label(3)).as_tensor())
    assert all(torch.equal(v, unet_before[k]) for k, v in wrapper.unet.state_dict().items())
    assert any(not torch.equal(v, controlnet_before[k]) for k, v in wrapper.controlnet.state_dict().items())


def one_hot_label(entry):
    return EncodeMaskd("label", NUM_CLASSES)(entry)


# ---- sampling --------------------------------------------------------------------------------------------------
def sampler(sampler_name="ddim", **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("modality", "mr")
    schedule = build_scheduler(sampler_name, **SCHEDULE, prediction_type="epsilon", clip_sample=False)
    return LatentDiffusionSampler(make_autoencoder(), SCALE, schedule, MODALITIES, **kwargs)


def masks(n=2):
    return torch.stack([one_hot(random_label(10 + i)) for i in range(n)])


@pytest.mark.parametrize("name", ["ddim", "dpm_solver"])
@pytest.mark.parametrize("plain_unet", [False, True])
def test_sampler_is_seeded_and_returns_images_on_the_mask_grid(name, plain_unet):
    network = make_unet() if plain_unet else make_wrapper()
    first = sampler(name, seed=3, guidance_scale=2.0)(masks(), network)
    assert first.shape == (2, 1, 16, 16) and torch.isfinite(first).all()
    torch.testing.assert_close(sampler(name, seed=3, guidance_scale=2.0)(masks(), network), first)
    assert not torch.allclose(sampler(name, seed=4, guidance_scale=2.0)(masks(), network), first)


@pytest.mark.parametrize("plain_unet", [False, True])
def test_seeded_batch_elements_get_their_own_noise_reproducibly(plain_unet):
    network = make_unet() if plain_unet else make_wrapper()
    same = masks(1).repeat(3, 1, 1, 1)  # one mask three times: only the noise can tell the elements apart
    first = sampler(seed=3)(same, network)
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[1], first[2])
    torch.testing.assert_close(sampler(seed=3)(same, network), first)


def test_given_noise_replaces_the_drawn_noise():
    network = make_unet()
    noise = torch.randn((2, LATENT_CHANNELS, 8, 8), generator=torch.Generator().manual_seed(5))
    given = sampler(seed=None)(masks(), network, noise=noise)
    torch.testing.assert_close(sampler(seed=9)(masks(), network, noise=noise), given)  # the seed is not used
    torch.testing.assert_close(sampler(seed=None)(masks(1), network, noise=noise[1:])[0], given[1])
    with pytest.raises(ValueError, match="expected \\(2, 3, 8, 8\\)"):
        sampler()(masks(), network, noise=noise[:1])


def test_guidance_scale_one_runs_one_pass_and_otherwise_a_doubled_batch():
    network = make_wrapper()
    batch_sizes = []
    network.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    sampler(guidance_scale=1.0)(masks(), network)
    assert batch_sizes == [2, 2, 2]
    batch_sizes.clear()
    sampler(guidance_scale=3.0)(masks(), network)
    assert batch_sizes == [4, 4, 4]


def test_guidance_combines_the_conditional_and_the_null_class_outputs():
    unet = make_unet().eval()
    x, t, labels, _ = inputs()
    with torch.no_grad():
        cond = unet(x, timesteps=t, class_labels=labels)
        uncond = unet(x, timesteps=t, class_labels=torch.full_like(labels, 2))
        guided = _Guided(unet, labels, None, 3.0, null_class=2)(x, t)
        torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
        torch.testing.assert_close(_Guided(unet, labels, None, 1.0, null_class=2)(x, t), cond)


def test_the_modality_changes_the_sample():
    network = make_unet()
    ct, mr = sampler(modality="ct")(masks(1), network), sampler(modality="mr")(masks(1), network)
    assert not torch.allclose(ct, mr)
    torch.testing.assert_close(sampler(modality="ct")(masks(1), network, class_labels=["mr"]), mr)


def test_sliding_window_decoding_equals_whole_decoding_when_the_window_covers_the_latent():
    latent = torch.randn((1, LATENT_CHANNELS, 8, 8), generator=torch.Generator().manual_seed(0))
    whole = sampler().decode(latent)
    windowed = sampler(decode_roi_size=(8, 8)).decode(latent)
    assert whole.shape == (1, 1, 16, 16)
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)
    patches = sampler(decode_roi_size=(4, 4), decode_overlap=0.5).decode(latent)  # 9 overlapping latent windows
    assert patches.shape == whole.shape and torch.isfinite(patches).all()


def test_sampler_refuses_clipping_latents_and_grids_that_do_not_divide():
    schedule = build_scheduler("ddim", **SCHEDULE, prediction_type="epsilon")  # clip_sample defaults to True
    with pytest.raises(ConfigKeyError, match="clip_sample false"):
        LatentDiffusionSampler(make_autoencoder(), SCALE, schedule, MODALITIES)
    with pytest.raises(ValueError, match="multiple of the autoencoder's downsampling 2"):
        sampler()(torch.zeros(1, NUM_CLASSES, 15, 16), make_unet())
