"""Checks for implementations that drive their own decays with a scheduler of their own.

The golden cases hand every step its decays, so they check a layer, not the scheduler that
feeds it in real training: an MBN whose layer is right but whose scheduler hands it ``1 - lam``
passes every case. An adapter that also implements
:class:`~mbn_conformance.protocol.ScheduledAdapter` runs its own schedule for a given
:class:`~mbn_conformance.protocol.ScheduleSetup` (the paper's ``m``, ``m0``, ``T``, ``tau0``)
and reports the decays it used at each step. Two checks follow, kept apart so that one bug does not
mask another:

``schedule/trajectory``
    the outputs and the state after every step equal the core's (:func:`mbn_ref.mbn_forward`)
    run with the **reported** decays: the layer uses what the scheduler says;
``schedule/eq11_eq12``
    the reported decays equal Eq. 11 (``lam`` at the 1-indexed epoch ``t = epoch + 1``) and
    Eq. 12 (``tau``): a deliberate other schedule is a named difference here, not a trajectory
    failure. The message names the usual confusions: a complemented decay (an update rate)
    and an epoch index off by one.

The suite's trajectory is one training step per epoch (``T`` steps), batch size ``m``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import mbn_ref as mr
from mbn_ref import schedules

from . import tolerances
from .protocol import Adapter, ScheduledAdapter, ScheduleSetup, Setup, Step

if TYPE_CHECKING:
    from hypothesis import settings as Settings

__all__ = ["SCHEDULE_CHECKS", "SETUPS", "ScheduleCheck"]


SETUPS: tuple[ScheduleSetup, ...] = (
    ScheduleSetup(batch_size=2),
    ScheduleSetup(batch_size=8, ideal_batch_size=64, total_epochs=4, tau0=0.9),
)
"""The schedules each check runs: the paper's defaults at batch size 2, and other numbers."""


def _needs(adapter: Adapter) -> str | None:
    if not isinstance(adapter, ScheduledAdapter):
        return "no own decay scheduler (scheduled_train_step) declared"
    if "mbn" not in adapter.capabilities.algorithms:
        return "algorithm mbn not declared"
    if "NCHW" not in adapter.capabilities.layouts:
        return "layout NCHW not declared"
    if "float64" not in adapter.capabilities.dtypes:
        return "dtype float64 not declared"
    return None


def _run(adapter: ScheduledAdapter, setup: ScheduleSetup) -> list[dict[str, Any]]:
    """Run the adapter's schedule; per step: inputs, outputs, state and reported decays."""
    rng = np.random.default_rng(20200823 + setup.batch_size)
    shape = (setup.batch_size, 3, 2, 2)
    geometry = Setup("mbn", "NCHW", shape, 1, 3, "float64", True)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.uniform(-1, 1, 3)
    init = {
        "running_mean": np.zeros(3),
        "running_var": np.ones(3),
        "moving_mean": np.zeros(3),
        "moving_var": np.ones(3),
        "num_batches_tracked": np.asarray(0, dtype=np.int64),
    }
    state = adapter.load_state(adapter.init_state(geometry), init)
    g, b = adapter.from_numpy(gamma), adapter.from_numpy(beta)
    estimator = adapter.capabilities.running_var
    records = []
    for epoch in range(setup.total_epochs):
        x = np.round(rng.normal(1.0, 2.0, size=shape) * 256) / 256
        step = Step("mbn", epoch, True, 1e-5, 1, estimator, decay=None, lam=0.0, tau=None)
        y, state, _, used = adapter.scheduled_train_step(
            setup, epoch, step, state, adapter.from_numpy(x), g, b
        )
        records.append(
            {
                "x": x,
                "y": adapter.to_numpy(y),
                "state": adapter.state_to_numpy(state),
                "used": (float(used[0]), float(used[1])),
            }
        )
    return [{"gamma": gamma, "beta": beta, "init": init, "estimator": estimator}, *records]


def check_trajectory(adapter: Adapter, settings: Settings | None = None) -> None:
    """The layer uses the decays its scheduler reports (outputs and state, every step)."""
    assert isinstance(adapter, ScheduledAdapter)
    for setup in SETUPS:
        head, *records = _run(adapter, setup)
        init = head["init"]
        state = mr.MBNState(
            init["moving_mean"],
            init["moving_var"],
            init["running_mean"],
            init["running_var"],
            init["num_batches_tracked"],
        )
        for k, rec in enumerate(records):
            lam, tau = rec["used"]
            if not (0.0 <= lam <= 1.0 and 0.0 <= tau <= 1.0):
                raise AssertionError(
                    f"m={setup.batch_size} step {k}: reported decays {rec['used']} are not "
                    "in [0, 1]"
                )
            y, state, _ = mr.mbn_forward(
                rec["x"],
                state,
                head["gamma"],
                head["beta"],
                lam=lam,
                tau=tau,
                estimator=head["estimator"],
            )
            expected = {"y": y, **dict(zip(state._fields, state, strict=True))}
            got = {"y": rec["y"], **rec["state"]}
            for name, want in expected.items():
                if name == "num_batches_tracked" and name not in got:
                    continue
                tol = tolerances.TOLERANCES["float64"].scaled(tolerances.trajectory_factor(k, 8))
                cmp = tolerances.compare(got[name], np.asarray(want), tol)
                if not cmp.ok:
                    raise AssertionError(
                        f"m={setup.batch_size} step {k} {name}: max abs err {cmp.max_abs:.3g} "
                        f"against the core run with the reported decays lam={lam!r}, "
                        f"tau={tau!r}: the layer does not use the decays its scheduler reports"
                    )


def _diagnose(value: float, expected: float, others: dict[str, float]) -> str:
    """A hint for a reported decay that is not the expected one."""
    if math.isclose(1.0 - value, expected, abs_tol=1e-9):
        return " (1 - reported matches: an update rate where a decay belongs)"
    for label, v in others.items():
        if math.isclose(value, v, abs_tol=1e-9):
            return f" (matches {label})"
    return ""


def check_eq11_eq12(adapter: Adapter, settings: Settings | None = None) -> None:
    """The decays the scheduler reports are Eq. 11's ``lam`` and Eq. 12's ``tau``."""
    assert isinstance(adapter, ScheduledAdapter)
    for setup in SETUPS:
        _, *records = _run(adapter, setup)
        m, m0, total = setup.batch_size, setup.ideal_batch_size, setup.total_epochs
        tau = schedules.mbn_tau(batch_size=m, ideal_batch_size=m0, tau0=setup.tau0)
        lam = [
            schedules.mbn_lambda(t, total_epochs=total, batch_size=m, ideal_batch_size=m0)
            for t in range(1, total + 1)
        ]
        for k, rec in enumerate(records):
            got_lam, got_tau = rec["used"]
            if not math.isclose(got_lam, lam[k], rel_tol=1e-9, abs_tol=1e-12):
                others = {f"Eq. 11 at t = {t + 1}": v for t, v in enumerate(lam) if t != k}
                raise AssertionError(
                    f"m={m}, m0={m0}, T={total}: epoch {k} (t = {k + 1}) used lam={got_lam!r}, "
                    f"Eq. 11 gives {lam[k]!r}{_diagnose(got_lam, lam[k], others)}"
                )
            if not math.isclose(got_tau, tau, rel_tol=1e-9, abs_tol=1e-12):
                raise AssertionError(
                    f"m={m}, m0={m0}, tau0={setup.tau0}: epoch {k} used tau={got_tau!r}, "
                    f"Eq. 12 gives {tau!r}{_diagnose(got_tau, tau, {})}"
                )


@dataclass(frozen=True)
class ScheduleCheck:
    """One check of an implementation's own scheduler, with the generator's interface."""

    id: str
    doc: str
    function: Any

    def needs(self, adapter: Adapter) -> str | None:
        """Why ``adapter`` cannot run this check, or ``None``."""
        return _needs(adapter)

    def check(self, adapter: Adapter, settings: Settings | None = None) -> None:
        """Run the check; ``AssertionError`` with a diagnosis on failure."""
        self.function(adapter, settings)


SCHEDULE_CHECKS: tuple[ScheduleCheck, ...] = (
    ScheduleCheck(
        "schedule/trajectory",
        "the layer uses the decays its own scheduler reports, step by step",
        check_trajectory,
    ),
    ScheduleCheck(
        "schedule/eq11_eq12",
        "the scheduler's decays are Eq. 11's lam (1-indexed epochs) and Eq. 12's tau",
        check_eq11_eq12,
    ),
)
"""The checks of implementations that drive their own decays."""
