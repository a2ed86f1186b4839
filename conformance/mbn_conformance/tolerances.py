"""One tolerance table per dtype, scaled where a case needs it, overrides with reasons.

An array ``actual`` passes against ``expected`` when, element by element,

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max(1, max |expected|)

(``atol`` is relative to the array's magnitude, so outputs scaled by a large ``1/sqrt(eps)``
in a zero-variance channel are judged fairly). ``rtol`` and ``atol`` always travel together.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Override:
    """A tolerance that replaces the dtype's for matching comparisons, with its reason."""

    pattern: str  # fnmatch pattern on "case id:quantity"
    tolerance: Tolerance
    reason: str


OVERRIDES: tuple[Override, ...] = (
    Override(
        "*/float32/*/offset*:[yd]*",
        Tolerance(rtol=1e-4, atol=2e-3),
        "mean 1e4 in float32: one ulp of the mean is ~1e-3, which x - mean carries into every "
        "normalized value and gradient (the data themselves are exact; the float64 reference "
        "is not limited by it)",
    ),
)


def trajectory_factor(step: int, m: int) -> float:
    """Growth of rounding error along a trajectory and over reductions of ``m`` values.

    ``step`` is 0-indexed. Errors add over steps (sqrt for independent roundings) and grow
    like ``log2(m)`` in pairwise summation.
    """
    return math.sqrt(step + 1) * max(1.0, math.log2(max(m, 2)) / 4)


def tolerance_for(
    case_id: str, quantity: str, dtype: str, step: int, m: int
) -> tuple[Tolerance, str]:
    """The tolerance for one compared array and the reason for any override."""
    key = f"{case_id}:{quantity}"
    for o in OVERRIDES:
        if fnmatch.fnmatchcase(key, o.pattern):
            return o.tolerance.scaled(trajectory_factor(step, m)), o.reason
    return TOLERANCES[dtype].scaled(trajectory_factor(step, m)), ""


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
