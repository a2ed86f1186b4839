"""Monte Carlo samplers for the noise model of docs/spec.md §6 (BN and MBN batch statistics).

Seeded (``numpy.random.Generator``), vectorized, NumPy only. Populations are standardized
to a known mean and standard deviation, so ``xi_mu = (mu - mu_B)/sigma`` and
``xi_sigma = var_B/sigma**2`` are computed from raw draws exactly as a BN layer would see
them (batch mean, two-pass biased variance). Used by ``tests/test_noise_sim.py``, by
``docs/plots/noise_variance.py`` and by ``docs/derivations/check_noise.py``, which prints the
formula-versus-simulation table of ``docs/derivations/noise.md``.

Arguments follow the package's rules (:mod:`mbn_ref._validate`): counts are integers
(``TypeError`` otherwise), decays host reals in ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from ._validate import check_decay, check_int, check_positive, check_real

__all__ = [
    "POPULATION_KINDS",
    "Population",
    "burn_in_steps",
    "mean_with_se",
    "sample_bn_noise",
    "sample_mbn_noise",
    "sample_xhat",
    "var_with_se",
]

PopulationKind = Literal["gaussian", "uniform", "exponential", "lognormal"]
POPULATION_KINDS: tuple[PopulationKind, ...] = ("gaussian", "uniform", "exponential", "lognormal")

_LOGNORMAL_SHAPE = 0.5  # sigma of log x; skewness 1.75, kurtosis 8.90
_CHUNK_ELEMENTS = 1 << 21  # draws held in memory at once (16 MiB of float64)

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Population:
    """An i.i.d. population standardized to ``mean`` and ``std``.

    ``kind`` is ``"gaussian"``, ``"uniform"`` (light tails, kurtosis 1.8),
    ``"exponential"`` (skewed, kurtosis 9) or ``"lognormal"`` (log-sd 0.5: skewed, kurtosis
    about 8.9).

    >>> Population("uniform").kurtosis
    1.8
    >>> x = Population("exponential", mean=3.0, std=2.0).sample(np.random.default_rng(0), 10**6)
    >>> round(float(x.mean()), 1), round(float(x.std()), 1)
    (3.0, 2.0)
    """

    kind: PopulationKind = "gaussian"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in POPULATION_KINDS:
            raise ValueError(
                f"population kind must be one of {POPULATION_KINDS}, got {self.kind!r}"
            )
        check_real("population mean", self.mean)
        check_positive("population std", self.std)

    @property
    def kurtosis(self) -> float:
        """Non-excess kurtosis ``E[(x - mean)**4] / std**4``."""
        if self.kind == "gaussian":
            return 3.0
        if self.kind == "uniform":
            return 1.8
        if self.kind == "exponential":
            return 9.0
        w = math.exp(_LOGNORMAL_SHAPE**2)
        return w**4 + 2 * w**3 + 3 * w**2 - 3

    @property
    def skewness(self) -> float:
        """Skewness ``E[(x - mean)**3] / std**3``."""
        if self.kind in ("gaussian", "uniform"):
            return 0.0
        if self.kind == "exponential":
            return 2.0
        w = math.exp(_LOGNORMAL_SHAPE**2)
        return (w + 2) * math.sqrt(w - 1)

    def standard(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> Array:
        """Draws standardized to mean 0 and std 1."""
        if self.kind == "gaussian":
            return rng.standard_normal(size)
        if self.kind == "uniform":
            h = math.sqrt(3.0)
            return rng.uniform(-h, h, size)
        if self.kind == "exponential":
            return rng.standard_exponential(size) - 1.0
        s2 = _LOGNORMAL_SHAPE**2
        z = np.exp(_LOGNORMAL_SHAPE * rng.standard_normal(size))
        return (z - math.exp(s2 / 2)) / math.sqrt((math.exp(s2) - 1) * math.exp(s2))

    def sample(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> Array:
        """Draws with this population's ``mean`` and ``std``."""
        return self.mean + self.std * self.standard(rng, size)


def _population(population: Population | PopulationKind) -> Population:
    return population if isinstance(population, Population) else Population(population)


def _batch_stats(pop: Population, rng: np.random.Generator, n: int, m: int) -> tuple[Array, Array]:
    """``(xi_mu, xi_sigma)`` of ``n`` fresh batches of size ``m`` (two-pass biased variance)."""
    x = pop.sample(rng, (n, m))
    mu_b = x.mean(axis=1)
    var_b = ((x - mu_b[:, None]) ** 2).mean(axis=1)
    return (pop.mean - mu_b) / pop.std, var_b / pop.std**2


def _chunks(n: int, m: int) -> list[int]:
    per = max(1, _CHUNK_ELEMENTS // max(m, 1))
    return [min(per, n - start) for start in range(0, n, per)]


def sample_bn_noise(
    m: int,
    n_batches: int,
    population: Population | PopulationKind,
    rng: np.random.Generator,
) -> tuple[Array, Array]:
    """Simulate BN's noise: ``(xi_mu, xi_sigma)`` of ``n_batches`` independent batches.

    >>> xi_mu, xi_sigma = sample_bn_noise(4, 100_000, "gaussian", np.random.default_rng(0))
    >>> round(float(xi_mu.var()), 2), round(float(xi_sigma.mean()), 2)
    (0.25, 0.75)
    """
    m = check_int("m", m, minimum=1)
    n_batches = check_int("n_batches", n_batches, minimum=1)
    pop = _population(population)
    parts = [_batch_stats(pop, rng, n, m) for n in _chunks(n_batches, m)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def burn_in_steps(lam: float, tol: float = 1e-6) -> int:
    """EMA steps after the first batch so the stationary variance is reached within ``tol``.

    A chain started at the first batch's statistics and updated ``J`` times has the exact
    stationary mean, and a variance larger than the stationary one by the relative amount
    ``lam**(2J) * 2 lam / (1 - lam)``; this returns the smallest ``J`` making that ``<= tol``
    (about ``log(tol)/(2 log lam)``).

    >>> burn_in_steps(0.0), burn_in_steps(0.5), burn_in_steps(0.9)
    (0, 11, 80)
    """
    lam = check_decay("lam", lam)
    if lam == 1:
        raise ValueError("lam must be a decay in [0, 1) for a stationary regime, got 1")
    if not 0 < check_real("tol", tol) < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if lam == 0:
        return 0
    excess = 2 * lam / (1 - lam)
    if excess <= tol:
        return 0
    return math.ceil(math.log(tol / excess) / (2 * math.log(lam)))


def sample_mbn_noise(
    m: int,
    lam: float,
    n_samples: int,
    population: Population | PopulationKind,
    rng: np.random.Generator,
    *,
    burn_in: int | None = None,
    tol: float = 1e-6,
) -> tuple[Array, Array]:
    """Simulate MBN's stationary noise: ``(xi_mu, xi_sigma)`` of EMAs with decay ``lam``.

    Runs ``n_samples`` independent chains in parallel; each starts at its first batch's
    ``(mu_B, var_B)`` and applies Eq. 8 (``s <- lam*s + (1-lam)*batch``) ``burn_in`` more
    times with fresh batches (default :func:`burn_in_steps` ``(lam, tol)``), so the samples
    are independent and the variance is within relative ``tol`` of stationary.

    >>> xi_mu, _ = sample_mbn_noise(4, 0.75, 100_000, "gaussian", np.random.default_rng(0))
    >>> round(float(xi_mu.var()), 3)
    0.036
    """
    m = check_int("m", m, minimum=1)
    n_samples = check_int("n_samples", n_samples, minimum=1)
    lam = check_decay("lam", lam)
    steps = burn_in_steps(lam, tol) if burn_in is None else check_int("burn_in", burn_in, minimum=0)
    pop = _population(population)
    mus: list[Array] = []
    sigmas: list[Array] = []
    for n in _chunks(n_samples, m):
        xi_mu, xi_sigma = _batch_stats(pop, rng, n, m)
        for _ in range(steps):
            b_mu, b_sigma = _batch_stats(pop, rng, n, m)
            xi_mu = lam * xi_mu + (1 - lam) * b_mu
            xi_sigma = lam * xi_sigma + (1 - lam) * b_sigma
        mus.append(xi_mu)
        sigmas.append(xi_sigma)
    return np.concatenate(mus), np.concatenate(sigmas)


def sample_xhat(
    m: int,
    xtilde: float,
    n: int,
    population: Population | PopulationKind,
    rng: np.random.Generator,
    *,
    lam: float = 0.0,
) -> Array:
    """Simulate Eq. 3, ``xhat = (xtilde + xi_mu)/sqrt(xi_sigma)``, for a point outside the batch.

    ``xtilde = (x - mu)/sigma`` is fixed; each of the ``n`` draws uses a fresh batch (BN,
    ``lam = 0``) or a fresh stationary MBN chain (``lam > 0``). Requires ``m >= 2``.

    >>> xhat = sample_xhat(16, 0.5, 100_000, "gaussian", np.random.default_rng(0))
    >>> round(float(xhat.mean()), 2)
    0.54
    """
    m = check_int("m", m, minimum=2)
    xtilde = check_real("xtilde", xtilde)
    if check_decay("lam", lam) == 0:
        xi_mu, xi_sigma = sample_bn_noise(m, n, population, rng)
    else:
        xi_mu, xi_sigma = sample_mbn_noise(m, lam, n, population, rng)
    return (xtilde + xi_mu) / np.sqrt(xi_sigma)


def mean_with_se(x: Array) -> tuple[float, float]:
    """Sample mean and its standard error ``std/sqrt(n)``.

    >>> mean_with_se(np.array([1.0, 2.0, 3.0, 4.0]))
    (2.5, 0.6454972243679028)
    """
    n = x.size
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(n))


def var_with_se(x: Array) -> tuple[float, float]:
    """Unbiased sample variance and its standard error ``sqrt((m4 - s**4)/n)``.

    ``m4`` is the sample fourth central moment; valid when ``E[x**4]`` is finite.

    >>> v, se = var_with_se(np.random.default_rng(0).standard_normal(100_000))
    >>> round(v, 2), round(se, 4)
    (1.0, 0.0045)
    """
    n = x.size
    d = x - x.mean()
    s2 = float(d @ d / (n - 1))
    m4 = float(np.mean(d**4))
    return s2, math.sqrt(max(m4 - s2**2, 0.0) / n)
