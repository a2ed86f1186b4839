"""README.md stays true: its Python snippets run, its two commands are intact and its shell
examples work as written after them.

CI reads the two commands (the first fenced block after ``<!-- main-command -->`` and after
``<!-- test-command -->``, see ``.ci/``), so each marker must appear exactly once and its
command must not change unnoticed. The other shell examples must call the tools in ``.venv``
(a reader who ran the commands has no activated environment: ``mbn-ref: command not found``);
they are run here with ``.venv/bin/`` standing for the environment that runs the tests.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = {
    "main-command": (
        'python3 -m venv .venv && .venv/bin/pip install -q -e ".[reproduce]" && '
        ".venv/bin/mbn-ref reproduce"
    ),
    "test-command": (
        'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && '
        ".venv/bin/python -m pytest"
    ),
}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    """The bodies of the fenced blocks of ``lang`` in README.md, in order."""
    return [body for tag, body in _FENCE.findall(_text()) if tag == lang]


def _example_lines() -> list[str]:
    """The lines of the ``bash`` blocks other than the two commands."""
    commands = set(COMMANDS.values())
    return [
        line
        for body in _blocks("bash")
        for line in body.splitlines()
        if line.strip() and line.strip() not in commands
    ]


@pytest.mark.parametrize("marker", list(COMMANDS))
def test_command_block_is_there_once_and_unchanged(marker: str) -> None:
    """Each marker appears once, directly followed by a one-line ``bash`` block holding the
    command, and that command appears nowhere else."""
    text = _text()
    tag = f"<!-- {marker} -->"
    assert text.count(tag) == 1, f"{tag} must appear exactly once"
    after = text.split(tag, 1)[1]
    match = _FENCE.search(after)
    assert match is not None and after[: match.start()].strip() == "", f"no block after {tag}"
    assert match.group(1) == "bash"
    assert match.group(2).splitlines() == [COMMANDS[marker]]
    assert text.count(COMMANDS[marker]) == 1


def test_python_snippets_exist() -> None:
    assert _blocks("python"), "README.md has no ```python block"


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_snippet_runs(index: int, tmp_path: Path) -> None:
    """Each ``python`` block runs as a script (in a fresh interpreter, from an empty folder)."""
    script = tmp_path / "snippet.py"
    script.write_text(_blocks("python")[index], encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_examples_use_the_environment_of_the_commands() -> None:
    """No example calls a tool of the environment by its bare name."""
    lines = _example_lines()
    assert lines, "README.md has no shell examples besides the two commands"
    for line in lines:
        first = shlex.split(line)[0]
        assert first.startswith(".venv/bin/"), f"{line!r}: call it as .venv/bin/{first}"


def test_shell_examples_run(tmp_path: Path) -> None:
    """The shell examples run from the repository's root and succeed (``report.json`` goes to
    a temporary folder instead of the working tree)."""
    bindir = str(Path(sys.executable).parent)
    for line in _example_lines():
        argv = shlex.split(line)
        argv[0] = bindir + "/" + argv[0].removeprefix(".venv/bin/")
        if argv[0].endswith("/python"):
            argv[0] = sys.executable
        argv = [str(tmp_path / a) if a == "report.json" else a for a in argv]
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
