"""The ``segdiff`` command: one sub-command per pipeline stage (data first; more stages plug in below).

    segdiff demo-data DIR                      # the offline MNI152 tissue demo data set
    segdiff datalist DATASET_DIR               # scan a data set folder, write datalist.json
    segdiff check DATALIST --num-classes N     # check every file before training

Exit status: 0 success, 1 the check found problems, 2 bad input (missing folder, bad datalist, ...).
A sub-command is a ``(name, help, add_arguments, run)`` row in :data:`COMMANDS`; ``run(args)`` returns the
exit status. Heavy imports (monai, nilearn) happen inside ``run`` so ``segdiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["main", "build_parser", "COMMANDS", "Command"]


class Command(NamedTuple):
    """One sub-command: its name, one-line help, longer description, argument setup and runner."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------- demo-data
def _demo_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="DIR", help="folder to write the demo data set into")
    parser.add_argument(
        "--num-slabs",
        type=int,
        default=10,
        metavar="N",
        help="number of axial slabs (default: 10, at least 4): 1 validation, 2 test, the rest training",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR")


def _demo_data_run(args: argparse.Namespace) -> int:
    from segdiff.data.demo import write_demo_data

    path = write_demo_data(args.output_dir, num_slabs=args.num_slabs, overwrite=args.overwrite)
    print(f"demo data written; datalist: {path}")
    return 0


# ----------------------------------------------------------------------------------------------- datalist
def _datalist_arguments(parser: argparse.ArgumentParser) -> None:
    from segdiff.data.datalist import LAYOUTS

    parser.add_argument(
        "dataset_dir", metavar="DATASET_DIR", help="the data set folder; paths are written relative to it"
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="folder layout (default: auto = segguided if DATA/ and MASK/ exist, nnunet if imagesTr/ and "
        "labelsTr/ exist, else folders)",
    )
    parser.add_argument(
        "--images", default="imagesTr", metavar="DIR", help="image folder, relative to DATASET_DIR (default: imagesTr)"
    )
    parser.add_argument(
        "--labels", default="labelsTr", metavar="DIR", help="label folder, relative to DATASET_DIR (default: labelsTr)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F", help="fraction of cases for validation (default: 0.1)"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.1, metavar="F", help="fraction of cases for test (default: 0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the case shuffle (default: 0)")
    parser.add_argument("--output", metavar="FILE", help="datalist to write (default: DATASET_DIR/datalist.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datalist file")


def _datalist_run(args: argparse.Namespace) -> int:
    from segdiff.data.datalist import SPLITS, build_datalist, save_datalist

    datalist = build_datalist(
        args.dataset_dir,
        layout=args.layout,
        images=args.images,
        labels=args.labels,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    output = args.output or os.path.join(args.dataset_dir, "datalist.json")
    save_datalist(datalist, output, overwrite=args.overwrite)
    sizes = ", ".join(f"{split} {len(datalist[split])}" for split in SPLITS if split in datalist)
    print(f"wrote {output}: {sizes}")
    return 0


# -------------------------------------------------------------------------------------------------- check
def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datalist", metavar="DATALIST", help="the datalist JSON file")
    parser.add_argument(
        "--dataset-dir",
        metavar="DIR",
        help="folder the datalist's paths are relative to (default: the datalist's folder)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        required=True,
        metavar="N",
        help="label classes including background; label values must lie in [0, N) (0: skip the range check)",
    )
    parser.add_argument(
        "--image-channels", type=int, metavar="C", help="expected image channels (default: not checked)"
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["training", "validation"],
        metavar="SPLIT",
        help="splits to check (default: training validation)",
    )
    parser.add_argument("--no-label", action="store_true", help="entries need no label (image-only datalists)")


def _check_run(args: argparse.Namespace) -> int:
    from segdiff.data.checks import DataCheckError, find_problems
    from segdiff.data.datalist import load_datalist

    datalist = load_datalist(args.datalist)
    dataset_dir = args.dataset_dir or os.path.dirname(os.path.abspath(args.datalist))
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"data set folder not found: {dataset_dir}")
    problems = find_problems(
        datalist,
        dataset_dir,
        args.num_classes,
        image_channels=args.image_channels,
        splits=args.splits,
        require_label=not args.no_label,
        datalist_name=args.datalist,
    )
    if problems:
        print(DataCheckError(problems, args.datalist), file=sys.stderr)
        return 1
    print(f"OK: {sum(len(datalist[s]) for s in args.splits)} entries checked")
    return 0


_EXAMPLES = """examples:
  segdiff demo-data ~/segdiff-demo
  segdiff check ~/segdiff-demo/datalist.json --num-classes 4 --image-channels 1
  segdiff datalist ~/data/Task09_Spleen --val-fraction 0.2 --seed 1
  segdiff datalist ~/data/mydata --layout folders --images images --labels masks

exit status: 0 ok, 1 the check found problems, 2 bad input (the error is printed on one line)
"""

#: the sub-commands, in the order ``segdiff --help`` lists them
COMMANDS: list[Command] = [
    Command(
        "demo-data",
        "write the offline MNI152 tissue demo data set (needs nilearn)",
        "Write axial slabs of the MNI ICBM152 2009a template (T1) with a 4-class tissue map (background, CSF, "
        "grey matter, white matter) as NIfTI pairs, plus datalist.json with splits by slab. Needs nilearn: "
        'pip install "monai-segdiff[demo]".',
        _demo_data_arguments,
        _demo_data_run,
    ),
    Command(
        "datalist",
        "scan a data set folder and write a datalist JSON",
        "Scan DATASET_DIR (nnU-Net/MSD imagesTr+labelsTr, seg-guided-diffusion DATA+MASK, or any image and label "
        "folders), pair images with labels by case name, split by case with a seeded shuffle (segguided: splits "
        "from the folders) and write a MONAI decathlon-style datalist with paths relative to DATASET_DIR.",
        _datalist_arguments,
        _datalist_run,
    ),
    Command(
        "check",
        "check every file of a datalist before training",
        "Read every file of the chosen splits with MONAI's LoadImage and report every problem: missing or "
        "unreadable files, image/label shape or affine mismatch, label values outside [0, N), NaN/Inf "
        "intensities, wrong channel counts. Exit 0 when all is well, 1 with the problems on stderr.",
        _check_arguments,
        _check_run,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``segdiff`` argument parser with one sub-parser per row of :data:`COMMANDS`."""
    from segdiff import __version__

    parser = argparse.ArgumentParser(
        prog="segdiff",
        description="monai-segdiff: diffusion models conditioned on segmentation masks. Data commands below; "
        "training and inference run as MONAI bundles.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``segdiff`` command line; return the exit status (0 ok, 1 check failed, 2 bad input).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: argparse already printed
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return args._run(args)
    except (OSError, ValueError, ImportError) as e:
        # bad input is the user's to fix: one line, no traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"segdiff {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
