"""The conventions every ``mbn-ref`` subcommand shares, in one place.

- **Errors** are one line on stderr, ``mbn-ref COMMAND: error: what was wrong``, never a
  traceback: a subcommand raises :class:`UsageError` (exit status 2) and
  :func:`mbn_ref.cli.main` prints it.
- **Exit status** (:data:`EXIT_STATUS`): 0 success; 1 a finding or failure the command
  reports (a check that fails, a benchmark suite that fails) or a reader that stopped early;
  2 a usage error (bad option value, missing optional dependency, unwritable output, not
  implemented, a plugin that fails to load).
- **Options**: ``--json PATH`` wherever the output is data (``-``: the JSON on stdout
  instead of the table); ``--out DIR`` for several files; ``--quick`` for the CI-sized run;
  ``--seed N`` for one seed, ``--seeds LIST`` for several; lists are comma-separated
  (``--suite core,torch``).
- **Help**: ``RawDescriptionHelpFormatter`` and an epilog from :func:`epilog` with
  ``examples:`` and ``exit status:``.

>>> text = epilog([("mbn-ref noise --batch-size 2", "the table")])
>>> text.splitlines()[:3]
['examples:', '  mbn-ref noise --batch-size 2', '      the table']
>>> text.splitlines()[6]
'  1  a reader that stopped early (`mbn-ref ... | head`)'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, NoReturn

__all__ = [
    "EXIT_STATUS",
    "PROG",
    "Parser",
    "UsageError",
    "atomic_output",
    "check_writable_file",
    "dump_json",
    "epilog",
    "float_list",
    "name_list",
    "positive_int",
]

PROG = "mbn-ref"

EXIT_STATUS = {
    0: "success",
    1: "a finding or failure the command reports (see each command's --help), or a reader "
    "that stopped early (`mbn-ref ... | head`)",
    2: "usage error: a bad option value, a missing optional dependency, an output that "
    "cannot be written, an option not implemented, a plugin that fails to load",
}
"""The exit statuses of every subcommand (each command's epilog says what 1 and 2 mean there)."""

_USAGE = (
    "usage error: a bad option value, a missing optional dependency, an output that cannot "
    "be written"
)


class UsageError(Exception):
    """A bad command line or input: reported on one line, exit status 2.

    The message is the whole line (``mbn-ref COMMAND: error: ...``) when it starts with
    ``mbn-ref``; otherwise :func:`mbn_ref.cli.main` prefixes it with the subcommand's name.
    """


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (:class:`UsageError`), never an exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


def _wrap(text: str, indent: str, width: int = 88) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent="", subsequent_indent=indent) or [""]


def epilog(
    examples: Sequence[tuple[str, str] | str],
    *,
    one: str = "",
    two: str = _USAGE,
    extra: str = "",
) -> str:
    """The ``examples:`` and ``exit status:`` epilog of a subcommand's ``--help``.

    Parameters
    ----------
    examples : sequence of str or (str, str)
        Command lines, each optionally with a short explanation.
    one : str, optional
        What exit status 1 means for this command (default: nothing but a reader that
        stopped early).
    two : str, optional
        What exit status 2 means (default: the usage errors every command shares).
    extra : str, optional
        A paragraph placed between the examples and the exit statuses.

    Returns
    -------
    str
        Text for ``ArgumentParser(epilog=..., formatter_class=RawDescriptionHelpFormatter)``.
    """
    lines = ["examples:"]
    for item in examples:
        command, note = (item, "") if isinstance(item, str) else item
        lines.append(f"  {command}")
        if note:
            lines += ["      " + ln for ln in _wrap(note, "")]
    if extra:
        lines += ["", extra.rstrip()]
    early = "a reader that stopped early (`mbn-ref ... | head`)"
    one_text = f"{one}; also {early}" if one else early
    lines += ["", "exit status:", "  0  success"]
    for code, text in ((1, one_text), (2, two)):
        wrapped = _wrap(text, "   ", 86)
        lines.append(f"  {code}  {wrapped[0]}")
        lines += [f"  {ln}" for ln in wrapped[1:]]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """An argparse type: an integer ``>= 1``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def float_list(text: str) -> list[float]:
    """An argparse type: one or more comma-separated finite numbers (``0,0.5,0.9``)."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
        values.append(value)
    return values


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names out of ``choices``, each once."""

    def parse(text: str) -> list[str]:
        names = [n.strip().lower() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError("expected at least one name")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, bad))}; expected a comma-separated list of "
                f"{', '.join(choices)}"
            )
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"repeated name in {text!r}")
        return names

    return parse


def check_writable_file(command: str, path: Path, what: str = "") -> None:
    """A :class:`UsageError` unless ``path`` can be created or replaced (nothing is written).

    The parent must be an existing, writable directory and ``path`` must not be a directory.
    """
    label = f"{what} {path}" if what else str(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{PROG} {command}: error: cannot write {label}: it is a directory")
    if not parent.is_dir():
        raise UsageError(
            f"{PROG} {command}: error: cannot write {label}: no such directory {parent}"
        )
    if not os.access(parent, os.W_OK):
        raise UsageError(
            f"{PROG} {command}: error: cannot write {label}: the directory is not writable"
        )


@contextmanager
def atomic_output(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file that appears at ``path`` only when the block ends without an exception.

    Written under a temporary name in the same directory, then renamed over ``path``, so a
    failure leaves nothing half-written.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dump_json(doc: Any, target: IO[str]) -> None:
    """``doc`` as indented JSON and a final newline (every command's JSON looks the same)."""
    json.dump(doc, target, indent=2)
    target.write("\n")
