"""The refusals of bad input, and the checks of an implementation's own scheduler.

See :mod:`mbn_conformance.refusals` and :mod:`mbn_conformance.own_schedule`.

One test per check; the ids are ``refusal/<name>`` and ``schedule/<name>``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mbn_conformance.checks import Check
from mbn_conformance.pytest_plugin import parametrize, run_check
from mbn_conformance.results import CaseResult


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``test_refusal`` and ``test_schedule`` with their checks."""
    kind = {"test_refusal": "refusal", "test_schedule": "schedule"}[metafunc.function.__name__]
    parametrize(metafunc, kind)


def test_refusal(mbn_check: Check, mbn_record: Callable[[CaseResult], None]) -> None:
    """The implementation refuses the bad input it declares it refuses, with an exception."""
    run_check(mbn_check, mbn_record)


def test_schedule(mbn_check: Check, mbn_record: Callable[[CaseResult], None]) -> None:
    """The implementation's own scheduler: its layer uses the reported Eq. 11/12 decays."""
    run_check(mbn_check, mbn_record)
