"""Every golden case of the committed vectors against the implementation under test.

One test per case (the id is the case id); a failure names the worst quantity, its error and
the tolerance, lists every comparison that failed and what they imply (the decay the
implementation's states show); an error names the adapter method, the step and the
traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mbn_conformance.checks import Check
from mbn_conformance.pytest_plugin import parametrize, run_check
from mbn_conformance.results import CaseResult


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize with every golden case; skips and known failures from the generator."""
    parametrize(metafunc, "golden")


def test_golden(mbn_check: Check, mbn_record: Callable[[CaseResult], None]) -> None:
    """Outputs, gradients and state after every step match the golden values."""
    run_check(mbn_check, mbn_record)
