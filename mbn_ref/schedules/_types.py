"""The schedule type and the argument checks shared by the schedule modules.

A *schedule* maps a 0-indexed ``count`` (completed epochs or steps, ``int`` or ``float``) to a
**decay** ``d`` in ``[0, 1]``: the weight on history in ``s <- d*s + (1-d)*batch``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable
from typing import Protocol

import numpy as np

__all__ = ["Schedule"]


class Schedule(Protocol):
    """A pure function ``count -> decay`` of a 0-indexed count (SPEC §4).

    ``count`` is the number of completed epochs (or steps): the first epoch is ``count = 0``.
    The returned value is a decay (weight on history), a Python ``float`` in ``[0, 1]``.
    """

    def __call__(self, count: float, /) -> float: ...


def check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite ``float``; ``ValueError`` (``TypeError`` for non-numbers)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def check_positive(name: str, value: object) -> float:
    """A finite real ``> 0``."""
    out = check_real(name, value)
    if not out > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def check_decay(name: str, value: object) -> float:
    """A decay: a finite real in ``[0, 1]``."""
    out = check_real(name, value)
    if not 0.0 <= out <= 1.0:
        raise ValueError(
            f"{name} must be a decay (weight on history) in [0, 1], got {value!r}; "
            "an update rate u (PyTorch's momentum) corresponds to the decay 1 - u"
        )
    return out


def check_num_steps(name: str, value: object) -> int:
    """An integer ``>= 1``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def check_count(count: object) -> float:
    """A schedule's 0-indexed count: a finite real ``>= 0``."""
    out = check_real("count", count)
    if out < 0:
        raise ValueError(
            f"count must be >= 0 (schedules take the 0-indexed number of completed "
            f"epochs or steps), got {count!r}"
        )
    return out


def check_boundaries(boundaries: Iterable[object]) -> tuple[float, ...]:
    """Strictly increasing, finite, non-negative boundaries."""
    try:
        items = tuple(boundaries)
    except TypeError:
        raise TypeError(f"boundaries must be a sequence of numbers, got {boundaries!r}") from None
    out = tuple(check_real(f"boundaries[{i}]", b) for i, b in enumerate(items))
    if out and out[0] < 0:
        raise ValueError(f"boundaries must be >= 0, got {list(out)}")
    if any(b >= c for b, c in itertools.pairwise(out)):
        raise ValueError(f"boundaries must be strictly increasing, got {list(out)}")
    return out
