"""The paper's noise model (docs/spec.md §6): batch-statistics noise of BN and MBN as functions.

Notation (paper §3.1, §4.1). Samples are i.i.d. from a population with mean ``mu``, standard
deviation ``sigma`` and kurtosis ``kappa = E[(x - mu)**4] / sigma**4`` (3 for a Gaussian).
A batch of ``m`` samples has mean ``mu_B`` and *biased* variance ``var_B``; then

- ``xi_mu = (mu - mu_B) / sigma`` (additive noise) and ``xi_sigma = var_B / sigma**2``
  (multiplicative noise) for BN (Eq. 2);
- MBN replaces ``mu_B``, ``var_B`` by their exponential moving averages with decay ``lam``
  (Eq. 8); "stationary" means after infinitely many i.i.d. batches (Eq. 9, 10);
- ``xhat = (xtilde + xi_mu) / sqrt(xi_sigma)`` with ``xtilde = (x - mu) / sigma`` for a
  point ``x`` independent of the batch (Eq. 3, 4).

Every function is vectorized over NumPy arrays (broadcasting ``m``, ``lam``, ``xtilde``),
returns float64, and is verified by Monte Carlo in ``tests/test_noise.py``; the derivations
are in ``docs/derivations/noise.md`` and the paper's misprints in ``docs/errata.md``.
``m`` may be any real number ``>= 1`` (the formulas are analytic in ``m``); moments that do not
exist are returned as ``inf`` (diverging) or ``nan`` (undefined), following ``scipy.stats.t``.
Arguments follow the package's rules (:mod:`mbn_ref._validate`): booleans and strings raise
``TypeError``, out-of-range values ``ValueError``.

SciPy (a declared dependency of mbn-ref, used by this module only) is imported by the
functions that need its special functions (digamma, trigamma, log-gamma), when they are
first called: importing this module, and the effective-batch-size functions that the
schedules and the command line use, need NumPy alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._validate import as_real_array, check_decays

__all__ = [
    "bn_xi_mu_mean",
    "bn_xi_mu_var",
    "bn_xi_sigma_mean",
    "bn_xi_sigma_var",
    "effective_batch_size",
    "effective_batch_size_sigma",
    "eq4_as_printed",
    "eq10_var_xi_mu_as_printed",
    "eq11_endpoint_effective_batch_size",
    "eq11_endpoint_effective_batch_size_sigma",
    "eq11_endpoint_lam",
    "gaussian_xi_sigma_inv_mean",
    "gaussian_xi_sigma_inv_sqrt_mean",
    "lam_for_effective_batch_size",
    "lam_for_effective_batch_size_sigma",
    "log_xi_sigma_mean",
    "log_xi_sigma_sq_mean",
    "log_xi_sigma_var",
    "mbn_xi_mu_mean",
    "mbn_xi_mu_var",
    "mbn_xi_sigma_mean",
    "mbn_xi_sigma_var",
    "variance_reduction_factor",
    "xhat_mean",
    "xhat_var",
    "xi_mu_sq_mean",
]

FloatArray = NDArray[np.float64] | Any
"""Return type: a float64 array (0-d for scalar inputs, so ``float(...)`` works)."""

GAUSSIAN_KURTOSIS = 3.0

# Large-argument switch for the asymptotic series below (relative error < 1e-15 beyond it).
_SERIES_MIN_X = 20.0


# --------------------------------------------------------------------------- validation


def _special() -> Any:
    """``scipy.special``, imported on first use (see the module docstring)."""
    from scipy import special

    return special


def _f64(value: ArrayLike) -> NDArray[np.float64]:
    """A result as a float64 array."""
    return np.asarray(value, dtype=np.float64)


def _batch_size(m: ArrayLike, name: str = "m", minimum: float = 1.0) -> NDArray[np.float64]:
    m_arr = as_real_array(name, m)
    if np.any(np.isnan(m_arr)) or np.any(m_arr < minimum):
        raise ValueError(f"batch size {name} must be >= {minimum:g} (and not NaN), got {m!r}")
    return m_arr


def _decay(lam: ArrayLike) -> NDArray[np.float64]:
    return check_decays("lam", lam)


def _kurtosis(kurtosis: ArrayLike) -> NDArray[np.float64]:
    k_arr = as_real_array("kurtosis", kurtosis)
    if np.any(np.isnan(k_arr)) or np.any(k_arr < 1):
        raise ValueError(
            "kurtosis must be the non-excess kurtosis E[(x-mu)^4]/sigma^4 >= 1 "
            f"(3 for a Gaussian), got {kurtosis!r}"
        )
    return k_arr


# --------------------------------------------------------------------------- BN (Eq. 2)


def bn_xi_mu_mean(m: ArrayLike) -> FloatArray:
    """``E[xi_mu] = 0`` for BN, any population (``mu_B`` is unbiased).

    >>> bn_xi_mu_mean([2, 4]).tolist()
    [0.0, 0.0]
    """
    return np.zeros_like(_batch_size(m))


def bn_xi_mu_var(m: ArrayLike) -> FloatArray:
    """``Var[xi_mu] = 1/m`` for BN, any population with finite variance (Eq. 2).

    >>> float(bn_xi_mu_var(16))
    0.0625
    """
    return 1.0 / _batch_size(m)


def bn_xi_sigma_mean(m: ArrayLike) -> FloatArray:
    """``E[xi_sigma] = (m-1)/m`` for BN, any population (bias of the 1/m variance).

    >>> float(bn_xi_sigma_mean(4))
    0.75
    """
    m_arr = _batch_size(m)
    return (m_arr - 1.0) / m_arr


def bn_xi_sigma_var(m: ArrayLike, kurtosis: ArrayLike = GAUSSIAN_KURTOSIS) -> FloatArray:
    """``Var[xi_sigma]`` for BN: ``(m-1)/m**3 * ((m-1)*kurtosis - (m-3))``.

    With the Gaussian ``kurtosis = 3`` this is the paper's ``2(m-1)/m**2`` (Eq. 2). For other
    populations it is ``(kurtosis - 1)/m + O(1/m**2)``, which does *not* approach the
    scaled chi-square's ``2/m`` unless ``kurtosis = 3``: the honest form of Theorem 1's limit.

    Parameters
    ----------
    m : array_like
        Batch size(s), ``>= 1``.
    kurtosis : array_like, optional
        Non-excess population kurtosis ``E[(x-mu)**4]/sigma**4`` (uniform 1.8, Gaussian 3,
        exponential 9).

    >>> float(bn_xi_sigma_var(4))
    0.375
    >>> round(float(bn_xi_sigma_var(4, kurtosis=1.8)), 6)
    0.20625
    """
    m_arr = _batch_size(m)
    k_arr = _kurtosis(kurtosis)
    return (m_arr - 1.0) / m_arr**3 * ((m_arr - 1.0) * k_arr - (m_arr - 3.0))


# --------------------------------------------------------------------------- MBN (Eq. 10)


def variance_reduction_factor(lam: ArrayLike) -> FloatArray:
    """``(1-lam)/(1+lam)``: variance of a stationary EMA of i.i.d. terms over their variance.

    ``sum_j (1-lam)**2 lam**(2j) = (1-lam)/(1+lam)``.

    >>> float(variance_reduction_factor(0.75))
    0.14285714285714285
    """
    lam_arr = _decay(lam)
    return (1.0 - lam_arr) / (1.0 + lam_arr)


def mbn_xi_mu_mean(m: ArrayLike, lam: ArrayLike) -> FloatArray:
    """``E[xi_mu] = 0`` for MBN's stationary regime, any population.

    >>> float(mbn_xi_mu_mean(4, 0.5))
    0.0
    """
    m_arr, _ = np.broadcast_arrays(_batch_size(m), _decay(lam))
    return np.zeros_like(m_arr)


def mbn_xi_mu_var(m: ArrayLike, lam: ArrayLike) -> FloatArray:
    """Corrected Eq. 10: stationary ``Var[xi_mu] = (1-lam)/((1+lam) m)``, any population.

    The paper prints ``(1-lam)/m`` (see :func:`eq10_var_xi_mu_as_printed`).

    >>> round(float(mbn_xi_mu_var(4, 0.75)), 6)
    0.035714
    """
    return variance_reduction_factor(lam) / _batch_size(m)


def eq10_var_xi_mu_as_printed(m: ArrayLike, lam: ArrayLike) -> FloatArray:
    """Eq. 10 **as printed** (wrong): ``(1-lam)/m``. Kept to demonstrate the erratum.

    >>> float(eq10_var_xi_mu_as_printed(4, 0.75))
    0.0625
    """
    return (1.0 - _decay(lam)) / _batch_size(m)


def mbn_xi_sigma_mean(m: ArrayLike, lam: ArrayLike) -> FloatArray:
    """Stationary ``E[xi_sigma] = (m-1)/m`` for MBN, any population (as in the paper).

    >>> float(mbn_xi_sigma_mean(4, 0.9))
    0.75
    """
    m_arr, _ = np.broadcast_arrays(_batch_size(m), _decay(lam))
    return (m_arr - 1.0) / m_arr


def mbn_xi_sigma_var(
    m: ArrayLike, lam: ArrayLike, kurtosis: ArrayLike = GAUSSIAN_KURTOSIS
) -> FloatArray:
    """Stationary ``Var[xi_sigma] = (1-lam)/(1+lam) * Var_BN[xi_sigma]``.

    Gaussian: ``(1-lam)/(1+lam) * 2(m-1)/m**2`` (as in the paper); other populations via
    ``kurtosis`` as in :func:`bn_xi_sigma_var`.

    >>> round(float(mbn_xi_sigma_var(4, 0.75)), 6)
    0.053571
    """
    return variance_reduction_factor(lam) * bn_xi_sigma_var(m, kurtosis)


def xi_mu_sq_mean(m: ArrayLike, lam: ArrayLike = 0.0) -> FloatArray:
    """Additive regularizer strength ``E[xi_mu**2]`` (§3.2): ``(1-lam)/((1+lam) m)``.

    ``lam = 0`` is BN (``1/m``). Equal to ``Var[xi_mu]`` since ``E[xi_mu] = 0``.

    >>> float(xi_mu_sq_mean(8))
    0.125
    """
    return mbn_xi_mu_var(m, lam)


# --------------------------------------------------------------------------- log xi_sigma


def _digamma_minus_log(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``digamma(x) - log(x)``, accurate (no cancellation) for large ``x``."""
    out = np.empty_like(x)
    big = x >= _SERIES_MIN_X
    xs = x[~big]
    out[~big] = _special().digamma(xs) - np.log(xs)
    inv2 = 1.0 / x[big] ** 2
    series = -inv2 * (
        1.0 / 12 - inv2 * (1.0 / 120 - inv2 * (1.0 / 252 - inv2 * (1.0 / 240 - inv2 / 132)))
    )
    out[big] = -0.5 / x[big] + series
    return out


def log_xi_sigma_mean(m: ArrayLike) -> FloatArray:
    """``E[log xi_sigma] = digamma((m-1)/2) + log(2/m)`` for BN, Gaussian data.

    ``xi_sigma ~ chi2(m-1)/m``; ``-inf`` at ``m = 1`` (``xi_sigma = 0``).

    >>> round(float(log_xi_sigma_mean(4)), 6)
    -0.656657
    """
    m_arr = _batch_size(m)
    half_k = np.atleast_1d((m_arr - 1.0) / 2.0)
    out = np.full(half_k.shape, -np.inf)
    ok = half_k > 0
    # digamma(k/2) + log(2/m) = [digamma(k/2) - log(k/2)] + log((m-1)/m)
    out[ok] = _digamma_minus_log(half_k[ok]) + np.log1p(-1.0 / np.atleast_1d(m_arr)[ok])
    return out.reshape(m_arr.shape)


def log_xi_sigma_var(m: ArrayLike) -> FloatArray:
    """``Var[log xi_sigma] = trigamma((m-1)/2)`` for BN, Gaussian data (nan at ``m = 1``).

    >>> round(float(log_xi_sigma_var(4)), 6)
    0.934802
    """
    half_k = (_batch_size(m) - 1.0) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(half_k > 0, _special().polygamma(1, np.maximum(half_k, 1e-300)), np.nan)
    return _f64(out)


def log_xi_sigma_sq_mean(m: ArrayLike) -> FloatArray:
    """Multiplicative regularizer strength ``E[(log xi_sigma)**2]`` (§3.2), BN, Gaussian.

    ``trigamma((m-1)/2) + (digamma((m-1)/2) + log(2/m))**2``; ``inf`` at ``m = 1``.

    >>> round(float(log_xi_sigma_sq_mean(4)), 6)
    1.366001
    """
    mean = log_xi_sigma_mean(m)
    var = log_xi_sigma_var(m)
    return _f64(np.where(np.isinf(mean), np.inf, var + mean**2))


# --------------------------------------------------------------------------- xhat (Eq. 4)


def _log_inv_sqrt_mean(m_arr: NDArray[np.float64]) -> NDArray[np.float64]:
    """``log E[xi_sigma**-0.5]`` for ``m > 2``, accurate when it is tiny (large m).

    ``E[xi_sigma**-0.5] = sqrt(m/2) Gamma(x) / Gamma(x + 1/2)`` with ``x = (m-2)/2``.
    """
    x = (m_arr - 2.0) / 2.0
    out = np.empty_like(x)
    big = x >= _SERIES_MIN_X
    xs, ms = x[~big], m_arr[~big]
    gammaln = _special().gammaln
    out[~big] = 0.5 * np.log(ms / 2.0) + gammaln(xs) - gammaln(xs + 0.5)
    xb, mb = x[big], m_arr[big]
    # log G(x+1/2) - log G(x) = log(x)/2 - 1/(8x) + 1/(192x^3) - 1/(640x^5) + 17/(14336x^7) - ...
    inv = 1.0 / xb
    inv2 = inv * inv
    tail = inv * (
        -1.0 / 8
        + inv2 * (1.0 / 192 - inv2 * (1.0 / 640 - inv2 * (17.0 / 14336 - inv2 * 31.0 / 18432)))
    )
    # 0.5 log(m/2) - 0.5 log(x) = -0.5 log1p(-2/m)
    out[big] = -0.5 * np.log1p(-2.0 / mb) - tail
    return out


def gaussian_xi_sigma_inv_sqrt_mean(m: ArrayLike) -> FloatArray:
    """``E[xi_sigma**-0.5] = sqrt(m/2) Gamma((m-2)/2) / Gamma((m-1)/2)`` (Gaussian, BN).

    Finite for ``m > 2``; ``inf`` for ``m <= 2``. Computed in log space (no overflow at
    ``m = 1e6``).

    >>> round(float(gaussian_xi_sigma_inv_sqrt_mean(4)), 6)
    1.595769
    """
    m_in = _batch_size(m)
    m_arr = np.atleast_1d(m_in)
    out = np.full(m_arr.shape, np.inf)
    ok = m_arr > 2
    out[ok] = np.exp(_log_inv_sqrt_mean(m_arr[ok]))
    return out.reshape(m_in.shape)


def gaussian_xi_sigma_inv_mean(m: ArrayLike) -> FloatArray:
    """``E[1/xi_sigma] = m/(m-3)`` (Gaussian, BN). Finite for ``m > 3``; ``inf`` otherwise.

    >>> float(gaussian_xi_sigma_inv_mean(4))
    4.0
    """
    m_arr = _batch_size(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _f64(np.where(m_arr > 3, m_arr / (m_arr - 3.0), np.inf))


def xhat_mean(m: ArrayLike, xtilde: ArrayLike) -> FloatArray:
    """Corrected Eq. 4 (mean): ``E[xhat] = xtilde * sqrt(m/2) Gamma((m-2)/2)/Gamma((m-1)/2)``.

    For Gaussian data and a point independent of the batch, ``xi_mu`` and ``xi_sigma`` are
    independent, so ``E[xhat] = xtilde * E[xi_sigma**-0.5]``; ``xhat`` is
    ``t / sqrt(m-1)`` with ``t`` noncentral-t, ``m-1`` degrees of freedom, noncentrality
    ``sqrt(m) * xtilde``. Exists for ``m > 2``; ``nan`` (undefined, both tails diverge) for
    ``m <= 2``.

    >>> round(float(xhat_mean(4, 0.5)), 4)
    0.7979
    """
    m_arr, xt = np.broadcast_arrays(_batch_size(m), as_real_array("xtilde", xtilde))
    c = gaussian_xi_sigma_inv_sqrt_mean(m_arr)
    with np.errstate(invalid="ignore"):
        return _f64(np.where(m_arr > 2, xt * np.where(np.isfinite(c), c, 0.0), np.nan))


def xhat_var(m: ArrayLike, xtilde: ArrayLike) -> FloatArray:
    """Corrected Eq. 4 (variance): ``Var[xhat] = (1 + m xtilde**2)/(m-3) - E[xhat]**2``.

    From ``E[xhat**2] = E[(xtilde + xi_mu)**2] E[1/xi_sigma] = (xtilde**2 + 1/m) m/(m-3)``.
    Exists for ``m > 3``; ``inf`` for ``2 < m <= 3``; ``nan`` for ``m <= 2`` (like
    ``scipy.stats.t.var``). Evaluated without cancellation for large ``m``, where it is
    ``(1 + xtilde**2/2)/m + O(1/m**2)``.

    >>> round(float(xhat_var(4, 0.5)), 4)
    1.3634
    """
    m_arr, xt = np.broadcast_arrays(_batch_size(m), as_real_array("xtilde", xtilde))
    m_flat = np.atleast_1d(m_arr)
    xt_flat = np.atleast_1d(xt)
    out = np.where(m_flat > 2, np.inf, np.nan)
    ok = m_flat > 3
    mo, xo = m_flat[ok], xt_flat[ok]
    # m/(m-3) - E[xi^-1/2]^2 = exp(b) * expm1(a - b), a = log(m/(m-3)), b = 2 log E[xi^-1/2]
    a = -np.log1p(-3.0 / mo)
    b = 2.0 * _log_inv_sqrt_mean(mo)
    out[ok] = xo**2 * np.exp(b) * np.expm1(a - b) + 1.0 / (mo - 3.0)
    return out.reshape(m_arr.shape)


def eq4_as_printed(
    m: ArrayLike, xtilde: ArrayLike, *, sqrt_over_gamma_ratio: bool = False
) -> tuple[FloatArray, FloatArray]:
    """Eq. 4 **as printed** (wrong): ``(E[xhat], Var[xhat])``. Kept to demonstrate the erratum.

    ``E = xtilde * sqrt((m-1)/2) * Gamma((m-2)/2)/Gamma((m-1)/2)`` (the mean of a noncentral
    t with ``m-1`` degrees of freedom and noncentrality ``xtilde``, i.e. the paper's claim
    ``xhat ~ Nt(xtilde, m-1)``) and ``Var = ((m-1)/(m-3) (1 + xtilde**2) - E**2)/m``.
    ``sqrt_over_gamma_ratio=True`` reads the square root as covering the Gamma ratio too
    (another rendering of the same equation); both readings disagree with simulation.

    >>> e, v = eq4_as_printed(4, 0.5)
    >>> round(float(e), 2), round(float(v), 2)
    (0.69, 0.82)
    """
    m_arr, xt = np.broadcast_arrays(_batch_size(m), as_real_array("xtilde", xtilde))
    with np.errstate(invalid="ignore", divide="ignore"):
        gammaln = _special().gammaln
        log_ratio = gammaln((m_arr - 2.0) / 2.0) - gammaln((m_arr - 1.0) / 2.0)
        if sqrt_over_gamma_ratio:
            factor = np.exp(0.5 * (np.log((m_arr - 1.0) / 2.0) + log_ratio))
        else:
            factor = np.sqrt((m_arr - 1.0) / 2.0) * np.exp(log_ratio)
        mean = np.where(m_arr > 2, xt * factor, np.nan)
        var = np.where(
            m_arr > 3, ((m_arr - 1.0) / (m_arr - 3.0) * (1.0 + xt**2) - mean**2) / m_arr, np.inf
        )
    return _f64(mean), _f64(var)


# --------------------------------------------------------------------------- effective m


def effective_batch_size(m: ArrayLike, lam: ArrayLike) -> FloatArray:
    """Batch size whose BN mean noise equals MBN's stationary mean noise at ``(m, lam)``.

    MBN's stationary ``Var[xi_mu] = (1 - lam) / ((1 + lam) * m)`` (the corrected Eq. 10);
    BN with batch size ``m'`` has ``Var[xi_mu] = 1/m'``. Equating gives
    ``m' = m (1 + lam) / (1 - lam)`` (``inf`` at ``lam = 1``). Holds for any population.

    >>> float(effective_batch_size(4, 0.75))
    28.0
    >>> float(effective_batch_size(4, 1.0))
    inf
    """
    m_arr = as_real_array("m", m)
    if np.any(np.isnan(m_arr)) or np.any(m_arr <= 0):
        raise ValueError(f"batch size m must be > 0, got {m!r}")
    lam_arr = _decay(lam)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(lam_arr < 1, m_arr * (1.0 + lam_arr) / (1.0 - lam_arr), np.inf)
    return _f64(out)


def lam_for_effective_batch_size(m: ArrayLike, target: ArrayLike) -> FloatArray:
    """Decay ``lam`` that makes MBN at batch size ``m`` as noisy in the mean as BN at ``target``.

    Inverse of :func:`effective_batch_size`: ``lam = (target - m) / (target + m)``, 0 when
    ``target <= m`` (MBN cannot add noise, only remove it) and 1 when ``target = inf``.

    >>> float(lam_for_effective_batch_size(4, 28))
    0.75
    >>> float(lam_for_effective_batch_size(4, 16))
    0.6
    >>> float(lam_for_effective_batch_size(4, float("inf")))
    1.0
    """
    m_arr = as_real_array("m", m)
    t_arr = as_real_array("target", target)
    if (
        np.any(np.isnan(m_arr))
        or np.any(np.isnan(t_arr))
        or np.any(m_arr <= 0)
        or np.any(t_arr <= 0)
        or np.any(np.isinf(m_arr))
    ):
        raise ValueError(
            f"batch sizes must be > 0 (m finite, target may be inf), got m={m!r}, target={target!r}"
        )
    with np.errstate(invalid="ignore"):
        lam = np.where(np.isinf(t_arr), 1.0, (t_arr - m_arr) / (t_arr + m_arr))
    return _f64(np.maximum(lam, 0.0))


def _bn_size_for_sigma_noise(c: NDArray[np.float64]) -> NDArray[np.float64]:
    """Solve ``(m'-1)/m'**2 = c`` for the root ``m' >= 2`` (``c`` in [0, 1/4])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _f64(
            np.where(c > 0, (1.0 + np.sqrt(np.maximum(1.0 - 4.0 * c, 0.0))) / (2 * c), np.inf)
        )


def effective_batch_size_sigma(m: ArrayLike, lam: ArrayLike) -> FloatArray:
    """Batch size ``m' >= 2`` whose BN ``Var[xi_sigma]`` equals MBN's stationary one (Gaussian).

    Solves ``2(m'-1)/m'**2 = (1-lam)/(1+lam) * 2(m-1)/m**2``:
    ``m' = (1 + sqrt(1 - 4c)) / (2c)`` with ``c = (1-lam)(m-1)/((1+lam) m**2)``. Requires
    ``m >= 2``; ``inf`` at ``lam = 1``. Not the same as :func:`effective_batch_size`: one
    decay cannot match both noises of one BN batch size.

    >>> round(float(effective_batch_size_sigma(4, 0.75)), 3)
    36.305
    """
    m_arr = _batch_size(m, minimum=2.0)
    c = variance_reduction_factor(lam) * (m_arr - 1.0) / m_arr**2
    return _bn_size_for_sigma_noise(c)


def lam_for_effective_batch_size_sigma(m: ArrayLike, target: ArrayLike) -> FloatArray:
    """Decay that makes MBN at ``m`` match BN at ``target`` in ``Var[xi_sigma]`` (Gaussian).

    ``r = [(target-1)/target**2] / [(m-1)/m**2]``, ``lam = (1-r)/(1+r)``; 0 when
    ``target <= m``, 1 when ``target = inf``. Requires ``m >= 2``.

    >>> round(float(lam_for_effective_batch_size_sigma(4, 16)), 4)
    0.5238
    """
    m_arr = _batch_size(m, minimum=2.0)
    t_arr = _batch_size(target, name="target", minimum=2.0)
    if np.any(np.isinf(m_arr)):
        raise ValueError(f"batch size m must be finite, got {m!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        r = ((t_arr - 1.0) / t_arr**2) / ((m_arr - 1.0) / m_arr**2)
        r = np.where(np.isinf(t_arr), 0.0, r)
        lam = np.where(t_arr <= m_arr, 0.0, (1.0 - r) / (1.0 + r))
    return _f64(lam)


# --------------------------------------------------------------------------- Eq. 11 end point


def eq11_endpoint_lam(m: ArrayLike, m0: ArrayLike) -> FloatArray:
    """Final training decay of Eq. 11: ``lam(T) = 1 - min(m/m0, 1)``.

    >>> float(eq11_endpoint_lam(4, 32))
    0.875
    """
    m_arr = as_real_array("m", m)
    m0_arr = as_real_array("m0", m0)
    if np.any(~(m_arr > 0)) or np.any(~(m0_arr > 0)) or np.any(np.isinf(m0_arr)):
        raise ValueError(f"m and m0 must be > 0 (m0 finite), got m={m!r}, m0={m0!r}")
    return _f64(1.0 - np.minimum(m_arr / m0_arr, 1.0))


def eq11_endpoint_effective_batch_size(m: ArrayLike, m0: ArrayLike) -> FloatArray:
    """BN batch size that MBN at the end of Eq. 11 really matches in ``Var[xi_mu]``.

    With ``lam = 1 - m/m0`` the corrected Eq. 10 gives ``m (1+lam)/(1-lam) = 2*m0 - m``
    (for ``m < m0``; ``m`` itself when ``m >= m0``, where MBN is BN). The paper's design
    argument (printed Eq. 10) claims ``m0``.

    >>> float(eq11_endpoint_effective_batch_size(4, 32))
    60.0
    """
    lam = eq11_endpoint_lam(m, m0)
    return effective_batch_size(m, lam)


def eq11_endpoint_effective_batch_size_sigma(m: ArrayLike, m0: ArrayLike) -> FloatArray:
    """BN batch size that MBN at the end of Eq. 11 matches in ``Var[xi_sigma]`` (Gaussian).

    ``c = (m-1)/(m (2 m0 - m))``, ``m' = (1 + sqrt(1-4c))/(2c)`` for ``2 <= m < m0``; about
    ``m (2 m0 - m)/(m - 1)``, i.e. ``4 m0 - 4`` at ``m = 2``.

    >>> round(float(eq11_endpoint_effective_batch_size_sigma(4, 32)), 2)
    78.99
    """
    _batch_size(m, minimum=2.0)
    lam = eq11_endpoint_lam(m, m0)
    return effective_batch_size_sigma(m, lam)
