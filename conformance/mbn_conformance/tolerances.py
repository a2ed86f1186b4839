"""One tolerance table per dtype, scaled where a case needs it, overrides with reasons.

An array ``actual`` passes against ``expected`` when, element by element,

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max(1, max |expected|)

(``atol`` is relative to the array's magnitude, so outputs scaled by a large ``1/sqrt(eps)``
in a zero-variance channel are judged fairly). ``rtol`` and ``atol`` always travel together.

Offset data: a tolerance from the conditioning
----------------------------------------------
Data far from zero (per-channel mean ``mu``, spread ``sigma``) are ill-conditioned for
normalization: with ``kappa = max_c |mu_c| / sigma_c`` (:func:`conditioning`), changing each
``x_i`` by one relative rounding ``u`` (the dtype's unit roundoff, :data:`UNIT_ROUNDOFF`)
moves ``x - mu`` by up to ``u * |mu|``, that is ``u * kappa`` in units of ``sigma``, the
unit of every normalized value. No computation in that precision does better: the batch
mean itself is a number of magnitude ``|mu|`` held in the dtype, off by at least half an ulp,
and ``x - mean`` carries that error into every ``y`` and ``dx``. So, to first order,

- a stable formulation (two-pass variance; ``dx`` from centered data, as PyTorch's kernels)
  has errors ``c * u * kappa`` in ``y`` and ``dx`` (in units of ``|gamma|`` and
  ``|gamma * dy| / sigma``), with ``c`` a small constant from the summations;
- a formulation that forms uncentered sums of the data (TensorFlow's gradient of
  ``x * inv + (beta - mean * inv)``: ``sum(dy * x) - mean * sum(dy)``, each term of
  magnitude ``|mu| * sum |dy|``) has errors of the same order ``u * kappa``, with a larger
  constant: the difference between the frameworks is a constant, not the scaling;
- ``dgamma = sum(dy * xhat)`` (and ``dbeta``) add ``m`` such errors, weighted by ``|dy|``;
  relative to their own magnitude (``~sqrt(m)`` for random ``dy``) that is up to ``sqrt(m)``
  times the error of one element;
- a raw-moments variance ``E[x^2] - E[x]^2`` rounds numbers of magnitude ``mu^2``: errors
  ``u * kappa**2``, ``kappa`` times more, which is what offset data exist to catch;
- a two-pass variance is exact to first order (the mean's error enters squared), so the
  statistics of offset data (``running_*``, ``moving_*``) keep the table's tolerance.

Hence the tolerance of offset comparisons (:func:`conditioned`)::

    atol = max(table atol, CONDITIONING_FACTOR * u * kappa * s),   s = sqrt(m) for dgamma and
                                                                    dbeta, 1 otherwise
    rtol = table rtol

with ``CONDITIONING_FACTOR = 8``, then scaled along the trajectory like every tolerance
(:func:`trajectory_factor`). For float64 it is the table's up to ``kappa ~ 1e5``; for
float32 at ``kappa = 1e4`` it allows about ``5e-3 * scale`` in ``y`` and ``dx`` while a
raw-moments variance is off by 1 to 1e7. Measured (``docs/conformance.md``, *Tolerances*)
on 100,000 float32 draws like the golden offset case, the worst draw of TensorFlow's
formulation uses 0.67 of this tolerance (PyTorch's CPU kernels 0.23), while raw moments
exceed it 33-fold at the least.

Several draws: a verdict that does not flip
-------------------------------------------
The golden float32 offset cases list steps that are independent draws of one scenario
(``meta["draws"]``, see :mod:`mbn_conformance.vectors`). :func:`draw_criterion` gives
``(n, k)``: the case's ``y``, ``dx``, ``dgamma`` and ``dbeta`` (every shard) pass when **at
least k of its n draws** have all of them within tolerance, ``k = n - 1``: one outlier draw
is forgiven. With a per-draw false-failure probability ``p`` the case then fails falsely with
probability ``P[Binomial(n, p) >= n - k + 1]`` (:meth:`DrawCriterion.false_fail_probability`),
about ``10 p**2`` for ``n = 5``; the state and non-draw steps are judged at every step as
usual.

**For the runner**: for a case with ``criterion = draw_criterion(case.meta)`` not ``None``,
compare every array as usual with :func:`tolerance_for` (passing ``kappa=conditioning(x,
axis)`` of the step's whole input, shards joined), but record a failure of a draw quantity
(:func:`is_draw_quantity`) at a step in ``criterion.steps`` per step instead of failing the
case; the case fails on those only when ``criterion.passes(ok_per_draw)`` is false (list the
forgiven draw's failures all the same).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """A pair ``(rtol, atol)``, applied as the module docstring says (see :func:`compare`)."""

    rtol: float
    atol: float

    def scaled(self, factor: float) -> Tolerance:
        """The tolerance with both ``rtol`` and ``atol`` multiplied by ``factor``."""
        return Tolerance(self.rtol * factor, self.atol * factor)


TOLERANCES: Mapping[str, Tolerance] = {
    # float64: rounding of a different summation order, amplified by a few steps
    "float64": Tolerance(rtol=1e-10, atol=1e-10),
    # float32: ~100 ulp of the normalized output
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    # float16/bfloat16: accumulation in float32, result rounded to 11 (8) bits
    "float16": Tolerance(rtol=2e-3, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=2e-2),
}

UNIT_ROUNDOFF: Mapping[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
"""Half the distance from 1 to the next number: the relative error of one rounding."""

CONDITIONING_FACTOR = 8.0
"""``K`` in ``atol = K * u * kappa`` (module docstring): the number of roundings of the
data's magnitude an implementation may accumulate in one normalized value."""

NOMINAL_OFFSET_KAPPA = 1e4
"""The conditioning of the golden offset data (per-channel mean ``1e4 + U(-2, 2)``, unit
spread), used by :func:`tolerance_for` when no measured ``kappa`` is given."""

DRAW_QUANTITIES: tuple[str, ...] = ("y", "dx", "dgamma", "dbeta")
"""The quantities a draw is judged on (``y[s]``, ``dx[s]`` of shard ``s`` included)."""


def conditioning(x: np.ndarray, axis: int) -> float:
    """``kappa = max_c |mean_c| / std_c`` of ``x`` as given: how far the data sit from zero.

    Float64 moments over every axis but ``axis``; channels of zero spread or without values
    are left out (0 when none is left).

    Parameters
    ----------
    x : ndarray
        The input of a step (the whole batch; shards joined along the first axis).
    axis : int
        The channel axis.

    Returns
    -------
    float
        The largest mean-to-spread ratio over the channels.

    Examples
    --------
    >>> x = np.array([[1e4 - 1, 0.0], [1e4 + 1, 2.0]])
    >>> conditioning(x, axis=1)
    10000.0
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2 or a.size == 0:
        return 0.0
    ax = axis % a.ndim
    axes = tuple(i for i in range(a.ndim) if i != ax)
    mean = a.mean(axis=axes)
    std = a.std(axis=axes)
    ok = std > 0
    return float(np.max(np.abs(mean[ok]) / std[ok])) if np.any(ok) else 0.0


def is_reduction(quantity: str) -> bool:
    """Whether ``quantity`` sums over the batch (``dgamma``, ``dbeta``)."""
    return quantity.startswith(("dgamma", "dbeta"))


def is_draw_quantity(quantity: str) -> bool:
    """Whether ``quantity`` (``y``, ``y[1]``, ``dx``, ``dgamma``...) is judged per draw."""
    return quantity.split("[", 1)[0] in DRAW_QUANTITIES


def conditioned(dtype: str, kappa: float, quantity: str = "y", m: int = 1) -> Tolerance:
    """The dtype's tolerance for data of conditioning ``kappa`` (module docstring).

    Parameters
    ----------
    dtype : str
        The compared computation's dtype (a key of :data:`TOLERANCES`).
    kappa : float
        The data's conditioning (:func:`conditioning`).
    quantity : str
        What is compared; ``dgamma``/``dbeta`` get ``sqrt(m)`` more.
    m : int
        Values per channel.

    Returns
    -------
    Tolerance
        ``rtol`` of the table, ``atol = max(table atol, K * u * kappa * s)``, before the
        trajectory factor.

    Examples
    --------
    >>> conditioned("float32", 1e4).atol  # 8 * 2**-24 * 1e4
    0.00476837158203125
    >>> conditioned("float64", 1e4) == TOLERANCES["float64"]
    True
    """
    base = TOLERANCES[dtype]
    spread = math.sqrt(max(m, 1)) if is_reduction(quantity) else 1.0
    atol = CONDITIONING_FACTOR * UNIT_ROUNDOFF[dtype] * max(kappa, 0.0) * spread
    return Tolerance(base.rtol, max(base.atol, atol))


@dataclass(frozen=True)
class Override:
    """A tolerance that replaces the dtype's for matching comparisons, with its reason.

    ``tolerance=None`` means the tolerance of the data's conditioning (:func:`conditioned`).
    """

    pattern: str  # fnmatch pattern on "case id:quantity"
    tolerance: Tolerance | None
    reason: str


OVERRIDES: tuple[Override, ...] = (
    Override(
        "*offset*:[yd]*",
        None,
        "offset data (mean 1e4, spread 1): one ulp of the mean is ~u*kappa in normalized "
        "units, which x - mean carries into every normalized value and gradient; allowed: "
        "8*u*kappa (sqrt(m) times more for dgamma, dbeta), or the dtype's atol if larger",
    ),
    Override(
        "sync*offset*:*_var",
        None,
        "synchronized statistics of offset data: a stable merge of per-shard (count, mean, "
        "M2) across devices (Chan's, as PyTorch's SyncBatchNorm does; docs/spec.md §5) holds "
        "each shard's mean to ~u*kappa, which enters the merged variance; allowed: 8*u*kappa. "
        "Single-device statistics get no such leniency (docs/spec.md §7)",
    ),
)


def trajectory_factor(step: int, m: int) -> float:
    """Growth of rounding error along a trajectory and over reductions of ``m`` values.

    ``step`` is 0-indexed. Errors add over steps (sqrt for independent roundings) and grow
    like ``log2(m)`` in pairwise summation.
    """
    return math.sqrt(step + 1) * max(1.0, math.log2(max(m, 2)) / 4)


def tolerance_for(
    case_id: str, quantity: str, dtype: str, step: int, m: int, *, kappa: float | None = None
) -> tuple[Tolerance, str]:
    """The tolerance for one compared array and the reason for any override.

    Parameters
    ----------
    case_id : str
        The golden case's id.
    quantity : str
        What is compared (``y``, ``dx[1]``, ``running_var``...).
    dtype : str
        The case's dtype.
    step : int
        The 0-indexed step.
    m : int
        Values per channel.
    kappa : float, optional
        The conditioning of the step's input (:func:`conditioning`); only offset cases use
        it, :data:`NOMINAL_OFFSET_KAPPA` when not given.

    Returns
    -------
    tuple of (Tolerance, str)
        The tolerance, scaled by :func:`trajectory_factor`, and the override's reason
        (``""`` for the table's).
    """
    key = f"{case_id}:{quantity}"
    factor = trajectory_factor(step, m)
    for o in OVERRIDES:
        if fnmatch.fnmatchcase(key, o.pattern):
            tol = o.tolerance
            if tol is None:
                k = NOMINAL_OFFSET_KAPPA if kappa is None else kappa
                tol = conditioned(dtype, k, quantity, m)
            return tol.scaled(factor), o.reason
    return TOLERANCES[dtype].scaled(factor), ""


class DrawCriterion(NamedTuple):
    """Pass when at least ``k`` of ``n`` independent draws are within tolerance.

    ``steps`` are the case's draw steps (``meta["draws"]``).
    """

    n: int
    k: int
    steps: tuple[int, ...] = ()

    def passes(self, within: Sequence[bool]) -> bool:
        """Whether enough of the draws (one flag per draw) are within tolerance."""
        if len(within) != self.n:
            raise ValueError(f"{len(within)} draw verdicts for {self.n} draws")
        return sum(bool(w) for w in within) >= self.k

    def false_fail_probability(self, p: float) -> float:
        """The chance of failing when each draw fails alone with probability ``p``.

        ``P[Binomial(n, p) >= n - k + 1]``.

        Examples
        --------
        >>> f"{DrawCriterion(5, 4).false_fail_probability(1e-3):.2e}"
        '9.98e-06'
        """
        return sum(
            math.comb(self.n, j) * p**j * (1 - p) ** (self.n - j)
            for j in range(self.n - self.k + 1, self.n + 1)
        )


def draw_criterion(meta: Mapping[str, Any]) -> DrawCriterion | None:
    """The criterion over a golden case's draws, or ``None`` when it has fewer than two.

    Parameters
    ----------
    meta : mapping
        The case's metadata; ``meta["draws"]`` lists the steps that are independent draws
        (:mod:`mbn_conformance.vectors`).

    Returns
    -------
    DrawCriterion or None
        ``(n, k, steps)`` with ``n`` the number of draws and ``k = n - 1`` (one outlier
        draw forgiven); ``None``: every step is judged alone.

    Examples
    --------
    >>> draw_criterion({"draws": [0, 1, 2, 3, 4]})
    DrawCriterion(n=5, k=4, steps=(0, 1, 2, 3, 4))
    >>> draw_criterion({"draws": []}) is None
    True
    """
    steps = tuple(int(k) for k in meta.get("draws") or ())
    if len(steps) < 2:
        return None
    return DrawCriterion(len(steps), len(steps) - 1, steps)


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`: the largest errors and whether they are allowed."""

    max_abs: float
    max_rel: float
    ok: bool
    ratio: float  # worst |err| / allowed; <= 1 passes


def compare(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> Comparison:
    """Compare in float64; shapes must match; NaN matches NaN only where expected is NaN."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return Comparison(math.inf, math.inf, False, math.inf)
    if a.size == 0:
        return Comparison(0.0, 0.0, True, 0.0)
    both_nan = np.isnan(a) & np.isnan(e)
    err = np.where(both_nan, 0.0, np.abs(a - e))
    err = np.where(np.isnan(err), np.inf, err)
    finite_e = np.abs(e[np.isfinite(e)])
    scale = max(1.0, float(finite_e.max()) if finite_e.size else 1.0)
    allowed = tol.atol * scale + tol.rtol * np.abs(np.where(np.isfinite(e), e, 0.0))
    ratio = float(np.max(err / allowed))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(e != 0, err / np.abs(e), np.where(err == 0, 0.0, np.inf))
    return Comparison(float(err.max()), float(np.max(rel)), ratio <= 1.0, ratio)
