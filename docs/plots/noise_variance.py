"""Plot BN versus MBN noise variance against batch size: formulas (lines) over Monte Carlo.

Run from anywhere: ``python docs/plots/noise_variance.py``; writes
``docs/_static/noise_variance.png``. Left: ``Var[xi_mu]``; right: ``Var[xi_sigma]`` (Gaussian
population). Lines are :mod:`mbn_ref.noise`; markers are :mod:`mbn_ref.noise_sim` estimates
(error bars: 2 standard errors, mostly smaller than the markers). The dotted line is the
paper's printed Eq. 10 for ``lam = 0.75``; the grey line is BN at ``m0 = 32``, the noise level
the paper says the end point of Eq. 11 reaches.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from mbn_ref import noise
from mbn_ref.noise_sim import sample_bn_noise, sample_mbn_noise, var_with_se

OUT = Path(__file__).resolve().parents[1] / "_static" / "noise_variance.png"
M0 = 32
LAMS = (0.5, 0.75, 0.9)
M_LINE = np.geomspace(2, 256, 200)
M_POINTS = (2, 4, 8, 16, 32, 64, 128)
N_SIM = 10_000


def main(seed: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    fig, (ax_mu, ax_sig) = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.8, len(LAMS)))

    def series(label: str, color: object, lam_of_m: object, style: str = "-") -> None:
        lam_line = lam_of_m(M_LINE)  # type: ignore[operator]
        ax_mu.plot(M_LINE, noise.mbn_xi_mu_var(M_LINE, lam_line), style, color=color, label=label)
        ax_sig.plot(M_LINE, noise.mbn_xi_sigma_var(M_LINE, lam_line), style, color=color)
        for m in M_POINTS:
            lam = float(lam_of_m(np.float64(m)))  # type: ignore[operator]
            if lam == 0:
                xi_mu, xi_sigma = sample_bn_noise(m, N_SIM, "gaussian", rng)
            else:
                xi_mu, xi_sigma = sample_mbn_noise(m, lam, N_SIM, "gaussian", rng)
            for ax, xi in ((ax_mu, xi_mu), (ax_sig, xi_sigma)):
                v, se = var_with_se(xi)
                ax.errorbar(m, v, yerr=2 * se, fmt="o", ms=4, color=color, capsize=2)

    series("BN (lam = 0)", "black", lambda m: np.zeros_like(m))
    for lam, c in zip(LAMS, colors, strict=True):
        series(f"MBN, lam = {lam}", c, lambda m, lam=lam: np.full_like(m, lam))
    series(
        f"MBN, end of Eq. 11 (lam = 1 - m/{M0})",
        "tab:red",
        lambda m: noise.eq11_endpoint_lam(m, M0),
        "--",
    )
    ax_mu.plot(
        M_LINE,
        noise.eq10_var_xi_mu_as_printed(M_LINE, 0.75),
        ":",
        color=colors[1],
        label="Eq. 10 as printed, lam = 0.75 (wrong)",
    )
    ax_mu.axhline(float(noise.bn_xi_mu_var(M0)), color="grey", lw=0.8)
    ax_sig.axhline(float(noise.bn_xi_sigma_var(M0)), color="grey", lw=0.8)
    for ax, level in ((ax_mu, noise.bn_xi_mu_var(M0)), (ax_sig, noise.bn_xi_sigma_var(M0))):
        ax.annotate(
            f"BN at m0 = {M0}", (256, float(level) * 1.12), color="grey", ha="right", fontsize=8
        )

    for ax, title in (
        (ax_mu, r"additive noise: Var[$\xi_\mu$]"),
        (ax_sig, r"multiplicative noise: Var[$\xi_\sigma$] (Gaussian)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            [2, 4, 8, 16, 32, 64, 128, 256], labels=["2", "4", "8", "16", "32", "64", "128", "256"]
        )
        ax.set_yscale("log")
        ax.set_xlabel("batch size m")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
    ax_mu.set_ylabel("variance")
    ax_mu.legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "Noise of BN vs stationary MBN: lines = formula (mbn_ref.noise), "
        f"dots = Monte Carlo ± 2 SE ({N_SIM} draws each)",
        fontsize=11,
    )
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=120)
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(main())
