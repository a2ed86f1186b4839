"""The math of BN and MBN, once, as small private functions over per-channel vectors.

Public functions in :mod:`mbn_ref.bn` and :mod:`mbn_ref.mbn` (and the synchronized mode
driven by :mod:`mbn_ref.distributed`) validate their arguments and call these. Derivations:
``docs/derivations/backward.md``.

Shapes: ``x``/``dy`` are full arrays in the compute dtype; every other array is a 1-D
per-channel vector of length C, also in the compute dtype. ``axis`` is the non-negative
channel axis and ``axes`` the reduced ones.

Full-size arrays that a function creates itself are updated in place (``*=``, ``+=``, part of
the Array API standard); arrays passed in by the caller never are.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from ._array import (
    AllSum,
    Array,
    Namespace,
    as_channel,
    device_of,
    is_array,
    keeps_count_on_device,
)


def _as_3d(xp: Namespace, a: Array, axis: int) -> Array:
    """``a`` viewed as ``(P, C, Q)``: the axes before the channel, it, the axes after."""
    shape = tuple(a.shape)
    return xp.reshape(a, (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])))


def channel_dot(
    xp: Namespace, a: Array, b: Array | None, axis: int, axes: tuple[int, ...]
) -> Array:
    """Per-channel ``sum(a * b)`` over the reduced axes (``b=None``: ``sum(a)``).

    One primitive for the reductions of the forward and backward passes. On NumPy it runs as
    ``vecdot`` over ``(P, C, Q)`` views (a BLAS dot per row, several times faster than a
    multi-axis ``sum`` and without the ``a * b`` temporary); elsewhere as ``sum``, which
    PyTorch already does in one fused pass (its ``vecdot`` is slower). Same math, two
    measured routes (``benchmarks/README.md``).
    """
    if array_api_compat.is_numpy_namespace(xp) and a.shape[axis] > 0:
        a3 = _as_3d(xp, a, axis)
        if a3.shape[2] > 1:
            b3 = xp.ones(a3.shape[2], dtype=a.dtype) if b is None else _as_3d(xp, b, axis)
            return xp.sum(xp.vecdot(a3, b3), axis=0)
    return xp.sum(a if b is None else a * b, axis=axes)


def at_least_one(xp: Namespace, count: int | Array) -> int | Array:
    """``max(count, 1)``: the divisor of a mean that is 0 for no values.

    A count is an int, a framework's symbolic int, or a 0-d array when known only at run
    time.
    """
    if is_array(count):
        return xp.maximum(count, xp.ones_like(count))
    return max(count, 1)


def batch_moments(
    xp: Namespace,
    x: Array,
    axis: int,
    axes: tuple[int, ...],
    m: int | Array,
    all_sum: AllSum | None = None,
) -> tuple[int | Array, Array, Array, Array]:
    """Per-channel count, mean, biased variance, and the centered data ``x - mean``.

    Two-pass (mean first, then the mean of squared deviations), which stays accurate for
    offset data where ``E[x^2] - E[x]^2`` loses every digit (docs/spec.md §7). With ``all_sum`` (a
    sum across shards, docs/spec.md §5) both passes are global: the shards first sum their counts
    and sums, then their squared deviations from the global mean, so empty shards contribute
    exact zeros and the result is the single-device two-pass up to summation order. The
    count is then the global ``n``, read on the host (one sync per step, like PyTorch's
    ``SyncBatchNorm``) unless the local count is itself an array (known only at run time) or
    the collective keeps counts on the device (:func:`~mbn_ref._array.keeps_count_on_device`),
    when it stays one; with ``n = 0`` the mean and variance are zeros. ``centered`` is a
    new array the caller may overwrite.
    """
    total = channel_dot(xp, x, None, axis, axes)
    if all_sum is not None:
        local_m = xp.reshape(xp.astype(xp.asarray(m, device=device_of(x)), x.dtype), (1,))
        totals = all_sum(xp.concat([total, local_m]))
        on_device = is_array(m) or keeps_count_on_device(all_sum)
        m = totals[-1] if on_device else round(float(totals[-1]))
        total = totals[:-1]
    divisor = at_least_one(xp, m)
    mean = total / divisor
    centered = x - as_channel(xp, mean, x.ndim, axis)
    squares = channel_dot(xp, centered, centered, axis, axes)
    if all_sum is not None:
        squares = all_sum(squares)
    return m, mean, squares / divisor, centered


def unbiased_factor(xp: Namespace, count: int | Array) -> int | float | Array:
    """Bessel's correction ``m/(m-1)``, for a host or an array count.

    It turns a biased variance over ``m`` values into the unbiased one (``m = 1`` gives 1:
    callers that can check reject it first). The one place of the formula:
    :func:`mbn_ref.conventions.unbiased_factor` validates a host count and calls it.
    """
    return count / at_least_one(xp, count - 1)


def inverse_std(xp: Namespace, var: Array, eps: float) -> Array:
    """``1 / sqrt(var + eps)``: eps inside the square root (docs/spec.md §1)."""
    return 1.0 / xp.sqrt(var + eps)


def ema(old: Array, new: Array, decay: Any, rest: Any = None) -> Array:
    """Exponential moving average with a **decay** (weight on history): ``d*old + (1-d)*new``.

    ``rest`` is ``1 - decay`` when the caller already has it (one operation fewer per
    statistic when ``decay`` is a 0-d array).
    """
    return decay * old + (1 - decay if rest is None else rest) * new


def affine_normalize(
    xp: Namespace,
    centered: Array,
    axis: int,
    shift_mean: Array | None,
    rstd: Array,
    gamma: Array | None,
    beta: Array | None,
) -> Array:
    """``gamma * (x - mean) * rstd + beta`` from data already centered on some other mean.

    ``centered = x - c`` for a per-channel ``c`` and is **overwritten** with the result;
    ``shift_mean = c - mean`` (``None`` when ``c`` is the normalizing mean itself). Folding
    the shift into the per-channel offset keeps every full-size operation on small, centered
    numbers (no cancellation for offset data) and costs two in-place passes.
    """
    ndim = centered.ndim
    scale = rstd if gamma is None else gamma * rstd
    offset = None
    if shift_mean is not None:
        offset = shift_mean * scale
    if beta is not None:
        offset = beta if offset is None else offset + beta
    y = centered
    y *= as_channel(xp, scale, ndim, axis)
    if offset is not None:
        y += as_channel(xp, offset, ndim, axis)
    return y


def normalize_backward(
    xp: Namespace,
    dy: Array,
    x: Array,
    axis: int,
    axes: tuple[int, ...],
    mean: Array,
    rstd: Array,
    gamma: Array | None,
    stats_weight: Array,
    batch_mean: Array | None,
    count: int | Array,
    all_sum: AllSum | None = None,
) -> tuple[Array, Array, Array]:
    """Gradients of ``y = gamma * (x - mean) * rstd + beta`` for BN and MBN (Eq. 13, corrected).

    ``mean``/``rstd`` normalized the batch; they depend on the batch's own statistics through
    ``mean = lam*mu_prev + (1-lam)*mu_B`` and ``var = lam*var_prev + (1-lam)*var_B``, so
    ``stats_weight`` is ``1 - lam`` in training (1 for BN) and 0 when the statistics are
    constants (evaluation). With ``g = gamma*dy`` and ``xhat = (x - mean)*rstd``::

        dx_i = rstd * (g_i - w/m * (sum(g) + (x_i - mu_B) * rstd * sum(g*xhat)))

    Returns ``(dx, sum(dy*xhat), sum(dy))``: the last two are ``dgamma`` and ``dbeta``.
    With ``all_sum`` (synchronized statistics) ``dx`` uses the sums over all shards and the
    global count, while the returned ``dgamma``/``dbeta`` stay this shard's: the
    data-parallel engine reduces them like any parameter gradient.

    Written as ``dx = scale*dy - k1*(x - mean) - k0`` with per-channel ``k1``, ``k0``
    (``docs/derivations/backward.md``): two reductions and one new full-size array besides
    ``dx``.
    """
    ndim = x.ndim
    centered = x - as_channel(xp, mean, ndim, axis)
    sum_dy = channel_dot(xp, dy, None, axis, axes)
    sum_dy_xhat = channel_dot(xp, dy, centered, axis, axes) * rstd
    scale = rstd if gamma is None else gamma * rstd
    dx = dy * as_channel(xp, scale, ndim, axis)
    if batch_mean is not None:
        g_sum, g_xhat_sum = sum_dy, sum_dy_xhat
        if all_sum is not None:
            c = sum_dy.shape[0]
            totals = all_sum(xp.concat([sum_dy, sum_dy_xhat]))
            g_sum, g_xhat_sum = totals[:c], totals[c:]
        k1, k0 = stats_coefficients(
            xp, mean, rstd, scale, stats_weight, batch_mean, g_sum, g_xhat_sum, count
        )
        centered *= as_channel(xp, k1 * rstd, ndim, axis)  # k1 * xhat
        dx -= centered
        dx -= as_channel(xp, k0, ndim, axis)
    return dx, sum_dy_xhat, sum_dy


def stats_coefficients(
    xp: Namespace,
    mean: Array,
    rstd: Array,
    scale: Array,
    stats_weight: Array,
    batch_mean: Array,
    sum_dy: Array,
    sum_dy_xhat: Array,
    count: int | Array,
) -> tuple[Array, Array]:
    """The part of ``dx`` that flows through the batch statistics ``mu_B`` and ``var_B``.

    ``(x_i - mu_B) * rstd = xhat_i + (mean - mu_B) * rstd``, so the term is
    ``k1 * xhat_i + k0`` with per-channel ``k1 = w*scale*sum(dy*xhat)/m`` and
    ``k0 = w*scale*(sum(dy) + (mean - mu_B)*rstd*sum(dy*xhat))/m``. ``count`` and the sums are
    global ones in synchronized BN.
    """
    coef = stats_weight * scale / at_least_one(xp, count)
    k1 = coef * sum_dy_xhat
    k0 = coef * (sum_dy + (mean - batch_mean) * rstd * sum_dy_xhat)
    return k1, k0


def kernel_terms(
    xp: Namespace,
    mean: Array,
    rstd: Array,
    gamma: Array | None,
    stats_weight: Array,
    batch_mean: Array,
    count: int | Array,
) -> tuple[Array, Array, Array, Array, Array]:
    """``dx`` through a fused BN training-backward kernel ``K`` and one per-channel correction.

    ``K(dy; mean, r, w) = w*r*(dy - S0/m - xhat*S1/m)`` with ``xhat = (x - mean)*r``,
    ``S0 = sum(dy)`` and ``S1 = sum(dy*xhat)`` is BN's gradient for the statistics given to
    it. With ``s = gamma*rstd``, ``w = stats_weight`` and ``o = sqrt(w)``, called with
    ``r = o*rstd`` and the weight ``gamma/o`` it gives :func:`normalize_backward`'s
    ``dx = s*dy - k1*xhat - k0`` except for a per-channel constant::

        dx = K(dy; mean, o*rstd, gamma/o) + (1 - w)*s/m * S0 + o*s*rstd*(mu_B - mean)/m * S1

    and ``dgamma = S1/o`` (the kernel's ``S1`` is over its ``xhat = o*(x - mean)*rstd``).
    Returns ``(o*rstd, gamma/o, S0 scale, S1 scale, o)``. ``o`` is ``sqrt(w + eps**2)``
    for the dtype's ``eps``: ``w`` itself wherever ``w > eps`` (the sum rounds to ``w``),
    and no division by zero at ``w = 0`` (``lam = 1``), where the terms it scales then fall
    below the dtype's resolution.
    """
    o = xp.sqrt(stats_weight + xp.finfo(rstd.dtype).eps ** 2)
    kernel_rstd = o * rstd
    weight = (xp.ones_like(rstd) if gamma is None else gamma) / o
    per_value = (rstd if gamma is None else gamma * rstd) / at_least_one(xp, count)  # s/m
    sum_dy_scale = (1 - stats_weight) * per_value
    sum_dy_xhat_scale = per_value * (batch_mean - mean) * kernel_rstd
    return kernel_rstd, weight, sum_dy_scale, sum_dy_xhat_scale, o
