"""The same BN/MBN computations on every Array API namespace (NumPy, array-api-strict,
PyTorch, CuPy when a GPU is there) give NumPy's float64 numbers, and results stay in the
caller's namespace, dtype and device (docs/spec.md §7)."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from _reference import forward_np, fresh_state
from conftest import _load, to_numpy

import mbn_ref as mr

LAMS = [0.0, 0.5, 0.9375, 1.0, 0.25]


def _data(shape, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 2), size=shape) for _ in range(steps)]


def _same_home(out, x):
    """``out`` is in ``x``'s namespace, dtype and device."""
    assert type(out) is type(x)
    assert array_api_compat.array_namespace(out) is array_api_compat.array_namespace(x)
    assert out.dtype == x.dtype
    assert array_api_compat.device(out) == array_api_compat.device(x)


def _check_state_home(state, xp, dtype, device):
    for name, v in zip(state._fields, state, strict=True):
        assert array_api_compat.array_namespace(v) is array_api_compat.array_namespace(
            xp.asarray(0.0)
        ), name
        assert array_api_compat.device(v) == device, name
        if name == "num_batches_tracked":
            assert xp.isdtype(v.dtype, "integral")
        else:
            assert v.dtype == dtype, name


@pytest.mark.parametrize("axis", [1, -1])
def test_mbn_trajectory_same_numbers_on_every_namespace(xp, axis):
    shape = (3, 4, 2, 3) if axis == 1 else (3, 2, 3, 4)
    c = 4
    gamma_np, beta_np = np.linspace(-1, 1.5, c), np.linspace(0.2, -0.2, c)
    gamma, beta = xp.asarray(gamma_np), xp.asarray(beta_np)
    state = mr.init_state(c, xp=xp, dtype=xp.float64)
    np_state, ref = mr.init_state(c), fresh_state(c)
    rng = np.random.default_rng(1)
    for step, (x_np, lam) in enumerate(zip(_data(shape), LAMS, strict=True)):
        x = xp.asarray(x_np)
        dy_np = rng.normal(size=shape)
        y, state, ctx = mr.mbn_forward(x, state, gamma, beta, lam=lam, tau=0.8, axis=axis)
        dx, dg, db = mr.mbn_backward(xp.asarray(dy_np), ctx)
        y_ref, ref = forward_np(x_np, ref, gamma_np, beta_np, lam=lam, tau=0.8, axis=axis)
        _, np_state, np_ctx = mr.mbn_forward(
            x_np, np_state, gamma_np, beta_np, lam=lam, tau=0.8, axis=axis
        )
        grads_np = mr.mbn_backward(dy_np, np_ctx)
        for out in (y, dx):
            _same_home(out, x)
        for out in (dg, db):
            _same_home(out, gamma)
        _check_state_home(state, xp, xp.float64, array_api_compat.device(x))
        np.testing.assert_allclose(
            to_numpy(y), y_ref, rtol=1e-12, atol=1e-12, err_msg=f"step {step}"
        )
        for ours, theirs in zip((dx, dg, db), grads_np, strict=True):
            np.testing.assert_allclose(to_numpy(ours), theirs, rtol=1e-12, atol=1e-12)
        for name in ("moving_mean", "moving_var", "running_mean", "running_var"):
            np.testing.assert_allclose(to_numpy(getattr(state, name)), ref[name], rtol=1e-13)
        assert int(state.num_batches_tracked) == step + 1
    y, same, _ = mr.mbn_forward(x, state, gamma, beta, tau=0.8, axis=axis, training=False)
    assert same is state
    _same_home(y, x)
    np.testing.assert_allclose(
        to_numpy(y),
        forward_np(x_np, ref, gamma_np, beta_np, axis=axis, training=False)[0],
        rtol=1e-12,
    )


@pytest.mark.parametrize("decay", [0.9, None], ids=["decay0.9", "cumulative"])
def test_bn_trajectory_same_numbers_on_every_namespace(xp, decay):
    c = 3
    state = mr.init_bn_state(c, xp=xp, dtype=xp.float64)
    ref = fresh_state(c)
    for x_np in _data((4, c, 5), seed=2):
        x = xp.asarray(x_np)
        y, state, ctx = mr.bn_forward(x, state, decay=decay, estimator="unbiased")
        dx, dg, db = mr.bn_backward(xp.ones_like(x), ctx)
        assert dg is None and db is None
        _same_home(y, x)
        _same_home(dx, x)
        y_ref, ref = forward_np(x_np, ref, tau=decay, estimator="unbiased")
        np.testing.assert_allclose(to_numpy(y), y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_numpy(state.running_mean), ref["running_mean"], rtol=1e-13)
        np.testing.assert_allclose(to_numpy(state.running_var), ref["running_var"], rtol=1e-13)
        np.testing.assert_allclose(to_numpy(dx), 0.0, atol=1e-12)
    _check_state_home(state, xp, xp.float64, array_api_compat.device(x))


def test_runtime_state_decays_as_0d_arrays_match_python_floats(xp):
    """lam/tau (and BN's decay) as 0-d arrays of the namespace, e.g. a schedule's output kept
    as runtime state, give the same numbers as Python floats."""
    c = 2
    s_float = s_arr = mr.init_state(c, xp=xp, dtype=xp.float64)
    b_float = b_arr = mr.init_bn_state(c, xp=xp, dtype=xp.float64)
    for x_np, lam in zip(_data((3, c, 2), seed=3), LAMS, strict=True):
        x = xp.asarray(x_np)
        lam_a, tau_a = xp.asarray(lam, dtype=xp.float64), xp.asarray(0.7, dtype=xp.float64)
        y1, s_float, c1 = mr.mbn_forward(x, s_float, lam=lam, tau=0.7)
        y2, s_arr, c2 = mr.mbn_forward(x, s_arr, lam=lam_a, tau=tau_a)
        np.testing.assert_allclose(to_numpy(y2), to_numpy(y1), rtol=1e-15, atol=1e-15)
        for a, b in zip(s_arr, s_float, strict=True):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-15)
        dy = xp.ones_like(x) * 0.5 + x
        dx2, dx1 = mr.mbn_backward(dy, c2)[0], mr.mbn_backward(dy, c1)[0]
        np.testing.assert_allclose(to_numpy(dx2), to_numpy(dx1), rtol=1e-14, atol=1e-14)
        yb1, b_float, _ = mr.bn_forward(x, b_float, decay=0.7)
        yb2, b_arr, _ = mr.bn_forward(x, b_arr, decay=tau_a)
        np.testing.assert_allclose(to_numpy(yb2), to_numpy(yb1), rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(
            to_numpy(b_arr.running_var), to_numpy(b_float.running_var), rtol=1e-15
        )
        _check_state_home(s_arr, xp, xp.float64, array_api_compat.device(x))


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_kernel_terms_same_numbers_on_every_namespace(xp, lam):
    """The terms of MBN's gradient through a BN kernel, the decay a float or a 0-d array."""
    x_np = _data((5, 2, 3), 1, seed=6)[0]
    gamma_np = np.array([0.5, 2.0])
    _, _, ctx_np = mr.mbn_forward(x_np, mr.init_state(2), gamma_np, None, lam=lam)
    expected = mr.kernel_terms(ctx_np)
    for decay in (lam, xp.asarray(lam, dtype=xp.float64)):
        x = xp.asarray(x_np)
        _, _, ctx = mr.mbn_forward(
            x, mr.init_state(2, xp=xp, dtype=xp.float64), xp.asarray(gamma_np), None, lam=decay
        )
        for name, a, e in zip(mr.KernelTerms._fields, mr.kernel_terms(ctx), expected, strict=True):
            if name != "rstd_scale":  # 0-d: NumPy makes it a scalar
                _same_home(a, x)
            np.testing.assert_allclose(to_numpy(a), e, rtol=1e-15, atol=1e-300, err_msg=name)


def test_float32_on_every_namespace_stays_float32(xp):
    c = 3
    x_np = _data((4, c, 3), 1, seed=4)[0].astype(np.float32)
    x = xp.asarray(x_np)
    state = mr.init_state(c, xp=xp, dtype=xp.float32)
    y, state, ctx = mr.mbn_forward(x, state, lam=0.5)
    dx, _, _ = mr.mbn_backward(xp.ones_like(x), ctx)
    _same_home(y, x)
    _same_home(dx, x)
    _check_state_home(state, xp, xp.float32, array_api_compat.device(x))
    y_ref, _ = forward_np(x_np.astype(np.float64), fresh_state(c), lam=0.5)
    np.testing.assert_allclose(to_numpy(y), y_ref, rtol=1e-5, atol=1e-5)


def test_cupy_is_skipped_with_a_reason_without_a_gpu():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:  # pragma: no cover - GPU machines
            pytest.skip("a GPU is present: the cupy namespace runs instead")
    except Exception:
        pass
    with pytest.raises(pytest.skip.Exception, match="CuPy"):
        _load("cupy")
