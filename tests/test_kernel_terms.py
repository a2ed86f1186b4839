"""``mbn_from_moments`` and ``kernel_terms``: MBN through a framework's fused BN kernels.

BN's kernels are emulated here in float64 NumPy as PyTorch computes them (the batch's
moments; evaluation-mode normalization with given statistics; ``native_batch_norm_backward``
in training mode with given statistics), and with the core's state, context and terms they
must give the core's MBN forward and backward to 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest

import mbn_ref as mr

EPS = 1e-5


def _bn_eval_kernel(x, mean, var, gamma, beta):
    """Normalization with given statistics (channel vectors broadcast)."""
    y = (x - mean) / np.sqrt(var + EPS)
    y = y if gamma is None else y * gamma
    return y if beta is None else y + beta


def _bn_backward_kernel(dy, x, mean, rstd, weight, axes):
    """BN's training gradient for the statistics given, sum(dy*xhat) and sum(dy)."""
    xhat = (x - mean) * rstd
    m = x.size // mean.size
    sum_dy = dy.sum(axis=axes, keepdims=True)
    sum_dy_xhat = (dy * xhat).sum(axis=axes, keepdims=True)
    return weight * rstd * (dy - sum_dy / m - xhat * sum_dy_xhat / m), sum_dy_xhat, sum_dy


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


CASES = [
    ((8, 3), 0.3, True, True),
    ((4, 3, 5, 6), 0.9, True, False),
    ((2, 3, 4), 0.5, False, True),
    ((6, 2), 0.0, False, False),  # BN: the terms vanish into the kernels
    ((6, 2), 1.0, True, True),  # history alone: no gradient through the batch
]


@pytest.mark.parametrize(("shape", "lam", "affine_scale", "affine_shift"), CASES)
def test_the_kernels_and_the_terms_give_the_cores_mbn(shape, lam, affine_scale, affine_shift):
    rng = np.random.default_rng(len(shape) * 10 + int(lam * 10))
    c = shape[1]
    axes = tuple(i for i in range(len(shape)) if i != 1)
    x = rng.normal(3.0, 2.0, size=shape)
    dy = rng.normal(size=shape)
    gamma = rng.normal(1.0, 0.3, size=c) if affine_scale else None
    beta = rng.normal(size=c) if affine_shift else None
    state = mr.init_state(c)._replace(
        moving_mean=rng.normal(size=c), moving_var=rng.uniform(0.5, 2.0, size=c)
    )
    y_core, state_core, ctx_core = mr.mbn_forward(
        x, state, gamma, beta, lam=lam, tau=0.8, estimator="unbiased"
    )
    dx_core, dgamma_core, dbeta_core = mr.backward(dy, ctx_core)

    new_state, ctx = mr.mbn_from_moments(
        x, state, gamma, beta, x.mean(axis=axes), x.var(axis=axes),
        lam=lam, tau=0.8, estimator="unbiased",
    )  # fmt: skip
    for a, e in zip(new_state, state_core, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)
    ch = [None if v is None else _channel(v, x.ndim) for v in (gamma, beta)]
    y = _bn_eval_kernel(
        x, _channel(new_state.moving_mean, x.ndim), _channel(new_state.moving_var, x.ndim), *ch
    )
    np.testing.assert_allclose(y, y_core, rtol=1e-12, atol=1e-12)
    t = mr.kernel_terms(ctx)
    k, s1, s0 = _bn_backward_kernel(
        dy, x, *(_channel(v, x.ndim) for v in (ctx.mean, t.rstd, t.weight)), axes
    )
    dx = k + _channel(t.sum_dy_scale, x.ndim) * s0 + _channel(t.sum_dy_xhat_scale, x.ndim) * s1
    np.testing.assert_allclose(dx, dx_core, rtol=1e-11, atol=1e-12)
    if gamma is not None:
        np.testing.assert_allclose(s1.ravel() / t.rstd_scale, dgamma_core, rtol=1e-11, atol=1e-12)
    if beta is not None:
        np.testing.assert_allclose(s0.ravel(), dbeta_core, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [None, 0.0, 0.99])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_from_moments_is_the_forward_training_step(tau, estimator):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 4))
    state = mr.init_state(4)
    for _ in range(3):
        _, expected, ctx_f = mr.mbn_forward(x, state, lam=0.6, tau=tau, estimator=estimator)
        new, ctx = mr.mbn_from_moments(
            x, state, None, None, x.mean(0), x.var(0), lam=0.6, tau=tau, estimator=estimator
        )
        for a, e in zip(new, expected, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-13)
        for name in ("mean", "rstd", "stats_weight", "batch_mean"):
            np.testing.assert_allclose(getattr(ctx, name), getattr(ctx_f, name), rtol=1e-13)
        assert ctx.count == ctx_f.count == 5
        state = new


def test_from_moments_refuses_what_the_forward_refuses():
    x = np.ones((1, 2))
    with pytest.raises(ValueError, match="lam"):
        mr.mbn_from_moments(x, mr.init_state(2), None, None, x[0], x[0] * 0, lam=1.5)
    with pytest.raises(ValueError, match="unbiased"):
        mr.mbn_from_moments(
            x, mr.init_state(2), None, None, x[0], x[0] * 0, lam=0.5, estimator="unbiased"
        )
    with pytest.raises(ValueError, match=r"channels|shape"):
        mr.mbn_from_moments(np.ones((2, 3)), mr.init_state(2), None, None, x[0], x[0], lam=0.5)


def test_terms_refuse_contexts_the_kernels_cannot_serve():
    x = np.random.default_rng(0).normal(size=(4, 2))
    _, _, eval_ctx = mr.mbn_forward(x, mr.init_state(2), training=False)
    with pytest.raises(ValueError, match="training step"):
        mr.kernel_terms(eval_ctx)
    _, _, sync_ctx = mr.mbn_forward(x, mr.init_state(2), lam=0.5, all_sum=lambda a: a)
    with pytest.raises(ValueError, match="synchronized"):
        mr.kernel_terms(sync_ctx)
