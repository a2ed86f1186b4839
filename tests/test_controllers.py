"""Tests of mbn_ref.schedules.controllers: plateau and gradient-noise-scale controllers."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbn_ref.noise import lam_for_effective_batch_size
from mbn_ref.schedules import (
    GradientNoiseController,
    GradientNoiseState,
    PlateauController,
    PlateauState,
)


def json_roundtrip(d: dict[str, Any]) -> Any:
    return json.loads(json.dumps(d, allow_nan=False))


# ------------------------------------------------------------------------------------------
# PlateauController
# ------------------------------------------------------------------------------------------


def run_plateau(ctl: PlateauController, metrics: list[float]) -> list[float]:
    s, out = ctl.init(), []
    for v in metrics:
        s = ctl.update(s, v)
        out.append(s.decay)
    return out


def test_plateau_seed_000_rule() -> None:
    ctl = PlateauController()
    assert ctl.init() == PlateauState(decay=0.9, best=None)
    decays = run_plateau(ctl, [1.0, 0.9, 0.95, 0.9, 0.8])
    # improve, improve, worse, equal (not an improvement), improve
    assert decays == pytest.approx([0.91, 0.92, 0.91, 0.90, 0.91], abs=1e-12)


def test_plateau_clamps() -> None:
    ctl = PlateauController()
    up = run_plateau(ctl, [10.0 - k for k in range(20)])
    assert up[-1] == 0.99 and max(up) == 0.99
    down = run_plateau(ctl, [1.0] + [2.0] * 20)
    assert down[-1] == 0.8 and min(down) == 0.8


def test_plateau_mode_max_and_min_delta() -> None:
    ctl = PlateauController(mode="max", step_up=0.05, step_down=0.02, min_delta=0.1)
    s = ctl.update(ctl.init(), 0.5)  # first finite metric improves
    assert s.decay == pytest.approx(0.95) and s.best == 0.5
    s = ctl.update(s, 0.55)  # +0.05 < min_delta: no improvement, best kept
    assert s.decay == pytest.approx(0.93) and s.best == 0.5
    s = ctl.update(s, 0.7)
    assert s.decay == pytest.approx(0.98) and s.best == 0.7


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_plateau_non_finite_metric_is_no_improvement(bad: float) -> None:
    ctl = PlateauController()
    s0 = ctl.init()
    s = ctl.update(s0, bad)
    assert s.decay == pytest.approx(0.89) and s.best is None
    s = ctl.update(ctl.update(s, 1.0), bad)
    assert s.best == 1.0 and s.decay == pytest.approx(0.89)
    json_roundtrip(ctl.state_to_dict(s))  # stays strict JSON


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0.995},
        {"initial": 0.5},
        {"min_decay": 0.95, "max_decay": 0.9},
        {"max_decay": 1.5},
        {"step_up": -0.01},
        {"step_down": math.nan},
        {"min_delta": -1.0},
        {"mode": "lower"},
    ],
)
def test_plateau_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PlateauController(**kwargs)


def test_plateau_rejects_non_number_metric() -> None:
    ctl = PlateauController()
    with pytest.raises(TypeError):
        ctl.update(ctl.init(), "0.5")  # type: ignore[arg-type]


metric_lists = st.lists(
    st.one_of(st.floats(-1e6, 1e6), st.just(math.nan), st.just(math.inf)), max_size=30
)


@given(before=metric_lists, after=metric_lists, mode=st.sampled_from(["min", "max"]))
def test_plateau_restore_mid_run_is_exact(
    before: list[float], after: list[float], mode: str
) -> None:
    ctl = PlateauController(mode=mode, step_up=0.013, step_down=0.007)  # type: ignore[arg-type]
    s = ctl.init()
    for v in before:
        s = ctl.update(s, v)
    restored = ctl.state_from_dict(json_roundtrip(ctl.state_to_dict(s)))
    assert restored == s
    assert type(restored.decay) is float
    for v in after:
        s, restored = ctl.update(s, v), ctl.update(restored, v)
        assert ctl.state_to_dict(restored) == ctl.state_to_dict(s)


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"decay": 0.9}, "missing key 'best'"),
        ({"decay": 0.9, "best": None, "extra": 1}, "unknown key 'extra'"),
        ({"decay": "0.9", "best": None}, "'decay'"),
        ({"decay": 1.2, "best": None}, "'decay'"),
        ({"decay": 0.9, "best": [1.0]}, "'best'"),
        ({"decay": 0.9, "best": math.nan}, "'best'"),
        ([0.9, None], "dict"),
    ],
)
def test_plateau_state_from_dict_errors(d: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlateauController().state_from_dict(d)


# ------------------------------------------------------------------------------------------
# GradientNoiseController: the estimator
# ------------------------------------------------------------------------------------------


def feed(
    ctl: GradientNoiseController, grads: Any, state: GradientNoiseState | None = None
) -> GradientNoiseState:
    s = ctl.init() if state is None else state
    for g in grads:
        s = ctl.update(s, g)
    return s


def test_moments_exact_in_cumulative_phase() -> None:
    """While 1/n >= alpha the moments are the exact mean and (biased) variance."""
    rng = np.random.default_rng(1)
    grads = rng.normal(3.0, 2.0, size=(40, 7))
    ctl = GradientNoiseController(batch_size=4, alpha=0.01)
    s = feed(ctl, grads)
    np.testing.assert_allclose(s.mean, grads.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(s.var, grads.var(axis=0), rtol=1e-12)
    assert s.weight_sq == pytest.approx(1 / 40, rel=1e-13)
    assert s.num_updates == 40


def test_moments_match_weighted_definition_in_ema_phase() -> None:
    rng = np.random.default_rng(2)
    n, alpha = 300, 0.05
    grads = rng.normal(-1.0, 0.5, size=(n, 5))
    s = feed(GradientNoiseController(batch_size=4, alpha=alpha), grads)
    # weights of the average: a_k = max(alpha, 1/k), w_k = a_k * prod_{j>k} (1 - a_j)
    a = np.maximum(alpha, 1.0 / np.arange(1, n + 1))
    w = a * np.append(np.cumprod((1 - a)[::-1])[::-1][1:], 1.0)
    assert w.sum() == pytest.approx(1.0, rel=1e-12)
    mean = w @ grads
    np.testing.assert_allclose(s.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(s.var, w @ (grads - mean) ** 2, rtol=1e-10)
    assert s.weight_sq == pytest.approx(float(w @ w), rel=1e-12)
    assert s.weight_sq == pytest.approx(alpha / (2 - alpha), rel=1e-6)  # stationary value


def test_variance_is_stable_with_large_offset() -> None:
    """Mean 1e8, std 1: E[g^2] - E[g]^2 would lose every digit; West's update does not."""
    rng = np.random.default_rng(3)
    grads = 1e8 + rng.standard_normal((50, 4))
    s = feed(GradientNoiseController(batch_size=4, alpha=0.01), grads)
    np.testing.assert_allclose(s.var, (grads - 1e8).var(axis=0), rtol=1e-6)


def synthetic_run(
    seed: int, g_true: Any, per_example_std: Any, batch: int, steps: int, alpha: float = 0.01
) -> tuple[GradientNoiseController, GradientNoiseState]:
    rng = np.random.default_rng(seed)
    ctl = GradientNoiseController(batch_size=batch, alpha=alpha, warmup_steps=100)
    grads = g_true + rng.standard_normal((steps, g_true.size)) * per_example_std / np.sqrt(batch)
    return ctl, feed(ctl, grads)


def test_noise_scale_converges_signal_dominated() -> None:
    """True B_simple = tr(Sigma)/|G|^2 = 8.2496...; within 15% (about 4 standard errors)."""
    g_true = np.linspace(-1, 1, 50) + 0.3
    std = np.linspace(0.5, 3, 50)
    true = float(np.sum(std**2) / (g_true @ g_true))
    assert true == pytest.approx(8.2496497, rel=1e-7)
    ctl, s = synthetic_run(0, g_true, std, batch=8, steps=3000)
    scale = ctl.noise_scale(s)
    assert scale is not None
    assert scale == pytest.approx(true, rel=0.15)


def test_noise_scale_converges_noise_dominated_and_bias_correction_matters() -> None:
    """B_simple = 800 >> B = 8; not removing Var[mean] from |mean|^2 gives ~33% too low."""
    g_true = np.full(200, 0.05)
    std = np.full(200, math.sqrt(2.0))
    ctl, s = synthetic_run(0, g_true, std, batch=8, steps=4000)
    scale = ctl.noise_scale(s)
    assert scale is not None
    assert scale == pytest.approx(800.0, rel=0.15)
    naive = 8 * float(np.sum(s.var)) / float(s.mean @ s.mean)
    assert naive < 0.75 * 800.0
    # the decay follows the mapping: lam(8, 800) = 792/808
    assert s.decay == ctl.decay_for_noise_scale(scale)
    assert s.decay == pytest.approx(792 / 808, abs=0.005)


# ------------------------------------------------------------------------------------------
# GradientNoiseController: mapping, warm-up, inputs
# ------------------------------------------------------------------------------------------


def test_mapping_values_monotone_and_clipped() -> None:
    ctl = GradientNoiseController(batch_size=4, min_decay=0.1, max_decay=0.95)
    assert ctl.decay_for_noise_scale(16.0) == pytest.approx(0.6)
    assert ctl.decay_for_noise_scale(16.0) == float(lam_for_effective_batch_size(4, 16.0))
    assert ctl.decay_for_noise_scale(4.0) == 0.1  # lam = 0, clipped up to min_decay
    assert ctl.decay_for_noise_scale(0.0) == 0.1
    assert ctl.decay_for_noise_scale(1e6) == 0.95  # clipped down to max_decay
    assert ctl.decay_for_noise_scale(math.inf) == 0.95
    grid = np.geomspace(1e-3, 1e6, 500)
    values = [ctl.decay_for_noise_scale(float(b)) for b in grid]
    assert values == sorted(values)
    assert sum(0.1 < v < 0.95 for v in values) > 50  # graded between 4 and 156
    with pytest.raises(ValueError, match="NaN"):
        ctl.decay_for_noise_scale(math.nan)


def test_mapping_uses_norm_batch_size() -> None:
    ctl = GradientNoiseController(batch_size=64, norm_batch_size=2)
    assert ctl.decay_for_noise_scale(6.0) == pytest.approx(0.5)  # (6-2)/(6+2)


def test_warmup_then_mapping() -> None:
    rng = np.random.default_rng(4)
    ctl = GradientNoiseController(batch_size=4, warmup_steps=5, initial=0.42, alpha=0.5)
    s = ctl.init()
    assert s.decay == 0.42 and ctl.noise_scale(s) is None
    decays = []
    for _ in range(8):
        s = ctl.update(s, 0.5 + rng.standard_normal(30))
        decays.append(s.decay)
    assert decays[:5] == [0.42] * 5
    scale = ctl.noise_scale(s)
    assert scale is not None
    assert decays[-1] == ctl.decay_for_noise_scale(scale) != 0.42


def test_non_finite_gradient_leaves_state_unchanged() -> None:
    ctl = GradientNoiseController(batch_size=4)
    s = feed(ctl, np.ones((3, 5)) + np.arange(15.0).reshape(3, 5))
    for bad in (np.full(5, np.nan), np.array([1.0, np.inf, 0, 0, 0])):
        assert ctl.update(s, bad) is s


def test_gradient_input_checks() -> None:
    ctl = GradientNoiseController(batch_size=4)
    s = ctl.update(ctl.init(), np.zeros((2, 3), dtype=np.float32))  # any shape, flattened
    assert s.mean.shape == (6,) and s.mean.dtype == np.float64
    with pytest.raises(ValueError, match="6"):
        ctl.update(s, np.zeros(5))
    with pytest.raises(TypeError, match="floating"):
        ctl.update(s, np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        ctl.update(ctl.init(), np.zeros(0))


def test_update_does_not_mutate() -> None:
    ctl = GradientNoiseController(batch_size=4)
    s1 = feed(ctl, [np.array([1.0, 2.0]), np.array([2.0, 0.0])])
    before = ctl.state_to_dict(s1)
    ctl.update(s1, np.array([5.0, 5.0]))
    assert ctl.state_to_dict(s1) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 4, "norm_batch_size": -1},
        {"batch_size": 4, "alpha": 0.0},
        {"batch_size": 4, "alpha": 1.5},
        {"batch_size": 4, "warmup_steps": 0},
        {"batch_size": 4, "initial": 1.1},
        {"batch_size": 4, "min_decay": 0.9, "max_decay": 0.5},
    ],
)
def test_gradient_noise_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GradientNoiseController(**kwargs)


# ------------------------------------------------------------------------------------------
# GradientNoiseController: state save/restore
# ------------------------------------------------------------------------------------------

grad_seqs = st.integers(1, 6).flatmap(
    lambda p: st.lists(
        st.lists(st.floats(-1e3, 1e3, allow_subnormal=False), min_size=p, max_size=p),
        min_size=0,
        max_size=25,
    )
)


@given(before=grad_seqs, after_seed=st.integers(0, 2**32 - 1), warmup=st.integers(1, 5))
def test_gradient_noise_restore_mid_run_is_exact(
    before: list[list[float]], after_seed: int, warmup: int
) -> None:
    ctl = GradientNoiseController(batch_size=3, alpha=0.2, warmup_steps=warmup)
    s = feed(ctl, [np.array(g) for g in before])
    d = ctl.state_to_dict(s)
    restored = ctl.state_from_dict(json_roundtrip(d))
    assert ctl.state_to_dict(restored) == d
    assert restored.decay == s.decay and restored.weight_sq == s.weight_sq
    np.testing.assert_array_equal(restored.mean, s.mean)
    np.testing.assert_array_equal(restored.var, s.var)
    size = len(before[0]) if before else 4
    rng = np.random.default_rng(after_seed)
    for _ in range(10):
        g = rng.normal(size=size)
        s, restored = ctl.update(s, g), ctl.update(restored, g)
        assert ctl.state_to_dict(restored) == ctl.state_to_dict(s)


def good_dict() -> dict[str, Any]:
    ctl = GradientNoiseController(batch_size=3)
    return ctl.state_to_dict(feed(ctl, [np.array([1.0, 2.0]), np.array([0.0, 1.0])]))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mean": None}, "'mean'"),
        ({"var": [1.0]}, "'var'"),
        ({"mean": [[1.0, 2.0]]}, "'mean'"),
        ({"var": [1.0, -1.0]}, "'var'"),
        ({"var": [1.0, math.nan]}, "'var'"),
        ({"num_updates": -1}, "'num_updates'"),
        ({"num_updates": 1.5}, "'num_updates'"),
        ({"num_updates": 0}, "'mean'"),
        ({"weight_sq": 0.0}, "'weight_sq'"),
        ({"decay": 2.0}, "'decay'"),
        ({"extra": 1}, "unknown key 'extra'"),
    ],
)
def test_gradient_noise_state_from_dict_errors(change: dict[str, Any], match: str) -> None:
    d = {**good_dict(), **change}
    with pytest.raises(ValueError, match=match):
        GradientNoiseController(batch_size=3).state_from_dict(d)


def test_gradient_noise_state_from_dict_missing_key() -> None:
    d = good_dict()
    del d["weight_sq"]
    with pytest.raises(ValueError, match="missing key 'weight_sq'"):
        GradientNoiseController(batch_size=3).state_from_dict(d)


def test_noise_scale_formula_on_known_state() -> None:
    """s2 = sum(var)/(1-W) = 2, tr = B*s2 = 8, |G|^2 = |mean|^2 - W*s2 = 1: B_simple = 8."""
    ctl = GradientNoiseController(batch_size=4)
    d = {"decay": 0.9, "num_updates": 2, "weight_sq": 0.5, "mean": [1.0, 1.0], "var": [0.5, 0.5]}
    assert ctl.noise_scale(ctl.state_from_dict(d)) == 8.0
    # |mean|^2 below the bias: |G|^2 is floored, the scale is huge but finite
    d2 = {**d, "mean": [0.5, 0.5]}
    scale = ctl.noise_scale(ctl.state_from_dict(d2))
    assert scale is not None and 1e300 < scale < math.inf


def test_moment_corrections_are_unbiased() -> None:
    """Monte Carlo over 2000 short runs (5 and 30 steps, alpha = 0.1): the documented
    estimates sum(var)/(1-W) and |mean|^2 - W*s2 average to the true per-step variance sum and
    |G|^2, within 5 standard errors."""
    rng = np.random.default_rng(5)
    g_true, step_std = np.array([0.3, -0.2, 0.1]), np.array([1.0, 0.5, 2.0])
    true_s2, true_g2 = float(np.sum(step_std**2)), float(g_true @ g_true)
    ctl = GradientNoiseController(batch_size=1, alpha=0.1)
    for steps in (5, 30):
        s2_est, g2_est = [], []
        for _ in range(2000):
            s = feed(ctl, g_true + rng.standard_normal((steps, 3)) * step_std)
            s2 = float(np.sum(s.var)) / (1 - s.weight_sq)
            s2_est.append(s2)
            g2_est.append(float(s.mean @ s.mean) - s.weight_sq * s2)
        for est, true in ((np.array(s2_est), true_s2), (np.array(g2_est), true_g2)):
            se = est.std() / np.sqrt(est.size)
            assert abs(est.mean() - true) < 5 * se, (steps, est.mean(), true, se)


# ------------------------------------------------------------------------------------------
# GradientNoiseController on any Array API namespace, on the gradient's device
# ------------------------------------------------------------------------------------------


def _noise_grads(n: int = 40, size: int = 30, seed: int = 7) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [0.2 + np.linspace(-1, 1, size) + rng.standard_normal(size) for _ in range(n)]


def _decays(ctl: GradientNoiseController, grads: Any) -> tuple[list[float], GradientNoiseState]:
    s, out = ctl.init(), []
    for g in grads:
        s = ctl.update(s, g)
        out.append(s.decay)
    return out, s


NOISE_CTL = GradientNoiseController(batch_size=4, alpha=0.1, warmup_steps=3)


@pytest.mark.parametrize("pieces", [False, True], ids=["one-tensor", "per-parameter"])
def test_torch_gradients_give_numpy_decays(pieces: bool) -> None:
    torch = pytest.importorskip("torch")
    grads = _noise_grads()
    ref, s_np = _decays(NOISE_CTL, grads)

    def as_torch(g: Any) -> Any:
        t = torch.tensor(g, dtype=torch.float64)
        return [t[:12].reshape(3, 4), t[12:20], t[20:].reshape(2, 5)] if pieces else t

    got, s_t = _decays(NOISE_CTL, [as_torch(g) for g in grads])
    assert len(set(ref[3:])) > 10  # the mapping is live after the warm-up, values vary
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    # the moments are the same elementwise operations: bit-identical, and stay torch float64
    assert isinstance(s_t.mean, torch.Tensor) and s_t.mean.dtype == torch.float64
    np.testing.assert_array_equal(s_t.mean.numpy(), s_np.mean)
    np.testing.assert_array_equal(s_t.var.numpy(), s_np.var)


def test_torch_float32_gradient_gets_float64_moments_and_is_copied() -> None:
    torch = pytest.importorskip("torch")
    g = torch.ones(5, dtype=torch.float64)
    s = NOISE_CTL.update(NOISE_CTL.init(), g)
    g.fill_(7.0)  # a training loop overwrites its gradient in place: the state keeps its copy
    assert s.mean.tolist() == [1.0] * 5
    s32 = NOISE_CTL.update(NOISE_CTL.init(), torch.ones(2, 3, dtype=torch.float32))
    assert s32.mean.dtype == torch.float64 and s32.mean.shape == (6,)
    with pytest.raises(TypeError, match="floating"):
        NOISE_CTL.update(s, torch.ones(5, dtype=torch.int64))


def test_sequence_of_numpy_arrays_is_their_concatenation() -> None:
    grads = _noise_grads(n=12, size=10)
    ref, s_ref = _decays(NOISE_CTL, grads)
    got, s = _decays(NOISE_CTL, [[g[:3].reshape(3, 1), g[3:]] for g in grads])
    assert got == ref
    np.testing.assert_array_equal(s.mean, s_ref.mean)
    np.testing.assert_array_equal(s.var, s_ref.var)


def _no_host_tensor_class() -> Any:
    torch = pytest.importorskip("torch")

    class NoHost(torch.Tensor):  # type: ignore[misc]
        """A tensor that refuses every copy to the host (as a CUDA tensor refuses NumPy)."""

        def _refuse(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host copy of a tensor of shape {tuple(self.shape)}")

        __array__ = numpy = cpu = tolist = _refuse

    return NoHost


def test_tensor_refusing_host_copies_works() -> None:
    """Only 0-d results are read on the host (float/bool), never the gradient or moments."""
    torch = pytest.importorskip("torch")
    no_host = _no_host_tensor_class()
    grads = _noise_grads()
    ref, _ = _decays(NOISE_CTL, grads)
    wrapped = [torch.tensor(g).as_subclass(no_host) for g in grads]
    with pytest.raises(AssertionError, match="host copy"):
        np.asarray(wrapped[0])  # the subclass does refuse
    got, s = _decays(NOISE_CTL, wrapped)
    assert type(s.mean) is no_host
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert NOISE_CTL.noise_scale(s) == pytest.approx(
        NOISE_CTL.noise_scale(_decays(NOISE_CTL, grads)[1]), rel=1e-12
    )
    # the checkpoint form keeps the arrays (no host copy) and restores them exactly
    d = NOISE_CTL.state_to_dict(s, arrays=True)
    assert d["mean"] is s.mean
    restored = NOISE_CTL.state_from_dict(d)
    assert torch.equal(restored.mean, s.mean) and torch.equal(restored.var, s.var)
    assert restored.mean is not s.mean  # copied on restore


def test_array_api_strict_on_a_device_without_numpy_conversion() -> None:
    xps = pytest.importorskip("array_api_strict")
    device = xps.Device("device1")  # converting its arrays to NumPy raises
    grads = _noise_grads()
    ref, _ = _decays(NOISE_CTL, grads)
    arrays = [xps.asarray(g, device=device) for g in grads]
    with pytest.raises(RuntimeError):
        np.asarray(arrays[0])
    got, s = _decays(NOISE_CTL, arrays)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert s.mean.device == device and s.mean.dtype == xps.float64
    restored = NOISE_CTL.state_from_dict(NOISE_CTL.state_to_dict(s, arrays=True))
    assert restored.mean.device == device
    after = xps.asarray(grads[0], device=device)
    assert NOISE_CTL.update(restored, after).decay == NOISE_CTL.update(s, after).decay
    # an array on another device is refused, not transferred
    with pytest.raises(ValueError, match="device"):
        NOISE_CTL.update(s, xps.asarray(grads[0], device=xps.Device("device2")))


def test_float32_moments_where_the_device_has_no_float64() -> None:
    xps = pytest.importorskip("array_api_strict")
    device = xps.Device("no_float64")
    grads = _noise_grads(n=20)
    ref, _ = _decays(NOISE_CTL, grads)
    got, s = _decays(NOISE_CTL, [xps.asarray(g.astype(np.float32), device=device) for g in grads])
    assert s.mean.dtype == xps.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_jax_arrays() -> None:
    jnp = pytest.importorskip("jax.numpy")
    # float32 gradients (JAX's default); the reference sees the same rounded values
    grads = [g.astype(np.float32) for g in _noise_grads(n=20)]
    ref, _ = _decays(NOISE_CTL, [g.astype(np.float64) for g in grads])
    got, s = _decays(NOISE_CTL, [jnp.asarray(g) for g in grads])
    assert "jax" in type(s.mean).__module__
    # float64 only with jax_enable_x64 (the moments are float32 otherwise)
    tol = 1e-12 if s.mean.dtype == jnp.float64 else 1e-4
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def test_gradient_in_another_namespace_than_the_moments_is_refused() -> None:
    torch = pytest.importorskip("torch")
    s = NOISE_CTL.update(NOISE_CTL.init(), np.ones(3))
    with pytest.raises(TypeError, match="namespace"):
        NOISE_CTL.update(s, torch.ones(3, dtype=torch.float64))
    # the JSON form (lists) restores NumPy moments; arrays restore in their own namespace
    d = NOISE_CTL.state_to_dict(s)
    moved = {**d, "mean": torch.tensor(d["mean"]), "var": torch.tensor(d["var"])}
    s_t = NOISE_CTL.state_from_dict(moved)
    assert isinstance(s_t.mean, torch.Tensor)
    assert NOISE_CTL.update(s_t, torch.zeros(3, dtype=torch.float64)).num_updates == 2


def test_state_to_dict_lists_from_torch_moments() -> None:
    torch = pytest.importorskip("torch")
    grads = _noise_grads(n=6, size=4)
    _, s_np = _decays(NOISE_CTL, grads)
    _, s_t = _decays(NOISE_CTL, [torch.tensor(g) for g in grads])
    assert NOISE_CTL.state_to_dict(s_t) == NOISE_CTL.state_to_dict(s_np)
    json_roundtrip(NOISE_CTL.state_to_dict(s_t))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mean": "2d"}, "1-D"),
        ({"mean": "nan"}, "non-finite"),
        ({"var": "negative"}, "negative"),
        ({"var": "int"}, None),
        ({"var": "bool"}, "real numbers"),
        ({"var": "list"}, "one kind"),
        ({"var": "short"}, "length"),
    ],
)
def test_state_from_dict_array_errors(change: dict[str, str], match: str | None) -> None:
    torch = pytest.importorskip("torch")
    s = _decays(NOISE_CTL, [torch.tensor(g) for g in _noise_grads(n=3, size=4)])[1]
    d = NOISE_CTL.state_to_dict(s, arrays=True)
    ((key, how),) = change.items()
    bad = {
        "2d": d[key].reshape(2, 2),
        "nan": torch.tensor([1.0, math.nan, 0.0, 0.0], dtype=torch.float64),
        "negative": torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64),
        "int": torch.tensor([1, 0, 2, 3]),
        "bool": torch.ones(4, dtype=torch.bool),
        "list": d[key].tolist(),
        "short": d[key][:3],
    }[how]
    if match is None:  # integers are numbers: accepted, as float64 moments
        restored = NOISE_CTL.state_from_dict({**d, key: bad})
        assert restored.var.dtype == torch.float64
        return
    with pytest.raises(ValueError, match=match):
        NOISE_CTL.state_from_dict({**d, key: bad})
