"""One rule, one outcome: the argument rules of ``mbn_ref._validate`` through every public
entry point that takes a decay (or an update rate: the same interval read the other way).

The table below is the contract (docs/spec.md §9): a host real in ``[0, 1]`` is accepted, whatever
its Python or NumPy type; ``bool``/``np.bool_``, strings and ``None`` are ``TypeError``; NaN,
infinities and values outside ``[0, 1]`` are ``ValueError``. Vectorized functions
(:mod:`mbn_ref.noise`) also take arrays; compute functions (``bn_forward``...) also take 0-d
arrays (runtime state, never read on the host) and, where documented, ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

import mbn_ref as mr
from mbn_ref import _validate, conventions, noise, noise_sim, schedules
from mbn_ref.schedules import GradientNoiseController, PlateauController

OK, TYPE, VALUE = "ok", "TypeError", "ValueError"


@dataclass(frozen=True)
class Value:
    """A candidate decay and its outcome under the scalar rule (``check_decay``)."""

    id: str
    value: Any
    outcome: str


VALUES = [
    Value("0.9", 0.9, OK),
    Value("np.float32(0.9)", np.float32(0.9), OK),
    Value("np.float16(0.5)", np.float16(0.5), OK),
    Value("np.float64(1.0)", np.float64(1.0), OK),
    Value("0", 0, OK),
    Value("1", 1, OK),
    Value("np.int64(0)", np.int64(0), OK),
    Value("Fraction(1, 2)", Fraction(1, 2), OK),
    Value("True", True, TYPE),
    Value("np.bool_(True)", np.bool_(True), TYPE),
    Value("False", False, TYPE),
    Value("-0.1", -0.1, VALUE),
    Value("1.1", 1.1, VALUE),
    Value("nan", float("nan"), VALUE),
    Value("np.float32(nan)", np.float32("nan"), VALUE),
    Value("inf", float("inf"), VALUE),
    Value("-inf", -math.inf, VALUE),
    Value("'0.9'", "0.9", TYPE),
    Value("None", None, TYPE),
    Value("1j", 1j, TYPE),
    Value("Decimal('0.5')", Decimal("0.5"), TYPE),
]


@dataclass(frozen=True)
class Entry:
    """A public entry point taking one decay ``v``.

    ``kind``: ``"host"`` (host numbers only), ``"vectorized"`` (also arrays), ``"compute"``
    (also 0-d arrays; ``None`` per ``none``). ``returns`` is true when the call returns the
    decay itself, which must then equal ``float(v)`` exactly. ``open_upper``: 1 is outside
    this entry's domain (a stationary regime needs ``lam < 1``).
    """

    id: str
    call: Callable[[Any], Any]
    kind: str = "host"
    returns: bool = False
    none: str = TYPE
    open_upper: bool = False


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


_X = np.random.default_rng(1).normal(size=(4, 3))

ENTRIES = [
    # conventions
    Entry("conventions.validate_decay", conventions.validate_decay, returns=True),
    Entry("conventions.decay_from_keras", conventions.decay_from_keras, returns=True),
    Entry("conventions.keras_from_decay", conventions.keras_from_decay, returns=True),
    Entry("conventions.torch_from_decay", conventions.torch_from_decay),
    Entry("conventions.decay_from_torch", conventions.decay_from_torch),
    Entry("conventions.update_rate_from_decay", conventions.update_rate_from_decay),
    Entry("conventions.decay_from_update_rate", conventions.decay_from_update_rate),
    Entry("FRAMEWORKS[torch].decay", conventions.FRAMEWORKS["torch"].decay),
    Entry("FRAMEWORKS[torch].momentum", conventions.FRAMEWORKS["torch"].momentum),
    Entry("FRAMEWORKS[flax].decay", conventions.FRAMEWORKS["flax"].decay, returns=True),
    # schedules
    Entry("schedules.constant", lambda v: schedules.constant(v)(3), returns=True),
    Entry("schedules.linear(start)", lambda v: schedules.linear(v, 0.5, 10)(0), returns=True),
    Entry("schedules.linear(end)", lambda v: schedules.linear(0.5, v, 10)(10), returns=True),
    Entry("schedules.cosine(start)", lambda v: schedules.cosine(v, 0.5, 10)(0), returns=True),
    Entry("schedules.exponential(start)", lambda v: schedules.exponential(v, 0.5)(0)),
    Entry(
        "schedules.exponential(end)",
        lambda v: schedules.exponential(1.0, 0.5, end=v),
        none=OK,  # no floor
    ),
    Entry(
        "schedules.piecewise_constant",
        lambda v: schedules.piecewise_constant([5], [0.5, v])(7),
        returns=True,
    ),
    Entry("schedules.join (result)", lambda v: schedules.join([lambda c: v], [])(0), returns=True),
    Entry(
        "schedules.from_update_rate (result)", lambda v: schedules.from_update_rate(lambda c: v)(0)
    ),
    # controllers
    Entry(
        "PlateauController(initial)",
        lambda v: PlateauController(initial=v, min_decay=0.0, max_decay=1.0),
    ),
    Entry(
        "PlateauController(max_decay)",
        lambda v: PlateauController(initial=0, min_decay=0, max_decay=v),
    ),
    Entry(
        "GradientNoiseController(initial)",
        lambda v: GradientNoiseController(batch_size=4, initial=v, max_decay=1.0),
    ),
    Entry(
        "GradientNoiseController(max_decay)",
        lambda v: GradientNoiseController(batch_size=4, initial=0, max_decay=v),
    ),
    # the noise model (vectorized)
    Entry("noise.mbn_xi_mu_var", lambda v: noise.mbn_xi_mu_var(4, v), kind="vectorized"),
    Entry("noise.mbn_xi_sigma_var", lambda v: noise.mbn_xi_sigma_var(4, v), kind="vectorized"),
    Entry("noise.mbn_xi_mu_mean", lambda v: noise.mbn_xi_mu_mean(4, v), kind="vectorized"),
    Entry("noise.mbn_xi_sigma_mean", lambda v: noise.mbn_xi_sigma_mean(4, v), kind="vectorized"),
    Entry("noise.xi_mu_sq_mean", lambda v: noise.xi_mu_sq_mean(4, v), kind="vectorized"),
    Entry(
        "noise.variance_reduction_factor",
        noise.variance_reduction_factor,
        kind="vectorized",
    ),
    Entry(
        "noise.eq10_var_xi_mu_as_printed",
        lambda v: noise.eq10_var_xi_mu_as_printed(4, v),
        kind="vectorized",
    ),
    Entry(
        "noise.effective_batch_size", lambda v: noise.effective_batch_size(4, v), kind="vectorized"
    ),
    Entry(
        "noise.effective_batch_size_sigma",
        lambda v: noise.effective_batch_size_sigma(4, v),
        kind="vectorized",
    ),
    # the Monte Carlo samplers (a stationary regime: lam < 1)
    Entry("noise_sim.burn_in_steps", noise_sim.burn_in_steps, open_upper=True),
    Entry(
        "noise_sim.sample_mbn_noise",
        lambda v: noise_sim.sample_mbn_noise(2, v, 3, "gaussian", _rng()),
        open_upper=True,
    ),
    Entry(
        "noise_sim.sample_xhat",
        lambda v: noise_sim.sample_xhat(2, 0.5, 3, "gaussian", _rng(), lam=v),
        open_upper=True,
    ),
    # the argument check of the compute functions, and the compute functions
    Entry(
        "_validate.check_decay_arg",
        lambda v: _validate.check_decay_arg("lam", v),
        "compute",
        none=VALUE,
    ),
    Entry(
        "_validate.check_decay_arg(allow_none)",
        lambda v: _validate.check_decay_arg("decay", v, allow_none=True),
        "compute",
        none=OK,
    ),
    Entry(
        "bn_forward(decay)",
        lambda v: mr.bn_forward(_X, mr.init_bn_state(3), decay=v),
        "compute",
        none=OK,
    ),
    Entry(
        "mbn_forward(lam)",
        lambda v: mr.mbn_forward(_X, mr.init_state(3), lam=v),
        "compute",
        none=VALUE,
    ),
    Entry(
        "mbn_forward(tau)",
        lambda v: mr.mbn_forward(_X, mr.init_state(3), lam=0.5, tau=v),
        "compute",
        none=OK,
    ),
]

ARRAYS = [
    Value("np.asarray(0.9)", np.asarray(0.9), OK),
    Value("np.asarray(True)", np.asarray(True), TYPE),
    Value("np.asarray([0.5, 0.9])", np.asarray([0.5, 0.9]), OK),
    Value("[0.5, 1.5]", [0.5, 1.5], VALUE),
    Value("np.asarray(['0.9'])", np.asarray(["0.9"]), TYPE),
]


def expected(entry: Entry, v: Value) -> str:
    """The outcome the contract gives ``v`` through ``entry``."""
    if v.value is None:
        return entry.none
    if isinstance(v.value, (np.ndarray, list)):
        if entry.kind == "host":
            return TYPE
        if entry.kind == "compute":
            arr = np.asarray(v.value)
            if arr.dtype == np.bool_:
                return TYPE
            return OK if arr.ndim == 0 else VALUE
        return v.outcome
    if entry.open_upper and v.outcome == OK and float(v.value) == 1.0:
        return VALUE
    return v.outcome


def outcome(entry: Entry, value: Any) -> tuple[str, Any]:
    try:
        result = entry.call(value)
    except TypeError as exc:
        return TYPE, exc
    except ValueError as exc:
        return VALUE, exc
    return OK, result


def _cases() -> list[Any]:
    cases = []
    for e in ENTRIES:
        for v in VALUES + ARRAYS:
            if v in ARRAYS and e.kind == "compute" and np.asarray(v.value).ndim > 0:
                continue  # per-channel decays: the compute functions' own shape rules
            cases.append(pytest.param(e, v, id=f"{e.id}-{v.id}"))
    return cases


@pytest.mark.parametrize(("entry", "v"), _cases())
def test_one_rule_one_outcome(entry: Entry, v: Value) -> None:
    want = expected(entry, v)
    got, detail = outcome(entry, v.value)
    assert got == want, f"{entry.id}({v.id}): expected {want}, got {got}: {detail!r}"
    if got == OK and entry.returns:
        assert detail == float(v.value) and isinstance(detail, float)
    if got == VALUE and entry.kind != "compute" and v.value is not None:
        assert "[0, 1]" in str(detail) or "stationary" in str(detail), detail


@pytest.mark.parametrize("v", VALUES, ids=[v.id for v in VALUES])
def test_check_decay_is_the_rule(v: Value) -> None:
    got, detail = outcome(Entry("check_decay", lambda x: _validate.check_decay("d", x)), v.value)
    assert got == v.outcome
    if got == VALUE:
        msg = str(detail)
        assert "decay (weight on history) in [0, 1]" in msg and "1 - u" in msg
    if got == TYPE:
        assert str(detail).startswith("d must be a real number")


@pytest.mark.parametrize("v", VALUES, ids=[v.id for v in VALUES])
def test_checkpoints_reject_with_value_error(v: Value) -> None:
    """A checkpoint value is data, not an argument: every bad one is a ValueError (docs/spec.md §9)
    naming the key; the good ones are those of the argument rule."""
    ctl = PlateauController()
    want = OK if v.outcome == OK else VALUE
    got, detail = outcome(
        Entry("", lambda x: ctl.state_from_dict({"decay": x, "best": None})), v.value
    )
    assert got == want, detail
    if got == VALUE:
        assert "'decay'" in str(detail)


@pytest.mark.parametrize(
    ("value", "finite", "want"),
    [
        (1.5, True, 1.5),
        (np.float32(0.25), True, 0.25),
        (-3, True, -3.0),
        (float("nan"), False, "nan"),
        (float("inf"), False, math.inf),
        (float("nan"), True, ValueError),
        (-math.inf, True, ValueError),
        (True, True, TypeError),
        (np.bool_(False), False, TypeError),
        ("1", True, TypeError),
        (None, False, TypeError),
        (np.asarray(1.0), True, TypeError),
    ],
)
def test_check_real(value: Any, finite: bool, want: Any) -> None:
    if isinstance(want, type):
        with pytest.raises(want, match="rate"):
            _validate.check_real("rate", value, finite=finite)
        return
    got = _validate.check_real("rate", value, finite=finite)
    assert type(got) is float
    assert math.isnan(got) if want == "nan" else got == want


def test_check_positive_and_nonnegative() -> None:
    assert _validate.check_positive("eps", np.float32(0.5)) == 0.5
    for bad, exc in [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
    ]:
        with pytest.raises(exc, match="eps"):
            _validate.check_positive("eps", bad)
    assert _validate.check_nonnegative("step", 0) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        _validate.check_nonnegative("step", -1e-300)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (3, 3),
        (np.int64(2), 2),
        (1, ValueError),
        (2.0, TypeError),
        (True, TypeError),
        (np.bool_(True), TypeError),
        ("3", TypeError),
        (None, TypeError),
    ],
)
def test_check_int(value: Any, want: Any) -> None:
    if isinstance(want, type):
        with pytest.raises(want, match="n"):
            _validate.check_int("n", value, minimum=2)
    else:
        got = _validate.check_int("n", value, minimum=2)
        assert got == want and type(got) is int


def test_check_update_rate_says_which_convention() -> None:
    assert _validate.check_update_rate("momentum", np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match=r"update rate \(weight on the new batch\).*1 - d"):
        _validate.check_update_rate("momentum", 1.5)
    with pytest.raises(ValueError, match="PyTorch momentum must be an update rate"):
        conventions.decay_from_torch(-0.5)


def test_check_decay_arg_shapes_and_dtypes() -> None:
    _validate.check_decay_arg("lam", np.asarray(0.5, dtype=np.float32))
    _validate.check_decay_arg("lam", np.asarray(7.0))  # runtime state: never read, not checked
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        _validate.check_decay_arg("lam", np.zeros(3))
    with pytest.raises(TypeError, match="bool"):
        _validate.check_decay_arg("lam", np.asarray(True))
    with pytest.raises(TypeError, match="complex"):
        _validate.check_decay_arg("lam", np.asarray(0.5 + 0j))
    with pytest.raises(TypeError, match="real number"):
        _validate.check_decay_arg("lam", np.complex64(0.5))


def test_check_decay_arg_never_reads_a_torch_tensor() -> None:
    torch = pytest.importorskip("torch")

    class NoHostRead(torch.Tensor):  # type: ignore[misc]
        def __float__(self) -> float:
            raise AssertionError("read on the host")

        def __bool__(self) -> bool:
            raise AssertionError("read on the host")

    t = torch.tensor(0.5).as_subclass(NoHostRead)
    _validate.check_decay_arg("lam", t)
    with pytest.raises(TypeError, match="bool"):
        _validate.check_decay_arg("lam", torch.tensor(True))


def test_as_real_array() -> None:
    assert _validate.as_real_array("m", np.float32(2)).dtype == np.float64
    np.testing.assert_array_equal(_validate.as_real_array("m", [[1, 2], [3, 4]]), [[1, 2], [3, 4]])
    for bad in ([True, False], "4", b"4", None, [1, "2"], [1j], np.array([1], dtype=object)):
        with pytest.raises(TypeError, match="m must be a real number or an array"):
            _validate.as_real_array("m", bad)
    with pytest.raises(TypeError):
        _validate.as_real_array("m", [[1, 2], [3]])  # ragged


def test_the_rules_live_in_one_module() -> None:
    """No module but mbn_ref._validate defines a real-number or decay rule of its own."""
    import ast
    from pathlib import Path

    root = Path(mr.__file__).parent
    owners = {"_validate.py"}
    defined = {
        "check_real",
        "check_decay",
        "check_decay_arg",
        "check_positive",
        "check_int",
        "check_num_steps",
        "is_real_scalar",
        "_check_int",
    }
    for path in sorted(root.rglob("*.py")):
        if path.name in owners:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not names & defined, f"{path.relative_to(root)} defines {names & defined}"
