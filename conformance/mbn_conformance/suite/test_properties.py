"""The hypothesis properties of :mod:`mbn_conformance.properties` against the implementation.

One test per property; the id is ``property/<name>``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("hypothesis", reason="the properties need hypothesis (pip install hypothesis)")

from mbn_conformance.checks import Check
from mbn_conformance.pytest_plugin import parametrize, run_check
from mbn_conformance.results import CaseResult


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize with every property; skips and known failures from the generator."""
    parametrize(metafunc, "property")


def test_property(mbn_check: Check, mbn_record: Callable[[CaseResult], None]) -> None:
    """The law holds on every example hypothesis draws (see the property's docstring)."""
    run_check(mbn_check, mbn_record)
