"""BN (docs/spec.md §2) against PyTorch's own batch norm over multi-step trajectories, and BN's
invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference import forward_np, fresh_state

import mbn_ref as mr
from mbn_ref.conventions import decay_from_torch

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _batches(shape, steps, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 3), size=shape).astype(dtype)
        for _ in range(steps)
    ]


def _np(t):
    return t.detach().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0])
def test_bn_matches_torch_functional_trajectory(momentum, dtype):
    c = 3
    gamma = np.array([1.5, -0.5, 0.8], dtype=NP_DTYPE[dtype])
    beta = np.array([0.1, 0.2, -0.3], dtype=NP_DTYPE[dtype])
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    state = mr.init_bn_state(c, dtype=NP_DTYPE[dtype])
    decay = decay_from_torch(momentum)
    for x in _batches((4, c, 3, 5), 6, seed=0, dtype=NP_DTYPE[dtype]):
        xt = torch.tensor(x)
        y_t = F.batch_norm(
            xt,
            rm,
            rv,
            torch.tensor(gamma),
            torch.tensor(beta),
            training=True,
            momentum=momentum,
            eps=1e-5,
        )
        y, state, _ = mr.bn_forward(
            x, state, gamma, beta, decay=decay, eps=1e-5, estimator="unbiased"
        )
        assert y.dtype == NP_DTYPE[dtype] and state.running_var.dtype == NP_DTYPE[dtype]
        np.testing.assert_allclose(y, _np(y_t), **TOL[dtype])
        np.testing.assert_allclose(state.running_mean, _np(rm), **TOL[dtype])
        np.testing.assert_allclose(state.running_var, _np(rv), **TOL[dtype])
    assert int(state.num_batches_tracked) == 6
    # evaluation with the running statistics
    x = _batches((5, c, 2, 2), 1, seed=9, dtype=NP_DTYPE[dtype])[0]
    y_t = F.batch_norm(
        torch.tensor(x), rm, rv, torch.tensor(gamma), torch.tensor(beta), training=False, eps=1e-5
    )
    y, same, _ = mr.bn_forward(x, state, gamma, beta, training=False, eps=1e-5)
    assert same is state
    np.testing.assert_allclose(y, _np(y_t), **TOL[dtype])


def test_torch_momentum_point1_is_decay_point9():
    """docs/spec.md §1: PyTorch's momentum is an update rate; 0.1 means our decay 0.9."""
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    state = mr.init_bn_state(2)
    for x in _batches((8, 2), 5, seed=1):
        F.batch_norm(torch.tensor(x), rm, rv, training=True, momentum=0.1)
        state = mr.bn_forward(x, state, decay=0.9, estimator="unbiased")[1]
    np.testing.assert_allclose(state.running_mean, _np(rm), rtol=1e-13)
    np.testing.assert_allclose(state.running_var, _np(rv), rtol=1e-13)
    # the wrong reading (decay 0.1) is far off
    wrong = mr.init_bn_state(2)
    for x in _batches((8, 2), 5, seed=1):
        wrong = mr.bn_forward(x, wrong, decay=0.1, estimator="unbiased")[1]
    assert np.max(np.abs(wrong.running_mean - _np(rm))) > 0.1


def test_biased_estimator_differs_from_torch_by_m_over_m_minus_1():
    x = _batches((3, 2, 2), 1, seed=2)[0]  # m = 6
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    F.batch_norm(torch.tensor(x), rm, rv, training=True, momentum=1.0)
    st = mr.bn_forward(x, mr.init_bn_state(2), decay=0.0)[1]
    np.testing.assert_allclose(st.running_var * 6 / 5, _np(rv), rtol=1e-13)
    np.testing.assert_allclose(st.running_var, x.var(axis=(0, 2)), rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_bn_matches_torch_batchnorm2d_module(momentum, dtype):
    c = 3
    mod = torch.nn.BatchNorm2d(c, momentum=momentum, eps=1e-3, dtype=dtype)
    with torch.no_grad():
        mod.weight.copy_(torch.tensor([1.2, -0.4, 0.7]))
        mod.bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
    gamma, beta = _np(mod.weight).copy(), _np(mod.bias).copy()
    decay = None if momentum is None else decay_from_torch(momentum)
    state = mr.init_bn_state(c, dtype=NP_DTYPE[dtype])
    rng = np.random.default_rng(3)
    for x in _batches((2, c, 4, 3), 5, seed=3, dtype=NP_DTYPE[dtype]):
        mod.train()
        mod.zero_grad()
        xt = torch.tensor(x, requires_grad=True)
        w = rng.normal(size=x.shape).astype(x.dtype)
        y_t = mod(xt)
        (y_t * torch.tensor(w)).sum().backward()
        y, state, ctx = mr.bn_forward(
            x, state, gamma, beta, decay=decay, eps=1e-3, estimator="unbiased"
        )
        dx, dg, db = mr.bn_backward(w, ctx)
        np.testing.assert_allclose(y, _np(y_t), **TOL[dtype])
        np.testing.assert_allclose(dx, _np(xt.grad), **TOL[dtype])
        np.testing.assert_allclose(dg, _np(mod.weight.grad), **TOL[dtype])
        np.testing.assert_allclose(db, _np(mod.bias.grad), **TOL[dtype])
        sd = mod.state_dict()
        np.testing.assert_allclose(state.running_mean, _np(sd["running_mean"]), **TOL[dtype])
        np.testing.assert_allclose(state.running_var, _np(sd["running_var"]), **TOL[dtype])
        assert int(state.num_batches_tracked) == int(sd["num_batches_tracked"])
    mod.eval()
    x = _batches((3, c, 2, 2), 1, seed=4, dtype=NP_DTYPE[dtype])[0]
    y, _, _ = mr.bn_forward(x, state, gamma, beta, training=False, eps=1e-3)
    np.testing.assert_allclose(y, _np(mod(torch.tensor(x))), **TOL[dtype])


def test_cumulative_average_is_the_mean_of_batch_statistics():
    batches = _batches((4, 2, 3), 7, seed=5)
    state = mr.init_bn_state(2)
    for x in batches:
        state = mr.bn_forward(x, state, decay=None, estimator="unbiased")[1]
    means = [x.mean(axis=(0, 2)) for x in batches]
    variances = [x.var(axis=(0, 2), ddof=1) for x in batches]
    np.testing.assert_allclose(state.running_mean, np.mean(means, axis=0), rtol=1e-13)
    np.testing.assert_allclose(state.running_var, np.mean(variances, axis=0), rtol=1e-13)
    assert int(state.num_batches_tracked) == 7


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_running_stats_matches_torch_track_running_stats_false(training):
    mod = torch.nn.BatchNorm1d(3, track_running_stats=False, affine=False, dtype=torch.float64)
    mod.train(training)
    for x in _batches((5, 3, 4), 3, seed=6):
        y, st, _ = mr.bn_forward(x, None, training=training)
        assert st is None
        np.testing.assert_allclose(y, _np(mod(torch.tensor(x))), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [1, -1])
def test_bn_trajectory_matches_float64_reference(axis):
    shape = (3, 4, 2, 5) if axis == 1 else (3, 2, 5, 4)
    gamma, beta = np.array([1.0, 2.0, -1.0, 0.5]), np.array([0.0, 1.0, 2.0, 3.0])
    state, ref = mr.init_bn_state(4), fresh_state(4)
    for step, x in enumerate(_batches(shape, 5, seed=7)):
        y, state, _ = mr.bn_forward(x, state, gamma, beta, decay=0.8, eps=0.5, axis=axis)
        y_ref, ref = forward_np(x, ref, gamma, beta, lam=0.0, tau=0.8, eps=0.5, axis=axis)
        np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13, err_msg=f"step {step}")
        np.testing.assert_allclose(state.running_mean, ref["running_mean"], rtol=1e-13)
        np.testing.assert_allclose(state.running_var, ref["running_var"], rtol=1e-13)


@pytest.mark.parametrize("axis", [1, -1])
def test_bn_training_is_invariant_to_affine_input_maps(axis):
    """y(a*x + b; eps*a^2) == y(x; eps) for a > 0: exact up to rounding."""
    x = _batches((6, 3, 4) if axis == 1 else (6, 4, 3), 1, seed=8)[0]
    gamma, beta = np.array([1.0, -2.0, 0.5]), np.array([0.3, 0.0, -0.1])
    for a, b in [(3.7, -12.0), (1e-3, 5.0), (250.0, 1e4)]:
        y0 = mr.bn_forward(x, None, gamma, beta, eps=1e-2, axis=axis)[0]
        y1 = mr.bn_forward(a * x + b, None, gamma, beta, eps=1e-2 * a * a, axis=axis)[0]
        np.testing.assert_allclose(y1, y0, rtol=1e-10, atol=1e-10)
    # with the same eps the outputs differ (eps is not scale invariant): the check is sharp
    y2 = mr.bn_forward(1e-3 * x, None, gamma, beta, eps=1e-2, axis=axis)[0]
    assert np.max(np.abs(y2 - y0)) > 1e-2


def test_zero_variance_channel_gives_beta():
    x = _batches((4, 2, 3), 1, seed=9)[0]
    x[:, 1, :] = 7.25
    y, st, ctx = mr.bn_forward(
        x, mr.init_bn_state(2), np.array([2.0, 3.0]), np.array([0.5, -0.5]), decay=0.0
    )
    np.testing.assert_array_equal(y[:, 1, :], -0.5)
    assert st.running_var[1] == 0.0 and st.running_mean[1] == 7.25
    dx, _, _ = mr.bn_backward(np.ones_like(x), ctx)
    assert np.all(np.isfinite(dx))
