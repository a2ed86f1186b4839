"""``mbn-ref bench``: run the benchmark scripts, print one ratio table, write JSON/Markdown/PNG.

The scripts are the repository's ``benchmarks/bench_core.py``, ``bench_torch.py`` and
``bench_keras.py`` (not part of the installed package): they are found beside the installed
``mbn_ref`` of an editable install (``<clone>/mbn_ref`` -> ``<clone>/benchmarks``) or given
with ``--benchmarks-dir``. Each runs in its own process (``sys.executable``) with its own
options and writes its JSON report; this command merges them (:mod:`.bench_report`) into
``--out DIR``: ``bench.json`` (every report, the versions and the command), ``bench.md``
(the table in Markdown, for the docs) and ``bench.png`` (the ratios against their targets).
``--from-json`` renders existing reports without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import bench_report
from ._common import (
    PROG,
    UsageError,
    atomic_output,
    check_writable_file,
    dump_json,
    epilog,
    name_list,
    positive_int,
)

__all__ = ["SCHEMA", "default_benchmarks_dir", "register"]

NAME = "bench"
SCHEMA = "mbn-ref/bench/1"
DEFAULT_OUT = Path("mbn-bench")

# what each suite's script imports (module, the install hint)
REQUIRES: dict[str, tuple[tuple[str, str], ...]] = {
    "core": (("torch", "pip install 'mbn-ref[torch]'"),),
    "torch": (("torch", "pip install 'mbn-ref[torch]'"), ("mbn_torch", "reinstall mbn-ref")),
    "keras": (
        ("keras", "pip install 'mbn-ref[tensorflow]'"),
        ("tensorflow", "pip install 'mbn-ref[tensorflow]'"),
        ("mbn_tf", "reinstall mbn-ref"),
    ),
}
VERSIONS = (
    "mbn-ref",
    "numpy",
    "array-api-compat",
    "torch",
    "onnx",
    "keras",
    "tensorflow",
    "jax",
    "matplotlib",
)

EPILOG = epilog(
    [
        ("mbn-ref bench --quick --suite core", "seconds: tiny shapes, one round"),
        ("mbn-ref bench --quick --suite core,torch --out /tmp/bench-quick", ""),
        ("mbn-ref bench --out docs/plots/bench", "the full run for the docs (quiet machine)"),
        (
            "mbn-ref bench --suite torch --torch-args '--cases resnet18_stage --modes eager_train'",
            "a suite script's own options",
        ),
        (
            "mbn-ref bench --from-json benchmarks/results/torch.json --out /tmp/b",
            "re-render reports without running",
        ),
        ("mbn-ref bench --quick --suite core --json -", "the merged report on stdout"),
    ],
    extra="Ratios are ours / the native batch norm (medians of paired per-round ratios, "
    "benchmarks/README.md); targets and PASS/FAIL come from the scripts. A missed target is "
    "reported, not an error.",
    one="a suite's script failed (or timed out); the other suites are still reported",
    two="usage error: a bad option value, the benchmark scripts not found, a suite named in "
    "--suite whose framework is missing, matplotlib missing for the plot, an output that "
    "cannot be written, a --from-json file that is not a benchmark report",
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``add_subparsers()`` object."""
    cmd: argparse.ArgumentParser = subparsers.add_parser(
        NAME,
        help="run the benchmarks against native BN: ratio table, JSON, Markdown, plot",
        description=(
            "Run the repository's benchmark scripts (benchmarks/bench_<suite>.py) in "
            "subprocesses, print one table of ratios to the native batch norms with the "
            "issue's targets, and write bench.json, bench.md and bench.png under --out."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument(
        "--suite",
        type=name_list(bench_report.SUITES),
        default=None,
        metavar="LIST",
        help=f"comma-separated suites out of {','.join(bench_report.SUITES)} (default: every "
        "suite whose framework is installed; the others are skipped, saying so)",
    )
    cmd.add_argument("--quick", action="store_true", help="tiny shapes, one round (seconds)")
    cmd.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        metavar="N",
        help="timed rounds per case (the scripts' default: 11; 1 with --quick)",
    )
    cmd.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch/TensorFlow intra-op threads (the scripts' default: 2 for torch "
        "and keras, torch's own choice for core)",
    )
    cmd.add_argument("--seed", type=int, default=None, help="the scripts' seed (default 0)")
    for suite in bench_report.SUITES:
        cmd.add_argument(
            f"--{suite}-args",
            default="",
            metavar="ARGS",
            help=f"more options for bench_{suite}.py, one quoted string (see python "
            f"benchmarks/bench_{suite}.py --help)",
        )
    cmd.add_argument(
        "--timeout",
        type=positive_int,
        default=3600,
        metavar="SECONDS",
        help="a suite still running after this fails (default %(default)s)",
    )
    cmd.add_argument(
        "--benchmarks-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the folder of the bench_*.py scripts (default: benchmarks/ of the checkout the "
        "installed mbn_ref comes from)",
    )
    cmd.add_argument(
        "--from-json",
        nargs="+",
        type=Path,
        default=None,
        metavar="FILE",
        help="render these reports (a script's JSON or a bench.json) instead of running",
    )
    out = cmd.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="directory of bench.json, bench.md, bench.png (default %(default)s)",
    )
    out.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="the merged JSON report (default DIR/bench.json; '-': on stdout instead of the table)",
    )
    out.add_argument("--no-plot", action="store_true", help="write no bench.png")
    cmd.set_defaults(run=run)
    return cmd


def _error(message: str) -> UsageError:
    return UsageError(f"{PROG} {NAME}: error: {message}")


def _note(message: str) -> None:
    print(f"{PROG} {NAME}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ finding


def default_benchmarks_dir() -> Path:
    """``benchmarks/`` beside the installed ``mbn_ref`` package (a checkout's layout)."""
    import mbn_ref

    return Path(mbn_ref.__file__).resolve().parent.parent / "benchmarks"


def _scripts(args: argparse.Namespace, suites: Sequence[str]) -> dict[str, Path]:
    given = args.benchmarks_dir is not None
    folder: Path = args.benchmarks_dir if given else default_benchmarks_dir()
    scripts = {s: folder / f"bench_{s}.py" for s in suites}
    missing = [p.name for p in scripts.values() if not p.is_file()]
    if missing:
        where = (
            f"--benchmarks-dir {folder}"
            if given
            else f"{folder} (beside the installed mbn_ref; the scripts live in the repository's "
            "benchmarks/ folder: use an editable install of a clone, or pass --benchmarks-dir)"
        )
        raise _error(f"cannot find {', '.join(missing)} in {where}")
    return scripts


def _missing_framework(suite: str) -> str | None:
    """Why ``suite`` cannot run here (a module its script imports is missing), or ``None``."""
    for module, hint in REQUIRES[suite]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{module} is not installed ({hint})"
    return None


def _selected(args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    """The suites to run, and entries for the suites skipped (default selection only)."""
    if args.suite is not None:
        for suite in args.suite:
            why = _missing_framework(suite)
            if why:
                raise _error(f"--suite {suite}: {why}")
        return list(args.suite), []
    run, skipped = [], []
    for suite in bench_report.SUITES:
        why = _missing_framework(suite)
        if why:
            _note(f"skipping suite {suite}: {why}")
            skipped.append({"suite": suite, "status": "skipped", "reason": why, "report": None})
        else:
            run.append(suite)
    if not run:
        raise _error("no suite can run here: " + "; ".join(str(e["reason"]) for e in skipped))
    return run, skipped


# ------------------------------------------------------------------------------ running


def _script_argv(args: argparse.Namespace, suite: str) -> list[str]:
    argv = ["--quick"] if args.quick else []
    if args.repeats is not None:
        argv += ["--repeats", str(args.repeats)]
    if args.threads is not None:
        argv += ["--torch-threads" if suite == "core" else "--threads", str(args.threads)]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    try:
        argv += shlex.split(getattr(args, f"{suite}_args"))
    except ValueError as exc:
        raise _error(f"--{suite}-args: {exc}") from None
    if any(a == "--json" or a.startswith("--json=") for a in argv):
        raise _error(f"--{suite}-args: --json is set by mbn-ref bench (use --out/--json)")
    return argv


def _run_suite(
    suite: str, script: Path, argv: list[str], tmp: Path, timeout: int
) -> dict[str, Any]:
    """Run one script; its entry (status, report, ...) in ``bench.json``."""
    out = tmp / f"{suite}.json"
    cmd = [sys.executable, str(script), *argv, "--json", str(out)]
    _note(f"running suite {suite}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
    entry: dict[str, Any] = {"suite": suite, "script": str(script), "argv": [*argv]}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=None,  # the script's progress reaches the terminal
            text=True,
            timeout=timeout,
            check=False,
            cwd=script.parent.parent,
        )
        returncode: int | None = proc.returncode
        reason = None if proc.returncode == 0 else f"exit status {proc.returncode}"
        stdout = proc.stdout
    except subprocess.TimeoutExpired as exc:
        returncode, reason = None, f"timed out after {timeout} s"
        stdout = exc.stdout if isinstance(exc.stdout, str) else ""
    entry["seconds"] = round(time.perf_counter() - start, 3)
    entry["returncode"] = returncode
    report = None
    if out.is_file():
        try:
            report = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            reason = reason or f"its JSON is unreadable ({exc})"
    elif reason is None:
        reason = "it wrote no JSON report"
    if report is not None and reason is None and bench_report.suite_of(report) != suite:
        reason = f"its JSON has the schema {report.get('schema')!r}"
    entry.update(status="failed" if reason else "ran", reason=reason, report=report)
    if reason:
        tail = "\n".join((stdout or "").rstrip().splitlines()[-15:])
        if tail:
            print(tail, file=sys.stderr)
        _note(f"suite {suite} failed: {reason}")
    return entry


def _load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The entries of existing reports (``--from-json``)."""
    entries: list[dict[str, Any]] = []
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise _error(f"--from-json cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise _error(f"--from-json {path} is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise _error(f"--from-json {path} is not a benchmark report (not a JSON object)")
        if doc.get("schema") == SCHEMA:
            entries += [
                {**e, "from": str(path)} for e in doc.get("suites", []) if isinstance(e, dict)
            ]
            continue
        suite = bench_report.suite_of(doc)
        if suite is None:
            raise _error(
                f"--from-json {path} is not a benchmark report (schema {doc.get('schema')!r}; "
                f"expected {SCHEMA!r} or one of {', '.join(map(repr, bench_report.SCHEMAS))})"
            )
        entries.append(
            {"suite": suite, "status": "loaded", "reason": None, "report": doc, "from": str(path)}
        )
    return entries


# ------------------------------------------------------------------------------ output


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _table_rows(entries: Sequence[dict[str, Any]]) -> list[bench_report.Row]:
    rows: list[bench_report.Row] = []
    for e in entries:
        if e.get("report") is None:
            continue
        try:
            rows += bench_report.rows(str(e["suite"]), e["report"])
        except ValueError as exc:
            where = e.get("from") or f"suite {e['suite']}"
            raise _error(f"{where}: the report is malformed: {exc}") from None
    return rows


def _markdown_doc(doc: dict[str, Any], rows: Sequence[bench_report.Row]) -> str:
    s = doc["summary"]
    v = doc["versions"]
    shown = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [
        "<!-- generated by mbn-ref bench; do not edit -->",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in doc['command'])}` "
        f"({doc['created_utc']}, {doc['platform']}; {shown}).",
        "",
        "Ratio = ours / the native batch norm in the same process (time: median of the "
        "per-round paired ratios; memory: peak bytes of one step); lower is better. Targets "
        "from the issue.",
        f"{s['with_target']} targets: {s['pass']} PASS, {s['fail']} FAIL.",
        "",
        bench_report.markdown(rows),
    ]
    notes = [
        f"- suite {e['suite']}: {e['status']} ({e['reason']})"
        for e in doc["suites"]
        if e.get("reason")
    ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _check_outputs(args: argparse.Namespace) -> tuple[Path | None, Path, Path | None]:
    """Create ``--out`` and check every output can be written, before anything runs."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise _error(f"cannot write under --out {out}: it is not a directory")
    if not args.no_plot:
        try:
            import matplotlib.figure  # noqa: F401
        except ImportError as exc:
            raise _error(
                f"the plot needs matplotlib ({exc}): pip install matplotlib (or --no-plot)"
            ) from None
    if not out.is_dir() and not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise _error(f"cannot create --out {out}: no such directory {out.parent}")
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise _error(f"cannot create --out {out}: {exc.strerror or exc}") from None
    json_path = None if args.json == "-" else Path(args.json or out / "bench.json")
    md, png = out / "bench.md", None if args.no_plot else out / "bench.png"
    for path in (json_path, md, png):
        if path is not None:
            check_writable_file(NAME, path)
    return json_path, md, png


def run(args: argparse.Namespace) -> int:
    """Run ``mbn-ref bench`` for parsed ``args``; returns the exit status."""
    if args.from_json is not None:
        if args.suite is not None or args.quick:
            raise _error("--from-json renders existing reports: it takes no --suite or --quick")
        entries = _load(args.from_json)
        json_path, md, png = _check_outputs(args)
    else:
        suites, skipped = _selected(args)
        scripts = _scripts(args, suites)
        argvs = {s: _script_argv(args, s) for s in suites}
        json_path, md, png = _check_outputs(args)
        entries = []
        with tempfile.TemporaryDirectory(prefix="mbn-bench-") as tmp:
            for suite in suites:
                entries.append(
                    _run_suite(suite, scripts[suite], argvs[suite], Path(tmp), args.timeout)
                )
        entries += skipped
    rows = _table_rows(entries)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "command": [PROG, *getattr(args, "cli_argv", [NAME])],
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "versions": _versions(),
        "summary": bench_report.summary(rows),
        "rows": [r.as_json() for r in rows],
        "suites": entries,
    }
    text = bench_report.markdown(rows)
    with atomic_output(md) as f:
        f.write(_markdown_doc(doc, rows))
    if png is not None:
        with atomic_output(png, "wb") as f:
            bench_report.plot(rows, f)
    if json_path is None:
        print(json.dumps(doc, indent=2))
    else:
        with atomic_output(json_path) as f:
            dump_json(doc, f)
        s = doc["summary"]
        print(text)
        print(
            f"\n# {s['with_target']} targets: {s['pass']} PASS, {s['fail']} FAIL; "
            + "; ".join(f"{e['suite']} {e['status']}" for e in entries)
        )
        written = [str(p) for p in (json_path, md, png) if p is not None]
        print(f"# wrote {', '.join(written)}")
    return 1 if any(e["status"] == "failed" for e in entries) else 0
