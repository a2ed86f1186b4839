"""BN/MBN backward (docs/spec.md §2-3, Eq. 13 corrected) against float64 autograd and finite
differences, and the printed Eq. 13 shown wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import channel_shape, forward_torch, reduce_axes
from hypothesis import assume, given
from hypothesis import strategies as st

import mbn_ref as mr

LAMS = [0.0, 0.5, 0.9375, 1.0]
LAYOUTS = {
    "NC": ((6, 3), 1),
    "NCL": ((3, 2, 5), 1),
    "NCHW": ((2, 3, 3, 4), 1),
    "NCDHW": ((2, 2, 2, 3, 2), 1),
    "NHWC": ((2, 3, 4, 3), -1),
    "NLC": ((3, 4, 2), -1),
}


def _case(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.normal(1.5, 2.0, size=shape)
    w = rng.normal(size=shape)  # the loss is sum(w * y), so dy = w
    gamma = np.array([1.3, -0.7, 0.4, 2.0][:c] + [0.9] * max(0, c - 4))
    beta = rng.normal(size=c)
    prev_mean = rng.normal(size=c)
    prev_var = rng.uniform(0.5, 2.0, size=c)
    return x, w, gamma, beta, prev_mean, prev_var


def _state(kind, prev_mean, prev_var):
    if kind == "bn":
        return mr.BNState(prev_mean, prev_var, np.asarray(3, dtype=np.int64))
    return mr.MBNState(
        prev_mean, prev_var, prev_mean + 0.25, prev_var * 1.5, np.asarray(3, dtype=np.int64)
    )


def _ours(kind, x, w, gamma, beta, prev_mean, prev_var, *, lam, eps, axis, training):
    state = _state(kind, prev_mean, prev_var)
    if kind == "bn":
        y, _, ctx = mr.bn_forward(
            x, state, gamma, beta, decay=0.9, eps=eps, axis=axis, training=training
        )
        return (y, *mr.bn_backward(w, ctx))
    y, _, ctx = mr.mbn_forward(
        x, state, gamma, beta, lam=lam, tau=0.9, eps=eps, axis=axis, training=training
    )
    return (y, *mr.mbn_backward(w, ctx))


def _autograd(kind, x, w, gamma, beta, prev_mean, prev_var, *, lam, eps, axis, training):
    t = {
        k: None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for k, v in {"x": x, "gamma": gamma, "beta": beta}.items()
    }
    if training or kind == "bn":
        pm, pv = prev_mean, prev_var  # BN eval: running stats are the state given
    else:
        pm, pv = prev_mean + 0.25, prev_var * 1.5  # MBN eval: inference statistics
    y = forward_torch(
        t["x"],
        t["gamma"],
        t["beta"],
        torch.tensor(pm),
        torch.tensor(pv),
        lam=lam,
        eps=eps,
        axis=axis,
        training=training,
    )
    (y * torch.tensor(w)).sum().backward()
    grads = [None if t[k] is None else t[k].grad.numpy() for k in ("x", "gamma", "beta")]
    return (y.detach().numpy(), *grads)


def _close(actual, desired, rtol, atol=0.0):
    scale = max(float(np.max(np.abs(desired))), 1e-300)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=max(atol, rtol * scale))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lam", LAMS)
def test_mbn_backward_matches_float64_autograd(lam, layout, affine, training):
    shape, axis = LAYOUTS[layout]
    x, w, gamma, beta, pm, pv = _case(shape, axis)
    if not affine:
        gamma = beta = None
    kw = dict(lam=lam, eps=1e-3, axis=axis, training=training)
    ours = _ours("mbn", x, w, gamma, beta, pm, pv, **kw)
    ref = _autograd("mbn", x, w, gamma, beta, pm, pv, **kw)
    for a, r in zip(ours, ref, strict=True):
        if r is None:
            assert a is None
        else:
            assert a.dtype == np.float64 and a.shape == r.shape
            _close(a, r, 1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bn_backward_matches_float64_autograd(layout, affine, training):
    shape, axis = LAYOUTS[layout]
    x, w, gamma, beta, pm, pv = _case(shape, axis, seed=1)
    if not affine:
        gamma = beta = None
    kw = dict(lam=0.0, eps=1e-5, axis=axis, training=training)
    ours = _ours("bn", x, w, gamma, beta, pm, pv, **kw)
    ref = _autograd("bn", x, w, gamma, beta, pm, pv, **kw)
    for a, r in zip(ours, ref, strict=True):
        if r is None:
            assert a is None
        else:
            _close(a, r, 1e-12)


def _finite_differences(f, arr, h=1e-6):
    grad = np.zeros_like(arr)
    flat, g = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        g[i] = (up - down) / (2 * h)
    return grad


def _check_fd(kind, shape, axis, lam, eps, seed, rtol=1e-6):
    x, w, gamma, beta, pm, pv = _case(shape, axis, seed)
    state = _state(kind, pm, pv)

    def loss():
        if kind == "bn":
            y, _, _ = mr.bn_forward(x, state, gamma, beta, eps=eps, axis=axis)
        else:
            y, _, _ = mr.mbn_forward(x, state, gamma, beta, lam=lam, eps=eps, axis=axis)
        return float(np.sum(w * y))

    if kind == "bn":
        _, _, ctx = mr.bn_forward(x, state, gamma, beta, eps=eps, axis=axis)
        dx, dg, db = mr.bn_backward(w, ctx)
    else:
        _, _, ctx = mr.mbn_forward(x, state, gamma, beta, lam=lam, eps=eps, axis=axis)
        dx, dg, db = mr.mbn_backward(w, ctx)
    # FD error floor: rounding of an O(|w|) loss over 2h, plus h^2 curvature terms
    floor = 1e-8 * float(np.max(np.abs(w)) * np.max(np.abs(gamma)))
    for ours, arr in ((dx, x), (dg, gamma), (db, beta)):
        fd = _finite_differences(loss, arr)
        _close(ours, fd, rtol, floor)


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_mbn_backward_matches_finite_differences(layout, lam):
    shape, axis = LAYOUTS[layout]
    _check_fd("mbn", shape, axis, lam, 1e-5, seed=2)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bn_backward_matches_finite_differences(layout):
    shape, axis = LAYOUTS[layout]
    _check_fd("bn", shape, axis, 0.0, 1e-5, seed=3)


@given(
    n=st.integers(1, 4),
    c=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 3), max_size=2),
    channels_last=st.booleans(),
    lam=st.sampled_from([0.0, 0.25, 0.5, 0.9375, 1.0]) | st.floats(0.0, 1.0),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_mbn_backward_property_finite_differences(n, c, spatial, channels_last, lam, eps, seed):
    shape = (n, *spatial, c) if channels_last else (n, c, *spatial)
    m = n * int(np.prod(spatial))
    assume(m >= 2 or lam > 0)  # m = 1 with lam = 0 is an error (docs/spec.md §3)
    _check_fd("mbn", shape, -1 if channels_last else 1, lam, eps, seed, rtol=1e-5)


def _eq13(x, dy, gamma, mean, var, batch_mean, lam, eps, *, printed):
    """Eq. 13 for an (N, C) batch: the paper's printed ``dL/dvar_B`` line or the corrected
    one. Only that line differs."""
    m = x.shape[0]
    dxhat = dy * gamma
    inv = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    factor = (xhat - mean) if printed else (x - mean)
    dvar_b = np.sum(dxhat * factor, axis=0) * -0.5 * (var + eps) ** -1.5 * (1 - lam)
    dmu_b = (
        np.sum(dxhat * (lam - 1) * inv, axis=0) + dvar_b * np.sum(-2 * (x - batch_mean), axis=0) / m
    )
    return dxhat * inv + dvar_b * 2 * (x - batch_mean) / m + dmu_b / m


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_printed_eq13_disagrees_with_autograd_ours_agrees(lam):
    x, w, gamma, beta, pm, pv = _case((8, 3), 1, seed=4)
    x = x + 3.0  # mu_M far from 0, so (xhat - mu_M) and (x - mu_M) differ clearly
    kw = dict(lam=lam, eps=1e-5, axis=1, training=True)
    _, dx_ours, _, _ = _ours("mbn", x, w, gamma, beta, pm, pv, **kw)
    _, dx_auto, _, _ = _autograd("mbn", x, w, gamma, beta, pm, pv, **kw)

    batch_mean, batch_var = x.mean(0), x.var(0)
    mean = lam * pm + (1 - lam) * batch_mean
    var = lam * pv + (1 - lam) * batch_var
    args = (x, w, gamma, mean, var, batch_mean, lam, 1e-5)
    corrected = _eq13(*args, printed=False)
    printed = _eq13(*args, printed=True)

    _close(corrected, dx_auto, 1e-12)
    _close(dx_ours, dx_auto, 1e-12)
    rel = np.max(np.abs(printed - dx_auto)) / np.max(np.abs(dx_auto))
    assert rel > 0.1, f"the printed Eq. 13 should disagree with autograd, rel err {rel:.2e}"


def test_bn_dx_sums_to_zero_per_channel_mbn_does_not():
    x, w, gamma, beta, pm, pv = _case((4, 3, 3, 3), 1, seed=5)
    axes = reduce_axes(4, 1)
    cs = channel_shape(4, 1)
    # sum(dx * xhat) = 0 holds for eps -> 0 (it is r*sum(g*xhat)*eps/(var+eps)): eps tiny
    eps = 1e-30
    _, _, ctx = mr.bn_forward(x, mr.init_bn_state(3), gamma, beta, eps=eps)
    dx, _, _ = mr.bn_backward(w, ctx)
    xhat = (x - x.mean(axes).reshape(cs)) / np.sqrt(x.var(axes).reshape(cs) + eps)
    scale = np.max(np.abs(dx)) * dx.size
    assert np.max(np.abs(dx.sum(axes))) < 1e-13 * scale
    assert np.max(np.abs((dx * xhat).sum(axes))) < 1e-13 * scale

    for lam in (0.5, 0.9375):
        _, _, ctx = mr.mbn_forward(x, _state("mbn", pm, pv), gamma, beta, lam=lam)
        dx, _, _ = mr.mbn_backward(w, ctx)
        # history carries part of the normalization: dx no longer sums to zero
        assert np.min(np.abs(dx.sum(axes))) > 1e-3 * np.max(np.abs(dx))


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_bn_dx_inner_product_with_xhat_is_the_eps_term(eps):
    """docs/derivations/backward.md: for BN, ``sum(dx * xhat) = r * eps/(var_B + eps) *
    sum(g * xhat)`` per channel (zero only for eps = 0), with ``g = gamma*dy``."""
    x, w, gamma, beta, _, _ = _case((4, 3, 3, 3), 1, seed=6)
    axes = reduce_axes(4, 1)
    cs = channel_shape(4, 1)
    _, _, ctx = mr.bn_forward(x, mr.init_bn_state(3), gamma, beta, eps=eps)
    dx, _, _ = mr.backward(w, ctx)
    var = x.var(axes)
    r = 1 / np.sqrt(var + eps)
    xhat = (x - x.mean(axes).reshape(cs)) * r.reshape(cs)
    g = gamma.reshape(cs) * w
    expected = r * eps / (var + eps) * (g * xhat).sum(axes)
    np.testing.assert_allclose((dx * xhat).sum(axes), expected, rtol=1e-10, atol=1e-13)
    assert np.min(np.abs(expected)) > 1e-6  # not the trivial zero
