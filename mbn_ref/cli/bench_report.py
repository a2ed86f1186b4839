"""The ratio table of ``mbn-ref bench``: rows from the benchmark scripts' JSON, Markdown, plot.

Each script of the repository's ``benchmarks/`` writes a report whose cases hold
``contenders`` (per-call times, and peak memory for ``bench_torch.py``), ``ratios`` (the
median over rounds of paired per-round ratios, named ``ours/baseline``) and ``targets``
(the issue's limits, ``memory:ours/baseline`` for peak memory, each with its ``pass``). The
targets are the scripts' own: this module only reads them, so one place holds each.

>>> report = {"schema": "mbn-ref/bench-keras/1", "cases": [{
...     "case": "256x1024", "mode": "tf_function",
...     "contenders": {"keras": {"median_ms": 2.0}, "mbn": {"median_ms": 2.5}},
...     "ratios": {"mbn/keras": {"median": 1.25}},
...     "targets": {"mbn/keras": {"limit": 1.5, "aim": 1.2, "ratio": 1.25, "pass": True}}}]}
>>> [row] = rows("keras", report)
>>> row.contender, row.baseline, row.ratio, row.result
('mbn', 'keras', 1.25, 'PASS')
>>> markdown([row]).splitlines()[2].split(" | ")[5:]
['time', '2.000 ms', '2.500 ms', '1.25', '<= 1.5 (aim 1.2)', 'PASS |']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

__all__ = ["SCHEMAS", "SUITES", "Row", "markdown", "plot", "rows", "suite_of", "summary"]

SUITES = ("core", "torch", "keras")
"""The benchmark suites, each a script ``benchmarks/bench_<suite>.py``."""

SCHEMAS = {f"mbn-ref/bench-{suite}/1": suite for suite in SUITES}
"""The schema of each script's JSON report, and its suite."""

_MIB = 2.0**20


@dataclass(frozen=True)
class Row:
    """One ratio of one case: ours over the baseline, in time or peak memory."""

    suite: str
    case: str
    mode: str
    contender: str
    baseline: str
    metric: str  # "time" (ms) or "memory" (MiB)
    baseline_value: float | None
    ours_value: float | None
    ratio: float
    limit: float | None
    aim: float | None
    passed: bool | None

    @property
    def result(self) -> str:
        """``PASS``, ``FAIL`` or ``-`` (no target)."""
        return "-" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return {**asdict(self), "result": self.result}


def suite_of(report: Mapping[str, Any]) -> str | None:
    """The suite whose script wrote ``report`` (by its schema), or ``None``."""
    return SCHEMAS.get(str(report.get("schema")))


def _case_name(case: Mapping[str, Any]) -> str:
    if "case" in case:
        return str(case["case"])
    return "x".join(str(n) for n in case.get("shape", ()))


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _memory_mib(contender: Mapping[str, Any] | None) -> float | None:
    peak = _number(((contender or {}).get("memory") or {}).get("peak_bytes"))
    return None if peak is None else peak / _MIB


def rows(suite: str, report: Mapping[str, Any]) -> list[Row]:
    """The table's rows of one script's report: every ratio, then every memory target.

    Raises
    ------
    ValueError
        The report has no list of cases, or a case lacks what a row needs.
    """
    cases = report.get("cases")
    if not isinstance(cases, list):
        raise ValueError("the report has no 'cases' list")
    out: list[Row] = []
    for case in cases:
        try:
            name, mode = _case_name(case), str(case["mode"])
            contenders: Mapping[str, Any] = case.get("contenders", {})
            targets: Mapping[str, Any] = case.get("targets", {})
            entries = [(k, "time", r["median"]) for k, r in case.get("ratios", {}).items()]
            entries += [
                (k.removeprefix("memory:"), "memory", t["ratio"])
                for k, t in targets.items()
                if k.startswith("memory:")
            ]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"a case lacks {exc}") from None
        for key, metric, ratio in entries:
            ours, _, base = key.partition("/")
            target = targets.get(key if metric == "time" else f"memory:{key}") or {}
            if metric == "time":
                values = [_number((contenders.get(c) or {}).get("median_ms")) for c in (base, ours)]
            else:
                values = [_memory_mib(contenders.get(c)) for c in (base, ours)]
            value = _number(ratio)
            if value is None:
                raise ValueError(f"{name} {mode} {key}: the ratio {ratio!r} is not a number")
            passed = target.get("pass")
            out.append(
                Row(
                    suite=suite,
                    case=name,
                    mode=mode,
                    contender=ours,
                    baseline=base,
                    metric=metric,
                    baseline_value=values[0],
                    ours_value=values[1],
                    ratio=value,
                    limit=_number(target.get("limit")),
                    aim=_number(target.get("aim")),
                    passed=passed if isinstance(passed, bool) else None,
                )
            )
    return out


def _value(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} ms" if metric == "time" else f"{v:.2f} MiB"


def _target(row: Row) -> str:
    if row.limit is None:
        return "-"
    aim = f" (aim {row.aim:g})" if row.aim is not None else ""
    # bench_core.py's ONNX targets are "faster than" (ratio < 1); every other is "<="
    op = "<" if row.suite == "core" and row.baseline.startswith("onnx") else "<="
    return f"{op} {row.limit:g}{aim}"


def markdown(table: Sequence[Row]) -> str:
    """The rows as a Markdown table (ratio = ours / baseline; smaller is better for us)."""
    head = (
        "| suite | case | mode | ours | baseline | metric | baseline value | ours value "
        "| ratio | target | result |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        lines.append(
            f"| {r.suite} | {r.case} | {r.mode} | {r.contender} | {r.baseline} | {r.metric} "
            f"| {_value(r.baseline_value, r.metric)} | {_value(r.ours_value, r.metric)} "
            f"| {r.ratio:.2f} | {_target(r)} | {r.result} |"
        )
    return "\n".join(lines)


def summary(table: Sequence[Row]) -> dict[str, int]:
    """Counts: rows, rows with a target, passed and failed targets."""
    return {
        "rows": len(table),
        "with_target": sum(r.passed is not None for r in table),
        "pass": sum(r.passed is True for r in table),
        "fail": sum(r.passed is False for r in table),
    }


def plot(table: Sequence[Row], target: IO[bytes], fmt: str = "png") -> None:
    """A bar chart of the ratios (log scale), one panel per suite, each target marked.

    Green bars meet their target, red ones miss it, grey ones have none; a black tick on a
    bar is its target, the dashed line is parity with the baseline. Needs matplotlib.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    suites = [s for s in dict.fromkeys(r.suite for r in table)]
    heights = [max(1, sum(r.suite == s for r in table)) for s in suites] or [1]
    fig = Figure(figsize=(10, 1.2 + 0.22 * sum(heights) + 0.5 * len(heights)), layout="constrained")
    axes = fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    colors = {True: "tab:green", False: "tab:red", None: "0.6"}
    for ax, suite in zip(axes, suites or ["(no rows)"], strict=True):
        mine = [r for r in table if r.suite == suite]
        ys = list(range(len(mine)))[::-1]
        ax.barh(ys, [r.ratio for r in mine], color=[colors[r.passed] for r in mine], height=0.7)
        for y, r in zip(ys, mine, strict=True):
            if r.limit is not None:
                ax.plot([r.limit, r.limit], [y - 0.42, y + 0.42], color="black", lw=1.6)
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_yticks(ys)
        ax.set_yticklabels(
            [
                f"{r.case} {r.mode} {r.contender}/{r.baseline}"
                + (" (memory)" if r.metric == "memory" else "")
                for r in mine
            ],
            fontsize=7,
        )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{suite}: ours / baseline (black tick: target)", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3, which="both")
        ax.tick_params(axis="x", labelsize=8)
    axes[-1].set_xlabel("ratio ours / baseline (time: median of paired rounds; lower is better)")
    fig.savefig(target, format=fmt, dpi=100)
