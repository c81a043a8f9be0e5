"""Synthesis across processes (segdiff.synthesis.shard and the records' journals): the shares of the masks, and two
gloo processes under torchrun writing what one process writes, resuming after a rank dies, with no pair lost or
written twice."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import TORCHRUN_TWO_PROCESSES, raises_with, write_dataset
from synthesis_toys import toy_synthesizer

from segdiff.synthesis.shard import process_shard, shard_of

WORKER = Path(__file__).with_name("synthesis_shard_worker.py")


def test_the_shares_of_the_ranks_hold_every_entry_exactly_once_in_order():
    entries = [f"case{i}" for i in range(7)]
    shares = [shard_of(entries, r, 3) for r in range(3)]
    assert shares == [["case0", "case3", "case6"], ["case1", "case4"], ["case2", "case5"]]
    assert shard_of(entries, 0, 1) == entries
    assert shard_of(entries[:1], 1, 2) == []  # more ranks than masks: a rank may have nothing to do


def test_the_rank_comes_from_the_arguments_or_torchruns_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_shard() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert process_shard() == (1, 4)
    assert process_shard(2, 3) == (2, 3)
    raises_with("rank 4 of world_size 4", process_shard, 4, None)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """Five toy masks and their list as JSON (for the worker), and the single-process result on them."""
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, shape=(24, 20), splits={"training": 5})
    entries = [{"label": str(root / "labels" / f"case{i}.nii.gz")} for i in range(5)]
    (root / "masks.json").write_text(json.dumps(entries))
    toy_synthesizer(root / "single").run(entries)
    return entries, root / "masks.json", root / "single"


def torchrun(output_dir, masks_json, *extra):
    return subprocess.run([*TORCHRUN_TWO_PROCESSES, str(WORKER), str(output_dir), str(masks_json), *extra],
                          capture_output=True, text=True, timeout=300)


def assert_same_outputs(out, reference):
    """Same records, datalist, table and pair files (same voxels, same affines) as the reference folder."""
    journal, expected = (json.loads((d / "tries.json").read_text()) for d in (out, reference))
    assert list(journal["masks"]) == list(expected["masks"]) == [f"case{i}" for i in range(5)]
    assert journal == expected
    for name in ("datalist.json", "tries.csv"):
        assert (out / name).read_text() == (reference / name).read_text()
    files = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(reference) for p in reference.rglob("*.nii.gz"))
    assert len(files) == 2 * len(json.loads((out / "datalist.json").read_text())["training"]) > 0
    for relative in files:
        ours, theirs = nib.load(str(out / relative)), nib.load(str(reference / relative))
        np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())
        np.testing.assert_array_equal(ours.affine, theirs.affine)


def test_two_gloo_processes_write_what_one_process_writes(tmp_path, masks):
    _, masks_json, single = masks
    done = torchrun(tmp_path / "out", masks_json)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_outputs(tmp_path / "out", single)
    ranks = [json.loads((tmp_path / "out" / "journals" / f"rank{r}.json").read_text())["masks"] for r in (0, 1)]
    assert list(ranks[0]) == ["case0", "case2", "case4"] and list(ranks[1]) == ["case1", "case3"]


@pytest.mark.parametrize("resume_with", ["two processes", "one process"])
def test_a_killed_rank_resumes_without_losing_or_duplicating_a_pair(tmp_path, masks, resume_with):
    entries, masks_json, single = masks
    out = tmp_path / "out"
    died = torchrun(out, masks_json, "--exit-at-case", "case3")  # rank 1 dies after case1; torchrun stops rank 0
    assert died.returncode != 0
    finished = json.loads((out / "tries.json").read_text())["masks"]
    assert "case1" in finished and "case3" not in finished
    if resume_with == "two processes":
        done = torchrun(out, masks_json)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        toy_synthesizer(out).run(entries)
    assert_same_outputs(out, single)
    tries = json.loads((out / "tries.json").read_text())["tries"]
    assert len({(t["case"], t["try"]) for t in tries}) == len(tries)  # no try recorded twice
    assert not list(out.rglob(".*.partial.nii.gz"))


def test_a_rank_refuses_a_folder_written_with_other_settings_naming_its_journal(tmp_path, masks):
    _, masks_json, _ = masks
    out = tmp_path / "out"
    assert torchrun(out, masks_json).returncode == 0
    journal = out / "journals" / "rank1.json"
    stored = json.loads(journal.read_text())
    stored["settings"]["toy"] = 2
    journal.write_text(json.dumps(stored))
    raises_with("rank1.json was written with other settings", toy_synthesizer(out).run, masks[0])
