"""How cases and output files are named: one place for every name that one module writes and another reads back.

- A synthetic pair generated from the mask of case ``<case>`` is named ``<case>_syn<k>`` (k = its rank among the
  pairs kept for that mask; synthesize.yaml writes ``images/<case>_syn<k>.nii.gz`` and ``labels/<case>_syn<k>.nii.gz``).
  :func:`synthetic_case_name` writes that name and :func:`source_of_synthetic_case` reads the case back.
- An inference output is named after its input file: the file name without its image extension, the first file's
  when an image is one file per channel (as MONAI's ``SaveImage`` does): :func:`output_case_name`. Two inputs with
  one file name in different folders therefore share an output name; ``segdiff.data.checks.check_output_names``
  refuses such inputs and ``output_name_collisions`` lists them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from segdiff.data.datalist import case_name

__all__ = ["SYNTHETIC_SUFFIX", "output_case_name", "source_of_synthetic_case", "synthetic_case_name"]

#: what separates a synthetic pair's source case from its rank: ``<case>_syn<k>``
SYNTHETIC_SUFFIX = "_syn"

_SYNTHETIC_NAME = re.compile(rf"^(?P<case>.+){re.escape(SYNTHETIC_SUFFIX)}(?P<rank>\d+)$")


def synthetic_case_name(case: str, k: int) -> str:
    """The case name of the k-th synthetic pair generated from the mask of ``case``: ``<case>_syn<k>``.

    Args:
        case: the source mask's case name (its file name without extension), e.g. ``"slab_02"``.
        k: the pair's rank among the pairs kept for that mask, 0 for the best.
    """
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"synthetic pair rank must be an integer >= 0, found {k!r}")
    return f"{case}{SYNTHETIC_SUFFIX}{int(k)}"


def source_of_synthetic_case(name: str | os.PathLike) -> str | None:
    """The source case of a synthetic pair named by :func:`synthetic_case_name`, or None for any other name.

    Args:
        name: a case name (``"slab_02_syn1"``) or a file path (``"images/slab_02_syn1.nii.gz"``: folder and image
            extension are ignored).

    A real case whose own name ends in ``_syn<digits>`` cannot be told from a synthetic one by its name; datalists
    written by synthesize.yaml also record each pair's source under ``"case"``, which callers should prefer.
    """
    text = os.fspath(name)
    stem = case_name(text) or os.path.basename(text)
    match = _SYNTHETIC_NAME.match(stem)
    return match.group("case") if match else None


def output_case_name(path: str | os.PathLike | list[Any] | tuple[Any, ...]) -> str:
    """The case name outputs are named after: the file name without its image extension; with one file per channel,
    the first file's (as MONAI's SaveImage does).

    Args:
        path: the input file, or the list of its per-channel files.
    """
    if isinstance(path, (list, tuple)):
        path = path[0]
    return case_name(str(path)) or Path(str(path)).stem
