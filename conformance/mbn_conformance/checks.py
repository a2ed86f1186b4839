"""The one check generator: every check of an adapter, with its skip and xfail decided here.

Like scikit-learn's ``estimator_checks_generator``, :func:`checks` lists what to run for an
adapter, and every front end only renders it: the command line (:mod:`.cli`),
:func:`mbn_conformance.run` and the pytest suite (:mod:`.pytest_plugin`). A :class:`Check`
is a golden case (:mod:`.runner`), a refusal of bad input (:data:`.refusals.REFUSALS`), a
check of the implementation's own scheduler (:data:`.own_schedule.SCHEDULE_CHECKS`) or a
hypothesis property (:data:`.properties.PROPERTIES`); it carries the reason it is skipped
(an undeclared capability) and the reason it is a known failure (the adapter's
``Capabilities.known_failures`` or an xfails list, see :func:`read_xfails`).

>>> from mbn_conformance.builtin import make
>>> found = checks(make("numpy"), select=["bn/NC/*"])
>>> [(c.kind, c.skip, c.xfail) for c in found][:1]
[('golden', None, None)]
>>> found[0].outcome().status
'pass'
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from . import runner, vectors
from .hypothesis_storage import no_hypothesis_storage
from .protocol import Adapter, FusedSyncAdapter, SyncAdapter
from .results import CaseResult, Kind, Status

__all__ = [
    "Check",
    "Law",
    "XfailEntry",
    "XfailsFileError",
    "checks",
    "golden_skip",
    "read_xfails",
]


class Law(Protocol):
    """A check that is not a golden case: a property, a refusal, a schedule check."""

    @property
    def id(self) -> str:
        """The check id: ``property/<name>``, ``refusal/<name>``, ``schedule/<name>``."""
        ...

    @property
    def doc(self) -> str:
        """One line saying what the law is."""
        ...

    def needs(self, adapter: Adapter) -> str | None:
        """Why ``adapter`` cannot be checked for this law (``None`` if it can)."""
        ...

    def check(self, adapter: Adapter, settings: Any = None) -> None:
        """Check the law; ``AssertionError`` (with the example) when it does not hold."""
        ...


@dataclass(frozen=True)
class XfailEntry:
    """One known failure: a glob pattern on check ids, the reason, and where it came from."""

    pattern: str
    reason: str
    source: str


class XfailsFileError(ValueError):
    """An xfails file that cannot be read or has a line without a reason (names the line)."""


@dataclass(frozen=True)
class Check:
    """One check of an adapter, with its skip and known-failure reasons already decided.

    Attributes
    ----------
    id : str
        A golden case id, ``property/<name>``, ``refusal/<name>`` or ``schedule/<name>``.
    kind : {"golden", "property", "refusal", "schedule"}
        What sort of check it is.
    skip : str or None
        Why it is not run (an undeclared capability), or ``None``.
    xfail : str or None
        Why it is expected to fail (with where that was declared), or ``None``.
    """

    id: str
    kind: Kind
    skip: str | None
    xfail: str | None
    _body: Callable[[], CaseResult] = field(repr=False, compare=False)

    def run(self) -> CaseResult:
        """Run the check: ``pass``, ``fail`` or ``error`` (``skip`` without running it).

        The known failure is not applied (pytest applies it as a strict xfail mark); see
        :meth:`outcome`.
        """
        if self.skip is not None:
            return CaseResult(self.id, "skip", kind=self.kind, reason=self.skip)
        return self._body()

    def judge(self, result: CaseResult) -> CaseResult:
        """``result`` with the known failure applied: ``xfail``, or ``xpass`` if it passed."""
        if self.xfail is None or result.status == "skip":
            return result
        status: Status = "xpass" if result.status == "pass" else "xfail"
        return replace(result, status=status, reason=self.xfail)

    def outcome(self) -> CaseResult:
        """The verdict of the check: :meth:`run`, then :meth:`judge`."""
        return self.judge(self.run())


def checks(
    adapter: Adapter,
    *,
    cases: Iterable[vectors.Case] | None = None,
    select: Sequence[str] = (),
    properties: bool | Sequence[Law] = False,
    refusals: bool | Sequence[Law] = True,
    schedules: bool | Sequence[Law] = True,
    xfails: Iterable[XfailEntry] = (),
    hypothesis_settings: Any = None,
) -> list[Check]:
    """Every check of ``adapter``: golden cases, refusals, schedule checks, properties.

    Parameters
    ----------
    adapter : Adapter
        The implementation under test.
    cases : iterable of Case, optional
        The golden cases (default: the committed vector file).
    select : sequence of str
        Glob patterns on check ids; a check is kept when one matches (all when empty).
    properties : bool or sequence of Law
        Add the hypothesis properties (``True``: :data:`.properties.PROPERTIES`, which
        needs hypothesis), or these laws.
    refusals : bool or sequence of Law
        Add the refusal checks (``True``: :data:`.refusals.REFUSALS`), or these laws.
    schedules : bool or sequence of Law
        Add the checks of an implementation's own scheduler (``True``:
        :data:`.own_schedule.SCHEDULE_CHECKS`), or these laws.
    xfails : iterable of XfailEntry
        Known failures beside the adapter's ``known_failures`` (an ``--mbn-xfails`` file).
    hypothesis_settings : hypothesis.settings, optional
        Passed to every property (default: the ``mbn-conformance`` profile).

    Returns
    -------
    list of Check
        Golden cases in file order, then refusals, schedule checks and properties.
    """
    entries = list(xfails)

    def chosen(check_id: str) -> bool:
        return not select or any(fnmatch.fnmatchcase(check_id, p) for p in select)

    out: list[Check] = []
    for case in vectors.read() if cases is None else cases:
        if chosen(case.id):
            out.append(_golden_check(adapter, case, entries))
    groups: tuple[tuple[Kind, Sequence[Law], Any], ...] = (
        ("refusal", _laws("refusals", "REFUSALS", refusals), None),
        ("schedule", _laws("own_schedule", "SCHEDULE_CHECKS", schedules), None),
        ("property", _laws("properties", "PROPERTIES", properties), hypothesis_settings),
    )
    for kind, laws, settings in groups:
        for law in laws:
            if chosen(law.id):
                out.append(_law_check(adapter, law, kind, settings, entries))
    return out


def _laws(module: str, attr: str, which: bool | Sequence[Law]) -> Sequence[Law]:
    """The shipped laws ``module.attr`` (``True``), none (``False``) or the ones given."""
    if which is False:
        return ()
    if which is not True:
        return which
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as exc:
        # TODO(own_schedule): it imports hypothesis (optional) for a type annotation only;
        # without hypothesis there are no schedule checks until that import moves under
        # TYPE_CHECKING, and then this clause goes
        if module == "own_schedule" and exc.name == "hypothesis":
            return ()
        raise
    return tuple(getattr(mod, attr))


def known_failure(adapter: Adapter, check_id: str, xfails: Iterable[XfailEntry]) -> str | None:
    """Why ``check_id`` is a known failure, with where it was declared; ``None`` if it is not.

    The adapter's ``known_failures`` come first, then the xfails list.
    """
    for pattern, reason in adapter.capabilities.known_failures.items():
        if fnmatch.fnmatchcase(check_id, pattern):
            return f"{reason} (known_failures of {adapter.name})"
    for entry in xfails:
        if fnmatch.fnmatchcase(check_id, entry.pattern):
            return f"{entry.reason} ({entry.source})"
    return None


def golden_skip(adapter: Adapter, case: vectors.Case) -> str | None:
    """Why ``adapter`` cannot run the golden ``case`` (``None`` if it can).

    Every other declaration is translated rather than skipped: the expectations follow the
    declared estimator and hyper-parameter precision, and without a batch counter the
    counter is not compared.
    """
    caps = adapter.capabilities
    meta = case.meta
    needed = {"sync_mbn": ("sync", "mbn")}.get(meta["algorithm"], (meta["algorithm"],))
    missing = [a for a in needed if a not in caps.algorithms]
    if missing:
        return f"algorithm {'+'.join(missing)} not declared"
    if meta["dtype"] not in caps.dtypes:
        return f"dtype {meta['dtype']} not declared"
    if meta["layout"] not in caps.layouts:
        return f"layout {meta['layout']} not declared"
    if not meta["affine"] and not caps.affine_optional:
        return "affine parameters not optional"
    if case.num_shards is not None and not isinstance(adapter, (SyncAdapter, FusedSyncAdapter)):
        return "no sync_train_step/sync_backward or sync_step"
    if caps.running_var not in case.estimators:
        return f"{caps.running_var} running variance undefined for one value per channel"
    steps = [case.step(k, caps.running_var) for k in range(len(case.steps))]
    cumulative = [s for s in steps if s.training and s.inference_decay is None]
    if cumulative and not caps.batch_counter:
        return "cumulative average needs a batch counter (batch_counter=False)"
    if cumulative and case.kind == "mbn" and not caps.cumulative_tau:
        return "cumulative tau=None not declared (cumulative_tau=False)"
    return None


def _golden_check(adapter: Adapter, case: vectors.Case, xfails: Sequence[XfailEntry]) -> Check:
    return Check(
        case.id,
        "golden",
        golden_skip(adapter, case),
        known_failure(adapter, case.id, xfails),
        lambda: runner.run_case(adapter, case),
    )


def _law_check(
    adapter: Adapter, law: Law, kind: Kind, settings: Any, xfails: Sequence[XfailEntry]
) -> Check:
    return Check(
        law.id,
        kind,
        law.needs(adapter),
        known_failure(adapter, law.id, xfails),
        lambda: run_law(adapter, law, kind, settings),
    )


def run_law(adapter: Adapter, law: Law, kind: Kind, settings: Any = None) -> CaseResult:
    """Check one law: ``fail`` on an ``AssertionError``, ``error`` on any other exception.

    Hypothesis writes nothing while it runs (:func:`.hypothesis_storage.no_hypothesis_storage`).
    An error names the adapter method it came from, found in the traceback.
    """
    try:
        with no_hypothesis_storage():
            law.check(adapter, settings)
    except AssertionError as exc:
        text = "\n".join([str(exc), *getattr(exc, "__notes__", [])]).strip()
        first = (text.splitlines() or ["assertion failed"])[0]
        return CaseResult(law.id, "fail", kind=kind, reason=first, failures=[text])
    except Exception as exc:  # an implementation's error is a result, not a crash
        method = runner.adapter_method_in(exc, adapter)
        return runner.error_result(law.id, kind, method, None, exc)
    return CaseResult(law.id, "pass", kind=kind)


def read_xfails(path: str | Path) -> list[XfailEntry]:
    """Parse an xfails file: ``pattern  # reason`` per line; blank and ``#`` lines ignored.

    A pattern without a reason is an :class:`XfailsFileError` naming the file and line:
    every expected failure carries its reason, as in scikit-learn's
    ``expected_failed_checks``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise XfailsFileError(f"cannot read {p}: {exc}") from None
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        pattern, reason = pattern.strip(), reason.strip()
        if not sep or not reason:
            raise XfailsFileError(
                f"{p}:{lineno}: {pattern!r} has no reason; write it as 'pattern  # why it fails'"
            )
        if len(pattern.split()) != 1:
            raise XfailsFileError(f"{p}:{lineno}: expected one pattern before '#', got {pattern!r}")
        entries.append(XfailEntry(pattern, reason, f"{p.name}:{lineno}"))
    return entries
