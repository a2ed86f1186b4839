"""``mbn-ref conformance``: run the checks against an implementation and report.

    mbn-ref conformance --backend numpy
    mbn-ref conformance --impl my_package.adapter:make --cases 'mbn/*' --json report.json
    mbn-ref conformance --impl my_package.adapter:make --properties --xfails xfails.txt

Exactly one of ``--backend`` (a built-in adapter over :mod:`mbn_ref`, or a backend that an
installed package registers in the entry-point group ``mbn_conformance.backends``, such as
``torch``: see :mod:`mbn_conformance.loading`) and ``--impl module:factory`` (a callable
returning an :class:`~mbn_conformance.protocol.Adapter`; the current directory is
importable, like ``python -m``). The checks, their skips and known failures come from
:func:`mbn_conformance.checks.checks`; this module only renders them.
Exit status: 0 when the implementation conforms (:func:`~mbn_conformance.results.succeeded`),
1 when a check fails, errors or passes unexpectedly, 2 on a usage error (bad ``--impl``, an
import that fails, a file that is not a golden-vector archive, a pattern that selects
nothing, a bad xfails file, an unwritable ``--json`` path).

:func:`register` is the entry point ``conformance`` of the group ``mbn_ref.commands``
(``pyproject.toml``): :mod:`mbn_ref.cli` loads it when ``mbn-ref conformance`` is used, and the
core never imports the suite. ``python -m mbn_conformance.cli`` runs it without the
``mbn-ref`` wrapper.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mbn_ref.cli import UsageError

from . import report, vectors
from .builtin import BACKENDS
from .checks import XfailEntry, XfailsFileError, checks, read_xfails
from .loading import (
    ENTRY_POINT_GROUP,
    AdapterLoadError,
    backend_adapter,
    backend_names,
    load_adapter,
)
from .protocol import Adapter
from .results import CaseResult, succeeded

__all__ = ["add_arguments", "load_impl", "main", "read_vectors", "register", "run_command"]

DESCRIPTION = (
    "Run the conformance suite's checks (golden cases, refusals of bad input, and with "
    "--properties the hypothesis properties) against a BN/MBN implementation and print a "
    "table (check, status, max abs/rel error, tolerance, worst quantity, reason) and the "
    "verdict with its coverage; exit 0 when it conforms, 1 when it does not, 2 on a usage "
    "error."
)


EPILOG = """\
examples:
  mbn-ref conformance --backend numpy
      the reference on NumPy (the suite checking itself)
  mbn-ref conformance --backend torch --all
      mbn_torch's modules, every check listed
  mbn-ref conformance --impl my_package.adapter:make --cases 'mbn/*,refusal/*' --json r.json
      your implementation, two groups of checks, table and JSON report
  mbn-ref conformance --impl my_package.adapter:make --properties --xfails xfails.txt
      with the hypothesis properties, known failures declared
  mbn-ref conformance --backend numpy --json -
      the JSON report on stdout

exit status:
  0  the implementation conforms (every check run passed or failed as declared)
  1  a check fails, errors or passes unexpectedly; also a reader that stopped early
     (`mbn-ref ... | head`)
  2  usage error: a bad --impl or --backend, an import that fails, a file that is not a
     golden-vector archive, a pattern that selects nothing, a bad xfails file, hypothesis
     missing for --properties, an unwritable --json path
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options, on ``parser``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--backend",
        choices=backend_names(BACKENDS),
        help="a named adapter: a built-in one (the core on this Array API namespace: "
        f"{', '.join(BACKENDS)}) or one an installed package registers in the entry-point "
        f"group {ENTRY_POINT_GROUP} (e.g. torch: mbn_torch's modules)",
    )
    which.add_argument(
        "--impl",
        metavar="MODULE:FACTORY",
        help="an implementation under test: FACTORY() in MODULE returns its adapter",
    )
    parser.add_argument(
        "--cases",
        metavar="PATTERNS",
        type=_pattern_list,
        action="append",
        default=[],
        help="run only checks whose id matches one of these comma-separated globs "
        "(repeatable), e.g. 'mbn/*', 'property/bn_*,refusal/*'",
    )
    parser.add_argument(
        "--vectors",
        metavar="PATH",
        type=Path,
        default=vectors.DEFAULT_PATH,
        help=f"golden vector file (default: the committed {vectors.DEFAULT_PATH.name})",
    )
    parser.add_argument(
        "--xfails",
        metavar="FILE",
        type=Path,
        default=None,
        help="known failures, one 'pattern  # reason' per line (globs on check ids)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write the JSON report to PATH ('-': the JSON report on stdout instead)",
    )
    parser.add_argument(
        "--properties",
        action="store_true",
        help="also check the hypothesis properties (needs hypothesis; ids property/<name>)",
    )
    parser.add_argument(
        "--all", action="store_true", help="list passing checks too (default: only the others)"
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="plain text table even when rich is installed and stdout is a terminal",
    )


def _pattern_list(text: str) -> list[str]:
    """``--cases`` value: comma-separated globs (check ids hold no commas)."""
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError(f"expected one or more glob patterns, got {text!r}")
    return patterns


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``conformance`` subcommand to an ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "conformance",
        help="run the conformance suite against an implementation",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run_command)
    return parser


def load_impl(spec: str) -> tuple[Adapter, str]:
    """The adapter named by ``module:factory`` (``UsageError`` with the reason otherwise)."""
    try:
        return load_adapter(spec), spec
    except AdapterLoadError as exc:
        raise UsageError(f"--impl {exc}") from None


def _backend(name: str) -> tuple[Adapter, str]:
    try:
        return backend_adapter(name), f"--backend {name}"
    except AdapterLoadError as exc:
        raise UsageError(str(exc)) from None


def run_command(args: argparse.Namespace) -> int:
    """Run the subcommand for parsed ``args``; returns the exit status.

    A usage problem raises :class:`mbn_ref.cli.UsageError`, which ``mbn-ref`` reports on
    one line with exit status 2.
    """
    adapter, source = _backend(args.backend) if args.backend else load_impl(args.impl)
    if args.json not in (None, "-"):  # an unwritable report path fails before any check runs
        try:
            with open(args.json, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot write {args.json}: {exc}") from None
    cases = read_vectors(args.vectors)
    xfails: list[XfailEntry] = []
    if args.xfails is not None:
        try:
            xfails = read_xfails(args.xfails)
        except XfailsFileError as exc:
            raise UsageError(f"--xfails {exc}") from None
    patterns: list[str] = [p for group in args.cases for p in group]
    try:
        found = checks(
            adapter, cases=cases, select=patterns, properties=args.properties, xfails=xfails
        )
    except ImportError as exc:
        if not args.properties:
            raise
        raise UsageError(f"--properties needs hypothesis (pip install hypothesis): {exc}") from None
    if not found:
        hint = (
            " (properties are checked with --properties)"
            if any(p.startswith("property/") for p in patterns) and not args.properties
            else ""
        )
        raise UsageError(f"no check id matches {' '.join(patterns)}{hint}")
    results = [c.outcome() for c in found]
    golden = sum(c.kind == "golden" for c in found)
    info = report.vectors_info(_shown(args.vectors), len(cases), golden, patterns)
    doc = report.build(adapter, results, info, source=source)
    text = report.dumps(doc)
    if args.json == "-":
        sys.stdout.write(text)
    else:
        if args.json is not None:
            try:
                Path(args.json).write_text(text, encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot write {args.json}: {exc}") from None
        _print_human(doc, results, args)
    return 0 if succeeded(results) else 1


def _shown(path: Path) -> Path:
    """``path`` relative to the current directory when it lies under it (for the header)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def read_vectors(path: Path) -> list[vectors.Case]:
    """The golden cases of ``path``; a :class:`UsageError` that says what is wrong otherwise.

    A file that is not a golden-vector archive (``--vectors README.md``) is named as such,
    never with NumPy's text about pickled data.
    """
    if not path.is_file():
        raise UsageError(f"cannot read vectors {path}: no such file")
    try:
        return vectors.read(path)
    except vectors.VectorFormatError as exc:
        raise UsageError(f"--vectors {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read vectors {path}: {exc}") from None
    except Exception as exc:  # NumPy's and zipfile's own errors for a file of another kind
        raise UsageError(
            f"--vectors {path} is not a golden-vector archive ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _print_human(
    doc: dict[str, Any], results: Sequence[CaseResult], args: argparse.Namespace
) -> None:
    if not args.plain and sys.stdout.isatty():
        try:
            report.print_rich(doc, results, show_all=args.all)
            return
        except ImportError:
            pass
    sys.stdout.write(report.render_text(doc, results, show_all=args.all))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mbn_conformance.cli``: ``mbn-ref conformance`` (same options, errors, exits)."""
    from mbn_ref.cli import main as mbn_main

    return mbn_main(["conformance", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
