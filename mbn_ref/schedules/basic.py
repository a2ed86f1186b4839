"""Generic decay schedules: validated factories returning pure ``count -> decay`` functions.

Modelled on optax's schedules. Every factory validates its arguments when called, so a bad
value fails where it is written, and returns a function of the **0-indexed** count (completed
epochs or steps; ``int`` or ``float``) whose values are **decays** in ``[0, 1]`` (weight on
history, ``s <- d*s + (1-d)*batch``) as Python floats. A negative or non-finite count raises
``ValueError``.

Schedules written as update rates (PyTorch's ``momentum``; the ``alpha`` of the article
"Batch Normalization in Neural Networks: A Comprehensive Guide") are converted with
:func:`from_update_rate`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

from .._validate import check_decay, check_int, check_real
from ..conventions import decay_from_update_rate
from ._types import Schedule, check_boundaries, check_count

__all__ = [
    "constant",
    "cosine",
    "cumulative",
    "exponential",
    "from_update_rate",
    "join",
    "linear",
    "piecewise_constant",
]


def constant(decay: float) -> Schedule:
    """The same decay at every count.

    Parameters
    ----------
    decay : float
        The decay (weight on history), a host real in ``[0, 1]``.

    Returns
    -------
    Schedule
        ``count -> decay``.

    Raises
    ------
    TypeError
        ``decay`` is not a real number.
    ValueError
        ``decay`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> constant(0.9)(123)
    0.9
    """
    d = check_decay("decay", decay)

    def schedule(count: float, /) -> float:
        check_count(count)
        return d

    return schedule


def _ramp(start: float, end: float, num_steps: int, ease: Callable[[float], float]) -> Schedule:
    """``start -> end`` over ``num_steps`` along ``ease`` (``[0, 1] -> [0, 1]``), then ``end``."""
    lo, hi = min(start, end), max(start, end)

    def schedule(count: float, /) -> float:
        c = check_count(count)
        if c >= num_steps:
            return end
        # Clamped: start + (end - start)*frac may round one unit past `end`.
        return min(max(start + (end - start) * ease(c / num_steps), lo), hi)

    return schedule


def _linear_ease(frac: float) -> float:
    return frac


def _cosine_ease(frac: float) -> float:
    return 0.5 * (1.0 - math.cos(math.pi * frac))


def linear(start: float, end: float, num_steps: int) -> Schedule:
    """Linear ramp from ``start`` (count 0) to ``end`` (count ``num_steps``), then constant.

    ``d(c) = start + (end - start) * min(c/num_steps, 1)``. Seed 000's "linearly decreasing
    momentum" example actually ramps the decay up, 0.9 -> 0.99 (docs/spec.md §8 erratum 7).

    Parameters
    ----------
    start, end : float
        The decays at count 0 and from count ``num_steps`` on, host reals in ``[0, 1]``.
    num_steps : int
        The length of the ramp, an integer ``>= 1``.

    Returns
    -------
    Schedule
        ``count -> decay``, clamped to ``[min(start, end), max(start, end)]``.

    Raises
    ------
    TypeError
        ``start``/``end`` is not a real number or ``num_steps`` not an integer.
    ValueError
        ``start``/``end`` is outside ``[0, 1]`` or ``num_steps < 1``.

    Examples
    --------
    >>> lam = linear(0.9, 0.99, num_steps=100)
    >>> lam(0), round(lam(50), 12), lam(100), lam(1000)
    (0.9, 0.945, 0.99, 0.99)
    """
    s, e = check_decay("start", start), check_decay("end", end)
    return _ramp(s, e, check_int("num_steps", num_steps, minimum=1), _linear_ease)


def cosine(start: float, end: float, num_steps: int) -> Schedule:
    """Half-cosine ramp from ``start`` (count 0) to ``end`` (count ``num_steps``), then constant.

    ``d(c) = start + (end - start) * (1 - cos(pi * min(c/num_steps, 1))) / 2``.

    Parameters
    ----------
    start, end, num_steps
        As in :func:`linear`.

    Returns
    -------
    Schedule
        ``count -> decay``, clamped to ``[min(start, end), max(start, end)]``.

    Raises
    ------
    TypeError, ValueError
        As in :func:`linear`.

    Examples
    --------
    >>> lam = cosine(0.9, 0.99, num_steps=100)
    >>> lam(0), round(lam(50), 12), lam(100)
    (0.9, 0.945, 0.99)
    """
    s, e = check_decay("start", start), check_decay("end", end)
    return _ramp(s, e, check_int("num_steps", num_steps, minimum=1), _cosine_ease)


def exponential(start: float, rate: float, *, end: float | None = None) -> Schedule:
    """``d(c) = start * rate**c``, optionally bounded by ``end``.

    The exponential schedule of the article "Batch Normalization in Neural Networks: A
    Comprehensive Guide".

    With ``rate < 1`` the values fall towards 0 and ``end`` (``<= start``) is a floor; with
    ``rate > 1`` they grow and ``end`` (``>= start``, ``<= 1``) is a required ceiling, so the
    values always stay in ``[0, 1]``.

    Parameters
    ----------
    start : float
        The decay at count 0, a host real in ``[0, 1]``.
    rate : float
        The factor per count, ``> 0``.
    end : float, optional
        A decay in ``[0, 1]``: the floor for ``rate < 1``, the ceiling (required) for
        ``rate > 1``.

    Returns
    -------
    Schedule
        ``count -> decay``.

    Raises
    ------
    TypeError
        An argument is not a real number.
    ValueError
        ``start``/``end`` outside ``[0, 1]``, ``rate <= 0``, ``rate > 1`` without ``end``,
        or ``end`` on the wrong side of ``start``.

    Examples
    --------
    >>> lam = exponential(0.5, 1.1, end=0.99)
    >>> round(lam(1), 12), lam(100)
    (0.55, 0.99)
    >>> exponential(0.99, 0.5, end=0.9)(3)
    0.9
    """
    s = check_decay("start", start)
    r = check_real("rate", rate)
    if r <= 0:
        raise ValueError(f"rate must be > 0, got {rate!r}")
    bound = None if end is None else check_decay("end", end)
    if r > 1 and bound is None:
        raise ValueError(
            f"rate = {rate!r} > 1 makes start * rate**count exceed 1; pass end (<= 1) as a ceiling"
        )
    if bound is not None and r > 1 and bound < s:
        raise ValueError(f"with rate > 1, end is a ceiling and must be >= start, got end={end!r}")
    if bound is not None and r < 1 and bound > s:
        raise ValueError(f"with rate < 1, end is a floor and must be <= start, got end={end!r}")

    def schedule(count: float, /) -> float:
        c = check_count(count)
        try:
            value = s * float(r**c)
        except OverflowError:  # r > 1, so the ceiling applies
            value = math.inf
        if bound is None:
            return value
        return min(value, bound) if r > 1 else max(value, bound)

    return schedule


def piecewise_constant(boundaries: Sequence[float], values: Sequence[float]) -> Schedule:
    """The step schedule: ``values[i]`` where ``i`` = number of boundaries ``<= count``.

    ``values[0]`` applies before ``boundaries[0]``, ``values[k]`` from ``boundaries[k-1]`` on.

    Parameters
    ----------
    boundaries : sequence of float
        Strictly increasing, finite, non-negative counts.
    values : sequence of float
        ``len(boundaries) + 1`` decays in ``[0, 1]``.

    Returns
    -------
    Schedule
        ``count -> decay``.

    Raises
    ------
    TypeError
        ``boundaries`` is not a sequence, or an element is not a real number.
    ValueError
        The boundaries are negative or not strictly increasing, a value is outside
        ``[0, 1]``, or the lengths do not match.

    Examples
    --------
    >>> lam = piecewise_constant([10, 20], [0.9, 0.95, 0.99])
    >>> lam(0), lam(9.5), lam(10), lam(25)
    (0.9, 0.9, 0.95, 0.99)
    """
    bounds = check_boundaries(boundaries)
    vals = tuple(check_decay(f"values[{i}]", v) for i, v in enumerate(values))
    if len(vals) != len(bounds) + 1:
        raise ValueError(
            f"need len(values) == len(boundaries) + 1, got {len(vals)} values "
            f"for {len(bounds)} boundaries"
        )

    def schedule(count: float, /) -> float:
        return vals[bisect.bisect_right(bounds, check_count(count))]

    return schedule


def cumulative() -> Schedule:
    """The cumulative average: ``d(c) = c / (c + 1)`` (PyTorch ``momentum=None``).

    The ``n``-th update (``n = c + 1``) uses ``(n-1)/n``, so the running statistic is the
    exact mean of every batch statistic seen; the first update (``c = 0``) ignores the initial
    value.

    Returns
    -------
    Schedule
        ``count -> count / (count + 1)``.

    Examples
    --------
    >>> lam = cumulative()
    >>> lam(0), lam(1), lam(3)
    (0.0, 0.5, 0.75)
    """

    def schedule(count: float, /) -> float:
        c = check_count(count)
        return c / (c + 1.0)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[float]) -> Schedule:
    """Chain schedules at boundaries, like ``optax.join_schedules``.

    Before ``boundaries[0]`` the first schedule runs on ``count``; from ``boundaries[k-1]``
    on, schedule ``k`` runs on ``count - boundaries[k-1]`` (each restarts at 0). The result is
    checked to be a decay at every call.

    Parameters
    ----------
    schedules : sequence of Schedule
        ``len(boundaries) + 1`` schedules (callables ``count -> decay``).
    boundaries : sequence of float
        Strictly increasing, finite, non-negative counts.

    Returns
    -------
    Schedule
        ``count -> decay``; a value of a joined schedule that is not a decay raises at the
        call.

    Raises
    ------
    TypeError
        An element of ``schedules`` is not callable, or a boundary is not a number.
    ValueError
        The boundaries are negative or not strictly increasing, or the lengths do not match.

    Examples
    --------
    >>> warm = join([constant(0.0), linear(0.9, 0.99, 10)], boundaries=[5])
    >>> warm(4), warm(5), warm(15)
    (0.0, 0.9, 0.99)
    """
    scheds = tuple(schedules)
    bounds = check_boundaries(boundaries)
    if len(scheds) != len(bounds) + 1:
        raise ValueError(
            f"need len(schedules) == len(boundaries) + 1, got {len(scheds)} schedules "
            f"for {len(bounds)} boundaries"
        )
    if not all(callable(s) for s in scheds):
        raise TypeError("every element of schedules must be callable (count -> decay)")

    def schedule(count: float, /) -> float:
        c = check_count(count)
        k = bisect.bisect_right(bounds, c)
        offset = bounds[k - 1] if k > 0 else 0.0
        return check_decay(f"schedules[{k}]({c - offset!r})", scheds[k](c - offset))

    return schedule


def from_update_rate(update_rate: Schedule) -> Schedule:
    """Turn a schedule of update rates ``u`` (PyTorch's ``momentum``) into decays ``1 - u``.

    The conversion is :func:`mbn_ref.conventions.decay_from_update_rate` (rounded to 15
    significant digits, so ``1 - 0.9`` is ``0.1``); a value outside ``[0, 1]`` raises
    ``ValueError`` naming the count, a non-number ``TypeError``.

    Seed 003 ramps PyTorch's momentum (an update rate) ``max(0.9 - epoch/50, 0.1)``: that is
    ``from_update_rate(linear(0.9, 0.1, num_steps=40))``, the decay ramp ``0.1 -> 0.9``, i.e.
    ``linear(0.1, 0.9, num_steps=40)`` up to rounding.

    Parameters
    ----------
    update_rate : Schedule
        A callable ``count -> u`` of update rates in ``[0, 1]``.

    Returns
    -------
    Schedule
        ``count -> 1 - u``.

    Raises
    ------
    TypeError
        ``update_rate`` is not callable.

    Examples
    --------
    >>> lam = from_update_rate(linear(0.9, 0.1, num_steps=40))
    >>> lam(0), lam(20), lam(40)
    (0.1, 0.5, 0.9)
    """
    if not callable(update_rate):
        raise TypeError(f"update_rate must be a schedule (callable), got {update_rate!r}")

    def schedule(count: float, /) -> float:
        u = update_rate(count)
        try:
            return decay_from_update_rate(u)
        except ValueError as exc:
            raise ValueError(f"{exc} (at count {count!r})") from None

    return schedule
