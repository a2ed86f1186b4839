"""mbn_conformance: the shared conformance suite for BN / dynamic BN / MBN implementations.

Run it against an implementation through an :class:`Adapter` (see ``docs/conformance.md``):

    mbn-ref conformance --backend numpy
    mbn-ref conformance --impl my_package.my_module:make_adapter --json report.json
    pytest --pyargs mbn_conformance --mbn-impl my_package.my_module:make_adapter
"""

from __future__ import annotations

from .protocol import ALGORITHMS, DTYPES, ESTIMATORS, LAYOUTS, Adapter, Capabilities, SyncAdapter
from .runner import CaseResult, run, run_case, succeeded, summary
from .tolerances import TOLERANCES, Tolerance
from .vectors import Case, VectorFormatError, read

__all__ = [
    "ALGORITHMS",
    "DTYPES",
    "ESTIMATORS",
    "LAYOUTS",
    "TOLERANCES",
    "Adapter",
    "Capabilities",
    "Case",
    "CaseResult",
    "SyncAdapter",
    "Tolerance",
    "VectorFormatError",
    "read",
    "run",
    "run_case",
    "succeeded",
    "summary",
]
