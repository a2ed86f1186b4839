"""``xp=``: the compute functions take an explicit namespace (array-api-extra's convention),
so an adapter can hand the core a namespace that array-api-compat does not know; and a batch
size that the static shape does not hold (``None``, as under ``tf.function``) is counted from
the array (docs/spec.md §9)."""

from __future__ import annotations

import _shapeless
import numpy as np
import pytest
from _shapeless import Shapeless

import mbn_ref as mr

xs = _shapeless.xp


def _x(shape, seed=0, loc=0.0):
    return np.random.default_rng(seed).normal(loc, 1.5, size=shape)


def _raw(v):
    return None if v is None else np.asarray(v.a if isinstance(v, Shapeless) else v)


def _wrap_state(state):
    return type(state)(*(Shapeless(v) for v in state))


def test_array_api_compat_does_not_know_the_shim():
    import array_api_compat

    with pytest.raises(TypeError):
        array_api_compat.array_namespace(Shapeless(np.ones((2, 3))))
    assert Shapeless(np.ones((2, 3))).shape == (None, 3)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("nonfinite", ["propagate", "skip_update"])
@pytest.mark.parametrize("axis", [1, -1])
def test_mbn_with_an_unknown_batch_size_matches_numpy(estimator, nonfinite, axis):
    shape = (5, 3, 4) if axis == 1 else (5, 4, 3)
    g, b = np.linspace(0.5, 2, 3), np.linspace(-1, 1, 3)
    state, ref = _wrap_state(mr.init_state(3)), mr.init_state(3)
    for step, lam in enumerate([0.0, 0.5, 0.9375]):
        x = _x(shape, seed=step, loc=2.0)
        dy = _x(shape, seed=10 + step)
        kw = dict(lam=lam, tau=0.8, axis=axis, estimator=estimator, nonfinite=nonfinite)
        y, state, ctx = mr.mbn_forward(Shapeless(x), state, Shapeless(g), Shapeless(b), xp=xs, **kw)
        y_ref, ref, ctx_ref = mr.mbn_forward(x, ref, g, b, **kw)
        assert not isinstance(ctx.count, int)  # counted from the array at run time
        assert float(ctx.count) == ctx_ref.count
        np.testing.assert_allclose(_raw(y), y_ref, rtol=1e-13, atol=1e-13)
        for got, want in zip(state, ref, strict=True):
            np.testing.assert_allclose(_raw(got), want, rtol=1e-13)
        grads = mr.backward(Shapeless(dy), ctx, xp=xs)
        grads_ref = mr.backward(dy, ctx_ref)
        for got, want in zip(grads, grads_ref, strict=True):
            np.testing.assert_allclose(_raw(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_bn_with_an_unknown_batch_size_matches_numpy(estimator):
    x, g = _x((6, 2, 3)), np.array([1.5, 0.5])
    y, state, _ctx = mr.bn_forward(
        Shapeless(x), _wrap_state(mr.init_bn_state(2)), Shapeless(g), estimator=estimator, xp=xs
    )
    y_ref, ref, _ctx_ref = mr.bn_forward(x, mr.init_bn_state(2), g, estimator=estimator)
    np.testing.assert_allclose(_raw(y), y_ref, rtol=1e-13, atol=1e-13)
    for got, want in zip(state, ref, strict=True):
        np.testing.assert_allclose(_raw(got), want, rtol=1e-13)
    # evaluation needs no count
    y_eval, _, _ = mr.bn_forward(Shapeless(x), state, Shapeless(g), training=False, xp=xs)
    y_eval_ref, _, _ = mr.bn_forward(x, ref, g, training=False)
    np.testing.assert_allclose(_raw(y_eval), y_eval_ref, rtol=1e-13)


@pytest.mark.parametrize("algorithm", ["bn", "mbn"])
def test_an_empty_batch_of_unknown_size_leaves_the_state_unchanged(algorithm):
    """Without a host count there is no early return: the update is selected away."""
    x = Shapeless(np.zeros((0, 3, 2)))
    if algorithm == "bn":
        state = _wrap_state(mr.init_bn_state(3)._replace(running_mean=np.arange(3.0)))
        y, new, ctx = mr.bn_forward(x, state, decay=0.5, estimator="unbiased", xp=xs)
    else:
        state = _wrap_state(mr.init_state(3)._replace(moving_mean=np.arange(3.0)))
        y, new, ctx = mr.mbn_forward(x, state, lam=0.5, tau=0.5, xp=xs)
    assert _raw(y).shape == (0, 3, 2)
    assert float(ctx.count) == 0.0
    for got, want in zip(new, state, strict=True):
        np.testing.assert_array_equal(_raw(got), _raw(want))
    dx, _, _ = mr.backward(Shapeless(np.zeros((0, 3, 2))), ctx, xp=xs)
    assert _raw(dx).shape == (0, 3, 2)


def test_one_value_per_channel_of_unknown_count_cannot_raise():
    """The host check needs the count on the host: with a run-time count BN normalizes the
    zero-variance batch to beta, as a traced graph does (documented in docs/spec.md §9)."""
    beta = np.array([0.5, -1.0])
    y, _, _ = mr.bn_forward(Shapeless(_x((1, 2, 1))), None, None, Shapeless(beta), xp=xs)
    np.testing.assert_array_equal(_raw(y)[:, :, 0], beta[None, :])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mr.bn_forward(_x((1, 2, 1)), None, None, beta)  # with a host count it raises


def test_the_explicit_namespace_is_the_one_used():
    """Every array operation of a training step and its backward goes through ``xp``."""
    _shapeless.CALLS.clear()
    x = Shapeless(_x((4, 3)))
    _, _, ctx = mr.mbn_forward(x, _wrap_state(mr.init_state(3)), lam=0.5, xp=xs)
    mr.backward(Shapeless(_x((4, 3), seed=1)), ctx, xp=xs)
    used = set(_shapeless.CALLS)
    assert {"sum", "sqrt", "astype", "reshape"} <= used, used


def test_merges_take_the_namespace_too():
    from mbn_ref import distributed

    means = [np.array([1.0, 2.0]), np.array([3.0, -1.0])]
    variances = [np.array([0.5, 1.0]), np.array([2.0, 0.25])]
    n, mean, var = distributed.merge_moments(
        [2, 3], [Shapeless(m) for m in means], [Shapeless(v) for v in variances], xp=xs
    )
    n_ref, mean_ref, var_ref = distributed.merge_moments([2, 3], means, variances)
    assert isinstance(mean, Shapeless) and float(n) == float(n_ref)
    np.testing.assert_allclose(_raw(mean), mean_ref, rtol=1e-15)
    np.testing.assert_allclose(_raw(var), var_ref, rtol=1e-15)
    states = [mr.init_state(2), mr.init_state(2)._replace(running_mean=np.array([3.0, 1.0]))]
    merged = distributed.merge_inference_statistics(
        [_wrap_state(s) for s in states], [1, 3], xp=xs
    )
    merged_ref = distributed.merge_inference_statistics(states, [1, 3])
    for got, want in zip(merged, merged_ref, strict=True):
        np.testing.assert_allclose(_raw(got), want, rtol=1e-15)


def test_a_compat_namespace_is_used_as_it_is(monkeypatch):
    """``xp=array_api_compat.numpy`` (or ``.torch``) needs no lookup: none is made, so a
    compiler tracing an adapter's call traces no namespace lookup (whose caches PyTorch's
    dynamo warns about)."""
    import array_api_compat
    import array_api_compat.numpy as cnp

    from mbn_ref._array import resolve_namespace

    def no_lookup(*arrays):
        raise AssertionError("array_namespace called")

    monkeypatch.setattr(array_api_compat, "array_namespace", no_lookup)
    assert resolve_namespace(cnp) is cnp
    state = mr.update_running_statistics(
        mr.init_bn_state(2, xp=cnp), np.zeros(2), np.ones(2), 4, decay=0.9, xp=cnp
    )
    np.testing.assert_allclose(state.running_var, 1.0)
