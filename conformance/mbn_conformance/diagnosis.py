"""What a failed running statistic says about the implementation's convention.

When a state field disagrees after a training step, the implementation's own consecutive
states tell which decay it applied: an update ``new = w*old + (1 - w)*batch`` has the
history weight

    w = (new - batch) / (old - batch)          (per channel)

with ``batch`` the step's statistic computed here in float64 from the step's inputs (all
shards together). :func:`decay_diagnosis` puts it beside the expected decay, so a swapped or
doubly complemented convention reads as ``"history weight 0.1, expected 0.9"`` rather than as
a maximum error; when the weight is right it says what else differs (the estimator, the
batch statistic).

>>> old, batch = np.array([0.0, 1.0]), np.array([1.0, 3.0])
>>> new = 0.1 * old + 0.9 * batch                      # decay 0.9 used as an update rate
>>> decay_diagnosis("step 0 running_mean", old, new, batch, 0.9)
'step 0 running_mean: history weight 0.1, expected 0.9 (its complement: a decay taken for an update rate, or the reverse)'
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STATISTICS = ("running_mean", "running_var", "moving_mean", "moving_var")
"""The state fields that are exponential averages of batch statistics."""
AGREE = 1e-3
"""Two history weights closer than this are the same decay (states may be float32)."""


def batch_moments(xs: Sequence[np.ndarray], axis: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(m, mean, biased variance)`` per channel over every shard, in float64.

    With ``m = 0`` the moments are NaN.
    """
    nd = xs[0].ndim
    ax = axis % nd
    flat = [np.moveaxis(np.asarray(x, dtype=np.float64), ax, -1) for x in xs]
    c = flat[0].shape[-1]
    values = np.concatenate([f.reshape(-1, c) for f in flat])
    m = values.shape[0]
    if m == 0:
        nan = np.full(c, np.nan)
        return 0, nan, nan
    mean = values.mean(axis=0)
    return m, mean, ((values - mean) ** 2).mean(axis=0)


def history_weights(old: np.ndarray, new: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """``(new - batch) / (old - batch)`` on the channels where ``old`` and ``batch`` differ.

    Channels where they (nearly) coincide say nothing about the weight and are left out.
    """
    o, n, b = (np.asarray(v, dtype=np.float64).ravel() for v in (old, new, batch))
    scale = np.maximum(1.0, np.maximum(np.abs(o), np.abs(b)))
    ok = np.isfinite(o) & np.isfinite(n) & np.isfinite(b) & (np.abs(o - b) > 1e-4 * scale)
    return (n[ok] - b[ok]) / (o[ok] - b[ok])


def _weight_text(w: np.ndarray) -> str:
    lo, hi = float(np.min(w)), float(np.max(w))
    if hi - lo <= 10 * AGREE:
        return f"{float(np.median(w)):.3g}"
    return f"{lo:.3g} to {hi:.3g} across channels"


def decay_diagnosis(
    what: str,
    old: np.ndarray,
    new: np.ndarray,
    batch: np.ndarray,
    expected: float,
    alternative: tuple[str, np.ndarray] | None = None,
    convention: str = "declared",
) -> str | None:
    """One line on the decay an update implies, or ``None`` when the states say nothing.

    Parameters
    ----------
    what : str
        The quantity, e.g. ``"step 3 running_var"``.
    old, new : ndarray
        The implementation's state field before and after the step.
    batch : ndarray
        The step's batch statistic, float64, under the expected convention.
    expected : float
        The history weight the step asks for (the decay).
    alternative : (str, ndarray), optional
        Another convention's batch statistic and its name (the other estimator): when the
        update fits it with the expected weight, the line says so.
    convention : str
        The name of the expected convention, for that line.

    Returns
    -------
    str or None
        The diagnosis: the implied weight beside the expected one when the update has one
        weight; otherwise how far the batch statistic it used is from the float64 one.
    """
    w = history_weights(old, new, batch)
    if w.size == 0:
        return None
    if alternative is not None and not np.all(np.abs(w - expected) <= AGREE):
        name, other = alternative
        wa = history_weights(old, new, other)
        if wa.size and bool(np.all(np.abs(wa - expected) <= AGREE)):
            return (
                f"{what}: updated with the {name} batch statistic, not the {convention} one "
                f"(history weight {_weight_text(wa)} as expected)"
            )
    single = float(np.max(w) - np.min(w)) <= 10 * AGREE
    median = float(np.median(w))
    if single and abs(median - expected) > AGREE:
        text = f"{what}: history weight {_weight_text(w)}, expected {expected:.3g}"
        if abs(median - (1.0 - expected)) <= AGREE:
            text += " (its complement: a decay taken for an update rate, or the reverse)"
        elif abs(median - 1.0) <= AGREE:
            text += " (the statistic did not move)"
        elif abs(median) <= AGREE:
            text += " (replaced by the batch statistic)"
        return text
    if expected >= 1.0:
        return None
    start = (
        f"{what}: history weight {expected:.3g} as expected"
        if single
        else f"{what}: no single history weight ({_weight_text(w)}); with the expected "
        f"{expected:.3g}"
    )
    b = np.asarray(batch, dtype=np.float64).ravel()
    o = np.asarray(old, dtype=np.float64).ravel()
    implied = (np.asarray(new, dtype=np.float64).ravel() - expected * o) / (1.0 - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = float(np.nanmax(np.abs(implied - b) / np.maximum(np.abs(b), 1e-300)))
    return (
        f"{start}, the batch statistic it used differs from the float64 one by up to "
        f"{rel:.2g} (relative)"
    )


def unchanged_diagnosis(what: str, old: np.ndarray, new: np.ndarray, when: str) -> str | None:
    """A line when a field moved where it must not (an empty batch, an evaluation step)."""
    o = np.asarray(old, dtype=np.float64)
    n = np.asarray(new, dtype=np.float64)
    if o.shape == n.shape and np.array_equal(o, n, equal_nan=True):
        return None
    return f"{what}: changed by {when} (expected unchanged)"
