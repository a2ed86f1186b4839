"""docs/spec.md §1: the two meanings of "momentum", the variance estimators, and each framework's
conventions. The end-to-end check that PyTorch's momentum=0.1 is our decay=0.9 lives in
``tests/test_bn.py::test_torch_momentum_point1_is_decay_point9``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbn_ref import conventions as cv

unit = st.floats(0.0, 1.0, allow_nan=False)


def test_decay_from_torch_point1_is_exactly_point9():
    assert cv.decay_from_torch(0.1) == 0.9
    assert cv.torch_from_decay(0.9) == 0.1
    assert cv.torch_from_decay(0.99) == 0.01
    assert cv.decay_from_torch(0.0) == 1.0 and cv.decay_from_torch(1.0) == 0.0
    assert cv.decay_from_update_rate(0.25) == 0.75
    assert cv.update_rate_from_decay(0.75) == 0.25


@given(unit)
def test_torch_and_update_rate_round_trip(d):
    assert math.isclose(cv.decay_from_torch(cv.torch_from_decay(d)), d, abs_tol=1e-14)
    assert math.isclose(cv.decay_from_update_rate(cv.update_rate_from_decay(d)), d, abs_tol=1e-14)
    assert math.isclose(cv.torch_from_decay(d) + d, 1.0, abs_tol=1e-14)


@given(unit)
def test_keras_is_the_identity(d):
    assert cv.decay_from_keras(d) == d
    assert cv.keras_from_decay(d) == d


@given(st.floats(0.0, 1e6, allow_nan=False), st.integers(2, 10_000))
def test_variance_estimators_round_trip(var, m):
    unbiased = cv.unbiased_from_biased(var, m)
    assert math.isclose(unbiased, var * m / (m - 1), rel_tol=1e-15)
    assert math.isclose(cv.biased_from_unbiased(unbiased, m), var, rel_tol=1e-14, abs_tol=0)


def test_variance_estimators_match_numpy_ddof():
    x = np.random.default_rng(0).normal(size=7)
    assert math.isclose(cv.unbiased_from_biased(x.var(), 7), x.var(ddof=1), rel_tol=1e-14)
    assert math.isclose(cv.biased_from_unbiased(x.var(ddof=1), 7), x.var(), rel_tol=1e-14)
    np.testing.assert_allclose(cv.unbiased_from_biased(np.array([1.0, 2.0]), 3), [1.5, 3.0])


@pytest.mark.parametrize("m", [1, 0, -3])
def test_variance_estimators_need_two_values(m):
    for f in (cv.unbiased_factor, lambda m: cv.unbiased_from_biased(1.0, m)):
        with pytest.raises(ValueError, match="at least 2 values"):
            f(m)
    with pytest.raises(ValueError, match="at least 2 values"):
        cv.biased_from_unbiased(1.0, m)


@pytest.mark.parametrize("m", [2.0, True, "4", None])
def test_unbiased_factor_needs_an_integer_count(m):
    with pytest.raises(TypeError, match="integer"):
        cv.unbiased_factor(m)


def _bits(x):
    return np.asarray(x, dtype=np.float64).tobytes()


@pytest.mark.parametrize("m", [2, 3, 7, 10, 49, 1000, 2**20 + 1, np.int64(5)])
def test_one_bessel_factor_bit_for_bit(m):
    """unbiased_factor is the single m/(m-1): both converters use it, bit for bit."""
    factor = cv.unbiased_factor(m)
    assert type(factor) is float and factor == int(m) / (int(m) - 1)
    var = np.random.default_rng(int(m)).uniform(0.0, 10.0, size=64)
    assert _bits(cv.unbiased_from_biased(var, m)) == _bits(var * factor)
    assert _bits(cv.biased_from_unbiased(var, m)) == _bits(var / factor)
    assert cv.unbiased_from_biased(2.5, m) == 2.5 * factor


@pytest.mark.parametrize("shape", [(2, 3), (3, 4, 5), (7, 2, 3, 3), (64, 1)])
def test_the_core_running_variance_uses_the_same_factor(shape):
    """BN's unbiased running variance is the biased one times unbiased_factor(m), bit for bit
    (decay 0: the running value is the batch's own)."""
    import mbn_ref as mr

    x = np.random.default_rng(len(shape)).normal(3.0, 2.0, size=shape)
    m = x.size // shape[1]
    _, biased, _ = mr.bn_forward(x, mr.init_bn_state(shape[1]), decay=0.0)
    _, unbiased, _ = mr.bn_forward(x, mr.init_bn_state(shape[1]), decay=0.0, estimator="unbiased")
    assert _bits(unbiased.running_var) == _bits(cv.unbiased_from_biased(biased.running_var, m))


def test_inverse_std_is_the_cores_normalizing_factor():
    """eps inside the square root, the very factor that normalized the batch, bit for bit."""
    import mbn_ref as mr

    x = np.random.default_rng(3).normal(3.0, 2.0, size=(6, 4))
    _, _, ctx = mr.mbn_forward(x, mr.init_state(4), lam=0.0, eps=1e-3)
    assert _bits(cv.inverse_std(x.var(axis=0), 1e-3)) == _bits(ctx.rstd)
    assert cv.inverse_std(np.array([3.0]), 1.0).tolist() == [0.5]


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.nan, math.inf, "1e-5"])
def test_inverse_std_refuses_a_bad_eps(eps):
    with pytest.raises((ValueError, TypeError), match="eps"):
        cv.inverse_std(np.ones(2), eps)


UPDATE_RATES = [0, 1, 0.1, 0.9, 0.99, 0.999, 1 / 3, 0.123456789012345678, 1e-17, np.float32(0.9)]


@pytest.mark.parametrize("u", UPDATE_RATES)
def test_one_converter_between_decay_and_update_rate(u):
    """1 - x is computed in one place (rounded to 15 significant digits): the converters,
    the framework table, the schedules and the command line agree bit for bit."""
    from mbn_ref import schedules

    want = cv.decay_from_update_rate(u)
    assert want == float(f"{1.0 - float(u):.15g}")
    same = [
        cv.decay_from_torch(u),
        cv.FRAMEWORKS["torch"].decay(u),
        schedules.from_update_rate(schedules.constant(u))(0),
        schedules.from_update_rate(lambda count: u)(5),
    ]
    assert all(_bits(v) == _bits(want) for v in same), (want, same)
    back = [
        cv.update_rate_from_decay(u),
        cv.torch_from_decay(u),
        cv.FRAMEWORKS["torch"].momentum(u),
    ]
    assert all(_bits(v) == _bits(want) for v in back)


def test_one_minus_point_nine_reads_point_one():
    from mbn_ref import schedules

    assert cv.decay_from_update_rate(0.9) == 0.1
    assert schedules.from_update_rate(schedules.constant(0.9))(0) == 0.1
    assert 1.0 - 0.9 != 0.1  # what the schedule used to return


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf")])
def test_converters_reject_values_outside_unit_interval(bad):
    for f in (
        cv.decay_from_torch,
        cv.torch_from_decay,
        cv.decay_from_keras,
        cv.keras_from_decay,
        cv.validate_decay,
    ):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            f(bad)


@pytest.mark.parametrize("bad", [None, "0.9", True])
def test_converters_reject_non_numbers(bad):
    with pytest.raises(TypeError, match="real number"):
        cv.decay_from_torch(bad)


def test_validate_estimator():
    assert cv.validate_estimator("biased") == "biased"
    assert cv.validate_estimator("unbiased") == "unbiased"
    with pytest.raises(ValueError, match="estimator must be one of"):
        cv.validate_estimator("ddof1")


def test_frameworks_table():
    torch_c = cv.FRAMEWORKS["torch"]
    assert torch_c.momentum_is == "update_rate" and torch_c.running_var == "unbiased"
    assert torch_c.default_momentum == 0.1 and torch_c.default_eps == 1e-5
    assert torch_c.decay(0.1) == 0.9 and torch_c.momentum(0.9) == 0.1

    keras = cv.FRAMEWORKS["keras"]
    assert keras.momentum_is == "decay" and keras.running_var == "biased"
    assert keras.default_momentum == 0.99 and keras.default_eps == 1e-3
    assert keras.decay(0.99) == 0.99 and keras.momentum(0.99) == 0.99
    # as in "Why is TensorFlow's batch normalization producing unexpected results?":
    # Keras momentum=0.1 is a decay of 0.1, not PyTorch's 0.1
    assert keras.decay(0.1) == 0.1 != torch_c.decay(0.1)

    for name in ("flax", "onnx", "paper", "mbn_ref"):
        c = cv.FRAMEWORKS[name]
        assert c.momentum_is == "decay" and c.running_var == "biased", name
    assert all(c.eps_placement == "inside sqrt" for c in cv.FRAMEWORKS.values())
    assert cv.FRAMEWORKS["torch"].cumulative_average == "momentum=None"
    assert cv.FRAMEWORKS["mbn_ref"].cumulative_average == "decay=None"


@given(unit)
def test_framework_decay_and_momentum_are_inverse(d):
    for c in cv.FRAMEWORKS.values():
        assert math.isclose(c.decay(c.momentum(d)), d, abs_tol=1e-14), c.name
