"""Bad input an implementation declares it refuses, checked (docs/spec.md §9).

An adapter lists in :attr:`Capabilities.refuses <mbn_conformance.protocol.Capabilities>` the
bad inputs of :data:`~mbn_conformance.protocol.REFUSALS` that its implementation refuses
with an exception; each declared one is a check, with id ``refusal/<name>``:

``one_value_per_channel``
    a BN training batch with one value per channel: inputs ``(1, C)`` and ``(1, C, 1, 1)``
    (in the declared layouts among ``NC`` and ``NCHW``, else the first declared one with
    every spatial size 1). An MBN-only adapter gets MBN with ``lam = 0``, which normalizes
    with the batch alone too (§3.5).
``decay_out_of_range``
    a decay of 1.5 and of -0.1, through the :class:`~mbn_conformance.protocol.Step`: BN's
    ``decay``, and MBN's ``lam`` and ``tau`` where MBN is declared.
``eps_not_positive``
    ``eps`` of 0 and of -1e-5.

A refusal passes when ``train_step`` raises (any ``Exception``) **and** the state it was
given is unchanged: ``state_to_numpy`` of that state object before and after the call is
compared bit for bit (the counter only with ``batch_counter=True``), so an implementation
that updates its buffers and then raises, or a stateful layer left half-updated, fails. A
call that returns instead fails with what it returned. Each bad input is preceded by the
same call with a valid value (a batch of two values per channel, a decay of 0.9, eps 1e-5),
which must succeed: an exception there is not a refusal and propagates as itself, as does
any exception from ``init_state``, ``load_state`` or ``state_to_numpy``.

This module needs no hypothesis. Each refusal offers the check generator the interface of
:class:`mbn_conformance.checks.Law`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .protocol import Adapter, Kind, Setup, Step

__all__ = ["PREFIX", "REFUSALS", "Refusal", "preferred_dtype"]

PREFIX = "refusal/"


def preferred_dtype(adapter: Adapter) -> str:
    """The dtype checks run in: float64 if declared, else float32, else float16."""
    for dt in ("float64", "float32", "float16"):
        if dt in adapter.capabilities.dtypes:
            return dt
    raise ValueError(f"{adapter.name} declares no floating dtype")


# layout -> (number of spatial axes, channel axis)
_LAYOUTS: Mapping[str, tuple[int, int]] = {
    "NC": (0, 1),
    "NCL": (1, 1),
    "NCHW": (2, 1),
    "NCDHW": (3, 1),
    "NHWC": (2, -1),
}
_C = 3  # channels of every refusal's batch


def _shape(layout: str, n: int, spatial: int) -> tuple[int, ...]:
    k, axis = _LAYOUTS[layout]
    rest = (spatial,) * k
    return (n, _C, *rest) if axis == 1 else (n, *rest, _C)


@dataclass(frozen=True)
class _Attempt:
    """One bad call and the valid call that precedes it (same layer, fresh states)."""

    what: str
    setup: Setup
    good: Step
    bad: Step
    good_x: np.ndarray
    bad_x: np.ndarray


def _hp(adapter: Adapter, v: float) -> float:
    """``v`` as the implementation holds hyper-parameters (rounded to float32 if declared)."""
    if adapter.capabilities.hyperparameter_dtype == "float32":
        return float(np.float32(v))
    return v


def _kind(adapter: Adapter) -> Kind:
    return "bn" if "bn" in adapter.capabilities.algorithms else "mbn"


def _layouts(adapter: Adapter, preferred: tuple[str, ...]) -> list[str]:
    declared = adapter.capabilities.layouts
    chosen = [lay for lay in preferred if lay in declared]
    return chosen or [next(lay for lay in _LAYOUTS if lay in declared)]


def _data(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.round(rng.standard_normal(shape) * 256) / 256).astype(dtype)


def _step(adapter: Adapter, kind: Kind, axis: int, **kw: float) -> Step:
    """A training step: eps 1e-5, decays 0.9, ``lam`` 0, but for ``kw`` (eps or a decay)."""
    values = {"eps": 1e-5, "decay": 0.9, "lam": 0.0, "tau": 0.9, **kw}
    return Step(
        kind=kind,
        index=0,
        training=True,
        eps=_hp(adapter, values["eps"]),
        axis=axis,
        estimator=adapter.capabilities.running_var,
        decay=_hp(adapter, values["decay"]),
        lam=_hp(adapter, values["lam"]),
        tau=_hp(adapter, values["tau"]),
    )


def _one_value_attempts(adapter: Adapter) -> list[_Attempt]:
    kind, dtype = _kind(adapter), preferred_dtype(adapter)
    out = []
    for layout in _layouts(adapter, ("NC", "NCHW")):
        axis = _LAYOUTS[layout][1]
        bad_shape, good_shape = _shape(layout, 1, 1), _shape(layout, 2, 1)
        setup = Setup(kind, layout, bad_shape, axis, _C, dtype, True)
        step = _step(adapter, kind, axis)  # lam = 0 for MBN: the batch alone normalizes
        out.append(
            _Attempt(
                f"a {kind.upper()} training batch of shape {bad_shape} ({layout}, one value per "
                "channel)",
                setup,
                step,
                step,
                _data(good_shape, dtype, 1),
                _data(bad_shape, dtype, 2),
            )
        )
    return out


def _valid_setup(adapter: Adapter, kind: Kind) -> tuple[Setup, np.ndarray]:
    dtype = preferred_dtype(adapter)
    layout = _layouts(adapter, ("NC", "NCHW"))[0]
    shape = _shape(layout, 4, 2)
    axis = _LAYOUTS[layout][1]
    setup = Setup(kind, layout, shape, axis, _C, dtype, True)
    return setup, _data(shape, dtype, 3)


def _decay_attempts(adapter: Adapter) -> list[_Attempt]:
    algorithms = adapter.capabilities.algorithms
    fields: list[tuple[Kind, str]] = [("bn", "decay")] if "bn" in algorithms else []
    if "mbn" in algorithms:
        fields += [("mbn", "lam"), ("mbn", "tau")]
    out = []
    for kind, name in fields:
        setup, x = _valid_setup(adapter, kind)
        good = _step(adapter, kind, setup.axis, **{name: 0.9 if name != "lam" else 0.5})
        for value in (1.5, -0.1):
            bad = _step(adapter, kind, setup.axis, **{name: value})
            what = f"{kind.upper()} {name}={getattr(bad, name):g} (outside [0, 1])"
            out.append(_Attempt(what, setup, good, bad, x, x))
    return out


def _eps_attempts(adapter: Adapter) -> list[_Attempt]:
    kind = _kind(adapter)
    setup, x = _valid_setup(adapter, kind)
    good = _step(adapter, kind, setup.axis)
    return [
        _Attempt(f"eps={value:g}", setup, good, _step(adapter, kind, setup.axis, eps=value), x, x)
        for value in (0.0, -1e-5)
    ]


def _initial(setup: Setup, counter: bool) -> dict[str, np.ndarray]:
    values = {
        "running_mean": np.linspace(-0.5, 0.5, setup.num_features),
        "running_var": np.linspace(0.5, 1.5, setup.num_features),
    }
    if setup.kind == "mbn":
        values["moving_mean"] = np.linspace(0.25, -0.25, setup.num_features)
        values["moving_var"] = np.linspace(1.25, 0.75, setup.num_features)
    if counter:
        values["num_batches_tracked"] = np.asarray(3, dtype=np.int64)
    return values


def _snapshot(adapter: Adapter, state: Any, counter: bool) -> dict[str, np.ndarray]:
    """A copy of the state's fields (``state_to_numpy`` may return live buffers)."""
    got = adapter.state_to_numpy(state)
    return {
        k: np.array(v, copy=True) for k, v in got.items() if counter or k != "num_batches_tracked"
    }


def _changed(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> list[str]:
    out = []
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            out.append(f"{key} {'appeared' if key not in before else 'disappeared'}")
            continue
        a, b = np.asarray(before[key]), np.asarray(after[key])
        if a.shape != b.shape:
            out.append(f"{key} shape {a.shape} -> {b.shape}")
            continue
        fa, fb = a.astype(np.float64), b.astype(np.float64)
        same = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
        if not np.all(same):
            out.append(
                f"{key} {np.array2string(a, precision=6)} -> {np.array2string(b, precision=6)}"
            )
    return out


def _describe(out: Any) -> str:
    """What a call that should have raised returned, in a few words."""
    if not isinstance(out, tuple | list) or not out:
        return f"returned {type(out).__name__}"
    shape = getattr(out[0], "shape", None)
    y = "" if shape is None else f", y of shape {tuple(shape)}"
    return f"returned a {type(out).__name__} of {len(out)}{y}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _try(adapter: Adapter, attempt: _Attempt) -> str | None:
    """Run the valid call, then the bad one on a fresh state; the failure text, or ``None``."""
    counter = adapter.capabilities.batch_counter
    init = _initial(attempt.setup, counter)
    c = attempt.setup.num_features
    gamma = adapter.from_numpy(np.linspace(0.75, 1.25, c).astype(attempt.setup.dtype))
    beta = adapter.from_numpy(np.linspace(-0.5, 0.5, c).astype(attempt.setup.dtype))

    def fresh() -> Any:
        return adapter.load_state(adapter.init_state(attempt.setup), dict(init))

    # the control: the same layer with a valid value must work (its exception propagates)
    good_setup = replace(attempt.setup, shape=attempt.good_x.shape)
    state = adapter.load_state(adapter.init_state(good_setup), dict(init))
    adapter.train_step(attempt.good, state, adapter.from_numpy(attempt.good_x), gamma, beta)

    state = fresh()
    before = _snapshot(adapter, state, counter)
    try:
        out = adapter.train_step(attempt.bad, state, adapter.from_numpy(attempt.bad_x), gamma, beta)
    except Exception as exc:
        changed = _changed(before, _snapshot(adapter, state, counter))
        if changed:
            return (
                f"{attempt.what}: train_step raised {type(exc).__name__}: {_first_line(exc)} "
                f"but first modified the state it was given: {'; '.join(changed)}"
            )
        return None
    return f"{attempt.what}: train_step accepted it ({_describe(out)}, no exception)"


@dataclass(frozen=True)
class Refusal:
    """A bad input the adapter must refuse if it declares so.

    Attributes
    ----------
    name : str
        One of :data:`~mbn_conformance.protocol.REFUSALS`.
    doc : str
        One line saying what is refused.
    attempts : callable
        The bad calls to make, from the adapter's declaration.
    """

    name: str
    doc: str
    attempts: Callable[[Adapter], list[_Attempt]]

    @property
    def id(self) -> str:
        """``refusal/<name>``."""
        return PREFIX + self.name

    def needs(self, adapter: Adapter) -> str | None:
        """``None`` when ``adapter`` declares this refusal and runs BN or MBN."""
        caps = adapter.capabilities
        if self.name not in caps.refuses:
            return f"refusal {self.name} not declared"
        if not {"bn", "mbn"} & set(caps.algorithms):
            return "neither bn nor mbn declared"
        return None

    def check(self, adapter: Adapter, settings: Any = None) -> None:
        """``AssertionError`` naming every bad input accepted or state modified.

        ``settings`` is ignored (the interface of :class:`mbn_conformance.checks.Law`).
        """
        attempts = self.attempts(adapter)
        failures = [f for a in attempts if (f := _try(adapter, a)) is not None]
        if failures:
            head = f"{self.id}: {len(failures)} of {len(attempts)} bad inputs not refused cleanly"
            raise AssertionError("\n".join([head, *(f"  - {f}" for f in failures)]))


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "one_value_per_channel",
        "A BN training batch with one value per channel ((1, C), (1, C, 1, 1)) raises.",
        _one_value_attempts,
    ),
    Refusal(
        "decay_out_of_range",
        "A decay outside [0, 1] (1.5, -0.1: BN's decay, MBN's lam and tau) raises.",
        _decay_attempts,
    ),
    Refusal("eps_not_positive", "eps <= 0 (0 and -1e-5) raises.", _eps_attempts),
)
"""One check per name of :data:`~mbn_conformance.protocol.REFUSALS`, in its order."""
