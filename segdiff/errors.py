"""The project's refusals: errors raised on purpose, before any long run, with a message meant for the user.

A bundle run evaluates our code inside MONAI's ``ConfigExpression``, which re-raises every error as ``RuntimeError:
Failed to evaluate ConfigExpression: (...)``; the traceback then ends with that generic line. ``import segdiff``
installs :func:`excepthook`, which, when the uncaught error was caused by a :class:`SegdiffError`, prints the
refusal's own message as the last thing on the console (the full traceback only with ``SEGDIFF_TRACEBACK=1``).
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

__all__ = ["ConfigKeyError", "ModelMismatchError", "OutputCollisionError", "RunFolderError", "SegdiffError",
           "excepthook", "find_refusal", "install_excepthook"]


class SegdiffError(Exception):
    """A refusal: the input, the configuration or the folders would give a wrong or lossy run."""


class ModelMismatchError(SegdiffError, ValueError):
    """Weights used with settings they were not trained with (the keys differ from their record)."""


class RunFolderError(SegdiffError, FileExistsError):
    """A training run would replace files of an earlier run, or resume from a checkpoint that is not there."""


class OutputCollisionError(SegdiffError, ValueError):
    """Several inputs would be written to the same output file."""


class ConfigKeyError(SegdiffError, ValueError):
    """A configuration key has a value the bundle does not know."""


def find_refusal(error: BaseException | None) -> SegdiffError | None:
    """The :class:`SegdiffError` that ``error`` is, or was caused by (following ``__cause__`` and ``__context__``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SegdiffError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """Print a refusal as one readable message at the end of the console; anything else as Python does."""
    refusal = find_refusal(error)
    if refusal is None or os.environ.get("SEGDIFF_TRACEBACK"):
        _previous_hook(kind, error, tb)
        if refusal is None:
            return
    else:
        where = traceback.extract_tb(refusal.__traceback__)[-1:] if refusal.__traceback__ else []
        origin = f" (raised in {where[0].filename}:{where[0].lineno}; SEGDIFF_TRACEBACK=1 shows the traceback)" if where else ""
        print(f"segdiff refused to run{origin}:", file=sys.stderr)
    print(f"ERROR: {refusal}", file=sys.stderr)


_previous_hook = sys.excepthook


def install_excepthook() -> None:
    """Use :func:`excepthook` for uncaught errors, unless another tool (IPython, a debugger) installed its own."""
    global _previous_hook
    if sys.excepthook is sys.__excepthook__:
        _previous_hook = sys.__excepthook__
        sys.excepthook = excepthook
