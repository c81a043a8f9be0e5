"""Datalists: layouts, by-case splitting, saving/loading and path resolution."""

from __future__ import annotations

import json
import os

import pytest

from segdiff.data.datalist import (
    DatalistError,
    as_datalist,
    build_datalist,
    case_name,
    load_datalist,
    resolve_datalist,
    save_datalist,
    split_cases,
)


def touch(path) -> None:
    """An empty file: building a datalist never reads the images."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def all_entries(datalist):
    return datalist["training"] + datalist["validation"] + datalist["test"]


def make_nnunet(root, cases=("a", "b", "c", "d", "e"), channels=2, dataset_json=None):
    for case in cases:
        for c in range(channels):
            touch(root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        touch(root / "labelsTr" / f"{case}.nii.gz")
    if dataset_json is not None:
        (root / "dataset.json").write_text(json.dumps(dataset_json))


# ------------------------------------------------------------------------------------------------ layouts
def test_nnunet_channel_files_are_grouped_into_one_case_with_a_list(tmp_path):
    make_nnunet(tmp_path, cases=("case1", "case2", "case3"), channels=2)
    datalist = build_datalist(tmp_path, layout="nnunet")
    entries = sorted(all_entries(datalist), key=lambda e: e["label"])
    assert entries[0] == {
        "image": ["imagesTr/case1_0000.nii.gz", "imagesTr/case1_0001.nii.gz"],
        "label": "labelsTr/case1.nii.gz",
    }
    assert len(entries) == 3


def test_nnunet_single_channel_case_gives_a_plain_string(tmp_path):
    make_nnunet(tmp_path, cases=("x", "y", "z"), channels=1)
    entries = all_entries(build_datalist(tmp_path, layout="nnunet"))
    assert sorted(e["image"] for e in entries) == [f"imagesTr/{c}_0000.nii.gz" for c in "xyz"]


def test_nnunet_dataset_json_v2_labels_and_channel_names_are_copied_as_index_to_name(tmp_path):
    make_nnunet(
        tmp_path,
        channels=2,
        dataset_json={"labels": {"background": 0, "tumour": 2, "edema": 1}, "channel_names": {"0": "T1", "1": "T2"}},
    )
    datalist = build_datalist(tmp_path)
    assert datalist["labels"] == {"0": "background", "1": "edema", "2": "tumour"}
    assert datalist["channel_names"] == {"0": "T1", "1": "T2"}


def test_msd_dataset_json_modality_becomes_channel_names(tmp_path):
    make_nnunet(
        tmp_path, channels=1, dataset_json={"labels": {"0": "background", "1": "spleen"}, "modality": {"0": "CT"}}
    )
    datalist = build_datalist(tmp_path, layout="nnunet")
    assert datalist["labels"] == {"0": "background", "1": "spleen"}
    assert datalist["channel_names"] == {"0": "CT"}


def test_dataset_json_channel_count_that_disagrees_with_the_files_is_an_error(tmp_path):
    make_nnunet(tmp_path, channels=1, dataset_json={"channel_names": {"0": "T1", "1": "T2"}})
    with pytest.raises(DatalistError, match="names 2 channel"):
        build_datalist(tmp_path, layout="nnunet")


def test_msd_files_without_channel_suffix_are_one_case_each(tmp_path):
    for case in ("spleen_2", "spleen_3", "spleen_10"):
        touch(tmp_path / "imagesTr" / f"{case}.nii.gz")
        touch(tmp_path / "labelsTr" / f"{case}.nii.gz")
    entries = all_entries(build_datalist(tmp_path))
    assert sorted((e["image"], e["label"]) for e in entries) == [
        (f"imagesTr/{c}.nii.gz", f"labelsTr/{c}.nii.gz") for c in ("spleen_10", "spleen_2", "spleen_3")
    ]


def test_case_name_ending_in_four_digits_without_channel_suffix_is_kept_whole(tmp_path):
    for case in ("patient_0001", "patient_0002", "patient_0003"):
        touch(tmp_path / "imagesTr" / f"{case}.nii.gz")
        touch(tmp_path / "labelsTr" / f"{case}.nii.gz")
    entries = all_entries(build_datalist(tmp_path))
    assert sorted(e["image"] for e in entries) == [f"imagesTr/patient_000{i}.nii.gz" for i in (1, 2, 3)]


def test_segguided_splits_come_from_the_folders(tmp_path):
    for folder, names in (("train", ["tr_1", "tr_2", "tr_3"]), ("val", ["va_1"]), ("test", ["te_1", "te_2"])):
        for name in names:
            touch(tmp_path / "DATA" / folder / f"{name}.png")
            touch(tmp_path / "MASK" / "all" / folder / f"{name}.png")
    datalist = build_datalist(tmp_path, val_fraction=0.5)  # fractions do not apply: splits are given
    assert [e["image"] for e in datalist["training"]] == [f"DATA/train/tr_{i}.png" for i in (1, 2, 3)]
    assert datalist["validation"] == [{"image": "DATA/val/va_1.png", "label": "MASK/all/val/va_1.png"}]
    assert [e["label"] for e in datalist["test"]] == ["MASK/all/test/te_1.png", "MASK/all/test/te_2.png"]


def test_segguided_accepts_nifti_images_with_png_masks(tmp_path):
    touch(tmp_path / "DATA" / "train" / "s1.nii.gz")
    touch(tmp_path / "MASK" / "all" / "train" / "s1.png")
    datalist = build_datalist(tmp_path, layout="segguided")
    assert datalist == {"training": [{"image": "DATA/train/s1.nii.gz", "label": "MASK/all/train/s1.png"}]}


def test_segguided_without_train_folder_is_an_error_naming_it(tmp_path):
    touch(tmp_path / "DATA" / "val" / "v.png")
    touch(tmp_path / "MASK" / "all" / "val" / "v.png")
    with pytest.raises(DatalistError, match=r"DATA.train"):
        build_datalist(tmp_path, layout="segguided")


def test_folders_layout_matches_by_name_across_extensions_and_tolerates_0000(tmp_path):
    touch(tmp_path / "imgs" / "a_0000.nii.gz")
    touch(tmp_path / "imgs" / "b.nii")
    touch(tmp_path / "imgs" / "c.mha")
    touch(tmp_path / "imgs" / "notes.txt")  # not an image: ignored
    touch(tmp_path / "segs" / "a.nii.gz")
    touch(tmp_path / "segs" / "b.nrrd")
    touch(tmp_path / "segs" / "c.png")
    datalist = build_datalist(tmp_path, images="imgs", labels="segs", val_fraction=0, test_fraction=0)
    assert datalist["training"] == [
        {"image": "imgs/a_0000.nii.gz", "label": "segs/a.nii.gz"},
        {"image": "imgs/b.nii", "label": "segs/b.nrrd"},
        {"image": "imgs/c.mha", "label": "segs/c.png"},
    ]


def test_auto_picks_segguided_then_nnunet_then_folders(tmp_path):
    make_nnunet(tmp_path / "nn", channels=1, dataset_json={"labels": {"0": "bg"}})
    assert build_datalist(tmp_path / "nn")["labels"] == {"0": "bg"}  # only nnunet reads dataset.json
    touch(tmp_path / "sg" / "DATA" / "train" / "a.png")
    touch(tmp_path / "sg" / "MASK" / "all" / "train" / "a.png")
    assert build_datalist(tmp_path / "sg")["training"][0]["label"] == "MASK/all/train/a.png"
    touch(tmp_path / "f" / "images" / "a.png")
    touch(tmp_path / "f" / "labels" / "a.png")
    assert build_datalist(tmp_path / "f", images="images", labels="labels")["training"][0]["image"] == "images/a.png"


def test_image_without_label_is_an_error_naming_the_file(tmp_path):
    make_nnunet(tmp_path, cases=("a", "b"), channels=1)
    touch(tmp_path / "imagesTr" / "orphan_0000.nii.gz")
    with pytest.raises(DatalistError, match=r"orphan_0000\.nii\.gz has no label"):
        build_datalist(tmp_path)


def test_label_without_image_is_an_error_naming_the_file(tmp_path):
    make_nnunet(tmp_path, cases=("a", "b"), channels=1)
    touch(tmp_path / "labelsTr" / "lonely.nii.gz")
    with pytest.raises(DatalistError, match=r"lonely\.nii\.gz has no image"):
        build_datalist(tmp_path)


def test_cases_with_different_channel_counts_are_an_error(tmp_path):
    make_nnunet(tmp_path, cases=("a", "b"), channels=2)
    os.remove(tmp_path / "imagesTr" / "b_0001.nii.gz")
    with pytest.raises(DatalistError, match="same channels"):
        build_datalist(tmp_path)


def test_missing_label_folder_is_an_error_naming_it(tmp_path):
    touch(tmp_path / "images" / "a.png")
    with pytest.raises(DatalistError, match=r"label folder not found: .*nolabels"):
        build_datalist(tmp_path, layout="folders", images="images", labels="nolabels")


def test_undetectable_layout_is_an_error_listing_what_was_looked_for(tmp_path):
    with pytest.raises(DatalistError, match="imagesTr/ \\+ labelsTr/"):
        build_datalist(tmp_path)


def test_missing_dataset_dir_is_an_error(tmp_path):
    with pytest.raises(DatalistError, match="data set folder not found"):
        build_datalist(tmp_path / "nowhere")


def test_empty_image_folder_is_an_error(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(DatalistError, match="no image files"):
        build_datalist(tmp_path)


def test_unknown_layout_is_an_error(tmp_path):
    with pytest.raises(DatalistError, match="unknown layout 'msd'"):
        build_datalist(tmp_path, layout="msd")


def test_build_is_reproducible_and_keeps_every_case_once(tmp_path):
    make_nnunet(tmp_path, cases=[f"c{i:02d}" for i in range(20)], channels=2)
    first = build_datalist(tmp_path, seed=3)
    assert first == build_datalist(tmp_path, seed=3)
    labels = [e["label"] for e in all_entries(first)]
    assert sorted(labels) == [f"labelsTr/c{i:02d}.nii.gz" for i in range(20)]
    assert [len(first[s]) for s in ("training", "validation", "test")] == [16, 2, 2]


def test_case_name_strips_known_extensions_only():
    assert case_name("dir/case_0000.nii.gz") == "case_0000"
    assert case_name("x.PNG") == "x"
    assert case_name("x.nrrd") == "x"
    assert case_name("notes.txt") is None
    assert case_name(".nii.gz") is None


# -------------------------------------------------------------------------------------------- split_cases
def test_split_sizes_follow_the_fractions():
    splits = split_cases(list(range(50)), val_fraction=0.2, test_fraction=0.1, seed=0)
    assert [len(splits[s]) for s in ("training", "validation", "test")] == [35, 10, 5]
    assert sorted(splits["training"] + splits["validation"] + splits["test"]) == list(range(50))


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    cases = [f"case{i}" for i in range(30)]
    assert split_cases(cases, 0.1, 0.1, seed=7) == split_cases(cases, 0.1, 0.1, seed=7)
    assert split_cases(cases, 0.1, 0.1, seed=7) != split_cases(cases, 0.1, 0.1, seed=8)


def test_split_keeps_the_input_order_within_each_split():
    splits = split_cases(list(range(30)), 0.2, 0.2, seed=1)
    for split in splits.values():
        assert split == sorted(split)


def test_three_cases_give_at_least_one_per_nonzero_fraction():
    splits = split_cases(["a", "b", "c"], 0.1, 0.1, seed=0)
    assert [len(splits[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    assert split_cases(["a", "b", "c"], 0.1, 0.0, seed=0)["test"] == []


def test_two_cases_all_go_to_training():
    splits = split_cases(["a", "b"], 0.1, 0.1, seed=0)
    assert splits == {"training": ["a", "b"], "validation": [], "test": []}


def test_large_fractions_still_leave_one_training_case():
    splits = split_cases(["a", "b", "c", "d"], 0.49, 0.49, seed=0)
    assert len(splits["training"]) == 1


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (1.0, 0.0), (0.5, 0.5)])
def test_invalid_fractions_are_an_error(val, test):
    with pytest.raises(DatalistError, match="fraction"):
        split_cases(list(range(10)), val, test, seed=0)


# --------------------------------------------------------------------------------------------- save/load
def test_save_and_load_round_trip(tmp_path):
    datalist = {"labels": {"0": "background"}, "training": [{"image": ["a_0000.nii.gz"], "label": "a.nii.gz"}]}
    path = save_datalist(datalist, tmp_path / "sub" / "datalist.json")
    assert load_datalist(path) == datalist
    assert os.listdir(tmp_path / "sub") == ["datalist.json"]  # no temporary file left behind


def test_saved_datalist_gets_the_usual_permissions_not_the_temp_files_private_ones(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = save_datalist({"training": []}, tmp_path / "datalist.json")
    finally:
        os.umask(old_umask)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_save_refuses_to_overwrite_and_names_the_file(tmp_path):
    path = tmp_path / "datalist.json"
    save_datalist({"training": [1]}, path)
    with pytest.raises(FileExistsError, match="datalist.json already exists"):
        save_datalist({"training": [2]}, path)
    assert load_datalist(path) == {"training": [1]}
    save_datalist({"training": [2]}, path, overwrite=True)
    assert load_datalist(path) == {"training": [2]}


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_datalist(tmp_path / "missing.json")


def test_load_invalid_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatalistError, match="bad.json is not valid JSON"):
        load_datalist(tmp_path / "bad.json")


def test_load_rejects_a_json_list(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatalistError, match="expected a JSON object"):
        load_datalist(tmp_path / "list.json")


# ------------------------------------------------------------------------------------------------ resolve
def test_resolve_makes_image_and_label_paths_absolute_elementwise(tmp_path):
    datalist = {"training": [{"image": ["i/a_0000.nii.gz", "i/a_0001.nii.gz"], "label": "l/a.nii.gz", "id": 3}]}
    (entry,) = resolve_datalist(datalist, tmp_path, "training")
    assert entry == {
        "image": [str(tmp_path / "i" / "a_0000.nii.gz"), str(tmp_path / "i" / "a_0001.nii.gz")],
        "label": str(tmp_path / "l" / "a.nii.gz"),
        "id": 3,
    }


def test_resolve_from_a_file_defaults_to_its_folder(tmp_path):
    path = save_datalist({"validation": [{"image": "a.png", "label": "b.png"}]}, tmp_path / "d.json")
    assert resolve_datalist(path, None, "validation") == [
        {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "b.png")}
    ]


def test_resolve_missing_split_names_datalist_and_split(tmp_path):
    path = save_datalist({"training": [{"image": "a.png"}]}, tmp_path / "mine.json")
    with pytest.raises(DatalistError, match=r"mine\.json has no split 'test'.*\['training'\]"):
        resolve_datalist(path, None, "test")


def test_resolve_empty_split_is_an_error_naming_it(tmp_path):
    with pytest.raises(DatalistError, match=r"spleen: split 'validation' is empty"):
        resolve_datalist({"validation": []}, tmp_path, "validation", datalist_name="spleen")


# ------------------------------------------------------------------------------- path or loaded datalist
def test_as_datalist_reads_a_file_with_its_folder_and_path_as_name(tmp_path):
    path = save_datalist({"training": [{"image": "a.png"}]}, tmp_path / "sub" / "d.json")
    datalist, folder, name = as_datalist(path)
    assert datalist == {"training": [{"image": "a.png"}]}
    assert folder == str(tmp_path / "sub") and name == str(path)
    assert as_datalist(path, tmp_path / "elsewhere", "spleen")[1:] == (str(tmp_path / "elsewhere"), "spleen")


def test_as_datalist_passes_a_mapping_through_and_needs_its_folder(tmp_path):
    loaded = {"training": []}
    datalist, folder, name = as_datalist(loaded, tmp_path)
    assert datalist is loaded and folder == str(tmp_path) and name == "datalist"
    with pytest.raises(DatalistError, match="spleen: dataset_dir is required when the datalist is not a file"):
        as_datalist(loaded, None, "spleen")


def test_as_datalist_refuses_what_is_neither_a_path_nor_a_mapping(tmp_path):
    with pytest.raises(DatalistError, match="expected a datalist JSON path or a mapping of splits, found list"):
        as_datalist([{"image": "a.png"}], tmp_path)


def test_as_datalist_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        as_datalist(tmp_path / "nope.json")


def test_a_missing_datalist_is_a_segdiff_refusal_and_a_file_not_found_error(tmp_path):
    from segdiff.data.datalist import InputNotFoundError
    from segdiff.errors import SegdiffError

    with pytest.raises(InputNotFoundError, match="datalist not found: .*gone.json") as info:
        load_datalist(tmp_path / "gone.json")
    assert isinstance(info.value, SegdiffError) and isinstance(info.value, FileNotFoundError)
