"""Serve our bundles in a MONAI Label 0.8.5 server: its own venv, a ``monaibundle`` app holding the bundles, a start.

    python3 scripts/setup_monailabel.py --studies ~/studies                # build (first time), copy, serve on :8000
    python3 scripts/setup_monailabel.py --studies ~/studies --weights image_to_mask=runs/i2m/models/model.pt
    python3 scripts/setup_monailabel.py --studies ~/masks --bundles latent_mask_to_image \
        --weights latent_mask_to_image=runs/latent/models      # the folder of its three stages' weights
    python3 scripts/setup_monailabel.py --build-only                       # only the venv (CI runs this first)

Steps, each skipped when already done:

1. The venv (default ``~/.cache/segdiff/monailabel-0.8.5``, or ``$SEGDIFF_MONAILABEL_VENV``): MONAI Label pins numpy
   1.26 and old pydicom, so it never shares a venv with the project's. ``monailabel==0.8.5`` goes in without its
   declared dependencies, which would pull SAM2 and MONAI's mlflow/openslide/lmdb extras; what it imports is listed
   in :data:`REQUIREMENTS`. Its ``transform/post.py`` imports torchvision, and PyPI's torchvision only loads beside
   the CUDA build of torch, so the venv takes torch 2.14.1 + torchvision 0.29.1 (about 5.5 GB, runs on a CPU too).
   A finished build leaves a stamp; a changed requirement list or a half-built venv is rebuilt from scratch.
2. ``monai-segdiff`` from this checkout, reinstalled whenever its sources change (a fingerprint in the venv).
3. The app (default ``~/.local/share/segdiff/monailabel-app``): MONAI Label's ``monaibundle`` sample app, with each
   bundle under ``model/<name>``. Every run rewrites the copies' ``configs/`` from this checkout with the MONAI
   Label settings of :data:`MONAILABEL_SETTINGS` and the ``--set`` overrides (comments are not kept; edit the bundle
   and re-run). ``models/`` is copied only the first time or from ``--weights`` (with the weights' record,
   ``<name>.json`` beside them, as ``models/model.json``): weights trained by MONAI Label stay. A bundle of
   :data:`STAGE_WEIGHTS` (latent_mask_to_image) has several weight files: ``--weights`` takes their folder, each file
   is copied with its record under its own name, and ``models/model.pt`` is an empty state dict (see there).
4. ``monailabel start_server`` on 127.0.0.1 with the offline flags (``--conf zoo_source github --conf sam2 false``).

docs/monailabel.md describes what the server answers; tests/test_monailabel_server.py runs it end to end.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    from segdiff.errors import SegdiffError
except ImportError:  # a python without monai-segdiff (the first build): use the checkout's (its top level is stdlib)
    sys.path.append(str(REPO))
    from segdiff.errors import SegdiffError
BUNDLES = REPO / "bundles"
MONAILABEL_VERSION = "0.8.5"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segdiff"
DEFAULT_VENV = Path(os.environ.get("SEGDIFF_MONAILABEL_VENV", CACHE_DIR / f"monailabel-{MONAILABEL_VERSION}"))
DEFAULT_APP = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "segdiff" / "monailabel-app"
DEFAULT_BUNDLES = ("image_to_mask", "mask_to_image")

#: what MONAI Label 0.8.5 imports (its declared dependencies less SAM2 and MONAI's mlflow/openslide/lmdb/gdown
#: extras), the pins REFERENCE.md 3 gives for the DICOM stack, and what monai-segdiff needs; torch and torchvision
#: are the CUDA builds because PyPI's torchvision does not load beside the CPU build
REQUIREMENTS = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "monai==1.6.1",
    "pytorch-ignite",
    "nibabel",
    "itk",
    "pillow",
    "psutil",
    "scikit-image",
    "scikit-learn",
    "scipy",
    "tensorboard",
    "tqdm",
    "fire",
    "einops>=0.7.0",
    "jsonschema",
    "pyyaml>=6.0.1",
    "uvicorn>=0.29.0",
    "fastapi>=0.110.2",
    "pydantic>=2.7.0",
    "pydantic-settings>=2.2.1",
    "python-dotenv>=1.0.1",
    "python-multipart>=0.0.9",
    "httpx>=0.27.0",
    "requests>=2.31.0",
    "requests-toolbelt>=1.0.0",
    "urllib3>=2.2.1",
    "schedule>=1.2.1",
    "timeloop>=1.0.2",
    "expiringdict>=1.2.2",
    "expiring_dict>=1.1.0",
    "cachetools>=5.3.3",
    "watchdog>=4.0.0",
    "filelock>=3.11.0",
    "passlib>=1.7.4",
    "pyjwt>=2.8.0",
    "bcrypt>=4.1.2",
    "dicomweb-client==0.59.1",
    "google-auth>=2.29.0",
    "pydicom==2.4.4",
    "pydicom-seg>=0.4.1",
    "pynetdicom==2.0.2",
    "pynrrd>=1.0.0",
    "numpymaxflow>=0.0.7",
    "girder-client>=3.2.3",
    "shapely>=2.0.4",
    "ninja>=1.11.1.1",
    "setuptools>=61",                             # to build monai-segdiff without network (no build isolation)
    "wheel",
)

#: what every /train of a MONAI Label copy needs: each request is a new run in the same folder (MONAI Label loads
#: the served model.pt first); the data checks name the datastore, not a datalist file; the learning-rate schedule
#: spans the request's epochs (MONAI Label sets train#trainer#max_epochs, not max_epochs)
MONAILABEL_TRAINING = {
    "overwrite": True,
    "datalist": "MONAI Label datastore",
    "lr_scheduler#t_total": "$@train#trainer#max_epochs * len(@train#dataloader)",
}
#: settings every MONAI Label copy gets, before the --set overrides: bundle -> config file -> key -> value
MONAILABEL_SETTINGS = {
    "image_to_mask": {"train.yaml": MONAILABEL_TRAINING},
    "mask_to_image": {
        # training: the datastore's labelled studies are real images (target) and their labels (condition)
        "train.yaml": MONAILABEL_TRAINING,
        # inference: the study is the mask, under 'image'; nothing is written, MONAI Label returns pred
        "inference.yaml": {"mask_key": "image"},
    },
    "latent_mask_to_image": {
        # inference only (no train.yaml: the three stages are trained from the command line). The study is the mask,
        # under 'image'; MONAI Label loads models/model.pt into network_def, here an empty module with an empty state
        # dict: the grid sampler loads the three stage files, each checked against its record, at every /infer
        "inference.yaml": {"mask_key": "image", "network_def": "$torch.nn.Module()"},
    },
}
#: bundles served from several weight files (in their models/, each with its record <name>.json): bundle -> files.
#: MONAI Label needs a models/model.pt to offer a bundle at all, so these get an empty one (their copies'
#: network_def is an empty module), written only when every file is there
STAGE_WEIGHTS = {"latent_mask_to_image": ("autoencoder.pt", "diffusion.pt", "controlnet.pt")}
CONFIG_FILES = ("inference.yaml", "train.yaml")
STAMP = "segdiff-monailabel.json"
SOURCE_STAMP = "segdiff-source.sha256"


class VenvBuildError(SegdiffError, RuntimeError):
    """The MONAI Label venv could not be built; the message says which step failed and where its log is."""


class AppSetupError(SegdiffError, FileNotFoundError):
    """The app cannot be laid out: a bundle or MONAI Label's sample app is missing."""


class OverrideError(SegdiffError, ValueError):
    """A ``--set`` key cannot be set in a bundle config (a part of its path is neither a mapping nor a list)."""


def venv_python(venv: Path) -> Path:
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _stamp() -> dict:
    return {"monailabel": MONAILABEL_VERSION, "requirements": list(REQUIREMENTS)}


def venv_ready(venv: Path = DEFAULT_VENV) -> bool:
    """True when ``venv`` holds a finished build of the current :data:`REQUIREMENTS`."""
    stamp = Path(venv) / STAMP
    try:
        return json.loads(stamp.read_text()) == _stamp() and venv_python(venv).exists()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on ``path`` (POSIX), so that two runs (CI's build step, a test) never build at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock
            pass
        yield


def _run(command: list[str], log: Path, step: str) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, command))}\n")
        out.flush()
        try:
            done = subprocess.run(
                [str(c) for c in command], check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as error:  # e.g. the python to build with does not exist
            raise VenvBuildError(f"{step} failed: {error}; log: {log}") from error
    if done.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        tail = "\n".join(lines[-25:])
        raise VenvBuildError(f"{step} failed (exit {done.returncode}); full log: {log}\n{tail}")


def ensure_venv(venv: Path = DEFAULT_VENV, python: str | None = None, quiet: bool = False) -> Path:
    """Build MONAI Label's venv at ``venv`` unless a finished build of the current requirements is there.

    Returns the venv's python. Raises :class:`VenvBuildError` with the failing step and the tail of its pip log.
    """
    venv = Path(venv)
    with _lock(venv.parent / f".{venv.name}.lock"):
        if venv_ready(venv):
            return venv_python(venv)
        log = venv.parent / f"{venv.name}-build.log"
        if venv.exists():
            if any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
                raise VenvBuildError(f"{venv} exists and is not a venv: choose an empty or new folder")
            shutil.rmtree(venv)  # half-built or built for other requirements
        log.write_text("")
        if not quiet:
            print(f"building MONAI Label {MONAILABEL_VERSION}'s venv in {venv} (minutes, about 8 GB; log: {log})", flush=True)
        _run([python or sys.executable, "-m", "venv", venv], log, "creating the venv")
        pip = [venv_python(venv), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
        _run(pip + list(REQUIREMENTS), log, "installing MONAI Label's requirements")
        _run(pip + ["--no-deps", f"monailabel=={MONAILABEL_VERSION}"], log, f"installing monailabel {MONAILABEL_VERSION}")
        check = "import monailabel.app, monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle, torchvision"
        _run([venv_python(venv), "-c", check], log, "importing MONAI Label in the new venv")
        (venv / STAMP).write_text(json.dumps(_stamp(), indent=1))
    return venv_python(venv)


def source_fingerprint(repo: Path = REPO) -> str:
    """sha256 over the files that make up the installed package (setup files and ``segdiff/``)."""
    digest = hashlib.sha256()
    files = [repo / "setup.cfg", repo / "pyproject.toml"] + sorted((repo / "segdiff").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(repo)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def install_segdiff(venv: Path = DEFAULT_VENV, repo: Path = REPO) -> None:
    """Install monai-segdiff from ``repo`` into the venv (no dependencies: the venv has them) if its sources changed.

    A copy is built, not the checkout itself, so the checkout gets no ``build/`` folder."""
    venv = Path(venv)
    stamp = venv / SOURCE_STAMP
    fingerprint = source_fingerprint(repo)
    if stamp.exists() and stamp.read_text() == fingerprint:
        return
    log = venv.parent / f"{venv.name}-build.log"
    with _lock(venv.parent / f".{venv.name}.lock"), tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "monai-segdiff"
        source.mkdir()
        for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
            if (repo / name).exists():
                shutil.copy2(repo / name, source / name)
        shutil.copytree(repo / "segdiff", source / "segdiff", ignore=shutil.ignore_patterns("__pycache__"))
        pip = [venv_python(venv), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
        _run(pip + ["--no-deps", "--no-build-isolation", "--force-reinstall", source], log, "installing monai-segdiff")
    stamp.write_text(fingerprint)


# ---- the app ----------------------------------------------------------------------------------------------------
def parse_value(text: str):
    """A ``--set`` value: a Python literal (``[8, 16]``, ``3``, ``True``) or else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_config_item(config: dict, key: str, value, where: str = "config") -> None:
    """Set ``key`` (MONAI's nested id, ``network_def#channels`` or ``train#handlers#0``) in a loaded config; missing
    mapping keys on the way are created. Raises :class:`OverrideError` naming the part of ``key`` that cannot hold
    it (a value that is neither a mapping nor a list, or a list index that is not one)."""
    parts = key.split("#")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, (dict, list)):
            raise OverrideError(f"{where}: cannot set {key!r}: {'#'.join(parts[:depth])!r} is "
                                f"{type(node).__name__}, neither a dict nor a list")
        if isinstance(node, list):
            try:
                index = int(part)
                node[index]
            except (ValueError, IndexError):
                raise OverrideError(f"{where}: cannot set {key!r}: {'#'.join(parts[:depth])!r} is a list of "
                                    f"{len(node)}, and {part!r} is not an index into it") from None
            if depth == len(parts) - 1:
                node[index] = value
            else:
                node = node[index]
        elif depth == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def write_app_config(source: Path, target: Path, overrides: dict) -> None:
    """Write ``source`` (a bundle YAML config) to ``target`` with ``overrides`` (nested ids -> values) applied."""
    import yaml

    config = yaml.safe_load(Path(source).read_text())
    for key, value in overrides.items():
        set_config_item(config, key, value, where=str(source))
    header = (
        f"# MONAI Label copy of bundles/{source.parent.parent.name}/configs/{source.name}, written by "
        f"scripts/setup_monailabel.py\n# with {json.dumps(overrides, default=str)}: edit the bundle and re-run it.\n"
    )
    target.write_text(header + yaml.safe_dump(config, sort_keys=False, width=120))


def copy_weights(source: Path, target: Path) -> None:
    """Copy weights and their record (``source`` with ``.json``, written by training beside ``model.pt``) to
    ``target`` and ``target`` with ``.json``. Weights without a record remove the target's old one, which describes
    other weights. MONAI Label offers only ``models/*.pt`` as model files, so the ``.json`` is never loaded as one."""
    source, target = Path(source), Path(target)
    record, target_record = source.with_suffix(".json"), target.with_suffix(".json")
    shutil.copy2(source, target)
    if record.is_file():
        shutil.copy2(record, target_record)
    else:
        target_record.unlink(missing_ok=True)
        print(f"warning: {source} has no record ({record.name}): {target} is served without one, its settings "
              "unchecked", flush=True)


def write_empty_model(models: Path, files: tuple[str, ...]) -> bool:
    """For a bundle of :data:`STAGE_WEIGHTS`: write ``models/model.pt`` (an empty state dict, for the copy's empty
    ``network_def``) when all of ``files`` are in ``models``, else remove it (MONAI Label then skips the bundle instead
    of failing to start on a missing file). Returns whether the bundle can be served."""
    import torch

    target = Path(models) / "model.pt"
    missing = [name for name in files if not (Path(models) / name).is_file()]
    if missing:
        target.unlink(missing_ok=True)
        return False
    if not target.exists():
        torch.save({}, target)
    return True


def prepare_app(
    venv: Path,
    app: Path,
    bundles: dict[str, dict],
    weights: dict[str, Path] | None = None,
    bundles_dir: Path = BUNDLES,
) -> Path:
    """Lay out MONAI Label's ``monaibundle`` app at ``app`` with each of ``bundles`` (name -> overrides) under
    ``model/<name>``; ``weights`` (name -> a state dict of network_def) become ``models/model.pt``, or for a bundle of
    :data:`STAGE_WEIGHTS` (name -> the folder of its files) are copied under their names. Returns ``app``."""
    app, weights = Path(app), dict(weights or {})
    sample = Path(venv) / "monailabel" / "sample-apps" / "monaibundle"
    if not (app / "main.py").exists():
        if not sample.is_dir():
            raise AppSetupError(f"{sample}: MONAI Label's monaibundle sample app is missing from {venv}")
        shutil.copytree(sample, app, ignore=shutil.ignore_patterns("__pycache__", "model", "logs"), dirs_exist_ok=True)
    for name, overrides in bundles.items():
        source, target = Path(bundles_dir) / name, app / "model" / name
        if not (source / "configs").is_dir():
            raise AppSetupError(f"{source}: no such bundle (expected {source / 'configs'})")
        for folder in ("configs", "docs"):
            shutil.rmtree(target / folder, ignore_errors=True)
            shutil.copytree(source / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__"))
        if (source / "LICENSE").exists():
            shutil.copy2(source / "LICENSE", target / "LICENSE")
        for config in CONFIG_FILES:
            if (target / "configs" / config).exists():
                settings = {**MONAILABEL_SETTINGS.get(name, {}).get(config, {}), **overrides}
                write_app_config(source / "configs" / config, target / "configs" / config, settings)
        models = target / "models"
        if not models.exists() and (source / "models").is_dir():
            shutil.copytree(source / "models", models, ignore=shutil.ignore_patterns(".gitkeep"))
        models.mkdir(parents=True, exist_ok=True)
        if name in STAGE_WEIGHTS:
            for file in STAGE_WEIGHTS[name] if name in weights else ():
                copy_weights(Path(weights[name]) / file, models / file)
            if not write_empty_model(models, STAGE_WEIGHTS[name]):
                missing = [f for f in STAGE_WEIGHTS[name] if not (models / f).is_file()]
                print(f"warning: {models} lacks {', '.join(missing)}: MONAI Label will not offer {name} for inference "
                      f"(--weights {name}=FOLDER with {', '.join(STAGE_WEIGHTS[name])})", flush=True)
        elif name in weights:
            copy_weights(weights[name], models / "model.pt")
        if name not in STAGE_WEIGHTS and not (models / "model.pt").exists():
            print(f"warning: {models / 'model.pt'} missing: MONAI Label will not offer {name} for inference", flush=True)
    return app


def server_command(
    venv: Path, app: Path, studies: Path, models: list[str], host: str = "127.0.0.1", port: int = 8000
) -> list[str]:
    """``monailabel start_server`` for the app, offline: no model-zoo look-up, no SAM2 weights."""
    return [
        str(venv_python(venv)), "-m", "monailabel.main", "start_server",
        "--app", str(app), "--studies", str(studies),
        "--conf", "models", ",".join(models),
        "--conf", "zoo_source", "github",
        "--conf", "sam2", "false",
        "--host", host, "--port", str(port),
    ]  # fmt: skip


def _overrides(items: list[str], names: list[str]) -> dict[str, dict]:
    result: dict[str, dict] = {name: {} for name in names}
    for item in items:
        target, _, assignment = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected [BUNDLE:]KEY=VALUE, e.g. image_to_mask:num_members=3")
        for name in [target] if target else names:
            if name not in result:
                raise SystemExit(f"--set {item!r}: {name!r} is not among the served bundles {names}")
            result[name][key] = parse_value(value)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=Path, help="MONAI Label's datastore: <id>.nii.gz, labels in labels/final/")
    parser.add_argument("--app", type=Path, default=DEFAULT_APP, help=f"the monaibundle app folder (default {DEFAULT_APP})")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"MONAI Label's venv (default {DEFAULT_VENV})")
    parser.add_argument("--bundles", default=",".join(DEFAULT_BUNDLES), help="bundles to serve, comma-separated")
    parser.add_argument("--weights", action="append", default=[], metavar="BUNDLE=PATH",
                        help="a state dict of network_def to serve as BUNDLE's models/model.pt; for latent_mask_to_image "
                             "the folder of its autoencoder.pt, diffusion.pt and controlnet.pt")
    parser.add_argument("--set", action="append", default=[], metavar="[BUNDLE:]KEY=VALUE",
                        help="override in the copies' inference.yaml and train.yaml, e.g. image_to_mask:num_members=3")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--build-only", action="store_true", help="build the venv and install monai-segdiff, then stop")
    parser.add_argument("--no-start", action="store_true", help="prepare everything and print the server command")
    args = parser.parse_args(argv)
    if not args.build_only and args.studies is None:
        parser.error("--studies is required unless --build-only")
    if args.studies is not None and not args.build_only and not args.studies.is_dir():
        parser.error(f"--studies {args.studies}: no such folder (MONAI Label's datastore: <id>.nii.gz, labels in "
                     "labels/final/<id>.nii.gz)")
    # the bundles and their weights are checked before the venv is built (minutes the first time)
    names = [n.strip() for n in args.bundles.split(",") if n.strip()]
    weights = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or name not in names:
            parser.error(f"--weights {item!r}: expected BUNDLE=PATH with BUNDLE in {names}")
        if name in STAGE_WEIGHTS:
            missing = [f for f in STAGE_WEIGHTS[name] if not (Path(path) / f).is_file()]
            if missing:
                parser.error(f"--weights {item!r}: {name} takes the folder of its weights "
                             f"({', '.join(STAGE_WEIGHTS[name])}); {path} lacks {', '.join(missing)}")
        elif not Path(path).is_file():
            parser.error(f"--weights {item!r}: expected BUNDLE=PATH with BUNDLE in {names} and an existing file")
        weights[name] = Path(path)
    try:
        python = ensure_venv(args.venv)
        install_segdiff(args.venv)
    except VenvBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.build_only:
        print(f"MONAI Label {MONAILABEL_VERSION} venv ready: {args.venv}")
        return 0
    if Path(sys.prefix).resolve() != Path(args.venv).resolve():
        # the app's configs are rewritten with PyYAML: run the rest with the venv's python, which has it
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv])
    app = prepare_app(args.venv, args.app, _overrides(args.set, names), weights)
    command = server_command(args.venv, app, args.studies, names, args.host, args.port)
    print("+ " + " ".join(command), flush=True)
    if args.no_start:
        return 0
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
