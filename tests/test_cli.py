"""The segdiff command line: sub-commands, exit status 0/1/2, one-line errors without traceback."""

from __future__ import annotations

import json
import os
import runpy
import sys

import nibabel as nib
import numpy as np
import pytest

from segdiff.cli import COMMANDS, main


def make_nnunet(root, num_cases=10):
    """A tiny readable nnU-Net raw data set: 2 channels, 3 classes."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(num_cases):
        for c in range(2):
            data = rng.random((6, 5, 3)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / "imagesTr" / f"c{i}_{c:04d}.nii.gz"))
        lbl = (np.arange(90) % 3).reshape(6, 5, 3).astype(np.uint8)
        nib.save(nib.Nifti1Image(lbl, np.eye(4)), str(root / "labelsTr" / f"c{i}.nii.gz"))
    meta = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "T1", "1": "T2"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_help_lists_every_sub_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command.name in out


def test_missing_sub_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "required" in capsys.readouterr().err


def test_datalist_writes_json_and_prints_split_sizes(tmp_path, capsys):
    root = make_nnunet(tmp_path / "ds")
    assert main(["datalist", str(root), "--val-fraction", "0.2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {root / 'datalist.json'}: training 7, validation 2, test 1" in out
    datalist = json.loads((root / "datalist.json").read_text())
    assert datalist["channel_names"] == {"0": "T1", "1": "T2"}
    assert datalist["training"][0]["image"][1].endswith("_0001.nii.gz")


def test_datalist_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    root = make_nnunet(tmp_path / "ds", num_cases=3)
    assert main(["datalist", str(root)]) == 0
    capsys.readouterr()
    assert main(["datalist", str(root)]) == 2
    assert "datalist.json already exists" in one_line_error(capsys.readouterr().err)
    assert main(["datalist", str(root), "--overwrite"]) == 0


def test_datalist_with_folders_layout_and_custom_output(tmp_path, capsys):
    for sub in ("img", "seg"):
        (tmp_path / sub).mkdir()
        for case in ("p", "q", "r"):
            (tmp_path / sub / f"{case}.png").write_bytes(b"")
    output = tmp_path / "lists" / "mine.json"
    args = ["datalist", str(tmp_path), "--layout", "folders", "--images", "img", "--labels", "seg"]
    assert main(args + ["--output", str(output)]) == 0
    datalist = json.loads(output.read_text())
    entries = datalist["training"] + datalist["validation"] + datalist["test"]
    assert sorted(e["label"] for e in entries) == ["seg/p.png", "seg/q.png", "seg/r.png"]


def test_datalist_on_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["datalist", str(tmp_path / "nowhere")]) == 2
    assert one_line_error(capsys.readouterr().err).startswith("segdiff datalist: error: data set folder not found")


def test_check_ok_prints_the_entry_count(tmp_path, capsys):
    root = make_nnunet(tmp_path / "ds")
    main(["datalist", str(root)])
    capsys.readouterr()
    argv = ["check", str(root / "datalist.json"), "--num-classes", "3", "--image-channels", "2"]
    assert main(argv + ["--splits", "training", "validation", "test"]) == 0
    assert capsys.readouterr().out.strip() == "OK: 10 entries checked"


def test_check_prints_every_problem_to_stderr_and_exits_1(tmp_path, capsys):
    root = make_nnunet(tmp_path / "ds")
    main(["datalist", str(root), "--val-fraction", "0", "--test-fraction", "0"])
    capsys.readouterr()
    os.remove(root / "labelsTr" / "c3.nii.gz")
    assert main(["check", str(root / "datalist.json"), "--num-classes", "2", "--splits", "training"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert err[0] == f"{root / 'datalist.json'}: 10 problem(s) found:"
    assert "training[3] 'label': file not found: labelsTr/c3.nii.gz" in captured.err
    assert "labelsTr/c0.nii.gz: expected class indices in [0, 2) for num_classes=2, found 2" in captured.err


def test_check_uses_dataset_dir_when_given(tmp_path, capsys):
    root = make_nnunet(tmp_path / "ds", num_cases=3)
    main(["datalist", str(root), "--output", str(tmp_path / "elsewhere.json")])
    capsys.readouterr()
    argv = ["check", str(tmp_path / "elsewhere.json"), "--num-classes", "3", "--splits", "training"]
    assert main(argv) == 1  # relative to tmp_path: nothing there
    capsys.readouterr()
    assert main(argv + ["--dataset-dir", str(root)]) == 0


def test_check_no_label_accepts_image_only_entries(tmp_path, capsys):
    root = make_nnunet(tmp_path / "ds", num_cases=3)
    datalist = {"test": [{"image": ["imagesTr/c0_0000.nii.gz", "imagesTr/c0_0001.nii.gz"]}]}
    (root / "infer.json").write_text(json.dumps(datalist))
    argv = ["check", str(root / "infer.json"), "--num-classes", "3", "--splits", "test"]
    assert main(argv) == 1
    capsys.readouterr()
    assert main(argv + ["--no-label"]) == 0


def test_check_missing_datalist_is_a_one_line_error(tmp_path, capsys):
    assert main(["check", str(tmp_path / "none.json"), "--num-classes", "3"]) == 2
    assert "datalist not found" in one_line_error(capsys.readouterr().err)


def test_check_requires_num_classes(tmp_path, capsys):
    assert main(["check", str(tmp_path / "d.json")]) == 2
    assert "--num-classes" in capsys.readouterr().err


def test_demo_data_passes_its_options_and_prints_the_datalist(tmp_path, capsys, monkeypatch):
    import segdiff.data.demo

    calls = []

    def fake_write(output_dir, num_slabs=10, overwrite=False):
        calls.append((output_dir, num_slabs, overwrite))
        return os.path.join(output_dir, "datalist.json")

    monkeypatch.setattr(segdiff.data.demo, "write_demo_data", fake_write)
    assert main(["demo-data", str(tmp_path), "--num-slabs", "6", "--overwrite"]) == 0
    assert calls == [(str(tmp_path), 6, True)]
    assert str(tmp_path / "datalist.json") in capsys.readouterr().out


def test_demo_data_into_non_empty_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "x").write_text("x")
    assert main(["demo-data", str(tmp_path)]) == 2
    assert "not empty" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_sub_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "usage: segdiff " + command in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:'segdiff.cli' found in sys.modules:RuntimeWarning")
def test_module_runs_as_a_script(monkeypatch, capsys):
    # in-process: a subprocess would spend seconds importing torch and monai again
    monkeypatch.setattr(sys, "argv", ["segdiff", "--version"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("segdiff.cli", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("segdiff ")


def test_check_reports_inputs_that_would_share_an_output_name_and_exits_1(tmp_path, capsys):
    entries = []
    for site in ("siteA", "siteB"):
        for folder, data in (("images", np.ones((6, 5, 3), np.float32)), ("labels", np.zeros((6, 5, 3), np.uint8))):
            (tmp_path / site / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / site / folder / "patient1.nii.gz"))
        entries.append({"image": f"{site}/images/patient1.nii.gz", "label": f"{site}/labels/patient1.nii.gz"})
    (tmp_path / "d.json").write_text(json.dumps({"test": entries}))
    argv = ["check", str(tmp_path / "d.json"), "--num-classes", "2", "--splits", "test"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "2 problem(s) found" in err
    assert ("test 'label': output 'patient1': entry 0 siteA/labels/patient1.nii.gz, entry 1 "
            "siteB/labels/patient1.nii.gz") in err
    assert "test 'image': output 'patient1': entry 0 siteA/images/patient1.nii.gz" in err
    assert main(argv + ["--output-keys"]) == 0  # no keys: the check is skipped
    assert main(argv + ["--output-keys", "label"]) == 1
    assert "test 'image'" not in capsys.readouterr().err


def test_check_reads_modalities_and_lets_the_unlabelled_modality_go_without_labels(tmp_path, capsys):
    root = make_nnunet(tmp_path / "ds", num_cases=3)
    main(["datalist", str(root), "--val-fraction", "0", "--test-fraction", "0"])
    capsys.readouterr()
    datalist = json.loads((root / "datalist.json").read_text())
    datalist["modalities"] = {"ct": 0, "mr": 1}
    for k, entry in enumerate(datalist["training"]):
        entry["modality"] = "ct" if k == 0 else "mr"
        if k > 0:
            del entry["label"]
    (root / "datalist.json").write_text(json.dumps(datalist))
    argv = ["check", str(root / "datalist.json"), "--num-classes", "3", "--splits", "training"]
    assert main(argv + ["--unlabelled-modalities", "mr"]) == 0
    assert main(argv) == 1
    assert "training[1] 'label': expected a 'label' key" in capsys.readouterr().err
