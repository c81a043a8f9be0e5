"""The output folder of a synthesis run: kept pairs, the record of every try, and what makes a run resumable.

Layout of ``output_dir``::

    images/<case>_syn<k>.nii.gz   generated image k of a mask (k = rank among its kept pairs), on the mask's grid
    labels/<case>_syn<k>.nii.gz   the mask it was generated from (after deformation), same grid
    datalist.json                 MONAI datalist: {"training": [{"image", "label", scores...}], "labels": ...}
    tries.json                    the settings, the finished masks and every try with its scores and decision
    tries.csv                     the tries as a table
    journals/rank<r>.json         with several processes (torchrun): rank r's own journal, merged into tries.json

``tries.json`` is the journal: a mask counts as finished once it is listed there. A mask's pairs are first written
under temporary names (``.<name>.partial.nii.gz``), then the mask is recorded, then the files are renamed; a run
that stops in between is completed (renamed) or cleaned up (unrecorded partial files) by the next run. Final files are
never overwritten: a pair file that exists for an unfinished mask stops the run.

With several processes (:mod:`segdiff.synthesis.shard`) each rank records its masks in its own journal and, after
every mask, merges all journals into ``tries.json``, ``datalist.json`` and ``tries.csv`` while holding the folder's
lock; a rank completes or cleans up only the files of its own masks. The merged records list the masks in the order
of the input list, whatever the number of processes, so a run on N processes writes what one process would.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from segdiff.data.naming import source_of_synthetic_case, synthetic_case_name
from segdiff.synthesis.shard import folder_lock

__all__ = ["SynthesisRecords", "file_digest", "pair_names"]

PARTIAL = ".partial"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file (weights): a rerun with other weights is another run."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_names(case: str, k: int) -> tuple[str, str]:
    """Paths of the k-th kept pair of a mask, relative to the output folder (named by
    :func:`segdiff.data.naming.synthetic_case_name`)."""
    name = synthetic_case_name(case, k)
    return f"images/{name}.nii.gz", f"labels/{name}.nii.gz"


def partial_name(relative: str) -> str:
    """Temporary name of an output file while its mask is not yet recorded."""
    folder, name = os.path.split(relative)
    return os.path.join(folder, f".{name[: -len('.nii.gz')]}{PARTIAL}.nii.gz")


def _normalise(value: Any) -> Any:
    """JSON-compatible copy: tuples -> lists, NaN -> None, numpy scalars -> Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SynthesisRecords:
    """Read and write the records of one output folder; refuse a folder written with other settings.

    Args:
        output_dir: the run's output folder.
        settings: everything that decides the outputs (model and judge weights, sampling, variety, thresholds,
            seed); stored with the records and compared on every rerun.
        class_names: names of classes ``1..num_classes-1`` (table columns).
        labels: the input datalist's ``"labels"`` (class names), copied into the output datalist; None: none.
        rank, world_size: this process among those writing the folder together (``(0, 1)``: alone).

    ``masks`` holds the finished masks of the whole folder (every journal), ``tries`` their tries, both in the order
    of :meth:`open`'s ``order``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        settings: Mapping[str, Any],
        class_names: Sequence[str],
        labels: Mapping[str, str] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.root = Path(output_dir)
        self.settings = _normalise(dict(settings))
        self.class_names = list(class_names)
        self.labels = None if labels is None else _normalise(dict(labels))
        self.rank, self.world_size = int(rank), int(world_size)
        self.masks: dict[str, dict[str, Any]] = {}
        self.tries: list[dict[str, Any]] = []
        self.order: list[str] = []
        self._own: dict[str, Any] = {"masks": {}, "tries": []}  # this rank's journal (several processes)

    @property
    def path(self) -> Path:
        return self.root / "tries.json"

    @property
    def journal_path(self) -> Path:
        """Where this process records its masks: ``tries.json`` alone, ``journals/rank<r>.json`` as rank r."""
        return self.path if self.world_size == 1 else self.root / "journals" / f"rank{self.rank}.json"

    # -- opening: new folder, or a resume with the same settings -------------------------------------------------
    def open(self, order: Sequence[str] = (), cases: Sequence[str] | None = None) -> int:
        """Start a new folder or resume one; returns the number of masks already finished (by any process).

        Args:
            order: the case names of the input list: the records list masks in this order (others after them).
            cases: the cases this process works on (None: all); only their interrupted renames are completed and
                their unrecorded partial files removed, since other processes may be writing theirs.

        Raises:
            ValueError: the folder holds records written with other settings (the differences are listed).
            FileExistsError: the folder holds pair files but no records (outputs of something else).
        """
        self.order = list(order)
        with folder_lock(self.root):
            if not self.path.exists():
                existing = [p for folder in ("images", "labels") for p in sorted((self.root / folder).glob("*.nii.gz"))]
                if existing or (self.root / "datalist.json").exists():
                    example = existing[0] if existing else self.root / "datalist.json"
                    raise FileExistsError(
                        f"{self.root} holds outputs without synthesis records (e.g. {example}); they would be mixed "
                        "with this run's. Choose another output_dir."
                    )
                (self.root / "images").mkdir(parents=True, exist_ok=True)
                (self.root / "labels").mkdir(parents=True, exist_ok=True)
                self._write_journal(self.path, {}, [])
            journals = self._read_journals()
        for path, stored in journals:
            self._check_settings(path, stored.get("settings", {}))
        self.masks, self.tries = self._union(stored for _, stored in journals)
        if self.world_size > 1 and self.journal_path.exists():
            own = json.loads(self.journal_path.read_text())
            self._own = {"masks": own.get("masks", {}), "tries": own.get("tries", [])}
        mine = None if cases is None else set(cases)
        self._complete_renames(mine)
        self._remove_unrecorded_partials(mine)
        self.merge()
        return len(self.masks)

    def _check_settings(self, path: Path, old: Mapping[str, Any]) -> None:
        differences = [
            f"{key}: {old.get(key, '<unset>')!r} there, {self.settings.get(key, '<unset>')!r} now"
            for key in sorted(set(old) | set(self.settings))
            if old.get(key) != self.settings.get(key)
        ]
        if differences:
            raise ValueError(
                f"{path} was written with other settings; resuming would mix two runs. Differences:\n  "
                + "\n  ".join(differences)
                + "\nUse the same settings to continue that run, or choose another output_dir."
            )

    def _read_journals(self) -> list[tuple[Path, dict[str, Any]]]:
        """``tries.json`` and every rank's journal, as stored (call with the folder's lock held)."""
        paths = [self.path] + sorted((self.root / "journals").glob("rank*.json"))
        return [(p, json.loads(p.read_text())) for p in paths if p.exists()]

    def _union(self, journals: Any) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """All finished masks and their tries over several journals, each once, in the input list's order."""
        masks: dict[str, dict[str, Any]] = {}
        tries: dict[tuple[str, int], dict[str, Any]] = {}
        for stored in journals:
            for case, info in stored.get("masks", {}).items():
                masks.setdefault(case, info)
            for row in stored.get("tries", []):
                if row["case"] in stored.get("masks", {}):
                    tries.setdefault((row["case"], int(row["try"])), row)
        position = {case: i for i, case in enumerate(self.order)}
        seen = {case: i for i, case in enumerate(masks)}
        rank = {case: (position.get(case, len(position)), seen[case]) for case in masks}
        ordered = {case: masks[case] for case in sorted(masks, key=rank.__getitem__)}
        rows = [tries[key] for key in sorted(tries, key=lambda k: (rank[k[0]], k[1]))]
        return ordered, rows

    def _complete_renames(self, cases: set[str] | None) -> None:
        for case, info in self.masks.items():
            if cases is not None and case not in cases:
                continue
            for relative in info.get("files", []):
                final, partial = self.root / relative, self.root / partial_name(relative)
                if not final.exists() and partial.exists():
                    os.replace(partial, final)
                elif not final.exists():
                    raise FileNotFoundError(
                        f"{final} is recorded in {self.path} as a kept pair of {case} but is missing; restore it, "
                        "or start again in another output_dir."
                    )

    def _remove_unrecorded_partials(self, cases: set[str] | None) -> None:
        """Partial files of masks that were never recorded: left by a run that stopped while writing."""
        for folder in ("images", "labels"):
            for path in (self.root / folder).glob(f".*{PARTIAL}.nii.gz"):
                case = source_of_synthetic_case(path.name[1 : -len(f"{PARTIAL}.nii.gz")])
                if cases is None or case in cases:
                    path.unlink()

    # -- per mask ----------------------------------------------------------------------------------------------
    def is_finished(self, case: str) -> bool:
        return case in self.masks

    def existing_outputs(self, case: str, keep_k: int) -> list[str]:
        """Pair files of ``case`` that already exist (an unfinished mask must have none)."""
        return [
            str(self.root / name) for k in range(keep_k) for name in pair_names(case, k) if (self.root / name).exists()
        ]

    def finish_mask(
        self,
        case: str,
        mask: str,
        rows: Sequence[Mapping[str, Any]],
        outputs: Sequence[tuple[str, Callable[[str], None]]],
    ) -> None:
        """Write a mask's kept pairs under temporary names, record its tries, then move the pairs into place.

        Args:
            case: the mask's case name.
            mask: the mask file.
            rows: one record per try, kept ones with their ``image`` and ``label`` paths.
            outputs: ``(relative path, writer)`` for every output file; ``writer(path)`` writes the file at ``path``.
        """
        for relative, _ in outputs:
            if (self.root / relative).exists():
                raise FileExistsError(
                    f"{self.root / relative} exists and is not overwritten; choose another output_dir."
                )
        for relative, write in outputs:
            write(str(self.root / partial_name(relative)))
        files = [relative for relative, _ in outputs]
        info = {
            "mask": str(mask),
            "tries": len(rows),
            "kept": sum(bool(r["kept"]) for r in rows),
            "relax_level": rows[0]["relax_level"] if rows else 0,
            "files": files,
        }
        recorded = [_normalise(dict(r)) for r in rows]
        if self.world_size == 1:
            self.masks[case] = info
            self.masks, self.tries = self._union([{"masks": self.masks, "tries": self.tries + recorded}])
            self._write_journal(self.path, self.masks, self.tries)
        else:
            self._own["masks"][case] = info
            self._own["tries"].extend(recorded)
            self._write_journal(self.journal_path, self._own["masks"], self._own["tries"])
        for relative in files:
            os.replace(self.root / partial_name(relative), self.root / relative)
        self.merge()

    # -- files ---------------------------------------------------------------------------------------------------
    def _write_journal(self, path: Path, masks: Mapping[str, Any], tries: Sequence[Mapping[str, Any]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = {"settings": self.settings, "classes": self.class_names, "masks": masks, "tries": list(tries)}
        _write_atomic(path, json.dumps(journal, indent=1))

    def merge(self) -> None:
        """Bring ``tries.json`` (several processes: the union of every rank's journal), ``datalist.json`` and
        ``tries.csv`` up to date, holding the folder's lock."""
        with folder_lock(self.root):
            if self.world_size > 1:
                self.masks, self.tries = self._union(stored for _, stored in self._read_journals())
                self._write_journal(self.path, self.masks, self.tries)
            self.write_tables()

    def datalist(self) -> dict[str, Any]:
        """The MONAI datalist of the kept pairs (paths relative to the output folder), with their scores."""
        score_keys = ("case", "mask", "try", "seed", "sample", "unspecified_classes", "mask_changed", "dice",
                      "mean_dice", "relax_level", "min_class_dice", "min_mean_dice")
        training = [
            {**({"image": r["image"]} if r.get("image") else {}), "label": r["label"], **{k: r[k] for k in score_keys}}
            for r in self.tries
            if r["kept"]
        ]
        training.sort(key=lambda e: e.get("image") or e["label"])  # generated masks alone have no image
        out: dict[str, Any] = {"training": training}
        if self.labels:
            out["labels"] = self.labels
        return out

    def table(self) -> str:
        """Every try as CSV: one column per class for the Dice and for the threshold in force."""
        columns = ["case", "try", "round", "sample", "seed", "unspecified_classes", "mask_changed"]
        columns += [f"dice_{n}" for n in self.class_names] + ["mean_dice"]
        columns += [f"min_dice_{n}" for n in self.class_names] + ["min_mean_dice", "relax_level"]
        columns += ["passed", "kept", "reason", "image", "label", "mask"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in self.tries:
            row = {k: r.get(k) for k in columns if k in r}
            row["unspecified_classes"] = " ".join(str(c) for c in r.get("unspecified_classes", []))
            for name, threshold in zip(self.class_names, r["min_class_dice"]):
                row[f"dice_{name}"] = "" if r["dice"].get(name) is None else r["dice"][name]
                row[f"min_dice_{name}"] = threshold
            row["mean_dice"] = "" if r["mean_dice"] is None else r["mean_dice"]
            writer.writerow(row)
        return buffer.getvalue()

    def write_tables(self) -> None:
        """Rewrite ``datalist.json`` and ``tries.csv`` from the records."""
        _write_atomic(self.root / "datalist.json", json.dumps(self.datalist(), indent=1))
        _write_atomic(self.root / "tries.csv", self.table())
