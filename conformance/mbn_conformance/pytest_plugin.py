"""pytest plugin of the conformance suite (registered as the ``pytest11`` entry point).

Choose the implementation under test, then run the shipped suite::

    pytest --pyargs mbn_conformance.suite --mbn-impl my_package.adapter:make_adapter
    MBN_IMPL=my_package.adapter:make_adapter pytest --pyargs mbn_conformance.suite
    pytest --pyargs mbn_conformance.suite --mbn-backend numpy     # a built-in adapter

``module:factory`` names a callable (or an adapter object) in an importable module;
``factory`` may be a dotted attribute path. Cases outside the adapter's declared
:class:`~mbn_conformance.protocol.Capabilities` are skipped with the reason; its
``known_failures`` and the lines of an ``--mbn-xfails FILE`` (``pattern  # reason``, fnmatch
patterns on conformance ids such as ``mbn/NCHW/*`` or ``property/sync_*``) become strict
xfails: a case that then passes fails the run, so the list cannot go stale.

In a session that names no implementation the plugin adds its options and nothing else: no
header lines, no fixtures used, no collection changes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ENV_IMPL = "MBN_IMPL"
_BACKENDS = ("numpy", "array-api-strict", "torch-xp", "cupy")
# frameworks whose version the header reports when the adapter has imported them
_FRAMEWORKS = (
    "torch",
    "tensorflow",
    "keras",
    "jax",
    "mlx",
    "cupy",
    "array_api_strict",
    "onnxruntime",
)


@dataclass(frozen=True)
class XfailEntry:
    """One known failure: an fnmatch pattern on conformance ids, the reason, where it came from."""

    pattern: str
    reason: str
    source: str


@dataclass
class _Session:
    """What the plugin knows about the implementation under test (on ``config.stash``)."""

    spec: str | None
    source: str
    xfails: list[XfailEntry]
    adapter: Any = None
    error: str | None = None


_KEY = pytest.StashKey[_Session]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``mbn-conformance`` options (``--mbn-impl``, ``--mbn-backend``...) to pytest."""
    group = parser.getgroup("mbn-conformance", "mbn-ref conformance suite")
    group.addoption(
        "--mbn-impl",
        default=None,
        metavar="MODULE:FACTORY",
        help=f"implementation under test: a factory returning an Adapter (or env {ENV_IMPL})",
    )
    group.addoption(
        "--mbn-backend",
        default=None,
        choices=_BACKENDS,
        help="shortcut for a built-in adapter (mbn_conformance.builtin:make on that backend)",
    )
    group.addoption(
        "--mbn-xfails",
        default=None,
        metavar="FILE",
        help="known failures, one 'pattern  # reason' per line (fnmatch on conformance ids)",
    )
    group.addoption(
        "--mbn-max-examples",
        default=None,
        type=int,
        metavar="N",
        help="hypothesis examples per property (default: the mbn-conformance profile's 25)",
    )


def read_xfails(path: str | Path) -> list[XfailEntry]:
    """Parse an xfails file: ``pattern  # reason`` per line; blank and ``#`` lines ignored.

    A pattern without a reason is a ``pytest.UsageError`` naming the file and line: every
    expected failure carries its reason, as in scikit-learn's ``expected_failed_checks``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise pytest.UsageError(f"--mbn-xfails: cannot read {p}: {exc}") from None
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        pattern, reason = pattern.strip(), reason.strip()
        if not sep or not reason:
            raise pytest.UsageError(
                f"{p}:{lineno}: {pattern!r} has no reason; write it as 'pattern  # why it fails'"
            )
        if len(pattern.split()) != 1:
            raise pytest.UsageError(
                f"{p}:{lineno}: expected one pattern before '#', got {pattern!r}"
            )
        entries.append(XfailEntry(pattern, reason, f"{p.name}:{lineno}"))
    return entries


def _session(config: pytest.Config) -> _Session:
    if _KEY not in config.stash:
        impl = config.getoption("mbn_impl")
        backend = config.getoption("mbn_backend")
        if impl and backend:
            raise pytest.UsageError("give either --mbn-impl or --mbn-backend, not both")
        if backend:
            spec: str | None = f"mbn_conformance.builtin:make({backend})"
            source = "--mbn-backend"
        elif impl:
            spec, source = impl, "--mbn-impl"
        elif os.environ.get(ENV_IMPL):
            spec, source = os.environ[ENV_IMPL], ENV_IMPL
        else:
            spec, source = None, ""
        path = config.getoption("mbn_xfails")
        xfails = read_xfails(path) if path else []
        config.stash[_KEY] = _Session(spec, source, xfails)
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
                f"{ENV_IMPL}=module:factory, or --mbn-backend {{{','.join(_BACKENDS)}}}"
            )
        try:
            sess.adapter = load_adapter(sess.spec)
        except pytest.UsageError as exc:
            sess.error = str(exc)
            raise
    return sess.adapter


def expected_failure(config: pytest.Config, adapter: Any, conformance_id: str) -> str | None:
    """The reason ``conformance_id`` is a known failure, or ``None``.

    The adapter's own declaration is looked up first, then the xfails file.
    """
    for pattern, reason in adapter.capabilities.known_failures.items():
        if fnmatch.fnmatchcase(conformance_id, pattern):
            return f"{reason} (known_failures of {adapter.name})"
    for entry in _session(config).xfails:
        if fnmatch.fnmatchcase(conformance_id, entry.pattern):
            return f"{entry.reason} ({entry.source})"
    return None


def adapter_for_collection(config: pytest.Config) -> Any:
    """:func:`get_adapter` for ``pytest_generate_tests``.

    A usage error becomes a collection error that pytest reports as the bare message (no
    traceback).
    """
    try:
        return get_adapter(config)
    except pytest.UsageError as exc:
        raise pytest.Collector.CollectError(f"mbn-conformance: {exc}") from None


def param(config: pytest.Config, value: Any, conformance_id: str, skip: str | None) -> Any:
    """``pytest.param`` for one case or property, with its skip or strict-xfail mark."""
    adapter = adapter_for_collection(config)
    marks: list[pytest.MarkDecorator] = []
    if skip is not None:
        marks.append(pytest.mark.skip(reason=f"{adapter.name}: {skip}"))
    else:
        reason = expected_failure(config, adapter, conformance_id)
        if reason is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(value, id=conformance_id, marks=marks)


def hypothesis_settings(config: pytest.Config) -> Any:
    """Hypothesis settings for the properties.

    The ``mbn-conformance`` profile, unless the user chose a profile with
    ``--hypothesis-profile`` (then the loaded default); ``--mbn-max-examples`` overrides the
    number of examples.
    """
    from hypothesis import settings

    from .properties import default_settings

    chosen = None
    with contextlib.suppress(ValueError):  # hypothesis' own plugin is not loaded
        chosen = config.getoption("hypothesis_profile")
    base = settings() if chosen else default_settings()
    n = config.getoption("mbn_max_examples")
    return base if n is None else settings(base, max_examples=n)


@pytest.fixture(scope="session")
def mbn_adapter(pytestconfig: pytest.Config) -> Any:
    """The implementation under test (from ``--mbn-impl``, ``MBN_IMPL`` or ``--mbn-backend``)."""
    return get_adapter(pytestconfig)


def _version(dist: str, module: str | None = None) -> str | None:
    mod = sys.modules.get(module or dist)
    v = getattr(mod, "__version__", None)
    if isinstance(v, str):
        return v
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _caps_line(caps: Any) -> str:
    def join(values: Iterable[str]) -> str:
        return ",".join(sorted(values))

    return (
        f"algorithms={join(caps.algorithms)} dtypes={join(caps.dtypes)} "
        f"layouts={join(caps.layouts)} running_var={join(caps.running_var)} "
        f"backward={caps.backward} affine_optional={caps.affine_optional} "
        f"native_momentum={caps.native_momentum} known_failures={len(caps.known_failures)}"
    )


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """The implementation, its capabilities and versions, for pytest's header.

    Nothing when no implementation is named (the plugin stays silent in sessions that do not
    use it).
    """
    sess = _session(config)
    if sess.spec is None:
        return None
    lines = [f"mbn-conformance: implementation {sess.spec} (from {sess.source})"]
    try:
        adapter = get_adapter(config)
    except pytest.UsageError as exc:
        return [*lines, f"mbn-conformance: cannot load it: {exc}"]
    lines[0] = f"mbn-conformance: implementation {adapter.name} = {sess.spec} (from {sess.source})"
    lines.append(f"mbn-conformance: capabilities {_caps_line(adapter.capabilities)}")
    versions = [
        f"mbn_ref {_version('mbn-ref', 'mbn_ref')}",
        f"numpy {_version('numpy')}",
        f"python {platform.python_version()}",
    ]
    top = type(adapter).__module__.split(".")[0]
    for name in (top, *_FRAMEWORKS):
        if name in ("mbn_conformance", "mbn_ref") or name not in sys.modules:
            continue
        v = _version(name.replace("_", "-"), name)
        entry = f"{name} {v}"
        if v is not None and entry not in versions:
            versions.append(entry)
    lines.append("mbn-conformance: versions " + ", ".join(versions))
    if sess.xfails:
        lines.append(f"mbn-conformance: {len(sess.xfails)} known failures from --mbn-xfails")
    return lines
