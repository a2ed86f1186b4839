"""Conformance reports: a human table and a JSON document.

The table is drawn with ``rich`` when it is available and the output is a terminal, as
plain aligned text otherwise.

The JSON report (``mbn-ref conformance --json PATH``) is one object with keys in this order::

    {"schema": "mbn-conformance-report", "version": 1,
     "implementation": {"name", "source"},
     "capabilities": {...},            # Capabilities, sets as sorted lists
     "vectors": {"path", "format", "version", "generator", "cases_total", "cases_selected",
                 "patterns"},
     "environment": {"python", "platform", "numpy", "mbn_ref", "frameworks": {...}},
     "summary": {"total", "pass", "fail", "error", "skip", "xfail", "xpass", "succeeded"},
     "cases": [CaseResult.to_dict(), ...]}

Non-finite numbers (a ``nan`` tolerance of a skipped case, an ``inf`` error of a shape
mismatch) are written as ``null`` so that the document is strict JSON.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .protocol import Adapter, Capabilities
from .runner import CaseResult, succeeded, summary

SCHEMA = "mbn-conformance-report"
VERSION = 1
FRAMEWORKS = ("torch", "array_api_strict", "cupy", "jax", "tensorflow", "mlx")
"""Modules whose versions the report lists when the implementation has imported them."""

_ORDER = {"error": 0, "fail": 1, "xpass": 2, "xfail": 3, "skip": 4, "pass": 5}
COLUMNS = (
    "case",
    "status",
    "max abs err",
    "max rel err",
    "tolerance (rtol/atol)",
    "worst quantity",
    "reason",
)


@dataclass(frozen=True)
class VectorsInfo:
    """Where the golden cases came from and which of them were selected."""

    path: str
    version: int
    generator: Mapping[str, Any]
    cases_total: int
    cases_selected: int
    patterns: Sequence[str] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``vectors`` object (JSON-compatible; see the module docstring)."""
        return {
            "path": self.path,
            "format": "mbn-conformance-vectors",
            "version": self.version,
            "generator": dict(sorted(self.generator.items())),
            "cases_total": self.cases_total,
            "cases_selected": self.cases_selected,
            "patterns": list(self.patterns),
        }


def vectors_info(
    path: str | Path, total: int, selected: int, patterns: Sequence[str]
) -> VectorsInfo:
    """Read the manifest's version and generator (without the arrays)."""
    with np.load(path, allow_pickle=False) as npz:
        manifest = json.loads(npz["manifest"].item())
    return VectorsInfo(
        str(path),
        int(manifest["version"]),
        manifest.get("generator", {}),
        total,
        selected,
        patterns,
    )


def capabilities_dict(caps: Capabilities) -> dict[str, Any]:
    """``caps`` as JSON-ready data (sets sorted)."""
    return {
        "algorithms": sorted(caps.algorithms),
        "dtypes": sorted(caps.dtypes),
        "layouts": sorted(caps.layouts),
        "running_var": sorted(caps.running_var),
        "native_momentum": caps.native_momentum,
        "backward": caps.backward,
        "affine_optional": caps.affine_optional,
        "known_failures": dict(sorted(caps.known_failures.items())),
    }


def capabilities_line(caps: Capabilities) -> str:
    """One line for the report header."""
    return (
        f"algorithms {','.join(sorted(caps.algorithms))}; dtypes {','.join(sorted(caps.dtypes))}; "
        f"layouts {','.join(sorted(caps.layouts))}; running var "
        f"{','.join(sorted(caps.running_var))}; native momentum {caps.native_momentum}; "
        f"backward {'yes' if caps.backward else 'no'}; affine optional "
        f"{'yes' if caps.affine_optional else 'no'}; known failures {len(caps.known_failures)}"
    )


def environment() -> dict[str, Any]:
    """Versions of Python, NumPy, mbn_ref and any framework the implementation imported."""
    import mbn_ref

    frameworks = {}
    for name in FRAMEWORKS:
        module = sys.modules.get(name)
        if module is not None:
            frameworks[name] = str(getattr(module, "__version__", "unknown"))
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "numpy": np.__version__,
        "mbn_ref": mbn_ref.__version__,
        "frameworks": frameworks,
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def case_dict(result: CaseResult) -> dict[str, Any]:
    """``result.to_dict()`` with non-finite numbers as ``None``."""
    return {k: _finite(v) for k, v in result.to_dict().items()}


def build(
    adapter: Adapter,
    results: Sequence[CaseResult],
    vectors: VectorsInfo,
    *,
    source: str,
) -> dict[str, Any]:
    """The JSON report as a dict (keys in the documented order)."""
    counts = summary(results)
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "implementation": {"name": adapter.name, "source": source},
        "capabilities": capabilities_dict(adapter.capabilities),
        "vectors": vectors.to_dict(),
        "environment": environment(),
        "summary": {"total": len(results), **counts, "succeeded": succeeded(results)},
        "cases": [case_dict(r) for r in results],
    }


def dumps(report: Mapping[str, Any]) -> str:
    """Strict JSON (``allow_nan=False``), two-space indent, keys in insertion order."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


# -- the human table ----------------------------------------------------------------------
def _num(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def row(result: CaseResult) -> tuple[str, ...]:
    """One table row: the :data:`COLUMNS` of ``result`` as text."""
    measured = result.status not in ("skip",) and not (
        result.status in ("error", "xfail") and not result.worst
    )
    tol = f"{result.rtol:.1e}/{result.atol:.1e}" if not math.isnan(result.rtol) else "-"
    return (
        result.case,
        result.status,
        _num(result.max_abs) if measured else "-",
        _num(result.max_rel) if measured else "-",
        tol if measured else "-",
        result.worst if measured else "-",
        result.reason,
    )


def ordered(results: Sequence[CaseResult], show_all: bool) -> list[CaseResult]:
    """The results in display order: failures first (error, fail, xpass), then xfail, skip.

    Passing cases are kept only with ``show_all``; within each status the golden file's order
    is kept.
    """
    keep = [r for r in results if show_all or r.status != "pass"]
    return sorted(keep, key=lambda r: _ORDER[r.status])


def header_lines(report: Mapping[str, Any]) -> list[str]:
    """The lines above the table: implementation, capabilities, vectors and versions."""
    impl = report["implementation"]
    vec = report["vectors"]
    env = report["environment"]
    versions = [f"python {env['python']}", f"numpy {env['numpy']}", f"mbn_ref {env['mbn_ref']}"]
    versions += [f"{k} {v}" for k, v in env["frameworks"].items()]
    selected = (
        f", {vec['cases_selected']} selected by {' '.join(vec['patterns'])}"
        if vec["patterns"]
        else ""
    )
    caps = report["capabilities"]
    return [
        f"implementation: {impl['name']}  ({impl['source']})",
        "capabilities:   " + capabilities_line(_caps_from_dict(caps)),
        f"vectors:        {vec['path']} (format v{vec['version']}, generated by mbn_ref "
        f"{vec['generator'].get('core', '?')}, {vec['cases_total']} cases{selected})",
        "versions:       " + ", ".join(versions),
    ]


def _caps_from_dict(caps: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        dtypes=frozenset(caps["dtypes"]),
        layouts=frozenset(caps["layouts"]),
        algorithms=frozenset(caps["algorithms"]),
        running_var=frozenset(caps["running_var"]),
        native_momentum=caps["native_momentum"],
        backward=caps["backward"],
        affine_optional=caps["affine_optional"],
        known_failures=caps["known_failures"],
    )


def summary_line(report: Mapping[str, Any]) -> str:
    """The counts of each status and the verdict (``CONFORMS`` or ``DOES NOT CONFORM``)."""
    s = report["summary"]
    verdict = "CONFORMS" if s["succeeded"] else "DOES NOT CONFORM"
    return (
        f"{s['total']} cases: {s['pass']} passed, {s['fail']} failed, {s['error']} errors, "
        f"{s['skip']} skipped, {s['xfail']} expected failures, {s['xpass']} unexpected passes"
        f" -> {verdict}"
    )


def failure_details(results: Sequence[CaseResult], limit: int = 3) -> list[str]:
    """The first ``limit`` failure messages of every failed case, and every error."""
    lines = []
    for r in ordered(results, show_all=False):
        if r.status == "fail":
            lines.append(f"FAIL  {r.case}")
            lines += [f"      {msg}" for msg in r.failures[:limit]]
            if len(r.failures) > limit:
                lines.append(f"      ... {len(r.failures) - limit} more")
        elif r.status == "error":
            lines.append(f"ERROR {r.case}")
            lines.append(f"      {r.reason}")
        elif r.status == "xpass":
            lines.append(f"XPASS {r.case}: declared as a known failure ({r.reason}) but passed")
    return lines


def plain_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned text columns separated by two spaces (numbers right-aligned)."""
    table = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    right = {2, 3}
    out = []
    for k, r in enumerate(table):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def render_text(report: Mapping[str, Any], results: Sequence[CaseResult], *, show_all: bool) -> str:
    """The whole human report as plain text."""
    shown = ordered(results, show_all)
    lines = ["mbn-ref conformance", *header_lines(report), ""]
    if shown:
        lines += plain_table([row(r) for r in shown])
    hidden = len(results) - len(shown)
    if hidden:
        lines.append(f"({hidden} passing cases not listed; --all lists them)")
    details = failure_details(results)
    if details:
        lines += ["", *details]
    lines += ["", summary_line(report)]
    return "\n".join(lines) + "\n"


def print_rich(
    report: Mapping[str, Any],
    results: Sequence[CaseResult],
    *,
    show_all: bool,
    file: IO[str] | None = None,
) -> None:
    """The human report through ``rich`` (raises ``ImportError`` when it is not installed)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    console.print("[bold]mbn-ref conformance[/bold]")
    for line in header_lines(report):
        console.print(line, markup=False, highlight=False)
    shown = ordered(results, show_all)
    styles = {"pass": "green", "fail": "red", "error": "red", "xpass": "red", "xfail": "yellow"}
    if shown:
        table = Table(show_header=True, header_style="bold")
        for i, name in enumerate(COLUMNS):
            table.add_column(name, justify="right" if i in (2, 3) else "left", overflow="fold")
        for r in shown:
            cells = row(r)
            style = styles.get(r.status, "dim")
            table.add_row(*cells[:1], f"[{style}]{cells[1]}[/{style}]", *cells[2:])
        console.print(table)
    hidden = len(results) - len(shown)
    if hidden:
        console.print(f"({hidden} passing cases not listed; --all lists them)", markup=False)
    for line in failure_details(results):
        console.print(line, markup=False, highlight=False)
    ok = report["summary"]["succeeded"]
    console.print(summary_line(report), style="bold green" if ok else "bold red", markup=False)
