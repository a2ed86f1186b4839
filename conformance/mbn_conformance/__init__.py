"""mbn_conformance: the shared conformance suite for BN / dynamic BN / MBN implementations.

Run it against an implementation through an :class:`Adapter` (protocol version 2, see
``docs/conformance.md``):

    mbn-ref conformance --backend numpy
    mbn-ref conformance --impl my_package.my_module:make_adapter --json report.json
    pytest --pyargs mbn_conformance.suite --mbn-impl my_package.my_module:make_adapter

From Python, :func:`checks` lists every check of an adapter with its skip and known-failure
reasons, and :func:`run` gives their outcomes.
"""

from __future__ import annotations

from .checks import Check, XfailEntry, checks, read_xfails
from .protocol import (
    ALGORITHMS,
    DTYPES,
    ESTIMATORS,
    LAYOUTS,
    PROTOCOL_VERSION,
    REFUSALS,
    Adapter,
    Capabilities,
    FusedSyncAdapter,
    Setup,
    Step,
    SyncAdapter,
)
from .results import CaseResult, succeeded, summarize, summary, verdict_line
from .runner import run, run_case
from .tolerances import TOLERANCES, Tolerance
from .vectors import Case, VectorFormatError, read

__all__ = [
    "ALGORITHMS",
    "DTYPES",
    "ESTIMATORS",
    "LAYOUTS",
    "PROTOCOL_VERSION",
    "REFUSALS",
    "TOLERANCES",
    "Adapter",
    "Capabilities",
    "Case",
    "CaseResult",
    "Check",
    "FusedSyncAdapter",
    "Setup",
    "Step",
    "SyncAdapter",
    "Tolerance",
    "VectorFormatError",
    "XfailEntry",
    "checks",
    "read",
    "read_xfails",
    "run",
    "run_case",
    "succeeded",
    "summarize",
    "summary",
    "verdict_line",
]
