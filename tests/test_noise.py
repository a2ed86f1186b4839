"""Deterministic checks of ``mbn_ref.noise`` (docs/spec.md §6): values, identities, edge cases.

The Monte Carlo checks of the same formulas are in ``tests/test_noise_sim.py``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from mbn_ref import noise

GRID_M = [2, 3, 4, 8, 16, 64]
GRID_LAM = [0.0, 0.5, 0.75, 0.9]


# ----------------------------------------------------------------- docs/spec.md §6 / §8 numbers


def test_spec_numbers_eq10() -> None:
    assert float(noise.eq10_var_xi_mu_as_printed(4, 0.75)) == 0.0625
    assert float(noise.mbn_xi_mu_var(4, 0.75)) == pytest.approx(1 / 28, rel=1e-15)
    assert round(float(noise.mbn_xi_mu_var(4, 0.75)), 4) == 0.0357


def test_spec_numbers_eq4() -> None:
    assert float(noise.xhat_mean(4, 0.5)) == pytest.approx(0.5 * math.sqrt(2) / math.gamma(1.5))
    assert round(float(noise.xhat_mean(4, 0.5)), 2) == 0.80
    # exact: (1 + 4*0.25)/1 - E^2 = 2 - 2/pi
    assert float(noise.xhat_var(4, 0.5)) == pytest.approx(2 - 2 / math.pi, rel=1e-14)
    mean_p, var_p = noise.eq4_as_printed(4, 0.5)
    assert (round(float(mean_p), 2), round(float(var_p), 2)) == (0.69, 0.82)
    mean_p2, var_p2 = noise.eq4_as_printed(4, 0.5, sqrt_over_gamma_ratio=True)
    assert (round(float(mean_p2), 2), round(float(var_p2), 2)) == (0.65, 0.83)


def test_paper_worked_example_corrected() -> None:
    # "lam = 3/4 makes batch 4 match batch 16": it matches 28; the lam matching 16 is 0.6
    assert float(noise.effective_batch_size(4, 0.75)) == pytest.approx(28.0)
    assert float(noise.lam_for_effective_batch_size(4, 16)) == pytest.approx(0.6)
    assert float(noise.mbn_xi_mu_var(4, 0.6)) == pytest.approx(float(noise.bn_xi_mu_var(16)))


@pytest.mark.parametrize("m0", [16, 32, 64])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 15])
def test_eq11_endpoint_matches_2m0_minus_m(m: int, m0: int) -> None:
    lam = float(noise.eq11_endpoint_lam(m, m0))
    assert lam == pytest.approx(1 - m / m0)
    m_eff = float(noise.eq11_endpoint_effective_batch_size(m, m0))
    assert m_eff == pytest.approx(2 * m0 - m, rel=1e-12)
    assert float(noise.mbn_xi_mu_var(m, lam)) == pytest.approx(1 / (2 * m0 - m), rel=1e-12)
    if m >= 2:
        m_sig = float(noise.eq11_endpoint_effective_batch_size_sigma(m, m0))
        assert float(noise.bn_xi_sigma_var(m_sig)) == pytest.approx(
            float(noise.mbn_xi_sigma_var(m, lam)), rel=1e-12
        )
        assert m_sig > m0  # the end point is quieter than BN at m0 in both noises
        assert m_sig == pytest.approx(m * (2 * m0 - m) / (m - 1), rel=0.1)


def test_eq11_endpoint_at_or_above_m0_is_bn() -> None:
    np.testing.assert_array_equal(noise.eq11_endpoint_lam([32, 64], 32), [0.0, 0.0])
    np.testing.assert_array_equal(noise.eq11_endpoint_effective_batch_size([32, 64], 32), [32, 64])
    assert float(noise.eq11_endpoint_effective_batch_size_sigma(4, 32)) == pytest.approx(
        78.99, abs=0.01
    )


# ----------------------------------------------------------------- identities and shapes


def test_broadcasting() -> None:
    m = np.array(GRID_M, dtype=float)[:, None]
    lam = np.array(GRID_LAM)[None, :]
    for f in (
        noise.mbn_xi_mu_mean,
        noise.mbn_xi_mu_var,
        noise.mbn_xi_sigma_mean,
        noise.mbn_xi_sigma_var,
        noise.eq10_var_xi_mu_as_printed,
        noise.effective_batch_size,
        noise.effective_batch_size_sigma,
        noise.xi_mu_sq_mean,
    ):
        out = f(m, lam)
        assert out.shape == (len(GRID_M), len(GRID_LAM)), f.__name__
        assert out.dtype == np.float64
    xt = np.linspace(-2, 2, 5)[None, :]
    assert noise.xhat_mean(m, xt).shape == (6, 5)
    assert noise.xhat_var(m, xt).shape == (6, 5)
    assert noise.eq4_as_printed(m, xt)[1].shape == (6, 5)
    assert noise.xhat_var(4, 0.5).shape == ()
    assert noise.log_xi_sigma_mean(m).shape == (6, 1)


def test_lam_zero_is_bn() -> None:
    m = np.array(GRID_M, dtype=float)
    np.testing.assert_allclose(noise.mbn_xi_mu_var(m, 0.0), noise.bn_xi_mu_var(m), rtol=1e-15)
    np.testing.assert_allclose(noise.mbn_xi_sigma_var(m, 0.0), noise.bn_xi_sigma_var(m))
    np.testing.assert_allclose(noise.effective_batch_size(m, 0.0), m)
    np.testing.assert_allclose(noise.effective_batch_size_sigma(m, 0.0), np.maximum(m, 2))
    np.testing.assert_allclose(noise.xi_mu_sq_mean(m), 1 / m)


@pytest.mark.parametrize("m", [2, 3, 4, 8, 16, 64, 1000])
def test_gaussian_kurtosis_gives_paper_eq2(m: int) -> None:
    assert float(noise.bn_xi_sigma_var(m)) == pytest.approx(2 * (m - 1) / m**2, rel=1e-14)
    # chi2(m-1)/m: scipy's variance
    assert float(noise.bn_xi_sigma_var(m)) == pytest.approx(stats.chi2(m - 1).var() / m**2)


def _exact_sigma_moments(values: list[float], probs: list[float], m: int) -> tuple[float, float]:
    """Mean and variance of the biased batch variance by enumerating all batches."""
    e1 = e2 = 0.0
    for idx in itertools.product(range(len(values)), repeat=m):
        x = np.array([values[i] for i in idx])
        p = math.prod(probs[i] for i in idx)
        v = float(np.mean((x - x.mean()) ** 2))
        e1 += p * v
        e2 += p * v * v
    return e1, e2 - e1 * e1


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_kurtosis_formula_by_exact_enumeration(m: int) -> None:
    # a skewed three-point population: the general formula must hold exactly
    values, probs = [-1.0, 0.5, 3.0], [0.5, 0.3, 0.2]
    mu = sum(v * p for v, p in zip(values, probs, strict=True))
    var = sum((v - mu) ** 2 * p for v, p in zip(values, probs, strict=True))
    kurt = sum((v - mu) ** 4 * p for v, p in zip(values, probs, strict=True)) / var**2
    e1, v1 = _exact_sigma_moments(values, probs, m)
    assert e1 / var == pytest.approx(float(noise.bn_xi_sigma_mean(m)), rel=1e-12)
    assert v1 / var**2 == pytest.approx(float(noise.bn_xi_sigma_var(m, kurt)), rel=1e-12)
    if abs(kurt - 3) > 0.1:  # and the Gaussian formula must not
        assert v1 / var**2 != pytest.approx(float(noise.bn_xi_sigma_var(m)), rel=0.05)


def test_theorem1_limit_of_sigma_variance_depends_on_kurtosis() -> None:
    m = 1e6
    for kurt in (1.8, 3.0, 9.0):
        assert m * float(noise.bn_xi_sigma_var(m, kurt)) == pytest.approx(kurt - 1, rel=1e-5)


@pytest.mark.parametrize("m", [4, 5, 6, 10, 33, 200, 5000])
@pytest.mark.parametrize("xt", [-1.5, 0.0, 0.5, 2.0])
def test_xhat_moments_equal_scaled_noncentral_t(m: int, xt: float) -> None:
    # xhat = T / sqrt(m-1), T ~ noncentral t(df = m-1, nc = sqrt(m) xtilde)
    t = stats.nct(m - 1, math.sqrt(m) * xt) if xt != 0 else stats.t(m - 1)
    mean, var = (float(v) for v in t.stats(moments="mv"))
    assert float(noise.xhat_mean(m, xt)) == pytest.approx(mean / math.sqrt(m - 1), abs=1e-12)
    assert float(noise.xhat_var(m, xt)) == pytest.approx(var / (m - 1), rel=1e-9)


def test_xhat_existence_conditions() -> None:
    assert math.isnan(float(noise.xhat_mean(2, 0.5)))
    assert math.isnan(float(noise.xhat_mean(1, 0.5)))
    assert math.isfinite(float(noise.xhat_mean(2.5, 0.5)))
    assert math.isfinite(float(noise.xhat_mean(3, 0.5)))
    assert float(noise.xhat_mean(3, 0.0)) == 0.0
    assert float(noise.xhat_var(3, 0.5)) == math.inf
    assert float(noise.xhat_var(2.5, 0.5)) == math.inf
    assert math.isnan(float(noise.xhat_var(2, 0.5)))
    assert math.isfinite(float(noise.xhat_var(3.001, 0.5)))
    assert float(noise.gaussian_xi_sigma_inv_sqrt_mean(2)) == math.inf
    assert float(noise.gaussian_xi_sigma_inv_mean(3)) == math.inf
    mean_p, var_p = noise.eq4_as_printed([2, 3], 0.5)
    assert math.isnan(mean_p[0]) and math.isinf(var_p[1])


def test_log_moments_against_numerical_integration() -> None:
    for m in (2, 3, 4, 10, 64):
        law = stats.chi2(m - 1, scale=1.0 / m)
        e1 = law.expect(np.log)
        e2 = law.expect(lambda v: np.log(v) ** 2)
        assert float(noise.log_xi_sigma_mean(m)) == pytest.approx(e1, rel=1e-7)
        assert float(noise.log_xi_sigma_var(m)) == pytest.approx(e2 - e1**2, rel=1e-6)
        assert float(noise.log_xi_sigma_sq_mean(m)) == pytest.approx(e2, rel=1e-7)
    assert float(noise.log_xi_sigma_mean(1)) == -math.inf
    assert float(noise.log_xi_sigma_sq_mean(1)) == math.inf


# ----------------------------------------------------------------- large m (no overflow, accurate)


def test_large_m_accuracy_against_mpmath() -> None:
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    for m in (5.0, 40.0, 43.5, 1e3, 1e5, 1e6, 1e9):
        mm = mp.mpf(m)
        inv_sqrt = mp.sqrt(mm / 2) * mp.exp(mp.loggamma((mm - 2) / 2) - mp.loggamma((mm - 1) / 2))
        xt = mp.mpf("0.5")
        var = (1 + mm * xt**2) / (mm - 3) - (xt * inv_sqrt) ** 2
        log_mean = mp.digamma((mm - 1) / 2) + mp.log(2 / mm)
        log_sq = mp.polygamma(1, (mm - 1) / 2) + log_mean**2
        for got, want in (
            (noise.gaussian_xi_sigma_inv_sqrt_mean(m), inv_sqrt),
            (noise.xhat_mean(m, 0.5), xt * inv_sqrt),
            (noise.xhat_var(m, 0.5), var),
            (noise.log_xi_sigma_mean(m), log_mean),
            (noise.log_xi_sigma_sq_mean(m), log_sq),
        ):
            assert float(got) == pytest.approx(float(want), rel=1e-12), m


def test_large_m_finite_and_limits() -> None:
    m = np.array([1e4, 1e6, 1e12])
    with np.errstate(all="raise"):
        for f in (
            noise.gaussian_xi_sigma_inv_sqrt_mean,
            noise.log_xi_sigma_sq_mean,
            noise.bn_xi_sigma_var,
        ):
            assert np.all(np.isfinite(f(m)))
        np.testing.assert_allclose(noise.xhat_mean(m, 0.5), 0.5, rtol=1e-3)
        np.testing.assert_allclose(m * noise.xhat_var(m, 0.5), 1 + 0.5 * 0.25, rtol=1e-3)
        np.testing.assert_allclose(m * noise.log_xi_sigma_sq_mean(m), 2.0, rtol=1e-3)
        e_print, v_print = noise.eq4_as_printed(1e6, 0.5)
    assert np.isfinite(e_print) and np.isfinite(v_print)


# ----------------------------------------------------------------- effective batch size


def test_effective_batch_size_roundtrip_and_edges() -> None:
    m = np.array([1.0, 2.0, 4.0, 7.0, 64.0])[:, None]
    lam = np.array([0.0, 0.3, 0.75, 0.9, 0.999])[None, :]
    back = noise.lam_for_effective_batch_size(m, noise.effective_batch_size(m, lam))
    np.testing.assert_allclose(back, np.broadcast_to(lam, back.shape), atol=1e-12)
    m2 = m[1:]
    back_s = noise.lam_for_effective_batch_size_sigma(m2, noise.effective_batch_size_sigma(m2, lam))
    np.testing.assert_allclose(back_s, np.broadcast_to(lam, back_s.shape), atol=1e-9)
    assert float(noise.effective_batch_size(4, 1.0)) == math.inf
    assert float(noise.effective_batch_size_sigma(4, 1.0)) == math.inf
    assert float(noise.lam_for_effective_batch_size(4, math.inf)) == 1.0
    assert float(noise.lam_for_effective_batch_size_sigma(4, math.inf)) == 1.0
    assert float(noise.lam_for_effective_batch_size(16, 4)) == 0.0
    assert float(noise.lam_for_effective_batch_size_sigma(16, 4)) == 0.0


def test_sigma_and_mean_matching_disagree() -> None:
    # one decay cannot make MBN at m match a single BN batch size in both noises
    lam = noise.lam_for_effective_batch_size(4, 16)
    assert float(noise.effective_batch_size_sigma(4, lam)) == pytest.approx(20.28, abs=0.01)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: noise.mbn_xi_mu_var(4, 1.5), "decay"),
        (lambda: noise.mbn_xi_mu_var(4, -0.1), "decay"),
        (lambda: noise.mbn_xi_mu_var(4, float("nan")), "decay"),
        (lambda: noise.bn_xi_mu_var(0), "batch size"),
        (lambda: noise.bn_xi_sigma_var(4, kurtosis=0.5), "kurtosis"),
        (lambda: noise.xhat_var(0.5, 1.0), "batch size"),
        (lambda: noise.effective_batch_size(0, 0.5), "batch size"),
        (lambda: noise.effective_batch_size_sigma(1, 0.5), "batch size"),
        (lambda: noise.lam_for_effective_batch_size(4, 0), "batch sizes"),
        (lambda: noise.lam_for_effective_batch_size(4, float("nan")), "batch sizes"),
        (lambda: noise.eq11_endpoint_lam(4, 0), "m0"),
    ],
)
def test_bad_input_raises(call: object, match: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=match):
        call()
