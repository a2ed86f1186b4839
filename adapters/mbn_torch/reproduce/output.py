"""The outputs of ``mbn-ref reproduce``: the table, the JSON report and the figure.

>>> from mbn_torch.reproduce.experiment import RunResult
>>> runs = [
...     RunResult("mlp", "bn", 2, s, a, a, 0.1, 10, 1.0) for s, a in ((0, 0.70), (1, 0.72))
... ]
>>> summarize(runs)[0]["mean"], summarize(runs)[0]["n"]
(0.71, 2)
>>> print(format_table(runs))  # doctest: +NORMALIZE_WHITESPACE
test accuracy (%), mean ± std over seeds
model  normalization       m=2
mlp    BN            71.0 ± 1.4
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mbn_ref import noise

from .experiment import Config, RunResult
from .models import NORM_LABELS, NORMS

__all__ = [
    "SAME_TAU_NOTE",
    "format_table",
    "make_report",
    "plot",
    "summarize",
    "versions",
    "write_json",
]

SAME_TAU_NOTE = (
    "BN and MBN use the same inference decay tau (Eq. 12, from the batch size) for their "
    "inference statistics, so they differ only in how they normalize during training."
)


def summarize(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Mean and standard deviation (``ddof=1``; 0 for one seed) of the test accuracy.

    One entry per ``(model, norm, batch_size)``, in the order first seen, with ``mean``,
    ``std`` (fractions), ``n`` (seeds) and ``seeds``.
    """
    groups: dict[tuple[str, str, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.model, r.norm, r.batch_size), []).append(r)
    out = []
    for (model, norm, m), runs in groups.items():
        acc = np.array([r.test_accuracy for r in runs], dtype=np.float64)
        std = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
        out.append(
            {
                "model": model,
                "norm": norm,
                "batch_size": m,
                "mean": round(float(acc.mean()), 12),
                "std": std,
                "n": len(runs),
                "seeds": [r.seed for r in runs],
            }
        )
    return out


def format_table(results: Sequence[RunResult]) -> str:
    """The table of test accuracy (%), mean ± std over seeds, per normalization and batch size."""
    summary = summarize(results)
    sizes = sorted({s["batch_size"] for s in summary})
    rows: dict[tuple[str, str], dict[int, str]] = {}
    for s in summary:
        cell = f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
        rows.setdefault((s["model"], s["norm"]), {})[s["batch_size"]] = cell
    order = sorted(rows, key=lambda k: (k[0] != "mlp", k[0], NORMS.index(k[1])))
    header = ["model", "normalization", *[f"m={m}" for m in sizes]]
    body = [
        [model, NORM_LABELS[norm], *[rows[(model, norm)].get(m, "-") for m in sizes]]
        for model, norm in order
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    return "\n".join(
        ["test accuracy (%), mean ± std over seeds", line(header), *[line(r) for r in body]]
    )


def versions(framework: str = "torch") -> dict[str, str]:
    """The versions of Python, the platform and the packages the experiment uses.

    With ``framework="keras"``, TensorFlow's and Keras' too.
    """
    import importlib.metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    dists = ["mbn-ref", "torch", "numpy", "scikit-learn", "scipy", "matplotlib", "tqdm"]
    if framework == "keras":
        dists += ["tensorflow", "tensorflow-cpu", "keras"]
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def make_report(
    config: Config,
    results: Sequence[RunResult],
    *,
    data: dict[str, Any],
    seconds: float,
    argv: Sequence[str],
    framework: str = "torch",
) -> dict[str, Any]:
    """The JSON report: configuration, versions, data, every run, the summary, statistics.

    ``data`` is the data set's record (its ``describe()``: name, sizes, preprocessing).
    """
    return {
        "command": "mbn-ref reproduce",
        "argv": list(argv),
        "framework": framework,
        "configuration": config.to_dict(),
        "notes": [SAME_TAU_NOTE, "test_accuracy is a fraction in [0, 1]"],
        "versions": versions(framework),
        "data": data,
        "results": [r.record() for r in results],
        "summary": summarize(results),
        "batch_statistics": [
            {
                "model": r.model,
                "norm": r.norm,
                "batch_size": r.batch_size,
                "seed": r.seed,
                "lam_last_epoch": r.lam[-1] if r.lam else 0.0,
                **r.batch_statistics,
            }
            for r in results
            if r.batch_statistics is not None
        ],
        "seconds": seconds,
    }


def write_json(report: dict[str, Any], path: Path | TextIO) -> None:
    """Write ``report`` to ``path`` or an open text stream (NaN as ``null``: strict JSON)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(report), indent=1) + "\n"
    if isinstance(path, Path):
        path.write_text(text, encoding="utf-8")
    else:
        path.write(text)
        path.flush()


# ------------------------------------------------------------------------------ figure


def _gamma_pdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    """The density of the gamma law with this mean and variance (moment-matched)."""
    from scipy import stats

    shape, scale = mean**2 / var, var / mean
    return np.asarray(stats.gamma.pdf(x, shape, scale=scale))


def _normal_pdf(x: np.ndarray, var: float) -> np.ndarray:
    return np.exp(-(x**2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def _noise_panels(ax_mu: Any, ax_sigma: Any, records: Sequence[RunResult]) -> None:
    """Fig. 1 after the paper: observed batch statistics against the noise model."""
    colors = {"bn": "tab:red", "mbn": "tab:blue"}
    for r in records:
        st = r.batch_statistics
        assert st is not None
        m = st["count"]
        means = np.array(st["mean"])
        variances = np.array(st["var"])
        mu = means.mean()  # the population, pooled over the last epoch
        sigma2 = variances.mean() * m / (m - 1)
        if r.norm == "bn":
            xi_mu = (means - mu) / math.sqrt(sigma2)
            xi_sigma = variances / sigma2
            var_mu = float(noise.bn_xi_mu_var(m))
            mean_s, var_s = float(noise.bn_xi_sigma_mean(m)), float(noise.bn_xi_sigma_var(m))
            label = f"BN: batch statistics (m={m})"
        else:
            lam = r.lam[-1] if r.lam else 0.0
            xi_mu = (np.array(st["moving_mean"]) - mu) / math.sqrt(sigma2)
            xi_sigma = np.array(st["moving_var"]) / sigma2
            var_mu = float(noise.mbn_xi_mu_var(m, lam))
            mean_s = float(noise.mbn_xi_sigma_mean(m, lam))
            var_s = float(noise.mbn_xi_sigma_var(m, lam))
            label = f"MBN: moving statistics (lam={lam:.3f})"
        c = colors[r.norm]
        span = 4 * math.sqrt(float(noise.bn_xi_mu_var(m)))
        ax_mu.hist(
            xi_mu, bins=60, range=(-span, span), density=True, alpha=0.4, color=c, label=label
        )
        grid = np.linspace(-span, span, 400)
        ax_mu.plot(grid, _normal_pdf(grid, var_mu), color=c, lw=1.5)
        top = float(np.quantile(variances / sigma2, 0.98)) if r.norm == "bn" else 3.0
        ax_sigma.hist(
            xi_sigma,
            bins=60,
            range=(0, max(top, 2.0)),
            density=True,
            alpha=0.4,
            color=c,
            label=label,
        )
        sgrid = np.linspace(1e-3, max(top, 2.0), 400)
        ax_sigma.plot(sgrid, _gamma_pdf(sgrid, mean_s, var_s), color=c, lw=1.5)
    first = records[0]
    ax_mu.set_title(
        f"Fig. 1 after the paper: {first.model.upper()}, first norm layer, channel 0, last epoch"
        f"\n(mean - mu)/sigma; lines: the noise model (mbn_ref.noise)",
        fontsize=9,
    )
    ax_mu.set_xlabel("standardized batch mean")
    ax_mu.set_ylabel("density")
    ax_mu.legend(fontsize=7)
    ax_sigma.set_title(
        "variance / sigma²; lines: the noise model (moment-matched gamma)",
        fontsize=9,
    )
    ax_sigma.set_xlabel("standardized batch variance")
    ax_sigma.set_ylim(0, 3)
    ax_sigma.legend(fontsize=7)


def plot(results: Sequence[RunResult], path: Path, *, data_name: str = "digits") -> None:
    """The figure: Fig. 4 after the paper, ``lam(t)`` and ``tau``, and Fig. 1 after it.

    Top row: test accuracy against batch size per normalization (one panel per model),
    then MBN's ``lam`` per epoch and the inference decay ``tau`` per batch size. Bottom
    row (when BN/MBN batch statistics were recorded): their distributions against the
    noise model's. ``data_name`` goes into the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    models = sorted({r.model for r in results}, key=lambda m: m != "mlp")
    recorded = [r for r in results if r.batch_statistics is not None]
    recorded = [r for r in recorded if r.model == recorded[0].model] if recorded else []
    ncols = max(len(models) + 1, 2)
    nrows = 2 if recorded else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        for norm in NORMS:
            pts = sorted(
                (s["batch_size"], s["mean"], s["std"])
                for s in summary
                if s["model"] == model and s["norm"] == norm
            )
            if pts:
                m, mean, std = (np.array(v) for v in zip(*pts, strict=True))
                ax.errorbar(
                    m, 100 * mean, yerr=100 * std, marker="o", capsize=3, label=NORM_LABELS[norm]
                )
        ax.set_xscale("log", base=2)
        sizes = sorted({s["batch_size"] for s in summary})
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("batch size m")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Fig. 4 after the paper: {model.upper()} on {data_name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][len(models)]
    seen: set[int] = set()
    for r in results:
        if r.lam is not None and r.batch_size not in seen:
            seen.add(r.batch_size)
            (line,) = ax.plot(
                range(1, len(r.lam) + 1), r.lam, marker=".", label=f"lam(t), m={r.batch_size}"
            )
            if r.inference_decay is not None:
                ax.axhline(
                    r.inference_decay,
                    ls="--",
                    color=line.get_color(),
                    lw=1,
                    label=f"tau, m={r.batch_size}",
                )
    ax.set_xlabel("epoch t")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("decay (weight on history)")
    ax.set_title("MBN's lam(t) (Eq. 11) and the inference decay tau (Eq. 12)", fontsize=10)
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=7)
    for extra in axes[0][len(models) + 1 :]:
        extra.axis("off")
    if recorded:
        _noise_panels(axes[1][0], axes[1][1], recorded)
        for extra in axes[1][2:]:
            extra.axis("off")
    fig.suptitle(SAME_TAU_NOTE, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
