"""Independent float64 references for BN and MBN, written from docs/spec.md §2-3 without the core.

``forward_np`` is plain NumPy (forward and state update, one step); ``forward_torch`` is plain
PyTorch, differentiable by autograd (the previous statistics are constants). Neither imports
``mbn_ref``: they are what the core is checked against.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def forward_np(
    x: np.ndarray,
    prev: dict[str, np.ndarray] | None,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    *,
    lam: float = 0.0,
    tau: float | None = 0.9,
    eps: float = 1e-5,
    axis: int = 1,
    training: bool = True,
    estimator: str = "biased",
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """One MBN step in float64 (``lam = 0``: BN with ``decay = tau``).

    ``prev`` holds ``moving_mean``, ``moving_var``, ``running_mean``, ``running_var`` and
    ``n`` (updates so far); ``tau=None`` is the cumulative average.
    """
    x = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x.ndim, axis)
    cs = channel_shape(x.ndim, axis)
    if training or prev is None:
        m = x.size // x.shape[axis]
        mu_b = x.mean(axis=axes)
        var_b = ((x - mu_b.reshape(cs)) ** 2).mean(axis=axes)
        if prev is None:
            mu, var, new = mu_b, var_b, None
        else:
            mu = lam * prev["moving_mean"] + (1 - lam) * mu_b
            var = lam * prev["moving_var"] + (1 - lam) * var_b
            d = prev["n"] / (prev["n"] + 1) if tau is None else tau
            inf_var = var_b * m / (m - 1) if estimator == "unbiased" else var_b
            new = {
                "moving_mean": mu,
                "moving_var": var,
                "running_mean": d * prev["running_mean"] + (1 - d) * mu_b,
                "running_var": d * prev["running_var"] + (1 - d) * inf_var,
                "n": prev["n"] + 1,
            }
    else:
        mu, var, new = prev["running_mean"], prev["running_var"], prev
    y = (x - mu.reshape(cs)) / np.sqrt(var.reshape(cs) + eps)
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(cs)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(cs)
    return y, new


def fresh_state(c: int) -> dict[str, Any]:
    return {
        "moving_mean": np.zeros(c),
        "moving_var": np.ones(c),
        "running_mean": np.zeros(c),
        "running_var": np.ones(c),
        "n": 0,
    }


def forward_torch(
    x: Any,
    gamma: Any,
    beta: Any,
    prev_mean: Any,
    prev_var: Any,
    *,
    lam: float,
    eps: float,
    axis: int,
    training: bool,
) -> Any:
    """Algorithm 1's normalization in plain torch: autograd differentiates it.

    Training: ``mu = lam*prev_mean + (1-lam)*mu_B`` (and ``var`` with the biased ``var_B``);
    evaluation: ``prev_mean``/``prev_var`` normalize. ``prev_*`` are constants.
    """
    import torch

    dims = reduce_axes(x.ndim, axis)
    cs = channel_shape(x.ndim, axis)
    if training:
        mu_b = x.mean(dim=dims)
        var_b = ((x - mu_b.reshape(cs)) ** 2).mean(dim=dims)
        mu = lam * prev_mean + (1 - lam) * mu_b
        var = lam * prev_var + (1 - lam) * var_b
    else:
        mu, var = prev_mean, prev_var
    y = (x - mu.reshape(cs)) / torch.sqrt(var.reshape(cs) + eps)
    if gamma is not None:
        y = y * gamma.reshape(cs)
    if beta is not None:
        y = y + beta.reshape(cs)
    return y
