"""Strict conversion of controller states from plain dictionaries (JSON-compatible).

Every reader validates the whole dictionary before building anything, so a bad checkpoint
loads nothing, and every error names the offending key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray


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
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} state: key {key!r} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{what} state: key {key!r} must be finite, got {value!r}")
    return out


def read_decay(d: Mapping[str, Any], key: str, what: str) -> float:
    out: float = read_float(d, key, what)
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{what} state: key {key!r} must be a decay in [0, 1], got {out!r}")
    return out


def read_count(d: Mapping[str, Any], key: str, what: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} state: key {key!r} must be an integer >= 0, got {value!r}")
    return int(value)


def read_vector(d: Mapping[str, Any], key: str, what: str) -> NDArray[np.float64]:
    """A flat list of finite reals as a float64 vector."""
    value = d[key]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} state: key {key!r} must be a list of numbers")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
        raise ValueError(f"{what} state: key {key!r} must be a flat list of numbers (1-D)")
    arr = np.array(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} state: key {key!r} holds non-finite values")
    return arr
