"""What decides how trained weights must be used, written beside them and checked before they are used.

Training writes ``models/model.pt`` (a plain state dict of ``network_def``: MONAI Label and the model zoo load it) and
beside it ``models/model.json``, the model's record:

- ``settings``: the bundle keys the weights only work with (``spatial_dims``, ``image_size``/``roi_size``,
  ``num_classes``, ``image_channels``, ``mask_encoding``, ``prediction_type``, the noise schedule, the network's
  architecture keys, the target/condition roles, the intensity scaling, ...), exactly as the bundle config gave them;
- ``network``: the network as built (class, constructor arguments found on the module, parameter count, a hash of
  its layer names and shapes);
- ``label_names``, ``weights_sha256`` (a hash of the tensors), ``versions`` (segdiff, MONAI, torch, Python) and
  ``training`` (epoch, iteration, time) and ``objective`` (loss weighting, timestep sampling: how the weights were
  trained, not how they must be used), both informative, never checked.

The same record goes into ``checkpoint.pt``. Inference, evaluation, synthesis, export, resume and MONAI Label's
``/infer`` build the record their own config implies (:class:`ModelRecord`) and compare it with the stored one
before any work: a difference stops the run with a message naming each key, the trained value, the configured
value, the record file, and the overrides that would match. Keys a user may change at will (sampler, steps,
ensemble size, seed) are not in ``settings`` and so are never checked. Weights without a record (older runs,
converted checkpoints) load with a warning.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from segdiff.data.inputs import require_file
from segdiff.errors import ModelMismatchError

__all__ = [
    "RECORD_FORMAT",
    "ModelRecord",
    "describe_network",
    "describe_transform",
    "label_names_of",
    "read_record",
    "record_path",
    "save_weights",
    "state_dict_sha256",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

RECORD_FORMAT = "segdiff-model-record/1"

# constructor arguments MONAI networks keep under another attribute name
_ARGUMENT_ALIASES = {"channels": ("block_out_channels", "channels")}


def record_path(weights_path: str | os.PathLike) -> Path:
    """Where the record of ``weights_path`` lives: the same name with ``.json`` (``model.pt`` -> ``model.json``)."""
    return Path(weights_path).with_suffix(".json")


def _plain(value: Any) -> Any:
    """A JSON-friendly copy: tuples -> lists, tensors/numpy -> lists or numbers, dtypes/classes -> names."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values (independent of how the file was written)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _layers_sha256(network: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(f"{name}|{tuple(tensor.shape)};".encode())
    return digest.hexdigest()


def describe_network(network: torch.nn.Module) -> dict[str, Any]:
    """The network as built: class, the constructor arguments it keeps as attributes, parameter count, layer hash.

    A wrapper that knows its own arguments can expose them as ``network.definition`` (a mapping); otherwise every
    argument of the class's ``__init__`` that the module keeps under the same name (or MONAI's alias, e.g.
    ``channels`` -> ``block_out_channels``) is recorded, and the group-norm settings are read off its first GroupNorm.
    """
    network = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    cls = type(network)
    arguments: dict[str, Any] = {}
    if isinstance(getattr(network, "definition", None), Mapping):
        arguments = dict(network.definition)
    else:
        try:
            parameters = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            parameters = {}
        for name in parameters:
            if name == "self":
                continue
            for attribute in _ARGUMENT_ALIASES.get(name, (name,)):
                value = getattr(network, attribute, None)
                if value is not None and not isinstance(value, (torch.nn.Module, torch.Tensor)) and not callable(value):
                    arguments[name] = value
                    break
        norm = next((m for m in network.modules() if isinstance(m, torch.nn.GroupNorm)), None)
        if norm is not None and "norm_num_groups" in parameters:
            arguments.setdefault("norm_num_groups", norm.num_groups)
            if "norm_eps" in parameters:
                arguments.setdefault("norm_eps", norm.eps)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "arguments": _plain(arguments),
        "num_parameters": int(sum(p.numel() for p in network.parameters())),
        "layers_sha256": _layers_sha256(network),
    }


def describe_transform(transform: Any) -> dict[str, Any]:
    """A MONAI transform's class and the constructor arguments it (or the array transform it wraps) keeps, e.g. the
    percentiles and output range of ``ScaleIntensityRangePercentilesd`` (how images were scaled for training)."""
    cls = type(transform)
    try:
        names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "keys", "allow_missing_keys")]
    except (TypeError, ValueError):
        names = []
    holders = [transform] + [v for v in vars(transform).values() if hasattr(v, "__call__") and hasattr(v, "__dict__")]
    arguments = {}
    for name in names:
        for holder in holders:
            if name in vars(holder) and not callable(vars(holder)[name]):
                arguments[name] = vars(holder)[name]
                break
    arguments.pop("dtype", None)
    return {"transform": cls.__name__, **_plain(arguments)}


def label_names_of(datalist: Any) -> dict[str, str] | None:
    """The datalist's ``labels`` (class index -> name), or None if it has none or cannot be read (MONAI Label trains
    from its own lists, without a datalist file)."""
    try:
        if isinstance(datalist, (str, os.PathLike)):
            with open(datalist) as f:
                datalist = json.load(f)
        labels = datalist.get("labels") if isinstance(datalist, Mapping) else None
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else None


def write_json_atomic(data: Any, path: str | os.PathLike) -> None:
    """Write JSON to a temporary file beside ``path``, then rename (never a half-written record)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, record: Mapping | None) -> None:
    """Write weights and their record: ``path`` (plain state dict) then ``record_path(path)``, each atomically, the
    record completed with the weights' hash. ``record`` None writes the weights alone (and removes a stale record)."""
    from segdiff.engine.handlers import atomic_torch_save  # the one torch writer

    atomic_torch_save(dict(state_dict), path)
    sidecar = record_path(path)
    if record is None:
        if sidecar.exists():
            sidecar.unlink()
        return
    record = dict(record)
    record["weights"] = Path(path).name
    record["weights_sha256"] = state_dict_sha256(state_dict)
    write_json_atomic(record, sidecar)


def read_record(weights_path: str | os.PathLike) -> dict[str, Any] | None:
    """The record stored beside ``weights_path``, or None when there is none. An unreadable record is an error."""
    path = record_path(weights_path)
    if not path.exists():
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelMismatchError(f"{path}: the model record cannot be read ({e}); restore it or delete it.") from e
    if not isinstance(record, Mapping) or record.get("format") != RECORD_FORMAT:
        raise ModelMismatchError(f"{path}: not a segdiff model record (expected format {RECORD_FORMAT!r}).")
    return dict(record)


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _override(key: str, value: Any) -> str:
    value = _plain(value)
    if isinstance(value, str):
        return f"--{key} {value}"
    text = json.dumps(value).replace("true", "True").replace("false", "False").replace("null", "None")
    return f"--{key} {text}" if isinstance(value, (int, float)) or value is None else f'--{key} "{text}"'


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings -> ``{"noise_schedule#beta_end": 0.02, ...}`` (MONAI's ``#`` key paths)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}#"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class ModelRecord:
    """The record a bundle config implies for its model, and the check of stored weights against it.

    Args:
        settings: the keys that decide how the weights must be used, as the config gives them (nested mappings are
            compared key by key: ``noise_schedule#beta_end``).
        label_names: class index -> name (the datalist's ``labels``); recorded, not checked.
        weights_path: the weights this config uses (inference, evaluation); None in training configs.
        bundle: the bundle's name, recorded (and checked: weights of one bundle are refused by another).
        objective: training-only choices (``loss_weighting``, ``min_snr_gamma``, ``timestep_sampling``): recorded
            in training configs, never checked (sampling does not depend on them).
        data_orientation: the voxel orientation of the training images, recorded as ``data.orientation``;
            inference refuses inputs in another one (:meth:`check_orientation`). None: the checkpoint handler
            fills it in from its trainer's dataset (:func:`segdiff.data.checks.data_orientation`).
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        label_names: Mapping[str, str] | None = None,
        weights_path: str | os.PathLike | None = None,
        bundle: str | None = None,
        objective: Mapping[str, Any] | None = None,
        data_orientation: str | None = None,
    ) -> None:
        self.settings = _plain(dict(settings))
        self.data_orientation = None if data_orientation is None else str(data_orientation)
        self.objective = None if objective is None else _plain(dict(objective))
        if bundle is not None:
            self.settings = {"bundle": bundle, **self.settings}
        self.label_names = None if label_names is None else {str(k): str(v) for k, v in label_names.items()}
        self.weights_path = None if weights_path is None else Path(weights_path)
        self._verified: tuple | None = None

    # -- writing ------------------------------------------------------------------------------------------------
    def build(self, network: torch.nn.Module, training: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The record to store with weights of ``network`` (the weights' hash is added when they are written)."""
        import monai

        from segdiff import __version__

        return {
            "format": RECORD_FORMAT,
            "settings": copy.deepcopy(self.settings),
            "network": describe_network(network),
            "label_names": self.label_names,
            "objective": copy.deepcopy(self.objective),
            **({"data": {"orientation": self.data_orientation}} if self.data_orientation else {}),
            "versions": {
                "segdiff": __version__,
                "monai": monai.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "training": _plain(
                {"written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(training or {})}
            ),
        }

    # -- checking -----------------------------------------------------------------------------------------------
    def differences(self, record: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """``(key, trained value, configured value)`` for every setting the two records both have and disagree on."""
        trained, configured = _flatten(record.get("settings", {})), _flatten(self.settings)
        return [(k, trained[k], configured[k]) for k in trained if k in configured and not _same(trained[k], configured[k])]

    def check(self, record: Mapping[str, Any], source: str | os.PathLike, network: torch.nn.Module | None = None) -> None:
        """Refuse (``ModelMismatchError``) when ``record`` was made with other settings than this config's, or for
        another network than ``network``. The message names every key, both values, ``source`` and the overrides."""
        diffs = self.differences(record)
        lines = [f"  {key}: trained {json.dumps(t)}, configured {json.dumps(c)}" for key, t, c in diffs]
        overrides = [_override(key, t) for key, t, _ in diffs]
        if network is not None and not diffs and "network" in record:
            built = describe_network(network)
            stored = record["network"]
            if built["class"] != stored.get("class"):
                lines.append(f"  network_def#_target_: trained {stored.get('class')}, configured {built['class']}")
            args_stored, args_built = stored.get("arguments", {}), built["arguments"]
            for name in args_stored:
                if name in args_built and not _same(args_stored[name], args_built[name]):
                    lines.append(
                        f"  network_def#{name}: trained {json.dumps(args_stored[name])}, configured {json.dumps(args_built[name])}"
                    )
                    overrides.append(_override(f"network_def#{name}", args_stored[name]))
            if not lines and stored.get("layers_sha256") not in (None, built["layers_sha256"]):
                lines.append("  network_def: the configured network's layers differ from the trained one's")
        if lines:
            fix = "Add the config or preset used in training (e.g. ../../configs/demo_cpu.yaml)"
            fix += f", or these overrides: {' '.join(overrides)}" if overrides else "."
            if any(key in ("target", "condition") for key, _, _ in diffs):  # another kind of model (e.g. joint image+mask weights given to a mask -> image config)
                trained = record.get("settings", {})
                fix = (
                    f"These weights generate {trained.get('target')} from {trained.get('condition') or 'no condition'}"
                    f"; this config generates {self.settings.get('target')} from "
                    f"{self.settings.get('condition') or 'no condition'}. No override turns one into the other: use "
                    "the config made for such weights, or this config's own weights (model_path)."
                )
            raise ModelMismatchError(
                f"{source} says these weights were trained with other settings than this config gives:\n"
                + "\n".join(lines)
                + "\n"
                + fix
            )

    def verify(self, network: torch.nn.Module | None = None, weights_path: str | os.PathLike | None = None) -> dict | None:
        """Check the weights file against this config before any work: its record (if any) must match, and its
        tensors must fit ``network`` (a mismatch is translated into the keys that differ). Returns the record, or
        None (with a warning) for weights without one."""
        path = Path(weights_path) if weights_path is not None else self.weights_path
        if path is None:
            raise ValueError("ModelRecord.verify needs the weights' path.")
        require_file(str(path))  # "no trained weights there; train the bundle first or set model_path"
        record = read_record(path)
        if record is not None:
            self.check(record, record_path(path), network)
        else:
            warnings.warn(
                f"{path} has no model record ({record_path(path).name}): it was written by an older version or "
                "converted; its settings cannot be checked against this config.",
                stacklevel=2,
            )
        if network is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and state and all(isinstance(v, Mapping) for v in state.values()):
                return record  # a checkpoint of several state dicts: its loader names the entry to use
            self._check_fits(state, network, path, record)
            if record is not None and record.get("weights_sha256") not in (None, state_dict_sha256(state)):
                warnings.warn(
                    f"{record_path(path)} was written for other weights than {path} (their hashes differ): the "
                    "record may not describe these weights.",
                    stacklevel=2,
                )
        self._verified = (str(path), _mtime(path))
        return record

    def trained_orientation(self, weights_path: str | os.PathLike | None = None) -> str | None:
        """The voxel orientation of the training images (the record's ``data.orientation``, e.g. ``"RAS"``); None
        when the weights or that entry are missing (older weights, 2D PNG data: not checked)."""
        path = Path(weights_path) if weights_path is not None else self.weights_path
        record = read_record(path) if path is not None and path.is_file() else None
        return (record or {}).get("data", {}).get("orientation") if isinstance(record, Mapping) else None

    def orientation_error(self, wrong: Sequence[str], key: str, weights_path: str | os.PathLike | None = None):
        """The refusal for inputs ``wrong`` (``"file (codes)"``) under ``key`` in another orientation than trained."""
        path = Path(weights_path) if weights_path is not None else self.weights_path
        trained = self.trained_orientation(path)
        listed = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        return ModelMismatchError(
            f"{record_path(path)} says the network was trained on images in {trained} voxel orientation; "
            f"{len(wrong)} input(s) under {key!r} are in another: {listed}. The network sees voxel arrays, so "
            f"these would reach it mirrored or turned. Reorient them to {trained} first (axes permuted and "
            f"flipped, no resampling), e.g. for RAS with nibabel: nib.as_closest_canonical(nib.load(path))"
            f".to_filename(path)."
        )

    def check_orientation(self, entries: Sequence[Any], key: str, weights_path: str | os.PathLike | None = None) -> None:
        """Refuse inputs whose voxel orientation differs from the training images' (the record's
        ``data.orientation``): the network sees voxel arrays, so they would reach it mirrored or turned. Weights
        without that record entry (older ones, 2D PNG data) are not checked."""
        from segdiff.data.checks import _first_path, file_orientation

        trained = self.trained_orientation(weights_path)
        if not trained:
            return
        wrong = []
        for entry in entries:
            file = _first_path(entry.get(key) if isinstance(entry, Mapping) else entry)
            codes = None if file is None else file_orientation(file)
            if codes is not None and codes != trained:
                wrong.append(f"{file} ({codes})")
        if wrong:
            raise self.orientation_error(wrong, key, weights_path)

    def verify_once(self, network: torch.nn.Module | None = None) -> None:
        """:meth:`verify` unless the same weights file was already verified (the sampler calls this for MONAI Label,
        which loads ``model.pt`` itself and skips the config's ``initialize``)."""
        if self.weights_path is None:
            return
        if self._verified != (str(self.weights_path), _mtime(self.weights_path)):
            self.verify(network)

    @staticmethod
    def _check_fits(state: Mapping[str, Any], network: torch.nn.Module, path: Path, record: Mapping | None) -> None:
        network = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
        expected = network.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [
            (k, tuple(state[k].shape), tuple(v.shape))
            for k, v in expected.items()
            if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
        ]
        if not (missing or unexpected or wrong):
            return
        details = []
        if wrong:
            k, have, want = wrong[0]
            details.append(f"{len(wrong)} tensor(s) of another shape, e.g. {k}: weights {list(have)}, network {list(want)}")
        if missing:
            details.append(f"{len(missing)} tensor(s) the network has and the weights lack, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} tensor(s) the weights have and the network lacks, e.g. {unexpected[0]}")
        hint = (
            "the network keys (num_classes, image_channels, mask_encoding, network_def) differ from training's"
            if record is None
            else f"see {record_path(path)} for the settings it was trained with"
        )
        raise ModelMismatchError(f"{path} does not fit the configured network_def: " + "; ".join(details) + f"; {hint}.")


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
