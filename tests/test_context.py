"""The public backward context: built by keyword, split into arrays and a static part that a
framework saves its own way, rebuilt in backward; half-precision inputs saved as they are;
one ``backward`` for BN and MBN (docs/spec.md §2, §3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import to_numpy

import mbn_ref as mr


def _x(shape, seed=0, loc=0.0):
    return np.random.default_rng(seed).normal(loc, 1.5, size=shape)


def _contexts():
    """A context of every kind: BN/MBN train, host and array lam, evaluation, empty batch."""
    x = _x((4, 3, 5))
    g, b = np.linspace(0.5, 2, 3), np.linspace(-1, 1, 3)
    out = {}
    _, _, out["bn-train"] = mr.bn_forward(x, mr.init_bn_state(3), g, b)
    _, _, out["bn-no-affine"] = mr.bn_forward(x, mr.init_bn_state(3))
    _, _, out["bn-eval"] = mr.bn_forward(x, mr.init_bn_state(3), g, b, training=False)
    _, _, out["mbn-host-lam"] = mr.mbn_forward(x, mr.init_state(3), g, b, lam=0.75)
    _, _, out["mbn-array-lam"] = mr.mbn_forward(x, mr.init_state(3), g, b, lam=np.asarray(0.75))
    _, _, out["mbn-eval"] = mr.mbn_forward(x, mr.init_state(3), g, b, training=False)
    _, _, out["empty"] = mr.mbn_forward(x[:0], mr.init_state(3), g, b, lam=0.5)
    return x, out


X, CONTEXTS = _contexts()


def test_built_by_keyword_only():
    ctx = CONTEXTS["bn-train"]
    with pytest.raises(TypeError):
        mr.NormContext(*(getattr(ctx, f.name) for f in dataclasses.fields(ctx)))  # type: ignore[misc]
    rebuilt = mr.NormContext(**{f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)})
    assert rebuilt.axis == ctx.axis and rebuilt.count == ctx.count


@pytest.mark.parametrize("kind", sorted(CONTEXTS))
def test_stats_weight_is_always_a_0d_array(kind):
    ctx = CONTEXTS[kind]
    w = ctx.stats_weight
    assert isinstance(w, np.ndarray) and w.shape == () and w.dtype == ctx.mean.dtype
    expected = {"bn-train": 1.0, "bn-no-affine": 1.0, "mbn-host-lam": 0.25}
    assert float(w) == expected.get(kind, 0.25 if kind == "mbn-array-lam" else 0.0)
    assert (ctx.batch_mean is None) == (float(w) == 0.0)


@pytest.mark.parametrize("kind", sorted(CONTEXTS))
def test_split_then_join_gives_the_same_gradients(kind):
    ctx = CONTEXTS[kind]
    arrays, static = ctx.split()
    assert len(arrays) == len(mr.NormContext.ARRAY_FIELDS)
    assert all(a is None or isinstance(a, np.ndarray) for a in arrays)  # only arrays travel
    assert isinstance(static, mr.ContextStatic)
    hash(static)  # hashable: usable as a compile-time constant
    dy = _x(ctx.x.shape, seed=3)
    expected = mr.backward(dy, ctx)
    got = mr.backward(dy, mr.NormContext.join(list(arrays), static))
    for e, g in zip(expected, got, strict=True):
        if e is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, e)


def test_join_refuses_the_wrong_number_of_arrays():
    arrays, static = CONTEXTS["bn-train"].split()
    with pytest.raises(ValueError, match="expected 7 arrays"):
        mr.NormContext.join(arrays[:-1], static)
    with pytest.raises(ValueError, match="count is neither static nor among the arrays"):
        mr.NormContext.join(arrays, dataclasses.replace(static, count=None))


def test_replace_changes_only_what_is_named():
    ctx = CONTEXTS["bn-train"]
    other = ctx.replace(all_sum=sum)
    assert other.all_sum is sum and ctx.all_sum is None and other.x is ctx.x
    with pytest.raises(TypeError):
        ctx.replace(weight=1.0)


def test_one_backward_for_bn_and_mbn():
    assert mr.bn_backward is mr.backward
    assert mr.mbn_backward is mr.backward


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_context_keeps_the_input_dtype(dtype_name):
    """The context saves half-precision ``x`` as it is (2 bytes an element), not a float32
    copy (4 bytes an element); the backward upcasts inside and matches a float32 run."""
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    x32 = torch.from_numpy(_x((16, 8, 6, 6), loc=3.0)).float()
    x = x32.to(dtype)
    g = torch.linspace(0.5, 2, 8)
    _y, _, ctx = mr.mbn_forward(x, mr.init_state(8, xp=torch, dtype=torch.float32), g, lam=0.5)
    assert ctx.x.dtype == dtype and ctx.x is x
    arrays, _ = ctx.split()
    saved = sum(a.numel() * a.element_size() for a in arrays if a is not None)
    full = x.numel()
    assert saved < full * 2 + 1024  # the input's own bytes plus C-vectors
    assert ctx.mean.dtype == torch.float32  # statistics in float32
    dy = torch.from_numpy(_x(x.shape, seed=5)).to(dtype)
    dx, dg, _ = mr.backward(dy, ctx)
    assert dx.dtype == dtype and dg.dtype == g.dtype
    _, _, ctx32 = mr.mbn_forward(
        x.float(), mr.init_state(8, xp=torch, dtype=torch.float32), g, lam=0.5
    )
    dx32, dg32, _ = mr.backward(dy.float(), ctx32)
    tol = 1e-2 if dtype_name == "float16" else 4e-2
    np.testing.assert_allclose(to_numpy(dx.float()), to_numpy(dx32), rtol=tol, atol=tol)
    np.testing.assert_allclose(to_numpy(dg), to_numpy(dg32), rtol=1e-5, atol=1e-4)
