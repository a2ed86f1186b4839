"""Monte Carlo checks of docs/spec.md §6 (``mbn_ref.noise``) with the samplers of
``mbn_ref.noise_sim``.

Every check states its bound: a formula agrees when the simulated estimate is within
``AGREE`` = 5 standard errors (mean: ``std/sqrt(n)``; variance: ``sqrt((m4 - s**4)/n)``);
a printed formula of the paper is rejected when it is more than ``REJECT`` = 10 standard
errors away. Seeds are fixed, so every run draws the same numbers. Distribution checks use
the Dvoretzky–Kiefer–Wolfowitz bound ``sqrt(log(2/alpha)/(2n))`` with ``alpha = 1e-6``.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy import stats

from mbn_ref import noise
from mbn_ref.noise_sim import (
    POPULATION_KINDS,
    Population,
    burn_in_steps,
    mean_with_se,
    sample_bn_noise,
    sample_mbn_noise,
    sample_xhat,
    var_with_se,
)

AGREE = 5.0
REJECT = 10.0
ALPHA = 1e-6


def rng_for(*key: object) -> np.random.Generator:
    """A generator seeded from the test's parameters (stable across runs and orderings)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def dkw(n: int, alpha: float = ALPHA) -> float:
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def assert_agrees(est: tuple[float, float], value: float, what: str) -> None:
    sim, se = est
    assert abs(sim - value) <= AGREE * se, f"{what}: formula {value:.6g}, sim {sim:.6g} ± {se:.2g}"


def assert_rejected(est: tuple[float, float], value: float, what: str) -> None:
    sim, se = est
    assert abs(sim - value) > REJECT * se, f"{what}: printed {value:.6g} not rejected by {sim:.6g}"


# ----------------------------------------------------------------- populations and helpers


@pytest.mark.parametrize("kind", POPULATION_KINDS)
def test_population_is_standardized_with_stated_kurtosis(kind: str) -> None:
    pop = Population(kind, mean=3.0, std=2.0)  # type: ignore[arg-type]
    x = pop.sample(rng_for("pop", kind), 400_000)
    assert_agrees(mean_with_se(x), 3.0, "mean")
    assert_agrees(var_with_se(x), 4.0, "variance")
    z = (x - 3.0) / 2.0
    assert_agrees(mean_with_se(z**4), pop.kurtosis, "kurtosis")
    assert_agrees(mean_with_se(z**3), pop.skewness, "skewness")


def test_standard_errors_are_honest() -> None:
    # the 5-SE rule must hold for the helpers themselves: coverage of 1-SE intervals ~ 68%
    rng = rng_for("se")
    x = rng.standard_exponential((2000, 500))
    hits_mean = sum(abs(mean_with_se(row)[0] - 1.0) <= mean_with_se(row)[1] for row in x)
    hits_var = sum(abs(var_with_se(row)[0] - 1.0) <= var_with_se(row)[1] for row in x)
    # binomial(2000, 0.683): sd 21; allow 5 sd
    assert abs(hits_mean - 1366) < 105
    assert abs(hits_var - 1366) < 150  # the variance SE of a skewed law converges more slowly


def test_samplers_are_deterministic_and_validate() -> None:
    a = sample_mbn_noise(4, 0.5, 100, "uniform", np.random.default_rng(1))
    b = sample_mbn_noise(4, 0.5, 100, "uniform", np.random.default_rng(1))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="kind"):
        Population("cauchy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="m must be"):
        sample_bn_noise(0, 10, "gaussian", np.random.default_rng(0))
    with pytest.raises(ValueError, match="stationary"):
        sample_mbn_noise(4, 1.0, 10, "gaussian", np.random.default_rng(0))
    with pytest.raises(ValueError, match="m must be"):
        sample_xhat(1, 0.5, 10, "gaussian", np.random.default_rng(0))


def test_burn_in_bias_formula() -> None:
    # a chain started at its first batch and updated J times has variance
    # Var_BN * [(1-lam)/(1+lam) + lam**(2J) * 2 lam/(1+lam)]: check J = 2 at lam = 0.9
    lam, m, n = 0.9, 4, 100_000
    xi_mu, _ = sample_mbn_noise(m, lam, n, "gaussian", rng_for("burn"), burn_in=2)
    want = (1 / m) * ((1 - lam) / (1 + lam) + lam**4 * 2 * lam / (1 + lam))
    assert_agrees(var_with_se(xi_mu), want, "J=2 chain variance")
    assert_rejected(var_with_se(xi_mu), float(noise.mbn_xi_mu_var(m, lam)), "stationary")
    assert burn_in_steps(0.9) >= math.log(1e-6 * 0.1 / 1.8) / (2 * math.log(0.9))


# ----------------------------------------------------------------- BN, Eq. 2, any population


@pytest.mark.parametrize("kind", POPULATION_KINDS)
@pytest.mark.parametrize("m", [2, 3, 4, 8, 16, 64])
def test_bn_noise_moments(m: int, kind: str) -> None:
    pop = Population(kind, mean=-7.0, std=0.3)  # type: ignore[arg-type]
    xi_mu, xi_sigma = sample_bn_noise(m, 40_000, pop, rng_for("bn", m, kind))
    assert_agrees(mean_with_se(xi_mu), float(noise.bn_xi_mu_mean(m)), "E[xi_mu]")
    assert_agrees(var_with_se(xi_mu), float(noise.bn_xi_mu_var(m)), "Var[xi_mu]")
    assert_agrees(mean_with_se(xi_mu**2), float(noise.xi_mu_sq_mean(m)), "E[xi_mu^2]")
    assert_agrees(mean_with_se(xi_sigma), float(noise.bn_xi_sigma_mean(m)), "E[xi_sigma]")
    v = var_with_se(xi_sigma)
    assert_agrees(v, float(noise.bn_xi_sigma_var(m, pop.kurtosis)), "Var[xi_sigma] (kurtosis)")
    if kind == "gaussian":
        assert_agrees(v, 2 * (m - 1) / m**2, "Var[xi_sigma] Eq. 2")
    elif m >= 4:  # the Gaussian-only 2(m-1)/m^2 is wrong for these populations
        assert_rejected(v, float(noise.bn_xi_sigma_var(m)), "2(m-1)/m^2 for non-Gaussian")


@pytest.mark.parametrize("m", [2, 3, 4, 16, 64])
def test_bn_log_xi_sigma_regularizer(m: int) -> None:
    _, xi_sigma = sample_bn_noise(m, 40_000, "gaussian", rng_for("log", m))
    log_xi = np.log(xi_sigma)
    assert_agrees(mean_with_se(log_xi), float(noise.log_xi_sigma_mean(m)), "E[log xi]")
    assert_agrees(var_with_se(log_xi), float(noise.log_xi_sigma_var(m)), "Var[log xi]")
    assert_agrees(mean_with_se(log_xi**2), float(noise.log_xi_sigma_sq_mean(m)), "E[log^2 xi]")


# ----------------------------------------------------------------- MBN, Eq. 10


def _check_mbn(m: int, lam: float, kind: str, n: int) -> None:
    pop = Population(kind)  # type: ignore[arg-type]
    xi_mu, xi_sigma = sample_mbn_noise(m, lam, n, pop, rng_for("mbn", m, lam, kind))
    vm = var_with_se(xi_mu)
    assert_agrees(mean_with_se(xi_mu), float(noise.mbn_xi_mu_mean(m, lam)), "E[xi_mu]")
    assert_agrees(vm, float(noise.mbn_xi_mu_var(m, lam)), "Var[xi_mu] corrected Eq. 10")
    assert_agrees(mean_with_se(xi_mu**2), float(noise.xi_mu_sq_mean(m, lam)), "E[xi_mu^2]")
    assert_agrees(mean_with_se(xi_sigma), float(noise.mbn_xi_sigma_mean(m, lam)), "E[xi_sigma]")
    assert_agrees(
        var_with_se(xi_sigma),
        float(noise.mbn_xi_sigma_var(m, lam, pop.kurtosis)),
        "Var[xi_sigma]",
    )
    if lam >= 0.5:
        assert_rejected(vm, float(noise.eq10_var_xi_mu_as_printed(m, lam)), "Eq. 10 printed")
    # the matching BN batch size has the same mean noise
    assert_agrees(vm, 1 / float(noise.effective_batch_size(m, lam)), "effective batch size")


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("m", [2, 4, 16, 64])
def test_mbn_noise_moments_gaussian(m: int, lam: float) -> None:
    _check_mbn(m, lam, "gaussian", 10_000)


@pytest.mark.parametrize("kind", ["uniform", "exponential", "lognormal"])
@pytest.mark.parametrize(("m", "lam"), [(4, 0.75), (16, 0.5), (2, 0.9)])
def test_mbn_noise_moments_non_gaussian(m: int, lam: float, kind: str) -> None:
    _check_mbn(m, lam, kind, 10_000)


def test_spec_example_eq10_rejected_at_m4_lam075() -> None:
    xi_mu, _ = sample_mbn_noise(4, 0.75, 40_000, "gaussian", rng_for("spec-eq10"))
    v = var_with_se(xi_mu)
    assert_agrees(v, 1 / 28, "corrected")
    assert_rejected(v, 0.0625, "printed")
    assert_rejected(v, 1 / 16, "paper's 'batch 4 matches 16'")


def test_eq11_endpoint_matches_2m0_minus_m_not_m0() -> None:
    m, m0 = 4, 32
    lam = float(noise.eq11_endpoint_lam(m, m0))
    xi_mu, xi_sigma = sample_mbn_noise(m, lam, 40_000, "gaussian", rng_for("eq11"))
    vm, vs = var_with_se(xi_mu), var_with_se(xi_sigma)
    assert_agrees(vm, 1 / (2 * m0 - m), "mean noise of BN at 2 m0 - m")
    assert_rejected(vm, 1 / m0, "mean noise of BN at m0 (the paper's claim)")
    m_sig = float(noise.eq11_endpoint_effective_batch_size_sigma(m, m0))
    assert_agrees(vs, float(noise.bn_xi_sigma_var(m_sig)), "sigma noise of BN at m'")
    assert_rejected(vs, float(noise.bn_xi_sigma_var(m0)), "sigma noise of BN at m0")


# ----------------------------------------------------------------- xhat, Eq. 3 and 4


@pytest.mark.parametrize("m", [4, 5, 8, 16, 64])
@pytest.mark.parametrize("xt", [0.0, 0.5, -2.0])
def test_xhat_mean(m: int, xt: float) -> None:
    # E[xhat^2] is finite for m > 3, so the sample mean has a valid standard error
    xhat = sample_xhat(m, xt, 40_000, "gaussian", rng_for("xhat-mean", m, xt))
    est = mean_with_se(xhat)
    assert_agrees(est, float(noise.xhat_mean(m, xt)), "E[xhat] corrected Eq. 4")
    if xt != 0 and m <= 8:
        assert_rejected(est, float(noise.eq4_as_printed(m, xt)[0]), "E[xhat] printed Eq. 4")


@pytest.mark.parametrize("m", [12, 16, 32, 64])
@pytest.mark.parametrize("xt", [0.0, 0.5, -2.0])
def test_xhat_var(m: int, xt: float) -> None:
    # Var[sample variance] needs E[xhat^4] (m > 5); its SE estimate needs E[xhat^8] (m > 9)
    xhat = sample_xhat(m, xt, 40_000, "gaussian", rng_for("xhat-var", m, xt))
    est = var_with_se(xhat)
    assert_agrees(est, float(noise.xhat_var(m, xt)), "Var[xhat] corrected Eq. 4")
    if m <= 16 and xt != 0:  # at xtilde = 0 the printed variance is only m/(m-1) too small
        assert_rejected(est, float(noise.eq4_as_printed(m, xt)[1]), "Var[xhat] printed Eq. 4")


def test_spec_example_eq4_m4() -> None:
    """docs/spec.md §6: m = 4, xtilde = 0.5. At m = 4 the sample variance of xhat has infinite
    variance (E[xhat**4] needs m > 5), so the second moment is checked through its exact law and
    through a truncated mean, which is a valid lower bound with a finite standard error."""
    m, xt, n = 4, 0.5, 200_000
    xhat = sample_xhat(m, xt, n, "gaussian", rng_for("spec-eq4"))
    est = mean_with_se(xhat)
    assert_agrees(est, float(noise.xhat_mean(m, xt)), "E[xhat]")
    e_print, v_print = noise.eq4_as_printed(m, xt)
    e_print2, v_print2 = noise.eq4_as_printed(m, xt, sqrt_over_gamma_ratio=True)
    assert_rejected(est, float(e_print), "E[xhat] printed")
    assert_rejected(est, float(e_print2), "E[xhat] printed (other reading)")
    # exact law: xhat * sqrt(m-1) ~ noncentral t(m-1, sqrt(m) xtilde)
    law = stats.nct(m - 1, math.sqrt(m) * xt)
    d = stats.kstest(xhat * math.sqrt(m - 1), law.cdf).statistic
    assert d < dkw(n), f"KS {d:.4f} vs DKW bound {dkw(n):.4f}"
    # lower bound on E[xhat^2]: E[min(xhat^2, c)] (bounded, so its SE is valid)
    # and an upper bound on E[xhat]^2 from the sample: Var[xhat] >= lower (at REJECT SE)
    lb, lb_se = mean_with_se(np.minimum(xhat**2, 100.0))
    lower = lb - REJECT * lb_se - (est[0] + REJECT * est[1]) ** 2
    assert lower > float(v_print), f"Var[xhat] >= {lower:.3f} > printed {float(v_print):.3f}"
    assert lower > float(v_print2)
    # and the corrected variance is consistent with this bound and with the exact law
    assert lower < float(noise.xhat_var(m, xt))
    assert float(noise.xhat_var(m, xt)) == pytest.approx(float(law.var()) / (m - 1), rel=1e-9)


def test_xhat_mbn_uses_mbn_noise() -> None:
    # xi_mu, xi_sigma are EMAs of independent batch means/variances: still independent for
    # Gaussian data, so E[xhat] = xtilde * E[xi_sigma^-1/2]; with small noise (m=16, lam=0.9)
    # a second-order delta expansion gives it to O(Var^2)
    m, lam, xt = 16, 0.9, 1.0
    xhat = sample_xhat(m, xt, 20_000, "gaussian", rng_for("xhat-mbn"), lam=lam)
    mean_s = float(noise.mbn_xi_sigma_mean(m, lam))
    var_s = float(noise.mbn_xi_sigma_var(m, lam))
    delta = xt * (mean_s**-0.5 + 3 / 8 * mean_s**-2.5 * var_s)
    est = mean_with_se(xhat)
    assert abs(est[0] - delta) <= AGREE * est[1] + 1e-4
    assert_rejected(est, float(noise.xhat_mean(m, xt)), "BN's E[xhat] for MBN")


# ----------------------------------------------------------------- Theorem 1 (non-Gaussian limit)

# Berry–Esseen constant (Shevtsova 2011) and E|x - mu|^3 / sigma^3 of the standardized laws
_BE_C = 0.4748
_ABS3 = {"uniform": 3 * math.sqrt(3) / 4, "exponential": 12 / math.e - 2}


@pytest.mark.parametrize("kind", ["uniform", "exponential"])
def test_theorem1_xi_mu_is_asymptotically_normal(kind: str) -> None:
    m, n = 64, 20_000
    xi_mu, _ = sample_bn_noise(m, n, kind, rng_for("thm1-mu", kind))  # type: ignore[arg-type]
    d = stats.kstest(math.sqrt(m) * xi_mu, "norm").statistic
    bound = _BE_C * _ABS3[kind] / math.sqrt(m) + dkw(n)
    assert d < bound, f"KS {d:.4f} >= Berry-Esseen + DKW {bound:.4f}"


@pytest.mark.parametrize("kind", ["uniform", "exponential", "lognormal"])
def test_theorem1_xi_sigma_limit_is_not_the_chi_square(kind: str) -> None:
    """Honest Theorem 1: sqrt(m)(xi_sigma - 1) -> N(0, kurtosis - 1), not the chi-square's
    N(0, 2). At m = 256 the variance matches (kurtosis - 1)/m (5 SE) and rejects 2/m (10 SE);
    the standardized law is within twice the first Edgeworth term plus DKW of N(0, 1)."""
    m, n = 256, 20_000
    pop = Population(kind)  # type: ignore[arg-type]
    _, xi_sigma = sample_bn_noise(m, n, pop, rng_for("thm1-sigma", kind))
    v = var_with_se(xi_sigma)
    assert_agrees(v, float(noise.bn_xi_sigma_var(m, pop.kurtosis)), "kurtosis formula")
    assert_rejected(v, float(noise.bn_xi_sigma_var(m)), "chi-square variance 2(m-1)/m^2")
    z = (xi_sigma - float(noise.bn_xi_sigma_mean(m))) / math.sqrt(
        float(noise.bn_xi_sigma_var(m, pop.kurtosis))
    )
    skew = float(stats.skew(z))
    # Edgeworth: F(z) ~ Phi(z) - skew/6 (z^2 - 1) phi(z); max |(z^2-1) phi| = phi(0)
    bound = 2 * abs(skew) / 6 / math.sqrt(2 * math.pi) + dkw(n)
    d_normal = stats.kstest(z, "norm").statistic
    assert d_normal < bound, f"KS to N(0,1) {d_normal:.4f} >= {bound:.4f}"
    # while the scaled chi-square law the theorem names is far off
    d_chi2 = stats.kstest(xi_sigma, stats.chi2(m - 1, scale=1 / m).cdf).statistic
    assert d_chi2 > 0.05 + dkw(n)
    assert d_chi2 > 2 * d_normal


# ----------------------------------------------------------- docs/derivations/check_noise.py

ROOT = Path(__file__).resolve().parents[1]
CHECK_NOISE = ROOT / "docs" / "derivations" / "check_noise.py"


def _check_noise_script() -> ModuleType:
    """The agreement-table script, imported by path (it is documentation, not the package)."""
    name = "_mbn_docs_check_noise"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CHECK_NOISE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_agreement_table_corrected_formulas_agree() -> None:
    """Every corrected formula of the table lies within 5 SE of its simulation (small n)."""
    script = _check_noise_script()
    rows = script.agreement_table(seed=7, n=100_000)
    assert len(rows) == 44
    checked = [
        r
        for r in rows
        if not any(k in r.formula for k in ("printed", "claim", "Gaussian only"))
        and not r.quantity.startswith("E[min(")  # a one-sided bound, not an estimate
    ]
    assert len(checked) == 30
    for r in checked:
        assert abs(r.z) < AGREE, f"{r.quantity} {r.setting} {r.formula}: z = {r.z:+.1f}"
    table = script.format_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and table[0].startswith("| quantity |")


def test_the_documented_table_is_the_scripts_output() -> None:
    """``python docs/derivations/check_noise.py`` runs on its own and prints, digit for digit,
    the table of docs/derivations/noise.md (seed 20200823)."""
    out = subprocess.run(
        [sys.executable, str(CHECK_NOISE)],
        cwd=ROOT / "docs",  # not the repository root: the script needs only the installed package
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    table = out.stdout.strip()
    assert table.count("\n") == 45
    doc = (ROOT / "docs" / "derivations" / "noise.md").read_text(encoding="utf-8")
    assert table in doc, "docs/derivations/noise.md holds an older table: rerun the script"


def test_the_package_no_longer_holds_the_table() -> None:
    import mbn_ref.noise_sim as ns

    assert not hasattr(ns, "agreement_table") and not hasattr(ns, "main")
