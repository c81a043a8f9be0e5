"""The latent_mask_to_image stages under torchrun (configs/multi_gpu_train_{autoencoder,diffusion,controlnet}.yaml): two
gloo processes on the CPU train each stage on tests/test_bundle_latent.py's tiny two-modality set, one after the other,
as a user runs them. Rank 0 alone writes weights, records, the scale factor and logs; the ranks train on disjoint
shares (stages 1 and 2) or on their own seeded weighted draws (stage 3); every rank resumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from bundle_utils import BUNDLES, TORCHRUN_TWO_PROCESSES, run_bundle_cli, workflow_missing_properties
from ignite.engine import Events
from test_bundle_latent import (AUTOENCODER, BUNDLE, COMMON, CONTROLNET, LATENT, TRAINING, stage_overrides,
                                write_ct_mr_set)

from segdiff.engine.data_sampler import DistributedWeightedSampler
from segdiff.engine.provenance import state_dict_sha256
from segdiff.export import load_bundle_network

STAGES = ("autoencoder", "diffusion", "controlnet")
#: one case per step: each rank's two training cases make two iterations per epoch (DDP's second iteration checks
#: that the first one's gradients were all reduced); stage 1 runs its discriminator from the first iteration on
SETTINGS = {
    "autoencoder": {**COMMON, **AUTOENCODER, "batch_size": 2, "adversarial_warmup_steps": 0},
    "diffusion": {**COMMON, **LATENT, **TRAINING, "batch_size": 2},
    "controlnet": {**COMMON, **LATENT, **TRAINING, **CONTROLNET, "batch_size": 2},
}
#: a test-only overlay, merged after the stage's: each rank's training indices per epoch (SeenIndices below)
SEEN_OVERLAY = """
seen_dir: null
seen_indices:
  _target_: test_latent_multi_gpu.SeenIndices
  folder: '@seen_dir'
train#trainer#train_handlers: "$@train#handlers + [@seen_indices]"
"""


class SeenIndices:
    """Train handler of :data:`SEEN_OVERLAY`: when an epoch starts (after MONAI has set the sampler's epoch), appends
    the epoch and the dataset indices this rank's sampler gives the data loader to ``<folder>/rank<r>.jsonl``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = {"epoch": engine.state.epoch, "indices": list(engine.data_loader.sampler)}
        with open(self.folder / f"rank{torch.distributed.get_rank()}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def seen(folder) -> dict[int, dict[int, list[int]]]:
    """rank -> epoch -> the indices that rank's sampler gave (what :class:`SeenIndices` wrote)."""
    ranks = {}
    for rank in (0, 1):
        lines = (Path(folder) / f"rank{rank}.jsonl").read_text().splitlines()
        ranks[rank] = {line["epoch"]: line["indices"] for line in map(json.loads, lines)}
    return ranks


def torchrun(root, stage, bundle_root, **overrides):
    """Stage ``stage`` with its overlay and :data:`SEEN_OVERLAY` under torchrun (two processes, gloo) writing into
    ``bundle_root``; returns the finished process and the folder of its :class:`SeenIndices` files."""
    seen_dir = Path(bundle_root) / f"seen_{stage}"
    overlay = os.path.relpath(root / "seen.yaml", BUNDLES / BUNDLE / "configs")  # run_bundle_cli prefixes configs/
    settings = {"dataset_dir": str(root / "data"), "bundle_root": str(bundle_root),
                "output_dir": str(Path(bundle_root) / "outputs" / stage), "seen_dir": str(seen_dir),
                "max_epochs": 1, **SETTINGS[stage], **overrides}
    done = run_bundle_cli(BUNDLE, [f"train_{stage}.yaml", f"multi_gpu_train_{stage}.yaml", overlay], run_id="training",
                          launcher=TORCHRUN_TWO_PROCESSES, timeout=300, **settings)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done, seen_dir


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The three stages, one torchrun each, in order (1 epoch each): ``(root, {stage: (process, seen_dir)})``."""
    root = tmp_path_factory.mktemp("latent_multi_gpu")
    write_ct_mr_set(root / "data")
    (root / "seen.yaml").write_text(SEEN_OVERLAY)
    with pytest.MonkeyPatch.context() as env:
        ranks_import_this_file(env)
        runs = {stage: torchrun(root, stage, root / "bundle") for stage in STAGES}
    return root, runs


def ranks_import_this_file(env: pytest.MonkeyPatch) -> None:
    """Put tests/ on the processes' path: they import :class:`SeenIndices` from this file."""
    env.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))


def output(done) -> str:
    return done.stdout + done.stderr


def test_rank_0_alone_writes_each_stages_weights_record_and_logs(launched):
    root, runs = launched
    models = root / "bundle" / "models"
    for stage, (done, _) in runs.items():
        log = output(done)
        saved = f"epoch 1: saved {models / f'{stage}_checkpoint.pt'} and {models / f'{stage}.pt'}"
        assert log.count(saved) == 1, stage  # the one writer logs each save; a second rank would log it again
        events = list((root / "bundle" / "outputs" / stage / "tensorboard").iterdir())
        assert len(events) == 1 and events[0].name.startswith("events.out.tfevents"), events  # none from rank 1
        weights = torch.load(models / f"{stage}.pt", weights_only=True)
        record = json.loads((models / f"{stage}.json").read_text())
        assert record["weights_sha256"] == state_dict_sha256(weights) and record["settings"]["stage"] == stage
        checkpoint = torch.load(models / f"{stage}_checkpoint.pt", weights_only=False)
        assert checkpoint["trainer"]["iteration"] == 2  # two cases per rank, one per step
    assert output(runs["autoencoder"][0]).count("latent scale factor") == 1
    assert "scale_factor" in json.loads((models / "autoencoder.json").read_text())["latent"]
    metrics = json.loads((root / "bundle" / "outputs" / "autoencoder" / "reconstruction_metrics.json").read_text())
    assert sorted(metrics["metrics"]) == ["ct", "mr"]  # every rank validated the whole split: both modalities
    assert not (BUNDLES / BUNDLE / "runs").exists()  # no TensorBoard writer of its own on any rank


def test_the_weights_are_plain_state_dicts_that_load_into_the_stage_networks(launched):
    root, _ = launched
    models = root / "bundle" / "models"
    for stage in STAGES:
        config = str(BUNDLES / BUNDLE / "configs" / f"train_{stage}.yaml")
        overrides = {"dataset_dir": str(root / "data"), "bundle_root": str(root / "bundle"), **SETTINGS[stage]}
        network, _ = load_bundle_network(config, weights=str(models / f"{stage}.pt"), overrides=overrides)  # strict
        assert not any(key.startswith("module.") for key in network.state_dict())
        checkpoint = torch.load(models / f"{stage}_checkpoint.pt", weights_only=False)
        network.load_state_dict(checkpoint["network"])  # the checkpoint too holds the network, not its DDP wrapper


def test_the_two_ranks_train_on_disjoint_shares_of_the_cases_in_stages_1_and_2(launched):
    _, runs = launched
    for stage in ("autoencoder", "diffusion"):
        ranks = seen(runs[stage][1])
        first, second = ranks[0][1], ranks[1][1]
        assert len(first) == len(second) == 2 and set(first) | set(second) == {0, 1, 2, 3}, (stage, ranks)


def controlnet_draws(root, rank, epoch):
    """What DistributedWeightedSampler draws on ``rank`` in ``epoch`` with train_controlnet.yaml's weights."""
    entries = json.loads((root / "data" / "datalist.json").read_text())["training"]
    ratio, targets = CONTROLNET["target_mix_ratio"], sum(e["modality"] == "mr" for e in entries)
    weights = [ratio / targets if e["modality"] == "mr" else (1 - ratio) / (len(entries) - targets) for e in entries]
    sampler = DistributedWeightedSampler(weights, len(entries), seed=0, num_replicas=2, rank=rank)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_controlnet_rank_draws_its_own_seeded_weighted_half_of_the_epoch(launched):
    root, runs = launched
    ranks = seen(runs["controlnet"][1])
    for rank in (0, 1):
        assert ranks[rank] == {1: controlnet_draws(root, rank, 1)} and len(ranks[rank][1]) == 2


def test_every_rank_resumes_the_controlnet_and_draws_what_an_uninterrupted_run_would(launched, tmp_path, monkeypatch):
    root, _ = launched
    shutil.copytree(root / "bundle" / "models", tmp_path / "models")
    before = torch.load(tmp_path / "models" / "controlnet.pt", weights_only=True)
    ranks_import_this_file(monkeypatch)
    done, seen_dir = torchrun(root, "controlnet", tmp_path, max_epochs=2, resume=True)
    log = output(done)
    assert log.count(f"resumed from {tmp_path / 'models' / 'controlnet_checkpoint.pt'} at epoch 1") == 2
    assert log.count(f"epoch 2: saved {tmp_path / 'models' / 'controlnet_checkpoint.pt'}") == 1
    checkpoint = torch.load(tmp_path / "models" / "controlnet_checkpoint.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 4 and checkpoint["record"]["training"]["epoch"] == 2
    after = torch.load(tmp_path / "models" / "controlnet.pt", weights_only=True)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert seen(seen_dir) == {rank: {2: controlnet_draws(root, rank, 2)} for rank in (0, 1)}


@pytest.mark.parametrize("stage", STAGES)
def test_check_properties_empty_for_each_overlay_in_a_one_process_group(launched, tmp_path, monkeypatch, stage):
    import socket

    import ignite.distributed

    root, _ = launched
    paths = {"dataset_dir": str(root / "data"), "bundle_root": str(root / "bundle")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                            LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    configs = [f"train_{stage}.yaml", f"multi_gpu_train_{stage}.yaml"]
    try:
        overrides = stage_overrides(configs[0], paths, tmp_path)
        assert workflow_missing_properties(BUNDLE, configs, "train", **overrides) == []
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        ignite.distributed.sync()  # Ignite caches the process group; later tests run without one
