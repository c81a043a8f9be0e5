"""Case and output naming: the name one module writes is the name the others read back."""

from __future__ import annotations

import pytest
from bundle_utils import raises_with

from segdiff.data.naming import output_case_name, source_of_synthetic_case, synthetic_case_name
from segdiff.evaluation.image_quality import mask_groups
from segdiff.synthesis.records import pair_names


def test_synthetic_case_name_appends_the_rank():
    assert synthetic_case_name("slab_02", 0) == "slab_02_syn0"
    assert synthetic_case_name("slab_02", 12) == "slab_02_syn12"


def test_source_of_a_synthetic_name_round_trips_including_names_that_contain_syn():
    for case in ("slab_02", "case_syn", "a_syn3"):
        assert source_of_synthetic_case(synthetic_case_name(case, 4)) == case


def test_source_of_a_synthetic_file_ignores_folder_and_extension():
    assert source_of_synthetic_case("images/slab_02_syn1.nii.gz") == "slab_02"
    assert source_of_synthetic_case("/s/labels/p7_syn0.png") == "p7"


@pytest.mark.parametrize("name", ["slab_02", "images/slab_02.nii.gz", "slab_02_syn", "slab_02_synA", "_syn1x"])
def test_names_that_are_not_synthetic_have_no_source(name):
    assert source_of_synthetic_case(name) is None


def test_negative_or_fractional_rank_is_refused():
    raises_with("integer >= 0, found -1", synthetic_case_name, "c", -1)
    raises_with("integer >= 0, found 1.5", synthetic_case_name, "c", 1.5)


def test_synthesis_pair_files_are_named_by_the_naming_module():
    image, label = pair_names("slab_07", 2)
    assert (image, label) == ("images/slab_07_syn2.nii.gz", "labels/slab_07_syn2.nii.gz")
    assert source_of_synthetic_case(image) == source_of_synthetic_case(label) == "slab_07"


def test_image_quality_groups_pairs_by_the_source_the_naming_module_reads():
    entries = [{"image": pair_names(case, k)[0], "label": pair_names(case, k)[1]} for case in ("a", "b_syn1") for k in (0, 1)]
    assert mask_groups(entries) == {"a": [0, 1], "b_syn1": [2, 3]}


def test_output_case_name_is_the_first_files_name_without_extension():
    assert output_case_name("/data/siteA/patient1.nii.gz") == "patient1"
    assert output_case_name(["/d/p_0000.nii.gz", "/d/p_0001.nii.gz"]) == "p_0000"
    assert output_case_name("/d/scan.dcm") == "scan"  # unknown extension: Path.stem


def test_transforms_io_re_exports_the_same_output_case_name():
    from segdiff.transforms import io

    assert io.output_case_name is output_case_name
