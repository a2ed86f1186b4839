"""Strict conversion of controller states from plain dictionaries (JSON-compatible).

Every reader validates the whole dictionary before building anything, so a bad checkpoint
loads nothing, and every error names the offending key. The rules are the package's
(:mod:`mbn_ref._validate`); a bad checkpoint value is always a ``ValueError``
(docs/spec.md §9), never a ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from .._validate import check_decay, check_int, check_real, is_real_scalar

_T = TypeVar("_T")


def _as_value_error(rule: Callable[[str, object], _T], key: str, what: str, value: object) -> _T:
    """``rule(name, value)`` with its ``TypeError`` turned into a ``ValueError`` naming ``key``."""
    try:
        return rule(f"{what} state: key {key!r}", value)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def check_keys(d: object, expected: tuple[str, ...], what: str) -> Mapping[str, Any]:
    """``d`` must be a mapping with exactly the keys ``expected``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} state must be a dict, got {type(d).__name__}")
    missing = [k for k in expected if k not in d]
    if missing:
        raise ValueError(f"{what} state: missing key {missing[0]!r} (expected {list(expected)})")
    unknown = [k for k in d if k not in expected]
    if unknown:
        raise ValueError(f"{what} state: unknown key {unknown[0]!r} (expected {list(expected)})")
    return d


def read_float(d: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> Any:
    """A finite real (or ``None`` when ``optional``) as ``float``."""
    value = d[key]
    if optional and value is None:
        return None
    return _as_value_error(check_real, key, what, value)


def read_decay(d: Mapping[str, Any], key: str, what: str) -> float:
    """A decay in ``[0, 1]`` as ``float``."""
    return _as_value_error(check_decay, key, what, d[key])


def read_count(d: Mapping[str, Any], key: str, what: str) -> int:
    """An integer ``>= 0`` as ``int``."""

    def rule(name: str, value: object) -> int:
        return check_int(name, value, minimum=0)

    return _as_value_error(rule, key, what, d[key])


def read_vector(d: Mapping[str, Any], key: str, what: str) -> NDArray[np.float64]:
    """A flat list of finite reals as a float64 vector."""
    value = d[key]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} state: key {key!r} must be a list of numbers")
    if not all(is_real_scalar(v) for v in value):
        raise ValueError(f"{what} state: key {key!r} must be a flat list of numbers (1-D)")
    arr = np.array(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} state: key {key!r} holds non-finite values")
    return arr
