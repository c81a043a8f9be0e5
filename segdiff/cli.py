"""The ``segdiff`` command: one sub-command per pipeline stage (data first; more stages plug in below).

    segdiff demo-data DIR                      # the offline MNI152 tissue demo data set
    segdiff totalseg-data DIR --modality ct    # TotalSegmentator's example CT (or mr) with shared organ labels
    segdiff datalist DATASET_DIR               # scan a data set folder, write datalist.json
    segdiff check DATALIST --num-classes N     # check every file before training
    segdiff export-nnunet --datalist FILE --output RAW_DIR --id N --name NAME   # nnU-Net v2 raw data set
    segdiff export-network CONFIG --weights W --output F.pt2   # torch.export of a bundle's network_def
    segdiff convert-diffusers UNET_DIR OUT_BUNDLE_DIR   # a released seg-guided-diffusion UNet -> mask_to_image

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


# ------------------------------------------------------------------------------------------ totalseg-data
def _totalseg_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="DIR", help="folder to write the data set into")
    parser.add_argument(
        "--modality", choices=("ct", "mr"), default="ct", help="the example CT or the example MR (default: ct)"
    )
    parser.add_argument(
        "--sdist",
        metavar="FILE",
        help="TotalSegmentator 2.18.0's .tar.gz (default: the cached copy under ~/.cache/segdiff, downloaded with "
        "pip when missing)",
    )
    parser.add_argument(
        "--num-slabs",
        type=int,
        default=6,
        metavar="N",
        help="number of axial slabs (default: 6, at least 4): 1 validation, 2 test, the rest training",
    )
    parser.add_argument("--no-download", action="store_true", help="refuse instead of downloading a missing sdist")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR")


def _totalseg_data_run(args: argparse.Namespace) -> int:
    from segdiff.data.totalsegmentator import write_reference_data

    path = write_reference_data(
        args.output_dir,
        modality=args.modality,
        sdist=args.sdist,
        num_slabs=args.num_slabs,
        overwrite=args.overwrite,
        download=not args.no_download,
    )
    print(f"TotalSegmentator {args.modality} data written; datalist: {path}")
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
    parser.add_argument(
        "--modality-key",
        metavar="KEY",
        help="entry key naming each image's modality (default: 'modality' when the datalist has a 'modalities' "
        "mapping, which is then checked)",
    )
    parser.add_argument(
        "--unlabelled-modalities",
        nargs="*",
        default=[],
        metavar="NAME",
        help="modalities whose entries need no label (e.g. mr: the target modality of latent_mask_to_image)",
    )
    parser.add_argument(
        "--output-keys",
        nargs="*",
        default=["image", "label"],
        metavar="KEY",
        help="entry keys inference names its outputs after (label: mask -> image, image: image -> mask); two entries "
        "of one split whose files there share a name (siteA/p1.nii.gz, siteB/p1.nii.gz) are reported "
        "(default: image label; the option without keys skips this check)",
    )


def _check_run(args: argparse.Namespace) -> int:
    from segdiff.data.checks import DataCheckError, find_problems
    from segdiff.data.datalist import InputNotFoundError, as_datalist

    datalist, dataset_dir, _ = as_datalist(args.datalist, args.dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise InputNotFoundError(f"data set folder not found: {dataset_dir}")
    problems = find_problems(
        datalist,
        dataset_dir,
        args.num_classes,
        image_channels=args.image_channels,
        splits=args.splits,
        require_label=not args.no_label,
        datalist_name=args.datalist,
        output_keys=args.output_keys,
        modality_key=args.modality_key,
        unlabelled_modalities=args.unlabelled_modalities,
    )
    if problems:
        print(DataCheckError(problems, args.datalist), file=sys.stderr)
        return 1
    print(f"OK: {sum(len(datalist[s]) for s in args.splits)} entries checked")
    return 0


# ----------------------------------------------------------------------------------------- export-network
def _export_network_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="+", metavar="CONFIG", help="bundle config(s), merged in order, e.g. configs/inference.yaml"
    )
    parser.add_argument("--weights", required=True, metavar="FILE", help="the trained state dict (models/model.pt)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the exported program to write (.pt2)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override as in training, VALUE a Python literal (repeatable), e.g. --set num_classes=3",
    )
    parser.add_argument(
        "--meta-file", metavar="FILE", help="metadata stored with the export (default: metadata.json beside CONFIG)"
    )
    parser.add_argument("--net-id", default="network_def", metavar="KEY", help="config key of the network")
    parser.add_argument("--key", metavar="NAME", help="entry of a nested checkpoint, e.g. ema_network for checkpoint.pt")
    parser.add_argument(
        "--spatial-shape", type=int, nargs="+", metavar="N", help="example spatial size (default: roi_size or image_size)"
    )
    parser.add_argument(
        "--dynamic-spatial",
        action="store_true",
        help="accept any spatial size that is a multiple of 2^(levels-1), not only the example's",
    )
    parser.add_argument("--device", default="cpu", help="device to export on; the program runs there (default: cpu)")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, metavar="T", help="largest |exported - eager| accepted (default: 1e-4)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _export_network_run(args: argparse.Namespace) -> int:
    import ast

    from segdiff.export import export_bundle_network

    overrides = {}
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[name] = text  # a plain string such as a path
    try:
        report = export_bundle_network(
            args.config,
            args.weights,
            args.output,
            meta_file=args.meta_file,
            overrides=overrides,
            net_id=args.net_id,
            key=args.key,
            spatial_shape=args.spatial_shape,
            dynamic_spatial=args.dynamic_spatial,
            device=args.device,
            tolerance=args.tolerance,
            overwrite=args.overwrite,
        )
    except RuntimeError as e:  # the reloaded program did not match the eager network: the check failed
        print(f"segdiff export-network: {e}", file=sys.stderr)
        return 1
    checked = ", ".join("x".join(map(str, shape)) for shape in report.checked_shapes)
    print(
        f"wrote {report.path} (example input {'x'.join(map(str, report.input_shape))}); reloaded and compared with "
        f"the eager network on {checked}: max abs difference {report.max_abs_diff:.3g}"
    )
    return 0


# ------------------------------------------------------------------------------------------ export-nnunet
def _export_nnunet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--datalist",
        nargs="+",
        required=True,
        metavar="FILE",
        help="datalist JSON file(s) whose pairs are exported, e.g. the real data's and a synthetic set's",
    )
    parser.add_argument(
        "--dataset-dir",
        nargs="+",
        metavar="DIR",
        help="folder each datalist's paths are relative to, one per datalist (default: each datalist's folder)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["training", "validation"],
        metavar="SPLIT",
        help="splits to export (default: training validation); a datalist without one is skipped for it",
    )
    parser.add_argument("--output", required=True, metavar="RAW_DIR", help="nnU-Net's raw folder ($nnUNet_raw)")
    parser.add_argument("--id", type=int, required=True, metavar="N", help="dataset id, 1..999 (DatasetNNN_NAME)")
    parser.add_argument("--name", required=True, metavar="NAME", help="dataset name (letters, digits, _ - .)")
    parser.add_argument(
        "--labels",
        metavar="JSON",
        help='class names: a JSON file or text, {"0": "background", "1": "liver"} or {"background": 0, ...} '
        '(default: the datalist\'s "labels", else class_<k>)',
    )
    parser.add_argument(
        "--channel-names",
        metavar="JSON",
        help='image channel names, e.g. \'{"0": "T1"}\' or \'["CT"]\'; nnU-Net normalises "CT" channels as CT '
        '(default: the datalist\'s "channel_names", else image / channel_<k>)',
    )
    parser.add_argument(
        "--case-prefix",
        nargs="+",
        metavar="PREFIX",
        help="prefix of each datalist's case names, one per datalist (e.g. real_ syn_), when names would collide",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DatasetNNN_NAME")


def _export_nnunet_run(args: argparse.Namespace) -> int:
    import json

    from segdiff.data.checks import DataCheckError
    from segdiff.data.nnunet import export_nnunet

    try:
        folder = export_nnunet(
            args.datalist,
            args.output,
            args.id,
            args.name,
            dataset_dir=args.dataset_dir,
            splits=args.splits,
            labels=args.labels,
            channel_names=args.channel_names,
            case_prefix=args.case_prefix,
            overwrite=args.overwrite,
        )
    except DataCheckError as e:  # every problem, one per line, as `segdiff check` prints them
        print(e, file=sys.stderr)
        return 1
    with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as f:
        num_training = json.load(f)["numTraining"]
    with open(os.path.join(folder, "segdiff_export.json"), encoding="utf-8") as f:
        for note in json.load(f)["notes"]:
            print(f"note: {note}")
    print(f"wrote {folder}: {num_training} training case(s); check it with nnUNetv2_plan_and_preprocess -d {args.id} "
          "--verify_dataset_integrity")
    return 0


# -------------------------------------------------------------------------------------- convert-diffusers
def _convert_diffusers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "unet_dir", metavar="UNET_DIR", help="diffusers UNet2DModel folder (config.json + weights), or its parent"
    )
    parser.add_argument(
        "bundle_dir", metavar="OUT_BUNDLE_DIR", help="bundle root to write models/model.pt and configs/converted.yaml"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_BUNDLE_DIR")


def _convert_diffusers_run(args: argparse.Namespace) -> int:
    from segdiff.convert import convert_diffusers_unet, run_command

    done = convert_diffusers_unet(args.unet_dir, args.bundle_dir, overwrite=args.overwrite)
    conditional = "mask_encoding" in done.overlay
    print(f"wrote {done.model_path} ({done.num_tensors} tensors, {done.num_parameters:,} parameters) and "
          f"{done.config_path}; generate with:\n  {run_command(args.bundle_dir, conditional)}")
    return 0


_EXAMPLES = """examples:
  segdiff demo-data ~/segdiff-demo
  segdiff totalseg-data ~/segdiff-totalseg-mr --modality mr
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
        "totalseg-data",
        "write TotalSegmentator's example CT or MR with shared organ labels (reads its sdist)",
        "Read the example CT (task total) or MR (task total_mr) and its TotalSegmentator segmentation from "
        "TotalSegmentator 2.18.0's sdist (a .tar.gz, downloaded once with pip into ~/.cache/segdiff unless --sdist "
        "is given), map both tasks' class ids to one label space (0 background, 1 liver, 2 spleen, 3 kidney, "
        "4 stomach, 5 pancreas, 6 gallbladder, 7 aorta) and write axial slabs as NIfTI pairs, plus datalist.json "
        "with splits by slab and \"modality\" in every entry.",
        _totalseg_data_arguments,
        _totalseg_data_run,
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
    Command(
        "export-nnunet",
        "write datalist pairs (real, synthetic or both) as an nnU-Net v2 raw data set",
        "Check every pair of the chosen splits, then write RAW_DIR/DatasetNNN_NAME with imagesTr/<case>_0000.nii.gz "
        "(one file per channel), labelsTr/<case>.nii.gz (integer labels on the image's header) and dataset.json "
        "(channel_names, labels, numTraining, file_ending), plus segdiff_export.json mapping each case to its "
        "datalist entry. Case names are the image file names (plus --case-prefix). Exit 0 when written, 1 when "
        "the checks found problems (listed on stderr, nothing written).",
        _export_nnunet_arguments,
        _export_nnunet_run,
    ),
    Command(
        "export-network",
        "export a bundle's trained network_def with torch.export (.pt2)",
        "Build network_def from the bundle config(s) with the given overrides, load the trained weights strictly, "
        "export network(image, timesteps) with torch.export (dynamic batch; --dynamic-spatial for any size that is "
        "a multiple of the down-sampling factor) and save it with the config and metadata inside. The file is "
        "loaded back and compared with the eager network before it is written: exit 0 when it matches, 1 when it "
        "differs by more than --tolerance (nothing written). Load it with torch.export.load(FILE).module().",
        _export_network_arguments,
        _export_network_run,
    ),
    Command(
        "convert-diffusers",
        "convert a diffusers UNet2DModel (released seg-guided-diffusion weights) for mask_to_image",
        "Read UNET_DIR/config.json and diffusion_pytorch_model.safetensors (or .bin), check that every field is one "
        "MONAI's DiffusionModelUNet computes the same way (else name the field), rename the weights and load them "
        "strictly, then write OUT_BUNDLE_DIR/models/model.pt and OUT_BUNDLE_DIR/configs/converted.yaml: an overlay "
        "for mask_to_image's inference.yaml (network, image size and channels, legacy class_index/255 mask "
        "encoding, epsilon prediction, DDIM-50 in fp32). Does not need diffusers.",
        _convert_diffusers_arguments,
        _convert_diffusers_run,
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
