"""The checks of implementations that drive their own decays (mbn_conformance.own_schedule):
a right scheduler passes both; a layer that ignores its scheduler, a scheduler that hands out
update rates, and one with 0-indexed epochs each fail the check that names their bug, and only
that one."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from mbn_conformance.builtin import CoreAdapter
from mbn_conformance.own_schedule import SCHEDULE_CHECKS
from mbn_conformance.protocol import ScheduledAdapter

CHECKS = {c.id: c for c in SCHEDULE_CHECKS}


class _LayerIgnoresScheduler(CoreAdapter):
    """Reports the scheduler's lam, normalizes with its complement."""

    def scheduled_train_step(self, schedule, epoch, step, state, x, g, b):
        *_, (lam, tau) = super().scheduled_train_step(schedule, epoch, step, state, x, g, b)
        y, state, ctx = self.train_step(replace(step, lam=1 - lam, tau=tau), state, x, g, b)
        return y, state, ctx, (lam, tau)


class _UpdateRateScheduler(CoreAdapter):
    """PyTorch's convention where a decay belongs, used consistently by the layer."""

    def scheduled_train_step(self, schedule, epoch, step, state, x, g, b):
        *_, (lam, tau) = super().scheduled_train_step(schedule, epoch, step, state, x, g, b)
        y, state, ctx = self.train_step(replace(step, lam=1 - lam, tau=tau), state, x, g, b)
        return y, state, ctx, (1 - lam, tau)


class _ZeroIndexedEpochs(CoreAdapter):
    """Eq. 11 at the 0-indexed epoch (t = max(epoch, 1))."""

    def scheduled_train_step(self, schedule, epoch, step, state, x, g, b):
        return super().scheduled_train_step(schedule, max(epoch - 1, 0), step, state, x, g, b)


def _outcome(adapter: Any) -> dict[str, str]:
    out = {}
    for check_id, check in CHECKS.items():
        assert check.needs(adapter) is None
        try:
            check.check(adapter)
            out[check_id] = "pass"
        except AssertionError as exc:
            out[check_id] = str(exc)
    return out


def test_a_right_scheduler_passes_both():
    adapter = CoreAdapter()  # the core drives its decays with mbn_ref.schedules
    assert isinstance(adapter, ScheduledAdapter)
    assert _outcome(adapter) == {"schedule/trajectory": "pass", "schedule/eq11_eq12": "pass"}


def test_a_layer_that_ignores_its_scheduler_fails_the_trajectory_only():
    out = _outcome(_LayerIgnoresScheduler())
    assert "does not use the decays its scheduler reports" in out["schedule/trajectory"]
    assert out["schedule/eq11_eq12"] == "pass"


def test_an_update_rate_scheduler_is_a_named_schedule_difference():
    out = _outcome(_UpdateRateScheduler())
    assert out["schedule/trajectory"] == "pass"
    assert "an update rate where a decay belongs" in out["schedule/eq11_eq12"]


def test_zero_indexed_epochs_are_named():
    out = _outcome(_ZeroIndexedEpochs())
    assert out["schedule/trajectory"] == "pass"
    assert "epoch 1 (t = 2)" in out["schedule/eq11_eq12"]
    assert "matches Eq. 11 at t = 1" in out["schedule/eq11_eq12"]


def test_adapters_without_a_scheduler_are_skipped_with_the_reason():
    class Plain(CoreAdapter):
        scheduled_train_step = None  # type: ignore[assignment]

    reason = CHECKS["schedule/trajectory"].needs(Plain())
    assert reason is not None and "scheduled_train_step" in reason


@pytest.mark.parametrize("check_id", sorted(CHECKS))
def test_checks_have_the_generator_interface(check_id):
    check = CHECKS[check_id]
    assert check.id.startswith("schedule/") and check.doc
