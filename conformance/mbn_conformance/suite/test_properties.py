"""The hypothesis properties of :mod:`mbn_conformance.properties` against the implementation.

One test per property; the id is ``property/<name>``.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("hypothesis", reason="the properties need hypothesis (pip install hypothesis)")

from mbn_conformance import properties
from mbn_conformance.pytest_plugin import adapter_for_collection, hypothesis_settings, param


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``mbn_property`` with every property, skips decided by the adapter."""
    if "mbn_property" not in metafunc.fixturenames:
        return
    config = metafunc.config
    adapter = adapter_for_collection(config)
    metafunc.parametrize(
        "mbn_property",
        [param(config, p, p.id, properties.skip_reason(adapter, p)) for p in properties.PROPERTIES],
    )


def test_property(
    mbn_adapter: Any, mbn_property: properties.Property, pytestconfig: pytest.Config
) -> None:
    """The law holds on every example hypothesis draws (see the property's docstring)."""
    mbn_property.check(mbn_adapter, hypothesis_settings(pytestconfig))
