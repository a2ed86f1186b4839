"""The outcome of one check, and the verdict and coverage of many.

A :class:`CaseResult` is one row of the report (a golden case, a property or a refusal);
:func:`summarize` counts them into the report's ``summary`` object and :func:`verdict_line`
turns that into the line every front end prints, coverage beside the verdict::

    CONFORMS: 62 of 71 checks run (61 passed, 1 expected failure); 9 skipped: 5 dtype float16
    not declared, 4 algorithm sync not declared
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "error", "skip", "xfail", "xpass"]
Kind = Literal["golden", "property", "refusal", "schedule"]
STATUSES: tuple[Status, ...] = ("pass", "fail", "error", "skip", "xfail", "xpass")
_RAN: tuple[tuple[Status, str, str], ...] = (
    ("pass", "passed", "passed"),
    ("fail", "failed", "failed"),
    ("error", "error", "errors"),
    ("xfail", "expected failure", "expected failures"),
    ("xpass", "unexpected pass", "unexpected passes"),
)


@dataclass
class CaseResult:
    """One check's outcome.

    Numbers are ``None`` where nothing was measured (a skip, a property, an error before the
    first comparison), never a made-up ``0.0``.

    Attributes
    ----------
    id : str
        The check id: a golden case id, ``property/<name>``, ``refusal/<name>`` or
        ``schedule/<name>``.
    status : {"pass", "fail", "error", "skip", "xfail", "xpass"}
        The outcome; ``xfail``/``xpass`` only once a known failure is applied
        (:meth:`mbn_conformance.checks.Check.outcome`).
    kind : {"golden", "property", "refusal", "schedule"}
        What sort of check it is.
    max_abs, max_rel : float or None
        The largest absolute and relative errors over every compared array.
    rtol, atol : float or None
        The tolerance of the worst quantity.
    worst : str or None
        The quantity closest to (or furthest past) its tolerance, e.g. ``"step 3 dx"``.
    ratio : float or None
        The worst quantity's error over its allowed error (at most 1 passes).
    reason : str
        Why it was skipped, why it is a known failure, or the first line of what failed.
    failures : list of str
        Every failed comparison or assertion.
    diagnoses : list of str
        What the failures imply, e.g. ``"step 0 running_mean: history weight 0.1, expected
        0.9"``.
    method : str or None
        The adapter method that raised (errors only).
    step : int or None
        The step at which it raised (errors only; ``None`` outside a step).
    traceback : str or None
        The full traceback of the error.
    """

    id: str
    status: Status
    kind: Kind = "golden"
    max_abs: float | None = None
    max_rel: float | None = None
    rtol: float | None = None
    atol: float | None = None
    worst: str | None = None
    ratio: float | None = None
    reason: str = ""
    failures: list[str] = field(default_factory=list)
    diagnoses: list[str] = field(default_factory=list)
    method: str | None = None
    step: int | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain dictionary of its fields (a row of the JSON report)."""
        return asdict(self)


def summary(results: Sequence[CaseResult]) -> dict[str, int]:
    """The number of results of each status (every status present, zeros included)."""
    counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
    for r in results:
        counts[r.status] += 1
    return counts


def succeeded(results: Sequence[CaseResult]) -> bool:
    """No failures or errors (expected failures and skips are fine; an xpass is not)."""
    return not any(r.status in ("fail", "error", "xpass") for r in results)


def coverage_of(total: int, skip_reasons: Iterable[str]) -> dict[str, Any]:
    """How many of ``total`` checks run, and the skipped ones counted by reason.

    Reasons are listed most frequent first (then alphabetically).

    >>> cov = coverage_of(4, ["no f16", "no sync", "no f16"])
    >>> cov["run"], cov["skipped"], cov["skip_reasons"][0]
    (1, 3, {'reason': 'no f16', 'count': 2})
    """
    reasons = Counter(skip_reasons)
    ordered = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    skipped = sum(reasons.values())
    return {
        "total": total,
        "run": total - skipped,
        "skipped": skipped,
        "skip_reasons": [{"reason": reason, "count": n} for reason, n in ordered],
    }


def coverage(results: Sequence[CaseResult]) -> dict[str, Any]:
    """:func:`coverage_of` the results: how many ran, the skipped ones by reason."""
    return coverage_of(len(results), (r.reason for r in results if r.status == "skip"))


def skipped_text(cov: Mapping[str, Any]) -> str:
    """``"9 skipped: 5 dtype float16 not declared, 4 ..."`` (empty when nothing is skipped)."""
    if not cov["skipped"]:
        return ""
    reasons = ", ".join(f"{r['count']} {r['reason']}" for r in cov["skip_reasons"])
    return f"{cov['skipped']} skipped: {reasons}"


def summarize(results: Sequence[CaseResult]) -> dict[str, Any]:
    """The report's ``summary``: counts per status, the verdict, and the coverage."""
    return {
        "total": len(results),
        **summary(results),
        "succeeded": succeeded(results),
        "coverage": coverage(results),
    }


def verdict_line(s: Mapping[str, Any]) -> str:
    """The verdict with the coverage beside it, from a :func:`summarize` dictionary.

    >>> verdict_line(summarize([CaseResult("a", "pass"), CaseResult("b", "skip", reason="r")]))
    'CONFORMS: 1 of 2 checks run (1 passed); 1 skipped: 1 r'
    """
    cov = s["coverage"]
    verdict = "CONFORMS" if s["succeeded"] else "DOES NOT CONFORM"
    ran = ", ".join(
        f"{s[status]} {one if s[status] == 1 else many}"
        for status, one, many in _RAN
        if s[status]
    )
    line = f"{verdict}: {cov['run']} of {cov['total']} checks run"
    if ran:
        line += f" ({ran})"
    if cov["skipped"]:
        line += f"; {skipped_text(cov)}"
    return line
