"""Conformance reports: a human table and a JSON document.

The table is drawn with ``rich`` when it is available and the output is a terminal, as
plain aligned text otherwise; numbers that were not measured print as ``—``.

The JSON report (``mbn-ref conformance --json PATH``) is one object with keys in this order::

    {"schema": "mbn-conformance-report", "version": 2, "protocol": 2,
     "implementation": {"name", "source", "version"},
     "capabilities": {...},            # Capabilities, sets as sorted lists
     "vectors": {"path", "format", "version", "generator", "cases_total", "cases_selected",
                 "patterns"},
     "environment": {"python", "platform", "numpy", "mbn_ref", "frameworks": {...}},
     "summary": {"total", "pass", "fail", "error", "skip", "xfail", "xpass", "succeeded",
                 "coverage": {"total", "run", "skipped",
                              "skip_reasons": [{"reason", "count"}, ...]},
                 "verdict"},
     "checks": [CaseResult.to_dict(), ...]}

A check row holds ``id, status, kind, max_abs, max_rel, rtol, atol, worst, ratio, reason,
failures, diagnoses, method, step, traceback``; what was not measured is ``null``, and so
are non-finite numbers (an ``inf`` error of a shape mismatch), so that the document is
strict JSON. An error row names the adapter ``method`` and the ``step`` and carries the
whole ``traceback``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import environment
from .protocol import PROTOCOL_VERSION, Adapter, Capabilities
from .results import CaseResult, summarize, verdict_line

SCHEMA = "mbn-conformance-report"
VERSION = 2
NOT_MEASURED = "—"
"""What the table shows where nothing was measured (``null`` in the JSON report)."""

_ORDER = {"error": 0, "fail": 1, "xpass": 2, "xfail": 3, "skip": 4, "pass": 5}
COLUMNS = (
    "check",
    "status",
    "max abs err",
    "max rel err",
    "tolerance (rtol/atol)",
    "worst quantity",
    "reason",
)
_NUMERIC = (2, 3)


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
        "running_var": caps.running_var,
        "native_momentum": caps.native_momentum,
        "backward": caps.backward,
        "affine_optional": caps.affine_optional,
        "batch_counter": caps.batch_counter,
        "hyperparameter_dtype": caps.hyperparameter_dtype,
        "cumulative_tau": caps.cumulative_tau,
        "refuses": sorted(caps.refuses),
        "version": caps.version,
        "known_failures": dict(sorted(caps.known_failures.items())),
    }


def capabilities_line(caps: Mapping[str, Any]) -> str:
    """One line for a report header, from :func:`capabilities_dict`."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    return (
        f"algorithms {','.join(caps['algorithms'])}; dtypes {','.join(caps['dtypes'])}; "
        f"layouts {','.join(caps['layouts'])}; running var {caps['running_var']}; "
        f"native momentum {caps['native_momentum']}; backward {yes(caps['backward'])}; "
        f"affine optional {yes(caps['affine_optional'])}; batch counter "
        f"{yes(caps['batch_counter'])}; hyper-parameters {caps['hyperparameter_dtype']}; "
        f"cumulative tau {yes(caps['cumulative_tau'])}; refuses "
        f"{','.join(caps['refuses']) or 'nothing'}; known failures {len(caps['known_failures'])}"
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_dict(result: CaseResult) -> dict[str, Any]:
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
    summary = summarize(results)
    summary["verdict"] = verdict_line(summary)
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "protocol": PROTOCOL_VERSION,
        "implementation": {
            "name": adapter.name,
            "source": source,
            "version": adapter.capabilities.version,
        },
        "capabilities": capabilities_dict(adapter.capabilities),
        "vectors": vectors.to_dict(),
        "environment": environment.environment(adapter),
        "summary": summary,
        "checks": [check_dict(r) for r in results],
    }


def dumps(report: Mapping[str, Any]) -> str:
    """Strict JSON (``allow_nan=False``), two-space indent, keys in insertion order."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


# -- the human table ----------------------------------------------------------------------
def _num(value: float | None) -> str:
    if value is None or math.isnan(value):
        return NOT_MEASURED
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def row(result: CaseResult) -> tuple[str, ...]:
    """One table row: the :data:`COLUMNS` of ``result`` as text (``—``: not measured)."""
    tol = (
        f"{result.rtol:.1e}/{result.atol:.1e}"
        if result.rtol is not None and result.atol is not None
        else NOT_MEASURED
    )
    return (
        result.id,
        result.status,
        _num(result.max_abs),
        _num(result.max_rel),
        tol,
        result.worst or NOT_MEASURED,
        result.reason,
    )


def ordered(results: Sequence[CaseResult], show_all: bool) -> list[CaseResult]:
    """The results in display order: failures first (error, fail, xpass), then xfail, skip.

    Passing checks are kept only with ``show_all``; within each status the order of the
    checks is kept.
    """
    keep = [r for r in results if show_all or r.status != "pass"]
    return sorted(keep, key=lambda r: _ORDER[r.status])


def header_lines(report: Mapping[str, Any]) -> list[str]:
    """The lines above the table: implementation, capabilities, vectors and versions."""
    impl = report["implementation"]
    vec = report["vectors"]
    selected = (
        f", {vec['cases_selected']} selected by {' '.join(vec['patterns'])}"
        if vec["patterns"]
        else ""
    )
    version = f" version {impl['version']}" if impl["version"] else ""
    return [
        f"implementation: {impl['name']}{version}  ({impl['source']}; protocol "
        f"v{report['protocol']})",
        "capabilities:   " + capabilities_line(report["capabilities"]),
        f"vectors:        {vec['path']} (format v{vec['version']}, generated by mbn_ref "
        f"{vec['generator'].get('core', '?')}, {vec['cases_total']} cases{selected})",
        "versions:       " + environment.versions_line(report["environment"]),
    ]


def summary_line(report: Mapping[str, Any]) -> str:
    """The verdict with the coverage beside it (:func:`~.results.verdict_line`)."""
    return verdict_line(report["summary"])


def explain(result: CaseResult, *, limit: int | None = None, full: bool = True) -> list[str]:
    """What went wrong in one check: failures, diagnoses, the error and its traceback.

    ``limit`` caps the failures listed; ``full`` adds the whole traceback of an error (the
    table gives its last frame only).
    """
    lines: list[str] = []
    failures = result.failures if limit is None else result.failures[:limit]
    lines += failures
    if limit is not None and len(result.failures) > limit:
        lines.append(f"... {len(result.failures) - limit} more")
    lines += [f"diagnosis: {d}" for d in result.diagnoses]
    if result.traceback is not None:
        if full:
            lines += result.traceback.rstrip().splitlines()
        else:
            if result.status == "error":
                lines.append(result.reason)
            lines.append("(the whole traceback is in the JSON report: --json)")
    return lines


def describe(result: CaseResult, *, limit: int = 12) -> str:
    """A full account of a check that did not pass (the pytest failure message).

    Golden failures give the worst quantity against its tolerance and the failed
    comparisons; a property's or refusal's failure, its assertion; an error, the adapter
    method, the step and the whole traceback; diagnoses in every case.
    """
    if result.status in ("error", "xfail") and result.traceback is not None and not (
        result.failures
    ):
        head = [f"{result.id}: {result.reason}"]
    elif result.kind == "golden" and result.failures:
        head = [f"{result.id}: {len(result.failures)} comparison(s) out of tolerance"]
        if result.ratio is not None and result.rtol is not None and result.atol is not None:
            head.append(
                f"worst: {result.worst} at {result.ratio:.3g}x its tolerance (rtol "
                f"{result.rtol:.2g}, atol {result.atol:.2g}); over the case max abs err "
                f"{_num(result.max_abs)}, max rel err {_num(result.max_rel)}"
            )
    else:
        head = [f"{result.id}: {result.status}"]
    body = explain(result, limit=limit, full=True)
    return "\n".join(head + [f"  {line}" for line in body])


def failure_details(results: Sequence[CaseResult], limit: int = 3) -> list[str]:
    """What goes below the table: every failed check, error and unexpected pass.

    A failed check lists its first ``limit`` failures and its diagnoses; an error, where it
    was raised.
    """
    lines = []
    for r in ordered(results, show_all=False):
        if r.status == "fail":
            lines.append(f"FAIL  {r.id}")
            lines += [f"      {msg}" for msg in explain(r, limit=limit, full=False)]
        elif r.status == "error":
            lines.append(f"ERROR {r.id}")
            lines += [f"      {msg}" for msg in explain(r, limit=limit, full=False)]
        elif r.status == "xpass":
            lines.append(f"XPASS {r.id}: declared as a known failure ({r.reason}) but passed")
    return lines


def plain_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned text columns separated by two spaces (numbers right-aligned)."""
    table = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    out = []
    for k, r in enumerate(table):
        cells = [
            c.rjust(widths[i]) if i in _NUMERIC else c.ljust(widths[i]) for i, c in enumerate(r)
        ]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _hidden_line(n: int) -> str:
    return f"({n} passing checks not listed; --all lists them)"


def render_text(report: Mapping[str, Any], results: Sequence[CaseResult], *, show_all: bool) -> str:
    """The whole human report as plain text."""
    shown = ordered(results, show_all)
    lines = ["mbn-ref conformance", *header_lines(report), ""]
    if shown:
        lines += plain_table([row(r) for r in shown])
    hidden = len(results) - len(shown)
    if hidden:
        lines.append(_hidden_line(hidden))
    details = failure_details(results)
    if details:
        lines += ["", *details]
    lines += ["", summary_line(report)]
    return "\n".join(lines) + "\n"


_REASON_MIN = 16
"""The narrowest the reason column gets in a ``rich`` table before columns are dropped."""
_OPTIONAL = (5, 2, 4, 3)
"""The columns a narrow terminal keeps while they fit, in this order: worst quantity, max
abs err, tolerance, max rel err."""


def rich_table(results: Sequence[CaseResult], width: int) -> Any:
    """The rows as a ``rich`` table ``width`` characters wide, or ``None`` if it cannot fit.

    A check id never wraps or gets cut (it is what ``--cases`` takes): the id, the status and
    the numbers keep their width, the reason column wraps, and in a narrow terminal the
    optional columns go first. When not even the id and the status fit, ``None`` (the caller
    prints the plain table).
    """
    from rich.table import Table

    rows = [row(r) for r in results]
    natural = [max([len(COLUMNS[i]), *(len(r[i]) for r in rows)]) for i in range(len(COLUMNS))]
    reason = len(COLUMNS) - 1

    def cost(columns: Sequence[int]) -> int:  # borders and padding: 3 per column, 1 more
        return sum(natural[i] for i in columns) + min(natural[reason], _REASON_MIN) + 3 * (
            len(columns) + 1
        ) + 1

    shown = [0, 1]
    if cost(shown) > width:
        return None
    for i in _OPTIONAL:  # most useful first, while they fit
        if cost([*shown, i]) <= width:
            shown.append(i)
    shown.sort()
    shown.append(reason)
    styles = {"pass": "green", "fail": "red", "error": "red", "xpass": "red", "xfail": "yellow"}
    table = Table(show_header=True, header_style="bold")
    for i in shown:
        if i == reason:
            table.add_column(COLUMNS[i], overflow="fold", ratio=1)
        else:
            table.add_column(
                COLUMNS[i],
                justify="right" if i in _NUMERIC else "left",
                no_wrap=True,
                min_width=natural[i],
            )
    for r, cells in zip(results, rows, strict=True):
        style = styles.get(r.status, "dim")
        status = f"[{style}]{cells[1]}[/{style}]"
        table.add_row(*(status if i == 1 else cells[i] for i in shown))
    return table


def print_rich(
    report: Mapping[str, Any],
    results: Sequence[CaseResult],
    *,
    show_all: bool,
    file: IO[str] | None = None,
) -> None:
    """The human report through ``rich`` (raises ``ImportError`` when it is not installed)."""
    from rich.console import Console

    console = Console(file=file)
    console.print("[bold]mbn-ref conformance[/bold]")
    for line in header_lines(report):
        console.print(line, markup=False, highlight=False)
    shown = ordered(results, show_all)
    table = rich_table(shown, console.width) if shown else None
    if table is not None:
        console.print(table)
    elif shown:  # narrower than an id: plain lines, each id whole on its line
        for line in plain_table([row(r) for r in shown]):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    hidden = len(results) - len(shown)
    if hidden:
        console.print(_hidden_line(hidden), markup=False)
    for line in failure_details(results):
        console.print(line, markup=False, highlight=False)
    ok = report["summary"]["succeeded"]
    console.print(summary_line(report), style="bold green" if ok else "bold red", markup=False)
