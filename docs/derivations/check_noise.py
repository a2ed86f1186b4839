"""Print the noise model's Monte Carlo agreement table (docs/derivations/noise.md).

    python docs/derivations/check_noise.py     # seed 20200823, 400k draws per row; seconds

Every formula of ``mbn_ref.noise`` (docs/spec.md §6) against a simulation with the seeded
samplers of ``mbn_ref.noise_sim``, ± one standard error, and ``z = (simulated - formula)/SE``.
Rows for the paper's printed Eq. 4 and Eq. 10 (and the claims built on them) are included:
the simulation rejects them. The table in ``docs/derivations/noise.md`` and the evidence in
``docs/errata.md`` are this script's output; ``tests/test_noise_sim.py`` asserts the same
agreements with explicit bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mbn_ref import noise
from mbn_ref.noise_sim import (
    POPULATION_KINDS,
    Population,
    mean_with_se,
    sample_bn_noise,
    sample_mbn_noise,
    sample_xhat,
    var_with_se,
)

SEED = 20200823
DRAWS = 400_000


@dataclass(frozen=True)
class AgreementRow:
    """One line of the formula-versus-simulation table."""

    quantity: str
    setting: str
    formula: str
    value: float
    simulated: float
    se: float

    @property
    def z(self) -> float:
        """``(simulated - value)/se``: how many standard errors apart."""
        return (self.simulated - self.value) / self.se if self.se > 0 else math.inf


def agreement_table(seed: int = SEED, n: int = DRAWS) -> list[AgreementRow]:
    """Formula versus Monte Carlo (± one standard error) for every quantity of docs/spec.md §6.

    Includes the paper's printed Eq. 4 and Eq. 10, which the simulation rejects. ``n`` draws
    per row (``n // 4`` MBN chains).
    """
    rng = np.random.default_rng(seed)
    rows: list[AgreementRow] = []

    def add(q: str, s: str, f: str, value: Any, sim: tuple[float, float]) -> None:
        rows.append(AgreementRow(q, s, f, float(value), sim[0], sim[1]))

    for kind in POPULATION_KINDS:
        pop = Population(kind)
        xi_mu, xi_sigma = sample_bn_noise(4, n, pop, rng)
        s = f"BN m=4 {kind}"
        add("Var[xi_mu]", s, "1/m", noise.bn_xi_mu_var(4), var_with_se(xi_mu))
        add("E[xi_sigma]", s, "(m-1)/m", noise.bn_xi_sigma_mean(4), mean_with_se(xi_sigma))
        add(
            "Var[xi_sigma]",
            s,
            "(m-1)/m^3((m-1)k-(m-3))",
            noise.bn_xi_sigma_var(4, pop.kurtosis),
            var_with_se(xi_sigma),
        )
        if kind != "gaussian":
            add(
                "Var[xi_sigma]",
                s,
                "2(m-1)/m^2 (Gaussian only)",
                noise.bn_xi_sigma_var(4),
                var_with_se(xi_sigma),
            )
    for m, lam in ((4, 0.75), (4, 0.6), (16, 0.9)):
        xi_mu, xi_sigma = sample_mbn_noise(m, lam, n // 4, "gaussian", rng)
        s = f"MBN m={m} lam={lam}"
        add("Var[xi_mu]", s, "(1-lam)/((1+lam)m)", noise.mbn_xi_mu_var(m, lam), var_with_se(xi_mu))
        add(
            "Var[xi_mu]",
            s,
            "Eq.10 printed (1-lam)/m",
            noise.eq10_var_xi_mu_as_printed(m, lam),
            var_with_se(xi_mu),
        )
        add("E[xi_sigma]", s, "(m-1)/m", noise.mbn_xi_sigma_mean(m, lam), mean_with_se(xi_sigma))
        add(
            "Var[xi_sigma]",
            s,
            "(1-lam)/(1+lam) 2(m-1)/m^2",
            noise.mbn_xi_sigma_var(m, lam),
            var_with_se(xi_sigma),
        )
    xi_mu, xi_sigma = sample_mbn_noise(4, 0.75, n // 4, "exponential", rng)
    s = "MBN m=4 lam=0.75 exponential"
    add("Var[xi_mu]", s, "(1-lam)/((1+lam)m)", noise.mbn_xi_mu_var(4, 0.75), var_with_se(xi_mu))
    add(
        "Var[xi_sigma]",
        s,
        "(1-lam)/(1+lam) Var_BN(k=9)",
        noise.mbn_xi_sigma_var(4, 0.75, 9.0),
        var_with_se(xi_sigma),
    )
    # Eq. 11 end point, m = 4, m0 = 32: lam = 0.875
    xi_mu, xi_sigma = sample_mbn_noise(4, 0.875, n // 4, "gaussian", rng)
    s = "MBN m=4 lam=0.875 (Eq.11 end, m0=32)"
    add("Var[xi_mu]", s, "1/(2m0-m) = 1/60", 1 / 60, var_with_se(xi_mu))
    add("Var[xi_mu]", s, "paper's claim 1/m0 = 1/32", 1 / 32, var_with_se(xi_mu))
    m_sig = noise.eq11_endpoint_effective_batch_size_sigma(4, 32)
    add(
        "Var[xi_sigma]",
        s,
        f"BN at m'={float(m_sig):.2f}",
        noise.bn_xi_sigma_var(m_sig),
        var_with_se(xi_sigma),
    )
    add(
        "Var[xi_sigma]",
        s,
        "paper's claim: BN at m0=32",
        noise.bn_xi_sigma_var(32),
        var_with_se(xi_sigma),
    )
    # Eq. 4, m = 4 (mean) and m = 16 (variance; at m = 4 the sample variance has infinite variance)
    xhat = sample_xhat(4, 0.5, n, "gaussian", rng)
    s = "xhat m=4 xtilde=0.5"
    add("E[xhat]", s, "corrected Eq.4", noise.xhat_mean(4, 0.5), mean_with_se(xhat))
    add("E[xhat]", s, "Eq.4 printed", noise.eq4_as_printed(4, 0.5)[0], mean_with_se(xhat))
    add(
        "E[xhat]",
        s,
        "Eq.4 printed, sqrt over Gamma ratio",
        noise.eq4_as_printed(4, 0.5, sqrt_over_gamma_ratio=True)[0],
        mean_with_se(xhat),
    )
    cap = 100.0
    lower = mean_with_se(np.minimum(xhat**2, cap))
    add(
        "E[min(xhat^2,100)], a lower bound of E[xhat^2]",
        s,
        "corrected: E[xhat^2]=(1+m xt^2)/(m-3)",
        noise.xhat_var(4, 0.5) + noise.xhat_mean(4, 0.5) ** 2,
        lower,
    )
    e_p, v_p = noise.eq4_as_printed(4, 0.5)
    add(
        "E[min(xhat^2,100)], a lower bound of E[xhat^2]",
        s,
        "Eq.4 printed: Var+E^2",
        v_p + e_p**2,
        lower,
    )
    for m in (16,):
        xhat = sample_xhat(m, 0.5, n, "gaussian", rng)
        s = f"xhat m={m} xtilde=0.5"
        add("E[xhat]", s, "corrected Eq.4", noise.xhat_mean(m, 0.5), mean_with_se(xhat))
        add("E[xhat]", s, "Eq.4 printed", noise.eq4_as_printed(m, 0.5)[0], mean_with_se(xhat))
        add("Var[xhat]", s, "corrected Eq.4", noise.xhat_var(m, 0.5), var_with_se(xhat))
        add("Var[xhat]", s, "Eq.4 printed", noise.eq4_as_printed(m, 0.5)[1], var_with_se(xhat))
    for m in (4, 16):
        _, xi_sigma = sample_bn_noise(m, n, "gaussian", rng)
        s = f"BN m={m} gaussian"
        add(
            "E[(log xi_sigma)^2]",
            s,
            "trigamma+(digamma+log(2/m))^2",
            noise.log_xi_sigma_sq_mean(m),
            mean_with_se(np.log(xi_sigma) ** 2),
        )
    return rows


def format_table(rows: Sequence[AgreementRow]) -> str:
    """The rows as a Markdown table (z = (simulated - formula)/SE)."""
    lines = [
        "| quantity | setting | formula | value | simulated ± SE | z |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.quantity} | {r.setting} | {r.formula} | {r.value:.5f} | "
            f"{r.simulated:.5f} ± {r.se:.5f} | {r.z:+.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Print the agreement table (``python docs/derivations/check_noise.py``)."""
    print(format_table(agreement_table()))


if __name__ == "__main__":
    main()
