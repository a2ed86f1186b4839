"""docs/spec.md §7: low-precision inputs accumulate in float32 and come back in their own dtype; the
batch variance is stable for offset data; no silent promotion of the caller's arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import forward_np, fresh_state
from conftest import to_numpy

import mbn_ref as mr

# A float32 mean of 1e4 is good to a few float32 eps relative (~1e-3 absolute), which shifts
# y by that much over std 1: outputs of offset data are held to 4 eps * |mean| / std.
OFFSET_Y_ATOL = 4 * float(np.finfo(np.float32).eps) * 1e4


def _data(shape, seed=0, loc=0.5, scale=1.5):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


LOW = {
    "numpy-float16": (np, np.float16, dict(rtol=2e-3, atol=2e-3)),
    "torch-float16": (torch, torch.float16, dict(rtol=2e-3, atol=2e-3)),
    "torch-bfloat16": (torch, torch.bfloat16, dict(rtol=1.6e-2, atol=1.6e-2)),
}


def _as(lib, a, dtype):
    if lib is np:
        return np.asarray(a, dtype=dtype)
    return torch.tensor(a).to(dtype)


def _f64(a):
    a = a.float() if hasattr(a, "float") else a  # bfloat16 has no NumPy dtype
    return to_numpy(a).astype(np.float64)


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("case", list(LOW))
def test_low_precision_accumulates_in_float32_returns_input_dtype(case, lam):
    lib, dtype, tol = LOW[case]
    c = 4
    x = _as(lib, _data((16, c, 8, 8), seed=1, loc=3.0), dtype)
    x64 = _f64(x)  # the float16 data, upcast: the reference sees exactly these values
    gamma = _as(lib, [1.0, -0.5, 2.0, 0.25], dtype)
    beta = _as(lib, [0.0, 0.5, -1.0, 1.0], dtype)
    f32 = np.float32 if lib is np else torch.float32
    state = mr.init_state(c, xp=lib, dtype=f32)  # mixed precision: float32 statistics
    y, state, ctx = mr.mbn_forward(x, state, gamma, beta, lam=lam, tau=0.9, eps=1e-3)
    dx, dg, db = mr.mbn_backward(x * 0 + 1, ctx)
    assert y.dtype == dtype and dx.dtype == dtype and dg.dtype == dtype and db.dtype == dtype
    assert state.running_mean.dtype == f32 and state.moving_var.dtype == f32
    y_ref, ref = forward_np(
        x64, fresh_state(c), _f64(gamma), _f64(beta), lam=lam, tau=0.9, eps=1e-3
    )
    np.testing.assert_allclose(_f64(y), y_ref, **tol)
    # the float32 state holds statistics at float32 accuracy (float16 sums would be ~1e-3 off)
    for name in ("moving_mean", "moving_var", "running_mean", "running_var"):
        np.testing.assert_allclose(
            _f64(getattr(state, name)), ref[name], rtol=2e-6, atol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("case", list(LOW))
def test_low_precision_state_stays_low_precision(case):
    lib, dtype, tol = LOW[case]
    x = _as(lib, _data((8, 3, 5), seed=2), dtype)
    state = mr.init_bn_state(3, xp=lib, dtype=dtype)
    y, state, _ = mr.bn_forward(x, state, decay=0.0)
    assert y.dtype == dtype and state.running_var.dtype == dtype
    _, ref = forward_np(_f64(x), fresh_state(3), tau=0.0)
    np.testing.assert_allclose(_f64(state.running_var), ref["running_var"], **tol)


def test_offset_float32_variance_is_stable_on_every_namespace(xp):
    """mean 1e4, std 1, float32: var_B within 1e-5 relative of float64 (docs/spec.md §7), where the
    naive E[x^2] - E[x]^2 in float32 is off by far more."""
    x_np = _data((64, 8, 16, 16), seed=3, loc=1e4, scale=1.0).astype(np.float32)
    axes = (0, 2, 3)
    x64 = x_np.astype(np.float64)
    var64 = x64.var(axis=axes)
    x = xp.asarray(x_np)

    bn_state = mr.init_bn_state(8, xp=xp, dtype=xp.float32)
    y, bn_state, _ = mr.bn_forward(x, bn_state, decay=0.0)
    mbn_state = mr.init_state(8, xp=xp, dtype=xp.float32)
    _, mbn_state, _ = mr.mbn_forward(x, mbn_state, lam=0.0, tau=0.0)
    for name, v in [
        ("bn running_var", bn_state.running_var),
        ("mbn moving_var", mbn_state.moving_var),
        ("mbn running_var", mbn_state.running_var),
    ]:
        assert v.dtype == xp.float32
        rel = np.max(np.abs(to_numpy(v).astype(np.float64) / var64 - 1))
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
    y_ref = (x64 - x64.mean(axis=axes, keepdims=True)) / np.sqrt(var64.reshape(1, -1, 1, 1) + 1e-5)
    np.testing.assert_allclose(to_numpy(y).astype(np.float64), y_ref, rtol=1e-4, atol=OFFSET_Y_ATOL)

    naive = xp.mean(x * x, axis=axes) - xp.mean(x, axis=axes) ** 2
    naive_rel = np.max(np.abs(to_numpy(naive).astype(np.float64) / var64 - 1))
    assert naive_rel > 1e-3, f"naive float32 variance unexpectedly accurate: {naive_rel:.2e}"


@pytest.mark.parametrize("lam", [0.5, 0.9375])
def test_offset_float32_mbn_output_with_history(xp, lam):
    """With history (lam > 0) the normalizing mean is not the batch's; the output stays
    accurate for offset float32 data."""
    c = 2
    state = mr.init_state(c, xp=xp, dtype=xp.float32)
    state = state._replace(moving_mean=xp.asarray([1e4, 1e4], dtype=xp.float32))
    ref = fresh_state(c)
    ref["moving_mean"] = np.array([1e4, 1e4])
    for seed in range(3):
        x_np = _data((16, c, 8), seed=10 + seed, loc=1e4, scale=1.0).astype(np.float32)
        y, state, _ = mr.mbn_forward(xp.asarray(x_np), state, lam=lam)
        y_ref, ref = forward_np(x_np.astype(np.float64), ref, lam=lam)
        np.testing.assert_allclose(
            to_numpy(y).astype(np.float64), y_ref, rtol=1e-4, atol=OFFSET_Y_ATOL
        )
        np.testing.assert_allclose(to_numpy(state.moving_var), ref["moving_var"], rtol=1e-4)


def test_no_silent_promotion(xp):
    x = xp.asarray(_data((6, 3), seed=4).astype(np.float32))
    s32 = mr.init_state(3, xp=xp, dtype=xp.float32)
    y, s32, ctx = mr.mbn_forward(x, s32, lam=0.5)
    assert y.dtype == xp.float32
    assert all(v.dtype == xp.float32 for v in s32[:4])

    s64 = mr.init_state(3, xp=xp, dtype=xp.float64)
    y, s64, _ = mr.mbn_forward(x, s64, lam=0.5)
    assert y.dtype == xp.float32
    assert all(v.dtype == xp.float64 for v in s64[:4])

    b64 = mr.init_bn_state(3, xp=xp, dtype=xp.float64)
    y, b64, _ = mr.bn_forward(x, b64)
    assert y.dtype == xp.float32 and b64.running_var.dtype == xp.float64
    y, _, _ = mr.bn_forward(x, b64, training=False)
    assert y.dtype == xp.float32

    # float64 parameters with float32 data: gradients come back in each one's own dtype
    gamma = xp.asarray([1.0, 2.0, 3.0], dtype=xp.float64)
    beta = xp.asarray([0.0, 0.0, 1.0], dtype=xp.float64)
    y, _, ctx = mr.bn_forward(x, None, gamma, beta)
    dx, dg, db = mr.bn_backward(xp.ones_like(x), ctx)
    assert y.dtype == xp.float32 and dx.dtype == xp.float32
    assert dg.dtype == xp.float64 and db.dtype == xp.float64
