"""Multi-device aggregation (docs/spec.md §5): merged moments, synchronized BN/MBN, per-device
MBN."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import to_numpy
from hypothesis import given
from hypothesis import strategies as st

import mbn_ref as mr
from mbn_ref import distributed as dist


def _split(x: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    bounds = [0, *sorted(cuts), x.shape[0]]
    return [x[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def partitions(draw: st.DrawFn) -> tuple[np.ndarray, list[int], dict[str, float]]:
    n = draw(st.integers(2, 12))
    c = draw(st.integers(1, 4))
    spatial = draw(st.sampled_from([(), (3,), (2, 2)]))
    k = draw(st.integers(1, 5))
    cuts = draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    params = {
        "lam": draw(st.sampled_from([0.0, 0.5, 0.9375, 1.0])),
        "tau": draw(st.sampled_from([0.0, 0.9, 0.99])),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5])),
    }
    rng = np.random.default_rng(seed)
    x = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), size=(n, c, *spatial))
    return x, cuts, params


def _assert_state_close(a: tuple, b: tuple, rtol: float, atol: float) -> None:
    for name, u, v in zip(type(a)._fields, a, b, strict=True):
        np.testing.assert_allclose(to_numpy(u), to_numpy(v), rtol=rtol, atol=atol, err_msg=name)


TOL = {np.float64: (1e-12, 1e-12), np.float32: (2e-5, 2e-5)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(case=partitions(), estimator=st.sampled_from(["biased", "unbiased"]))
def test_sync_mbn_equals_one_device(dtype: type, case: tuple, estimator: str) -> None:
    """Any partition (unequal, empty shards): outputs, gradients and state as one device."""
    x, cuts, p = case
    x = x.astype(dtype)
    c = x.shape[1]
    rng = np.random.default_rng(0)
    gamma = rng.normal(size=c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    state = mr.init_state(c, dtype=dtype)
    kw = {"lam": p["lam"], "tau": p["tau"], "eps": p["eps"], "estimator": estimator}
    rtol, atol = TOL[dtype]
    for _ in range(2):  # two steps: the second starts from a non-trivial state
        y, s1, ctx = mr.mbn_forward(x, state, gamma, beta, **kw)
        ys, states, ctxs = dist.sync_mbn_forward(_split(x, cuts), state, gamma, beta, **kw)
        np.testing.assert_allclose(np.concatenate(ys), y, rtol=rtol, atol=atol)
        for s in states:
            _assert_state_close(s, s1, rtol, atol)
        dx, dg, db = mr.mbn_backward(dy, ctx)
        dxs, dgs, dbs = dist.sync_backward(_split(dy, cuts), ctxs)
        np.testing.assert_allclose(np.concatenate(dxs), dx, rtol=rtol, atol=atol * 10)
        np.testing.assert_allclose(dgs, dg, rtol=rtol, atol=atol * x.size)
        np.testing.assert_allclose(dbs, db, rtol=rtol, atol=atol * x.size)
        state = s1


@given(case=partitions())
def test_sync_bn_equals_one_device(case: tuple) -> None:
    x, cuts, p = case
    c = x.shape[1]
    state = mr.init_bn_state(c)
    for decay in (0.9, None):
        y, s1, ctx = mr.bn_forward(x, state, decay=decay, eps=p["eps"], estimator="unbiased")
        ys, states, ctxs = dist.sync_bn_forward(
            _split(x, cuts), state, decay=decay, eps=p["eps"], estimator="unbiased"
        )
        np.testing.assert_allclose(np.concatenate(ys), y, rtol=1e-12, atol=1e-12)
        for s in states:
            _assert_state_close(s, s1, 1e-12, 1e-12)
        dy = np.cos(np.arange(x.size, dtype=np.float64)).reshape(x.shape)
        dx, _, db = mr.bn_backward(dy, ctx)
        dxs, _, dbs = dist.sync_backward(_split(dy, cuts), ctxs)
        np.testing.assert_allclose(np.concatenate(dxs), dx, rtol=1e-10, atol=1e-12)
        assert dbs is None and db is None


def test_sync_on_other_namespaces(xp) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3, 2))
    parts = [xp.asarray(p) for p in _split(x, [1, 1, 4])]
    state = mr.init_state(3, xp=xp, dtype=xp.float64)
    ys, states, _ = dist.sync_mbn_forward(parts, state, lam=0.5, tau=0.9)
    y, s1, _ = mr.mbn_forward(x, mr.init_state(3), lam=0.5, tau=0.9)
    np.testing.assert_allclose(np.concatenate([to_numpy(v) for v in ys]), y, rtol=1e-12)
    _assert_state_close(states[2], s1, 1e-12, 1e-12)


def test_all_shards_empty_changes_nothing() -> None:
    state = mr.init_state(2)
    ys, states, ctxs = dist.sync_mbn_forward([np.zeros((0, 2)), np.zeros((0, 2))], state, lam=0.5)
    assert all(y.shape == (0, 2) for y in ys)
    assert all(s is state for s in states)
    dxs, dg, db = dist.sync_backward([np.zeros((0, 2))] * 2, ctxs)
    assert all(d.shape == (0, 2) for d in dxs)
    assert dg is None and db is None  # no affine parameters, nothing to reduce


def test_single_value_in_total_is_rejected_for_bn() -> None:
    with pytest.raises(ValueError, match="in total over all shards"):
        dist.sync_bn_forward([np.ones((1, 2)), np.zeros((0, 2))], mr.init_bn_state(2))


def test_shards_with_different_channel_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="channel count"):
        dist.sync_bn_forward([np.ones((2, 2)), np.ones((2, 3))], None)
    with pytest.raises(ValueError, match="different channel counts"):
        dist.merge_moments([1, 1], [np.zeros(2), np.zeros(3)], [np.ones(2), np.ones(3)])


def test_merge_moments_matches_concatenation() -> None:
    rng = np.random.default_rng(7)
    chunks = [rng.normal(2.0, 1.5, size=(n, 3)) for n in (1, 5, 0, 17)]
    counts = [c.shape[0] for c in chunks]
    means = [c.mean(axis=0) if len(c) else np.full(3, np.nan) for c in chunks]
    variances = [c.var(axis=0) if len(c) else np.full(3, np.nan) for c in chunks]
    n, mean, var = dist.merge_moments(counts, means, variances)
    allx = np.concatenate(chunks)
    assert int(n) == allx.shape[0]
    np.testing.assert_allclose(mean, allx.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, allx.var(axis=0), rtol=1e-13)


def test_merge_of_nothing_is_the_identity() -> None:
    n, mean, var = dist.merge_moments([0, 0], [[np.nan], [1.0]], [[np.nan], [2.0]])
    assert (int(n), float(mean[0]), float(var[0])) == (0, 0.0, 0.0)


def test_merge_rejects_negative_counts_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        dist.merge_moments([-1, 2], [[0.0], [1.0]], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="one entry per shard"):
        dist.merge_moments([1], [[0.0], [1.0]], [[1.0], [1.0]])


def test_float32_offset_merge_is_stable_while_raw_moments_are_not() -> None:
    """docs/spec.md §5/§7: mean 1e4, std 1, float32. Merging the same float32 shard moments, Chan's
    merge stays within 1e-5 relative of the exact (float64) merge, while going through raw
    moments, E[x^2] - E[x]^2 (Keras' synchronized BN, Flax's fast variance), loses every
    digit. Synchronized BN on the data itself matches float64 within 1e-5."""
    rng = np.random.default_rng(11)
    shards = [rng.normal(1e4, 1.0, size=(n, 8)).astype(np.float32) for n in (3, 64, 1, 40)]
    counts = [len(s) for s in shards]
    means = [s.mean(axis=0) for s in shards]
    variances = [s.var(axis=0) for s in shards]

    _, _, exact = dist.merge_moments(
        counts, [m.astype(np.float64) for m in means], [v.astype(np.float64) for v in variances]
    )
    _, _, ours = dist.merge_moments(counts, means, variances)
    assert ours.dtype == np.float32
    ours_err = np.max(np.abs(ours.astype(np.float64) - exact) / exact)

    n = np.float32(sum(counts))
    ex = sum(np.float32(c) * m for c, m in zip(counts, means, strict=True)) / n
    ex2 = sum(np.float32(c) * (v + m * m) for c, m, v in zip(counts, means, variances, strict=True))
    naive = ex2 / n - ex * ex
    naive_err = np.max(np.abs(naive.astype(np.float64) - exact) / exact)

    data_var = np.concatenate(shards).astype(np.float64).var(axis=0)
    _, states, _ = dist.sync_bn_forward(shards, mr.init_bn_state(8, dtype=np.float32), decay=0.0)
    sync_err = np.max(np.abs(states[0].running_var.astype(np.float64) - data_var) / data_var)

    assert ours_err < 1e-5, ours_err
    assert sync_err < 1e-5, sync_err
    assert naive_err > 1e-2, naive_err  # (nearly) every digit lost


def test_per_device_merge_is_count_weighted_and_consistent() -> None:
    """Per-device MBN (the paper's setting): merging the devices' inference statistics
    count-weighted equals the moments of the pooled data the statistics summarize."""
    rng = np.random.default_rng(5)
    devices = [rng.normal(mu, sd, size=(200, 2)) for mu, sd in ((0.0, 1.0), (3.0, 2.0))]
    states = []
    for d in devices:
        s = mr.init_state(2)
        s = s._replace(running_mean=d.mean(axis=0), running_var=d.var(axis=0))
        states.append(s._replace(moving_mean=d.mean(axis=0), moving_var=d.var(axis=0)))
    merged = dist.merge_inference_statistics(states, [200, 200])
    pooled = np.concatenate(devices)
    np.testing.assert_allclose(merged.running_mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.running_var, pooled.var(axis=0), rtol=1e-12)
    # a plain average of variances ignores the spread of the means: visibly wrong here
    assert np.all(np.abs(np.mean([s.running_var for s in states], axis=0) - pooled.var(axis=0)) > 1)


def test_per_device_mbn_trains_independently_then_merges() -> None:
    rng = np.random.default_rng(9)
    states = [mr.init_state(3), mr.init_state(3)]
    for _ in range(20):
        for k in range(2):
            x = rng.normal(k * 2.0, 1.0, size=(2, 3))
            _, states[k], _ = mr.mbn_forward(x, states[k], lam=0.5, tau=0.9)
    merged = dist.merge_inference_statistics(states, [2, 2])
    assert int(merged.num_batches_tracked) == 20
    expected_mean = (states[0].running_mean + states[1].running_mean) / 2
    np.testing.assert_allclose(merged.running_mean, expected_mean, rtol=1e-12)


def test_simulate_propagates_errors_without_hanging() -> None:
    def fn(rank: int, all_sum):  # type: ignore[no-untyped-def]
        if rank == 1:
            raise RuntimeError("rank 1 failed")
        return all_sum(np.ones(1))

    with pytest.raises(RuntimeError, match="rank 1 failed"):
        dist.simulate(3, fn, timeout=10)
