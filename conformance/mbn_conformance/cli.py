"""``mbn-ref conformance``: run the golden cases against an implementation and report.

    mbn-ref conformance --backend numpy
    mbn-ref conformance --impl my_package.adapter:make --cases 'mbn/*' --json report.json

Exactly one of ``--backend`` (a built-in adapter over :mod:`mbn_ref`) and ``--impl
module:factory`` (a callable returning an :class:`~mbn_conformance.protocol.Adapter`; the
current directory is importable, like ``python -m``). Exit status: 0 when the
implementation conforms (:func:`~mbn_conformance.runner.succeeded`), 1 when a case fails,
errors or passes unexpectedly, 2 on a usage error (bad ``--impl``, an import that fails, an
unreadable vector file, a pattern that selects nothing, an unwritable ``--json`` path).

:mod:`mbn_ref.cli` registers the subcommand lazily through :func:`register`;
``python -m mbn_conformance.cli`` runs it without the ``mbn-ref`` wrapper.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report, vectors
from .builtin import BACKENDS
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
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise UsageError(f"--impl must be MODULE:FACTORY (e.g. my_pkg.adapter:make), got {spec!r}")
    if os.getcwd() not in sys.path:  # like ``python -m``: the current directory is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    adapter = obj
    if not isinstance(obj, Adapter):
        if not callable(obj):
            raise UsageError(f"{spec} is neither an adapter nor a callable returning one")
        try:
            adapter = obj()
        except Exception as exc:
            raise UsageError(f"{spec}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(adapter, Adapter):
        missing = [
            name
            for name in ("name", "capabilities", *_PROTOCOL_METHODS)
            if not hasattr(adapter, name)
        ]
        raise UsageError(
            f"{spec} returned {type(adapter).__name__}, not an Adapter (missing: {missing})"
        )
    return adapter, spec


_PROTOCOL_METHODS = (
    "from_numpy",
    "to_numpy",
    "init_state",
    "load_state",
    "state_to_numpy",
    "train_step",
    "eval_step",
    "backward",
)


def _backend(name: str) -> tuple[Adapter, str]:
    from . import builtin

    try:
        adapter: Adapter = builtin.make(name)
    except ImportError as exc:
        raise UsageError(f"backend {name!r} is not available: {exc}") from None
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"backend {name!r}: {exc}") from None
    return adapter, f"--backend {name}"


def run_command(args: argparse.Namespace) -> int:
    """Run the subcommand for parsed ``args``; returns the exit status."""
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    adapter, source = _backend(args.backend) if args.backend else load_impl(args.impl)
    try:
        cases = vectors.read(args.vectors)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read vectors {args.vectors}: {exc}") from None
    patterns: list[str] = args.cases
    chosen = [
        c for c in cases if not patterns or any(fnmatch.fnmatchcase(c.id, p) for p in patterns)
    ]
    if not chosen:
        raise UsageError(f"no case id matches {' '.join(patterns)} (in {args.vectors})")
    results = run(adapter, chosen)
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
