"""pytest plugin of the conformance suite (registered as the ``pytest11`` entry point).

Choose the implementation under test, then run the shipped suite::

    pytest --pyargs mbn_conformance.suite --mbn-impl my_package.adapter:make_adapter
    MBN_IMPL=my_package.adapter:make_adapter pytest --pyargs mbn_conformance.suite
    pytest --pyargs mbn_conformance.suite --mbn-backend numpy     # a built-in adapter
    pytest --pyargs mbn_conformance.suite --mbn-backend torch     # a registered backend

``module:factory`` names a callable (or an adapter object) in an importable module;
``factory`` may be a dotted attribute path. The tests are the checks of
:func:`mbn_conformance.checks.checks`, which decides every skip (with its reason) and every
known failure: the adapter's ``known_failures`` and the lines of an ``--mbn-xfails FILE``
(``pattern  # reason``, glob patterns on check ids such as ``mbn/NCHW/*`` or
``property/sync_*``) become strict xfails, so a known failure that passes fails the run and
the list cannot go stale. The plugin only renders: a mark per check, the implementation and
the planned coverage in the report header, the verdict with its coverage in the terminal
summary.

In a session that names no implementation the plugin adds its options and nothing else: no
header lines, no fixtures used, no collection changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .checks import Check, XfailEntry
    from .results import CaseResult

ENV_IMPL = "MBN_IMPL"
BACKENDS = ("numpy", "array-api-strict", "torch-xp", "cupy")
"""The built-in choices of ``--mbn-backend``: :data:`mbn_conformance.builtin.BACKENDS` (a test
keeps them equal; the plugin does not import the core until an implementation is named).
The backends registered in the entry-point group ``mbn_conformance.backends`` follow them
(:func:`mbn_conformance.loading.backend_names`)."""
CHECK_PARAM = "mbn_check"
"""The argument the shipped tests are parametrized over: one :class:`~.checks.Check` each."""


@dataclass
class _Session:
    """What the plugin knows about the implementation under test (on ``config.stash``)."""

    spec: str | None
    source: str
    xfails: list[XfailEntry]
    backend: str | None = None
    adapter: Any = None
    error: str | None = None
    checks: list[Check] | None = None
    items: list[tuple[pytest.Item, Check]] = field(default_factory=list)


_KEY = pytest.StashKey[_Session]()
_RESULT = pytest.StashKey["CaseResult"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``mbn-conformance`` options (``--mbn-impl``, ``--mbn-backend``...) to pytest."""
    group = parser.getgroup("mbn-conformance", "mbn-ref conformance suite")
    group.addoption(
        "--mbn-impl",
        default=None,
        metavar="MODULE:FACTORY",
        help=f"implementation under test: a factory returning an Adapter (or env {ENV_IMPL})",
    )
    from .loading import ENTRY_POINT_GROUP

    group.addoption(
        "--mbn-backend",
        default=None,
        choices=_backend_names(),
        help="shortcut for a named adapter: a built-in one (mbn_conformance.builtin:make on "
        f"that backend) or one registered in the entry-point group {ENTRY_POINT_GROUP}",
    )
    group.addoption(
        "--mbn-xfails",
        default=None,
        metavar="FILE",
        help="known failures, one 'pattern  # reason' per line (globs on check ids)",
    )
    group.addoption(
        "--mbn-max-examples",
        default=None,
        type=int,
        metavar="N",
        help="hypothesis examples per property (default: the mbn-conformance profile's 25)",
    )


def read_xfails(path: str | Path) -> list[XfailEntry]:
    """:func:`mbn_conformance.checks.read_xfails`, failing as a ``pytest.UsageError``."""
    from .checks import XfailsFileError
    from .checks import read_xfails as read

    try:
        return read(path)
    except XfailsFileError as exc:
        raise pytest.UsageError(f"--mbn-xfails: {exc}") from None


def _session(config: pytest.Config) -> _Session:
    if _KEY not in config.stash:
        impl = config.getoption("mbn_impl")
        backend = config.getoption("mbn_backend")
        if impl and backend:
            raise pytest.UsageError("give either --mbn-impl or --mbn-backend, not both")
        if backend:
            spec: str | None = backend_spec(backend)
            source = "--mbn-backend"
        elif impl:
            spec, source = impl, "--mbn-impl"
        elif os.environ.get(ENV_IMPL):
            spec, source = os.environ[ENV_IMPL], ENV_IMPL
        else:
            spec, source = None, ""
        path = config.getoption("mbn_xfails")
        xfails = read_xfails(path) if path else []
        config.stash[_KEY] = _Session(spec, source, xfails, backend=backend or None)
    return config.stash[_KEY]


def pytest_configure(config: pytest.Config) -> None:
    """Check the options early: a usage error before collection.

    Errors are both --mbn-impl and --mbn-backend, or a bad xfails file. Without the options
    this reads nothing.
    """
    _session(config)


def load_adapter(spec: str) -> Any:
    """:func:`mbn_conformance.loading.load_adapter`, failing as a ``pytest.UsageError``."""
    from .loading import AdapterLoadError
    from .loading import load_adapter as load

    try:
        return load(spec)
    except AdapterLoadError as exc:
        raise pytest.UsageError(f"--mbn-impl/{ENV_IMPL} {exc}") from None


def load_backend(name: str) -> Any:
    """:func:`mbn_conformance.loading.backend_adapter`, failing as a ``pytest.UsageError``."""
    from .loading import AdapterLoadError, backend_adapter

    try:
        return backend_adapter(name)
    except AdapterLoadError as exc:
        raise pytest.UsageError(f"--mbn-backend {exc}") from None


def backend_spec(name: str) -> str:
    """:func:`mbn_conformance.loading.backend_spec`, failing as a ``pytest.UsageError``."""
    from .loading import AdapterLoadError
    from .loading import backend_spec as spec

    try:
        return spec(name)
    except AdapterLoadError as exc:
        raise pytest.UsageError(f"--mbn-backend {exc}") from None


def get_adapter(config: pytest.Config) -> Any:
    """The adapter of this session, loaded once.

    ``pytest.UsageError`` if none is named or it cannot be loaded.
    """
    sess = _session(config)
    if sess.adapter is None:
        if sess.error is not None:
            raise pytest.UsageError(sess.error)
        if sess.spec is None:
            raise pytest.UsageError(
                "the suite needs an implementation: --mbn-impl module:factory, "
                f"{ENV_IMPL}=module:factory, or --mbn-backend {{{','.join(_backend_names())}}}"
            )
        try:
            sess.adapter = load_backend(sess.backend) if sess.backend else load_adapter(sess.spec)
        except pytest.UsageError as exc:
            sess.error = str(exc)
            raise
    return sess.adapter


def _backend_names() -> list[str]:
    from .loading import backend_names

    return backend_names(BACKENDS)


def _has_hypothesis() -> bool:
    return importlib.util.find_spec("hypothesis") is not None


def session_checks(config: pytest.Config) -> list[Check]:
    """Every check of the session's adapter, listed once (properties when hypothesis is here)."""
    sess = _session(config)
    if sess.checks is None:
        from .checks import checks

        adapter = get_adapter(config)
        with_properties = _has_hypothesis()
        sess.checks = checks(
            adapter,
            properties=with_properties,
            xfails=sess.xfails,
            hypothesis_settings=hypothesis_settings(config) if with_properties else None,
        )
    return sess.checks


def _collection_error(exc: pytest.UsageError) -> pytest.Collector.CollectError:
    """A usage error as a collection error, which pytest reports as the bare message."""
    return pytest.Collector.CollectError(f"mbn-conformance: {exc}")


def parametrize(metafunc: pytest.Metafunc, kind: str) -> None:
    """Parametrize :data:`CHECK_PARAM` with the session's checks of ``kind``.

    Each check carries its skip mark or its strict xfail mark; the test ids are the check
    ids.
    """
    if CHECK_PARAM not in metafunc.fixturenames:
        return
    try:
        adapter = get_adapter(metafunc.config)
        found = [c for c in session_checks(metafunc.config) if c.kind == kind]
    except pytest.UsageError as exc:
        raise _collection_error(exc) from None
    params = []
    for check in found:
        marks: list[pytest.MarkDecorator] = []
        if check.skip is not None:
            marks.append(pytest.mark.skip(reason=f"{adapter.name}: {check.skip}"))
        elif check.xfail is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=check.xfail))
        params.append(pytest.param(check, id=check.id, marks=marks))
    metafunc.parametrize(CHECK_PARAM, params)


def run_check(check: Check, record: Callable[[CaseResult], None]) -> None:
    """Run ``check`` in a test: pass, or fail with :func:`~.report.describe`'s account.

    A known failure fails here and its strict xfail mark records it as expected; if it
    passes, strict mode reports the stale declaration.
    """
    from .report import describe

    result = check.run()
    record(result)
    if result.status == "skip":  # the mark skips these before the call; kept for safety
        pytest.skip(result.reason)
    if result.status != "pass":
        pytest.fail(describe(result), pytrace=False)


def hypothesis_settings(config: pytest.Config) -> Any:
    """Hypothesis settings for the properties.

    The ``mbn-conformance`` profile, unless the user chose a profile with
    ``--hypothesis-profile`` (then the loaded default); ``--mbn-max-examples`` overrides the
    number of examples. The example database is always off: the suite writes nothing.
    """
    from hypothesis import settings

    from .properties import default_settings

    chosen = None
    with contextlib.suppress(ValueError):  # hypothesis' own plugin is not loaded
        chosen = config.getoption("hypothesis_profile")
    base = settings() if chosen else default_settings()
    n = config.getoption("mbn_max_examples")
    return settings(base, database=None, **({} if n is None else {"max_examples": n}))


@pytest.fixture(scope="session")
def mbn_adapter(pytestconfig: pytest.Config) -> Any:
    """The implementation under test (from ``--mbn-impl``, ``MBN_IMPL`` or ``--mbn-backend``)."""
    return get_adapter(pytestconfig)


@pytest.fixture
def mbn_record(request: pytest.FixtureRequest) -> Callable[[CaseResult], None]:
    """Keep a check's result on its test item, for the verdict in the terminal summary."""

    def record(result: CaseResult) -> None:
        request.node.stash[_RESULT] = result

    return record


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """The implementation, its capabilities, versions and planned coverage.

    Nothing when no implementation is named (the plugin stays silent in sessions that do not
    use it).
    """
    sess = _session(config)
    if sess.spec is None:
        return None
    lines = [f"mbn-conformance: implementation {sess.spec} (from {sess.source})"]
    try:
        adapter = get_adapter(config)
        planned = session_checks(config)
    except pytest.UsageError as exc:
        return [*lines, f"mbn-conformance: cannot load it: {exc}"]
    from .environment import environment, versions_line
    from .report import capabilities_dict, capabilities_line
    from .results import coverage_of, skipped_text

    version = adapter.capabilities.version
    lines[0] = (
        f"mbn-conformance: implementation {adapter.name}"
        f"{f' version {version}' if version else ''} = {sess.spec} (from {sess.source})"
    )
    lines.append(
        "mbn-conformance: capabilities "
        + capabilities_line(capabilities_dict(adapter.capabilities))
    )
    lines.append("mbn-conformance: versions " + versions_line(environment(adapter)))
    cov = coverage_of(len(planned), [c.skip for c in planned if c.skip is not None])
    skipped = skipped_text(cov)
    lines.append(
        f"mbn-conformance: {cov['total']} checks, {cov['run']} to run"
        + (f"; {skipped}" if skipped else "")
    )
    if sess.xfails:
        lines.append(f"mbn-conformance: {len(sess.xfails)} known failures from --mbn-xfails")
    return lines


def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember the suite's items (after deselection) for the terminal summary."""
    sess = _session(session.config)
    if sess.spec is None:
        return
    from .checks import Check

    for item in session.items:
        check = getattr(getattr(item, "callspec", None), "params", {}).get(CHECK_PARAM)
        if isinstance(check, Check):
            sess.items.append((item, check))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The verdict with its coverage, over the checks this session ran or skipped."""
    sess = _session(config)
    if sess.spec is None or not sess.items:
        return
    from .results import summarize, verdict_line

    results = []
    for item, check in sess.items:
        if check.skip is not None:
            results.append(check.run())
        elif _RESULT in item.stash:
            results.append(check.judge(item.stash[_RESULT]))
    if results:
        terminalreporter.write_sep("-", "mbn-conformance")
        terminalreporter.write_line(verdict_line(summarize(results)))
