"""The command line the benchmark scripts share: timing options and writing the report.

``bench_core.py``, ``bench_torch.py`` and ``bench_keras.py`` take the same timing options
(``--quick``, ``--repeats``, ``--json``, ``--min-sample-ms``, ``--warmup``, ``--seed``) with
the same defaults, and end the same way (JSON written, the Markdown table printed, the load
average, a note when the machine was busy, schema warnings). ``mbn-ref bench`` runs them
with these options. Imported by its bare name, like ``bench_timing`` (the scripts' folder is
``sys.path[0]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbn_ref.cli import positive_int

__all__ = ["positive_int"]  # the scripts' integer options, as every mbn-ref command's


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser: its module docstring's first paragraph, raw formatting."""
    return argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_timing_arguments(p: argparse.ArgumentParser, default_json: Path, quick_help: str) -> None:
    """``--quick``, ``--repeats``, ``--json``, ``--min-sample-ms``, ``--warmup``, ``--seed``."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed rounds per case (default 11; 1 with --quick)",
    )
    p.add_argument("--json", type=Path, default=default_json, help=f"default {default_json}")
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=None,
        help="a sample's minimum length; loops are calibrated to it (default 50; 0 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="calls per contender before timing (default 3; 1 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc thresholds (default: the script re-executes itself with "
        "steady ones, bench_timing.MALLOC_TUNABLES)",
    )


@dataclass(frozen=True)
class Timing:
    """The timing settings the options select."""

    rounds: int
    warmup: int
    min_sample_s: float

    def settings(self, quick: bool, seed: int) -> dict[str, Any]:
        """The header's ``settings`` entries every script records."""
        return {
            "quick": quick,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "min_sample_ms": self.min_sample_s * 1e3,
            "seed": seed,
        }


def timing(args: argparse.Namespace) -> Timing:
    """Rounds, warm-up calls and minimum sample length, ``--quick`` changing the defaults."""
    quick = args.quick
    rounds = args.repeats if args.repeats is not None else (1 if quick else 11)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    min_ms = args.min_sample_ms if args.min_sample_ms is not None else (0.0 if quick else 50.0)
    return Timing(rounds, warmup, min_ms / 1e3)


def report_problems(
    report: dict[str, Any], schema: str, header_keys: tuple[str, ...]
) -> tuple[list[str], list[dict[str, Any]]]:
    """What every script's ``validate_report`` checks first: schema, header keys, cases.

    Returns the problems found and the report's cases (empty when there are none, which is
    itself a problem).
    """
    problems: list[str] = []
    if report.get("schema") != schema:
        problems.append(f"schema is {report.get('schema')!r}, expected {schema!r}")
    header = report.get("header", {})
    problems += [f"header lacks {key!r}" for key in header_keys if key not in header]
    cases = report.get("cases")
    if not isinstance(cases, list) or not cases:
        return [*problems, "no cases"], []
    return problems, cases


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def finish(
    report: dict[str, Any],
    path: Path,
    table: str,
    problems: list[str],
    busy_note: str,
    extra: str = "",
) -> int:
    """Print the table, where the JSON went, a busy-machine note and warnings; exit status."""
    header = report["header"]
    print(table)
    print(
        f"\nJSON: {path}  (load average {header['load_average_start']} -> "
        f"{header['load_average_end']}{extra})"
    )
    if header["busy_at_start"] or header["busy_at_end"]:
        print(f"note: the machine was busy (load average above half the CPUs){busy_note}")
    for msg in problems:
        print(f"warning: {msg}", file=sys.stderr)
    return 1 if problems else 0
