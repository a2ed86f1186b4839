"""MBN (docs/spec.md §3, Algorithm 1) against the float64 reference over trajectories, and
``lam = 0`` reproducing BN exactly."""

from __future__ import annotations

import numpy as np
import pytest
from _reference import forward_np, fresh_state

import mbn_ref as mr

LAYOUTS = {
    "NC": ((5, 3), 1),
    "NCL": ((2, 3, 4), 1),
    "NCHW": ((2, 3, 2, 3), 1),
    "NCDHW": ((2, 3, 2, 2, 2), 1),
    "NHWC": ((2, 2, 3, 3), -1),
}
LAM_SCHEDULE = [0.0, 0.25, 0.5, 0.9375, 1.0, 0.5]


def _batches(shape, steps, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(loc + rng.uniform(-2, 2), rng.uniform(0.5, 3), size=shape) for _ in range(steps)
    ]


def _check_state(state, ref, rtol=1e-13, msg=""):
    for name in ("moving_mean", "moving_var", "running_mean", "running_var"):
        np.testing.assert_allclose(
            getattr(state, name), ref[name], rtol=rtol, atol=rtol, err_msg=f"{name} {msg}"
        )
    assert int(state.num_batches_tracked) == ref["n"]


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("tau", [0.9, None], ids=["tau0.9", "cumulative"])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mbn_trajectory_matches_reference(layout, eps, tau, estimator):
    shape, axis = LAYOUTS[layout]
    c = shape[axis]
    gamma, beta = np.linspace(-1.0, 2.0, c), np.linspace(0.5, -0.5, c)
    state, ref = mr.init_state(c), fresh_state(c)
    kw = dict(tau=tau, eps=eps, axis=axis, estimator=estimator)
    for step, (x, lam) in enumerate(zip(_batches(shape, 6, seed=0), LAM_SCHEDULE, strict=True)):
        y, state, _ = mr.mbn_forward(x, state, gamma, beta, lam=lam, **kw)
        y_ref, ref = forward_np(x, ref, gamma, beta, lam=lam, **kw)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12, err_msg=f"step {step}")
        _check_state(state, ref, msg=f"step {step}")
    x = _batches(shape, 1, seed=1)[0]
    y, same, _ = mr.mbn_forward(x, state, gamma, beta, training=False, **kw)
    y_ref, _ = forward_np(x, ref, gamma, beta, training=False, **kw)
    assert same is state
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


def test_mbn_normalizes_with_updated_not_previous_statistics():
    """Algorithm 1 normalizes with the moving statistics *after* this batch's update."""
    x = _batches((4, 2), 1, seed=2, loc=5.0)[0]
    st = mr.init_state(2)
    y, new, _ = mr.mbn_forward(x, st, lam=0.5)
    mu = 0.5 * 0 + 0.5 * x.mean(0)
    var = 0.5 * 1 + 0.5 * x.var(0)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5), rtol=1e-14)
    np.testing.assert_allclose(new.moving_mean, mu, rtol=1e-15)
    with_previous = (x - 0.0) / np.sqrt(1 + 1e-5)
    assert np.max(np.abs(y - with_previous)) > 1.0


def test_mbn_lam_one_freezes_moving_statistics():
    st = mr.init_state(3)
    st = st._replace(moving_mean=np.array([1.0, 2.0, 3.0]), moving_var=np.array([4.0, 1.0, 2.0]))
    x = _batches((6, 3), 1, seed=3)[0]
    y, new, ctx = mr.mbn_forward(x, st, lam=1.0, tau=0.5)
    np.testing.assert_array_equal(new.moving_mean, st.moving_mean)
    np.testing.assert_array_equal(new.moving_var, st.moving_var)
    np.testing.assert_allclose(new.running_mean, 0.5 * x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(
        y, (x - st.moving_mean) / np.sqrt(st.moving_var + 1e-5), atol=1e-14, rtol=1e-14
    )
    dy = np.random.default_rng(0).normal(size=x.shape)
    dx, _, _ = mr.mbn_backward(dy, ctx)
    np.testing.assert_allclose(dx, dy / np.sqrt(st.moving_var + 1e-5), rtol=1e-14)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_mbn_lam_zero_is_bn(layout, estimator):
    """docs/spec.md §3: lam = 0 makes MBN exactly BN: outputs, gradients, inference statistics."""
    shape, axis = LAYOUTS[layout]
    c = shape[axis]
    gamma, beta = np.linspace(0.5, 1.5, c), np.linspace(-1, 1, c)
    rng = np.random.default_rng(4)
    mbn_state, bn_state = mr.init_state(c), mr.init_bn_state(c)
    for x in _batches(shape, 5, seed=4):
        dy = rng.normal(size=shape)
        y_m, mbn_state, ctx_m = mr.mbn_forward(
            x, mbn_state, gamma, beta, lam=0.0, tau=0.85, axis=axis, estimator=estimator
        )
        y_b, bn_state, ctx_b = mr.bn_forward(
            x, bn_state, gamma, beta, decay=0.85, axis=axis, estimator=estimator
        )
        np.testing.assert_allclose(y_m, y_b, rtol=1e-15, atol=1e-15)
        for gm, gb in zip(mr.mbn_backward(dy, ctx_m), mr.bn_backward(dy, ctx_b), strict=True):
            np.testing.assert_allclose(gm, gb, rtol=1e-13, atol=1e-13)
        np.testing.assert_array_equal(mbn_state.running_mean, bn_state.running_mean)
        np.testing.assert_array_equal(mbn_state.running_var, bn_state.running_var)
        np.testing.assert_array_equal(mbn_state.num_batches_tracked, bn_state.num_batches_tracked)
    x = _batches(shape, 1, seed=5)[0]
    y_m = mr.mbn_forward(x, mbn_state, gamma, beta, axis=axis, training=False)[0]
    y_b = mr.bn_forward(x, bn_state, gamma, beta, axis=axis, training=False)[0]
    np.testing.assert_array_equal(y_m, y_b)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9375])
def test_mbn_offset_data_float64(lam):
    """Offset data (mean 1e4) in float64 stays at the reference's accuracy."""
    shape = (3, 2, 4, 4)
    state, ref = mr.init_state(2), fresh_state(2)
    state = state._replace(moving_mean=np.full(2, 1e4))
    ref["moving_mean"] = np.full(2, 1e4)
    for x in _batches(shape, 5, seed=6, loc=1e4):
        y, state, _ = mr.mbn_forward(x, state, lam=lam)
        y_ref, ref = forward_np(x, ref, lam=lam)
        np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
        _check_state(state, ref, rtol=1e-11)


def test_default_mbn_is_bn_with_torch_default_momentum():
    """The documented defaults (lam=0, tau=0.9) make MBN BN with decay 0.9."""
    x = _batches((4, 3), 1, seed=7)[0]
    y_m, st_m, _ = mr.mbn_forward(x, mr.init_state(3))
    y_b, st_b, _ = mr.bn_forward(x, mr.init_bn_state(3))
    np.testing.assert_array_equal(y_m, y_b)
    np.testing.assert_array_equal(st_m.running_mean, st_b.running_mean)
    np.testing.assert_allclose(st_m.running_mean, 0.1 * x.mean(0), rtol=1e-15)
