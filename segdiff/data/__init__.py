"""Data layer: datalists (build, split, save, load, resolve), file checks and the offline data sets (MNI152 demo,
TotalSegmentator's example CT and MR).

The submodules are imported here so that bundle config expressions reach them as attributes once the package
is imported (``"imports": ["$import segdiff"]``), e.g.
``"$segdiff.data.checks.check_datalist(@datalist, @dataset_dir, @num_classes)"``.
"""

from segdiff.data import checks, datalist, demo, inputs, naming, nnunet, totalsegmentator
from segdiff.data.checks import (
    DataCheckError,
    check_datalist,
    check_output_names,
    find_problems,
    output_name_collisions,
)
from segdiff.data.datalist import (
    DatalistError,
    InputNotFoundError,
    as_datalist,
    build_datalist,
    load_datalist,
    resolve_datalist,
    save_datalist,
    split_cases,
)
from segdiff.data.demo import write_demo_data
from segdiff.data.nnunet import export_nnunet
from segdiff.data.totalsegmentator import write_reference_data

__all__ = [
    "checks",
    "datalist",
    "demo",
    "inputs",
    "naming",
    "nnunet",
    "totalsegmentator",
    "DataCheckError",
    "DatalistError",
    "InputNotFoundError",
    "as_datalist",
    "build_datalist",
    "export_nnunet",
    "check_datalist",
    "check_output_names",
    "find_problems",
    "load_datalist",
    "output_name_collisions",
    "resolve_datalist",
    "save_datalist",
    "split_cases",
    "write_demo_data",
    "write_reference_data",
]
