"""``mbn-ref conformance``: run the golden cases against an implementation and report.

    mbn-ref conformance --backend numpy
    mbn-ref conformance --impl my_package.adapter:make --cases 'mbn/*' --json report.json

Exactly one of ``--backend`` (a built-in adapter over :mod:`mbn_ref`) and ``--impl
module:factory`` (a callable returning an :class:`~mbn_conformance.protocol.Adapter`; the
current directory is importable, like ``python -m``). Exit status: 0 when the
implementation conforms (:func:`~mbn_conformance.runner.succeeded`), 1 when a case fails,
errors or passes unexpectedly, 2 on a usage error (bad ``--impl``, an import that fails, an
unreadable vector file, a pattern that selects nothing, an unwritable ``--json`` path).

:func:`register` is the entry point ``conformance`` of the group ``mbn_ref.commands``
(``pyproject.toml``): :mod:`mbn_ref.cli` loads it when ``mbn-ref conformance`` is used, and the
core never imports the suite. ``python -m mbn_conformance.cli`` runs it without the
``mbn-ref`` wrapper.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report, vectors
from .builtin import BACKENDS
from .loading import AdapterLoadError, backend_adapter, load_adapter
from .protocol import Adapter
from .runner import run, succeeded

__all__ = ["add_arguments", "load_impl", "main", "register", "run_command"]

PROG = "mbn-ref conformance"
DESCRIPTION = (
    "Run the conformance suite's golden cases against a BN/MBN implementation and print a "
    "table (case, status, max abs/rel error, tolerance, worst quantity, reason); exit 0 when "
    "it conforms, 1 when it does not, 2 on a usage error."
)


class UsageError(Exception):
    """A command-line problem the user can fix; reported on one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options, on ``parser``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--backend",
        choices=BACKENDS,
        help="a built-in adapter: the core on this Array API namespace",
    )
    which.add_argument(
        "--impl",
        metavar="MODULE:FACTORY",
        help="an implementation under test: FACTORY() in MODULE returns its adapter",
    )
    parser.add_argument(
        "--cases",
        metavar="PATTERN",
        action="append",
        default=[],
        help="run only cases whose id matches this glob (repeatable), e.g. 'mbn/*'",
    )
    parser.add_argument(
        "--vectors",
        metavar="PATH",
        type=Path,
        default=vectors.DEFAULT_PATH,
        help="golden vector file (default: the committed golden_v1.npz)",
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
        "--all", action="store_true", help="list passing cases too (default: only the others)"
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="plain text table even when rich is installed and stdout is a terminal",
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``conformance`` subcommand to an ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "conformance",
        help="run the conformance suite against an implementation",
        description=DESCRIPTION,
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
    """Run the subcommand for parsed ``args``; returns the exit status."""
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    adapter, source = _backend(args.backend) if args.backend else load_impl(args.impl)
    if args.json not in (None, "-"):  # an unwritable report path fails before any case runs
        try:
            with open(args.json, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot write {args.json}: {exc}") from None
    try:
        cases = vectors.read(args.vectors)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read vectors {args.vectors}: {exc}") from None
    patterns: list[str] = args.cases
    own = [p for p in patterns if p.startswith("property/")]  # these select properties
    golden = [p for p in patterns if p not in own]
    if own and not golden:
        chosen = []
    else:
        chosen = [
            c for c in cases if not golden or any(fnmatch.fnmatchcase(c.id, p) for p in golden)
        ]
        if not chosen:
            raise UsageError(f"no case id matches {' '.join(golden)} (in {args.vectors})")
    results = run(adapter, chosen)
    if args.properties:
        results += _properties(adapter, own)
    info = report.vectors_info(args.vectors, len(cases), len(chosen), patterns)
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


def _properties(adapter: Adapter, select: Sequence[str]) -> list[Any]:
    """The properties (all, or those matching ``property/...`` patterns) as result rows."""
    try:
        from . import properties
    except ImportError as exc:
        raise UsageError(f"--properties needs hypothesis: {exc}") from None
    results = properties.run(adapter, select=select)
    if select and not results:
        raise UsageError(f"no property matches {' '.join(select)}")
    return results


def _print_human(doc: dict[str, Any], results: Sequence[Any], args: argparse.Namespace) -> None:
    if not args.plain and sys.stdout.isatty():
        try:
            report.print_rich(doc, results, show_all=args.all)
            return
        except ImportError:
            pass
    sys.stdout.write(report.render_text(doc, results, show_all=args.all))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mbn_conformance.cli``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
