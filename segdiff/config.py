"""Small helpers that bundle configs call: renamed keys and key values checked against their allowed set or bound."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from segdiff.errors import ConfigKeyError

__all__ = ["at_least", "between", "choice", "renamed_key"]


def renamed_key(old_name: str, old_value: Any, new_name: str, default: Any) -> Any:
    """The value of a key that was renamed: ``default`` (the new key's own default) unless the config or the command
    line still sets the old name, which is then used with a deprecation warning. Old names are accepted for one
    release. In a config: ``samples_per_mask: "$segdiff.config.renamed_key('num_samples', @num_samples,
    'samples_per_mask', 1)"`` beside ``num_samples: null``."""
    if old_value is None:
        return default
    message = f"the key '{old_name}' is deprecated and will be removed in the next release: use '{new_name}' instead."
    warnings.warn(message, FutureWarning, stacklevel=2)
    return old_value


def choice(key: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else a refusal naming the key, the value and the allowed values."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigKeyError(f"'{key}' must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return value


def at_least(key: str, value: Any, minimum: int, why: str = "") -> Any:
    """``value`` if it is at least ``minimum``, else a refusal naming the key, the value, the bound and ``why``."""
    if value is None or value < minimum:
        reason = f" ({why})" if why else ""
        raise ConfigKeyError(f"'{key}' must be at least {minimum}{reason}; got {value!r}.")
    return value


def between(key: str, value: Any, low: float, high: float) -> Any:
    """``value`` if it is a number in ``[low, high]``, else a refusal naming the key, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigKeyError(f"'{key}' must be a number in [{low}, {high}]; got {value!r}.")
    return value
