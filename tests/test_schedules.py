"""Tests of mbn_ref.schedules.paper (Eq. 11, Eq. 12) and mbn_ref.schedules.basic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbn_ref import schedules as S

# ------------------------------------------------------------------------------------------
# Eq. 11
# ------------------------------------------------------------------------------------------

totals = st.integers(min_value=2, max_value=10_000)
sizes = st.integers(min_value=1, max_value=512)


def lam(t: float, total: float, m: float = 2, m0: float = 32) -> float:
    return S.mbn_lambda(t, total_epochs=total, batch_size=m, ideal_batch_size=m0)


def printed_eq11(t: float, total: float, m: float, m0: float) -> float:
    """Eq. 11 exactly as printed in the paper."""
    rho = min(m / m0, 1.0) ** (1.0 / total)
    return float(rho ** (total / (total - 1) * max(total - t, 0)) - rho**total)


def test_lambda_known_values() -> None:
    # r = 1/16, T = 200: lam(t) = (1/16)**((200-t)/199) - 1/16, computed by hand/mpmath.
    assert lam(1, 200) == 0.0
    assert lam(200, 200) == 0.9375
    assert lam(100, 200) == pytest.approx(0.18576447628042621, abs=1e-16)
    # T = 2 is a two-step schedule: 0 then 1 - r.
    assert lam(1, 2, m=4, m0=16) == 0.0
    assert lam(2, 2, m=4, m0=16) == 0.75


@given(t=st.integers(1, 20_000), total=totals, m=sizes, m0=sizes)
def test_lambda_equals_printed_form(t: int, total: int, m: int, m0: int) -> None:
    assert lam(t, total, m, m0) == pytest.approx(printed_eq11(t, total, m, m0), abs=1e-11)


@given(total=totals, m=sizes, m0=sizes)
def test_lambda_endpoints_and_range(total: int, m: int, m0: int) -> None:
    r = min(m / m0, 1.0)
    assert lam(1, total, m, m0) == 0.0
    assert lam(total, total, m, m0) == 1.0 - r
    assert lam(total + 1, total, m, m0) == 1.0 - r
    assert lam(10.5 * total, total, m, m0) == 1.0 - r
    values = S.mbn_lambda(
        np.arange(1, total + 1), total_epochs=total, batch_size=m, ideal_batch_size=m0
    )
    assert np.all((values >= 0) & (values < 1))
    assert np.all(np.diff(values) >= 0)  # non-decreasing


@given(t1=st.floats(1, 1e4), t2=st.floats(1, 1e4), total=st.floats(1.5, 1e4), m=sizes)
def test_lambda_monotone_in_real_t(t1: float, t2: float, total: float, m: int) -> None:
    lo, hi = sorted((t1, t2))
    assert 0.0 <= lam(lo, total, m) <= lam(hi, total, m) < 1.0


@given(t=st.floats(1, 1e6), total=st.integers(1, 10**6), m=st.integers(32, 4096))
def test_lambda_zero_when_batch_at_least_ideal(t: float, total: int, m: int) -> None:
    assert lam(t, total, m, 32) == 0.0


@pytest.mark.parametrize("t", [1, 2, 1.5, 7, 1000])
def test_lambda_single_epoch_is_bn(t: float) -> None:
    """T = 1 is 0/0 in the paper; defined as 0 (MBN = BN) for every t."""
    assert lam(t, 1) == 0.0
    assert lam(t, 1, m=1, m0=1024) == 0.0
    np.testing.assert_array_equal(
        S.mbn_lambda(np.array([1.0, 2.0]), total_epochs=1, batch_size=2), [0.0, 0.0]
    )


def test_lambda_accurate_for_per_step_use() -> None:
    """T = 1e6 steps: absolute error within one ulp of 1 (the printed form is off ~3e-12)."""
    total, r = 10**6, Fraction(1, 16)
    ts = [1, 2, 10, 1000, 123_457, 500_000, 999_999, 10**6]
    # Reference 1, a different float64 formula: lam = r * expm1(ln(1/r) * (t-1)/(T-1)) has a
    # small *relative* error everywhere (log, expm1, product: a few ulp each).
    for t in ts:
        ref = float(r) * math.expm1(math.log(16.0) * (t - 1) / (total - 1))
        assert lam(t, total) == pytest.approx(ref, rel=1e-15, abs=2.3e-16)
    # Reference 2, arbitrary precision when mpmath is there (it comes with sympy/torch).
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        for t in ts:
            exact = mpmath.mpf(1) / 16 ** (mpmath.mpf(total - t) / (total - 1)) - mpmath.mpf(1) / 16
            assert abs(lam(t, total) - exact) <= 2.3e-16


def test_lambda_array_matches_scalar() -> None:
    t = np.linspace(1, 400, 1237)
    arr = S.mbn_lambda(t, total_epochs=300, batch_size=3, ideal_batch_size=64)
    assert isinstance(arr, np.ndarray)
    assert arr.shape == t.shape and arr.dtype == np.float64
    scalars = np.array([lam(float(x), 300, 3, 64) for x in t])
    # NumPy's vectorized pow may differ from libm's in the last place of r**e (<= 1).
    np.testing.assert_allclose(arr, scalars, rtol=0, atol=4.5e-16)
    assert arr[-1] == 1 - 3 / 64


def test_lambda_scalar_returns_python_float() -> None:
    assert type(lam(5, 10)) is float
    assert type(lam(np.float64(5.0), 10)) is float


@pytest.mark.parametrize("epoch", [0, 0.5, -1, float("nan")])
def test_lambda_rejects_epoch_below_one(epoch: float) -> None:
    with pytest.raises(ValueError, match=r"1-indexed|finite"):
        lam(epoch, 10)
    with pytest.raises(ValueError, match=r"1-indexed|0-indexed"):
        S.mbn_lambda(np.array([1.0, 0.0]), total_epochs=10, batch_size=2)


def test_lambda_zero_epoch_message_hints_at_indexing() -> None:
    with pytest.raises(ValueError, match=r"1-indexed.*count \+ 1"):
        lam(0, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_epochs": 0, "batch_size": 2}, "total_epochs"),
        ({"total_epochs": 0.5, "batch_size": 2}, "total_epochs"),
        ({"total_epochs": 10, "batch_size": 0}, "batch_size"),
        ({"total_epochs": 10, "batch_size": -2}, "batch_size"),
        ({"total_epochs": 10, "batch_size": 2, "ideal_batch_size": 0}, "ideal_batch_size"),
        ({"total_epochs": 10, "batch_size": float("nan")}, "batch_size"),
        ({"total_epochs": float("inf"), "batch_size": 2}, "total_epochs"),
    ],
)
def test_lambda_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.mbn_lambda(1, **kwargs)
    with pytest.raises(ValueError, match=match):
        S.mbn_lambda_schedule(**kwargs)


def test_lambda_schedule_is_zero_indexed() -> None:
    sched = S.mbn_lambda_schedule(total_epochs=200, batch_size=2, ideal_batch_size=32)
    for count in range(200):
        assert sched(count) == lam(count + 1, 200)
    assert sched(0) == 0.0
    assert sched(199) == 0.9375
    assert sched(1) == lam(2, 200) > 0
    assert sched(0.5) == lam(1.5, 200)
    with pytest.raises(ValueError, match="count"):
        sched(-1)


# ------------------------------------------------------------------------------------------
# Eq. 12
# ------------------------------------------------------------------------------------------


def test_tau_paper_value() -> None:
    tau = S.mbn_tau(batch_size=2, ideal_batch_size=32, tau0=0.85)
    assert tau == pytest.approx(0.98989, abs=1e-5)  # the paper: "about 0.99"
    assert tau == 0.85 ** (1 / 16)
    assert S.mbn_tau(batch_size=2) == tau  # §5.2 values are the defaults
    assert S.mbn_tau(batch_size=32) == 0.85
    assert S.mbn_tau(batch_size=64) == pytest.approx(0.85**2)


def test_paper_defaults_constants() -> None:
    assert S.PAPER_DEFAULTS_SEC_5_2 == (32, 0.85)
    assert S.PAPER_DEFAULTS_SEC_4_2 == (64, 0.9)
    d = S.PAPER_DEFAULTS_SEC_4_2
    assert S.mbn_tau(batch_size=2, ideal_batch_size=d.ideal_batch_size, tau0=d.tau0) == (
        pytest.approx(0.9 ** (1 / 32))
    )


@given(m=st.floats(0.01, 1e4), ratio=st.floats(1e-3, 50), tau0=st.floats(0.001, 0.999))
def test_tau_properties(m: float, ratio: float, tau0: float) -> None:
    m0 = m / ratio
    tau = S.mbn_tau(batch_size=m, ideal_batch_size=m0, tau0=tau0)
    assert 0.0 <= tau < 1.0
    # tau**(N/m) is the same for every m (Eq. 12's derivation), here with N = m * m0.
    assert math.log(tau) * m0 == pytest.approx(math.log(tau0) * m, rel=1e-9)
    if m < m0:
        assert tau >= tau0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 2, "tau0": 0.0}, "tau0"),
        ({"batch_size": 2, "tau0": 1.0}, "tau0"),
        ({"batch_size": 2, "tau0": 1.5}, "tau0"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "ideal_batch_size": -1}, "ideal_batch_size"),
    ],
)
def test_tau_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.mbn_tau(**kwargs)


# ------------------------------------------------------------------------------------------
# Generic schedules
# ------------------------------------------------------------------------------------------


def test_constant() -> None:
    s = S.constant(0.9)
    assert [s(c) for c in (0, 1, 10**9, 2.5)] == [0.9] * 4
    assert S.constant(0.0)(3) == 0.0 and S.constant(1.0)(3) == 1.0


def test_linear_seed_000_ramp() -> None:
    s = S.linear(0.9, 0.99, num_steps=100)
    assert s(0) == 0.9
    assert s(50) == pytest.approx(0.945, abs=1e-15)
    assert s(25.5) == pytest.approx(0.9 + 0.09 * 0.255, abs=1e-15)
    assert s(100) == 0.99 and s(10**6) == 0.99  # clamped after num_steps
    values = [s(c) for c in range(120)]
    assert values == sorted(values)


@given(start=st.floats(0, 1), end=st.floats(0, 1), n=st.integers(1, 1000), c=st.floats(0, 2000))
def test_linear_and_cosine_stay_between_endpoints(
    start: float, end: float, n: int, c: float
) -> None:
    for factory in (S.linear, S.cosine):
        v = factory(start, end, n)(c)
        assert min(start, end) <= v <= max(start, end)
        assert factory(start, end, n)(0) == start
        assert factory(start, end, n)(n) == end


def test_cosine_values() -> None:
    s = S.cosine(0.5, 0.9, num_steps=4)
    expected = [0.5 + 0.4 * (1 - math.cos(math.pi * c / 4)) / 2 for c in range(4)]
    assert [s(c) for c in range(4)] == pytest.approx(expected, abs=1e-15)
    assert s(2) == pytest.approx(0.7, abs=1e-15)
    assert s(4) == 0.9 and s(9) == 0.9


def test_update_rate_ramp_of_seed_003() -> None:
    """Seed 003's PyTorch momentum (an update rate) max(0.9 - epoch/50, 0.1), epochs 0..49.

    It falls 1/50 per epoch and hits its floor 0.1 at epoch 40: a linear ramp of the update
    rate 0.9 -> 0.1 over 40 steps, i.e. the decays 0.1 -> 0.9.
    """
    decay = S.from_update_rate(S.linear(0.9, 0.1, num_steps=40))
    direct = S.linear(0.1, 0.9, num_steps=40)
    seed = [1 - max(0.9 - e / 50, 0.1) for e in range(50)]
    assert [decay(e) for e in range(50)] == pytest.approx(seed, abs=1e-15)
    assert [direct(e) for e in range(50)] == pytest.approx(seed, abs=1e-15)
    assert decay(0) == pytest.approx(0.1, abs=1e-15) and decay(20) == pytest.approx(0.5)
    assert decay(40) == pytest.approx(0.9, abs=1e-15) and decay(49) == decay(40)
    with pytest.raises(ValueError, match="update rate"):
        S.from_update_rate(lambda c: 2.0)(0)


def test_exponential() -> None:
    s = S.exponential(0.5, 0.5)
    assert [s(c) for c in range(4)] == [0.5, 0.25, 0.125, 0.0625]
    floor = S.exponential(0.99, 0.9, end=0.5)
    assert floor(1) == pytest.approx(0.891) and floor(100) == 0.5
    ceiling = S.exponential(0.5, 1.5, end=0.99)
    assert ceiling(1) == 0.75 and ceiling(2) == 0.99
    assert ceiling(1e6) == 0.99  # 1.5**1e6 overflows: the ceiling applies
    assert S.exponential(0.5, 1e-300)(1e6) == 0.0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0.5, 1.1), {}, "end"),
        ((0.5, 1.1), {"end": 0.4}, "ceiling"),
        ((0.5, 0.9), {"end": 0.6}, "floor"),
        ((0.5, 0.0), {}, "rate"),
        ((0.5, -1.0), {}, "rate"),
        ((1.5, 0.9), {}, "start"),
        ((0.5, 1.1), {"end": 1.1}, "end"),
    ],
)
def test_exponential_bad(args: tuple[float, float], kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.exponential(*args, **kwargs)


def test_piecewise_constant() -> None:
    s = S.piecewise_constant([10, 20], [0.9, 0.95, 0.99])
    assert [s(c) for c in (0, 9, 9.99, 10, 19, 20, 10**6)] == [
        0.9,
        0.9,
        0.9,
        0.95,
        0.95,
        0.99,
        0.99,
    ]
    assert S.piecewise_constant([], [0.7])(5) == 0.7


def test_cumulative_is_exact_mean() -> None:
    s = S.cumulative()
    assert [s(c) for c in range(4)] == [0.0, 0.5, 2 / 3, 0.75]
    rng = np.random.default_rng(0)
    batches = rng.normal(size=57)
    running = 123.0  # the initial value is forgotten at the first update
    for count, b in enumerate(batches):
        d = s(count)
        running = d * running + (1 - d) * b
    assert running == pytest.approx(batches.mean(), rel=1e-13)


def test_join() -> None:
    s = S.join([S.constant(0.0), S.linear(0.9, 0.99, 10), S.constant(0.999)], [5, 20])
    assert s(0) == 0.0 and s(4.9) == 0.0
    assert s(5) == 0.9  # the second schedule restarts at count 0
    assert s(10) == pytest.approx(0.945, abs=1e-15)
    assert s(15) == 0.99 and s(19) == 0.99
    assert s(20) == 0.999
    single = S.join([S.cumulative()], [])
    assert single(3) == 0.75


def test_join_checks_each_output() -> None:
    def bad(count: float, /) -> float:
        return 1.5

    with pytest.raises(ValueError, match="decay"):
        S.join([S.constant(0.5), bad], [2])(3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: S.constant(1.01),
        lambda: S.constant(-0.1),
        lambda: S.constant(float("nan")),
        lambda: S.linear(0.9, 1.2, 10),
        lambda: S.linear(0.9, 0.99, 0),
        lambda: S.cosine(-0.1, 0.5, 10),
        lambda: S.cosine(0.1, 0.5, 0),
        lambda: S.piecewise_constant([10, 5], [0.1, 0.2, 0.3]),
        lambda: S.piecewise_constant([10, 10], [0.1, 0.2, 0.3]),
        lambda: S.piecewise_constant([10], [0.1]),
        lambda: S.piecewise_constant([10], [0.1, 1.2]),
        lambda: S.piecewise_constant([-1], [0.1, 0.2]),
        lambda: S.join([S.constant(0.1)], [5]),
        lambda: S.join([S.constant(0.1), S.constant(0.2)], [5, 3]),
    ],
)
def test_factories_validate_at_construction(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_factories_reject_non_numbers() -> None:
    with pytest.raises(TypeError):
        S.constant("0.9")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        S.linear(0.9, 0.99, 10.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sched",
    [
        S.constant(0.5),
        S.linear(0.1, 0.2, 3),
        S.cosine(0.1, 0.2, 3),
        S.exponential(0.5, 0.5),
        S.piecewise_constant([1], [0.1, 0.2]),
        S.cumulative(),
        S.join([S.constant(0.1), S.constant(0.2)], [1]),
    ],
)
def test_schedules_reject_negative_count(sched: S.Schedule) -> None:
    with pytest.raises(ValueError, match="0-indexed"):
        sched(-1)
    with pytest.raises(ValueError):
        sched(float("nan"))
    assert type(sched(2)) is float
