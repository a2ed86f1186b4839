"""The ``mbn-ref`` parser: built-in subcommands, plugin subcommands, and :func:`main`."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mbn_ref import __version__

from . import bench, noise, schedule
from ._common import EXIT_STATUS, PROG, Parser, UsageError

__all__ = ["COMMAND_GROUP", "main"]

COMMAND_GROUP = "mbn_ref.commands"
"""The entry-point group of subcommand plugins (see :mod:`mbn_ref.cli`)."""

_BUILTINS: dict[str, Callable[[Any], argparse.ArgumentParser]] = {
    "schedule": schedule.register,
    "noise": noise.register,
    "bench": bench.register,
}

_EPILOG = f"""\
examples:
  mbn-ref schedule --batch-size 2 --epochs 200             Eq. 11/12 for batch size 2
  mbn-ref schedule --batch-size 2 --epochs 50 --plot s.png static vs dynamic momentum
  mbn-ref noise --batch-size 2 --lam 0,0.5,0.9375 --json - BN vs MBN noise, as JSON
  mbn-ref conformance --backend numpy                      the conformance suite
  mbn-ref bench --quick --suite core                       benchmarks: ratio table
  mbn-ref reproduce --quick                                BN vs MBN at batch size 2
  mbn-ref COMMAND --help                                   a command's options

conventions: --json PATH writes the data as JSON ('-': on stdout instead of the table);
--out DIR holds a command's several files; --quick is the CI-sized run; lists are
comma-separated. Errors are one line on stderr: "{PROG} COMMAND: error: ...".

exit status (every command):
  0  {EXIT_STATUS[0]}
  1  a finding or failure the command reports (conformance: does not conform; bench: a
     suite failed), or a reader that stopped early (`mbn-ref ... | head`)
  2  usage error: a bad option value, a missing optional dependency, an output that
     cannot be written, an option not implemented, a plugin that fails to load
"""


# ------------------------------------------------------------------------------ plugins


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of :data:`COMMAND_GROUP`."""
    return list(importlib.metadata.entry_points(group=COMMAND_GROUP))


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Plugin subcommands by name: the first entry point of a name wins, built-ins win."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in _entry_points():
        if ep.name not in _BUILTINS and ep.name not in found:
            found[ep.name] = ep
    return found


def _selected_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (its first non-option token), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a == "-h" or (len(a) > 3 and "--help".startswith(a)) for a in argv)


def _add_stub(sub: Any, name: str, helptext: str, run: Callable[[argparse.Namespace], int]) -> None:
    """A subcommand that takes any arguments and runs ``run``."""
    stub = sub.add_parser(
        name,
        help=helptext,
        add_help=False,
        prefix_chars="\0",  # every argument is positional: the stub takes anything
    )
    stub.add_argument("rest", nargs="*")
    stub.set_defaults(run=run)


def _forget(sub: Any, name: str) -> None:
    """Undo a partial ``add_parser(name)`` of a plugin that then failed."""
    sub.choices.pop(name, None)
    actions = getattr(sub, "_choices_actions", None)
    if isinstance(actions, list):
        actions[:] = [a for a in actions if getattr(a, "dest", None) != name]


def _register_plugin(sub: Any, name: str, ep: importlib.metadata.EntryPoint) -> None:
    """Load the plugin ``ep`` and let it add its subcommand; a stub reporting why if it fails."""
    try:
        register = ep.load()
        register(sub)
        if name not in sub.choices:
            raise LookupError(f"register() added no subcommand named {name!r}")
    except Exception as exc:  # any failure of third-party code: reported when used
        _forget(sub, name)
        dist = getattr(getattr(ep, "dist", None), "name", None)
        where = f"entry point {name} = {ep.value!r} in group {COMMAND_GROUP!r}" + (
            f" of the distribution {dist}" if dist else ""
        )
        kind = "is not importable" if isinstance(exc, ImportError) else "failed to load"
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line

        def broken(args: argparse.Namespace) -> int:
            raise UsageError(
                f"{PROG} {name}: error: the plugin providing this subcommand {kind} "
                f"({where}; {reason}); reinstall or fix the distribution that provides it"
            )

        _add_stub(sub, name, f"(unavailable: the plugin {kind})", broken)


def _add_plugins(sub: Any, argv: Sequence[str]) -> None:
    """Add every plugin subcommand to ``sub``.

    A plugin is loaded when it is the one used (or for ``--help``); otherwise a placeholder
    keeps its name among the choices.
    """
    command = _selected_command(argv)
    load_all = command is None and _wants_help(argv)
    for name, ep in _plugins().items():
        if load_all or name == command:
            _register_plugin(sub, name, ep)
        else:
            _add_stub(sub, name, f"(from {ep.value})", _not_selected)


def _not_selected(args: argparse.Namespace) -> int:  # pragma: no cover - never selected
    raise UsageError(f"{PROG}: error: internal: a plugin placeholder ran")


# ------------------------------------------------------------------------------ parser


def _build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Reference implementation of BN with dynamic momentum and Momentum BN.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for register in _BUILTINS.values():
        register(sub)
    _add_plugins(sub, argv)
    return parser


def _one_line(exc: UsageError, command: str | None) -> str:
    text = " ".join(str(exc).split())
    if text.startswith(PROG):
        return text
    return f"{PROG} {command}: error: {text}" if command else f"{PROG}: error: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: str | None = None
    try:
        parser = _build_parser(args_list)
        args = parser.parse_args(args_list)
        command = args.command
        args.cli_argv = args_list  # the command line as given (reports record it)
        run = getattr(args, "run", None)
        if run is None:
            raise UsageError(f"{PROG} {args.command}: error: the subcommand set no run function")
        status: int = run(args)
    except UsageError as exc:
        print(_one_line(exc, command), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # `mbn-ref schedule ... | head`: stop quietly
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status
