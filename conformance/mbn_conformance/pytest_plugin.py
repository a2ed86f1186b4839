"""pytest plugin of the conformance suite (registered as the ``pytest11`` entry point)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mbn-conformance")
    group.addoption(
        "--mbn-impl",
        default=None,
        help="implementation under test as module:factory (or env MBN_IMPL)",
    )
