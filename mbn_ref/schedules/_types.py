"""The schedule type and the two argument checks only schedules have (count, boundaries).

The other rules (real numbers, decays, integers) are the package's, in
:mod:`mbn_ref._validate`.

A *schedule* maps a 0-indexed ``count`` (completed epochs or steps, ``int`` or ``float``) to a
**decay** ``d`` in ``[0, 1]``: the weight on history in ``s <- d*s + (1-d)*batch``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Protocol

from .._validate import check_real

__all__ = ["Schedule"]


class Schedule(Protocol):
    """A pure function ``count -> decay`` of a 0-indexed count (docs/spec.md §4).

    ``count`` is the number of completed epochs (or steps): the first epoch is ``count = 0``.
    The returned value is a decay (weight on history), a Python ``float`` in ``[0, 1]``.
    """

    def __call__(self, count: float, /) -> float: ...


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
