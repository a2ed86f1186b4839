"""``mbn-ref schedule``: Eq. 11's ``lam`` per epoch, Eq. 12's ``tau``, and their effect.

The table (and ``--json``) holds the decays; ``--plot PATH`` also draws the running
statistics of one simulated channel under a static decay and under MBN's schedule
(:mod:`mbn_ref.cli.trajectories`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mbn_ref import noise
from mbn_ref.conventions import (
    ESTIMATORS,
    decay_from_torch,
    update_rate_from_decay,
    validate_decay,
)
from mbn_ref.schedules.paper import PAPER_DEFAULTS_SEC_5_2, mbn_lambda_schedule, mbn_tau

from ._common import PROG, UsageError, atomic_output, check_writable_file, dump_json, epilog
from ._common import positive_int as _positive_int

__all__ = ["register"]

NAME = "schedule"
PLOT_FORMATS = ("png", "svg", "pdf")
DEFAULT_STATIC_DECAY = decay_from_torch(0.1)  # PyTorch's default BatchNorm momentum

EPILOG = epilog(
    [
        ("mbn-ref schedule --batch-size 2 --epochs 200", "the paper's setting: lam(t), tau"),
        (
            "mbn-ref schedule --batch-size 4 --epochs 90 --every 10 --json lam.json",
            "every 10th epoch in the table, every epoch in lam.json",
        ),
        ("mbn-ref schedule --batch-size 2 --epochs 200 --json -", "the JSON on stdout"),
        (
            "mbn-ref schedule --batch-size 2 --epochs 50 --plot schedule.png --seed 1",
            "the running mean and variance of one simulated channel under a static decay and "
            "under MBN's lam(t)/tau",
        ),
    ],
    two="usage error: a bad option value, matplotlib missing for --plot, an output that "
    "cannot be written (nothing is written then)",
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``schedule`` subcommand to an ``add_subparsers()`` object."""
    sched: argparse.ArgumentParser = subparsers.add_parser(
        NAME,
        help="print the paper's lam (Eq. 11) per epoch and tau (Eq. 12); --plot their effect",
        description=(
            "Print MBN's training decay lam (Eq. 11) for each 1-indexed epoch t = 1..T and its "
            "inference decay tau (Eq. 12). Both are decays (weight on history); PyTorch's "
            "momentum is 1 - decay. With --plot, also draw what they do to the running "
            "statistics of one simulated channel whose mean drifts, against a static decay."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sched.add_argument("--batch-size", type=_positive_int, required=True, help="batch size m")
    sched.add_argument("--epochs", type=_positive_int, required=True, help="total epochs T")
    sched.add_argument(
        "--ideal-batch-size",
        type=_positive_int,
        default=PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
        help="ideal batch size m0 (default %(default)s, the paper's §5.2)",
    )
    sched.add_argument(
        "--tau0",
        type=float,
        default=PAPER_DEFAULTS_SEC_5_2.tau0,
        help="inference decay at m0, in (0, 1) (default %(default)s, the paper's §5.2)",
    )
    sched.add_argument(
        "--every",
        type=_positive_int,
        default=None,
        help="print every K-th epoch plus the first and last (default: about 20 rows)",
    )
    sched.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write every epoch's values (and with --plot the trajectories) as JSON to "
        "PATH ('-': JSON on stdout instead of the table)",
    )
    plot = sched.add_argument_group("trajectories (--plot)")
    plot.add_argument(
        "--plot",
        metavar="PATH",
        type=Path,
        default=None,
        help=f"draw the running statistics of one simulated channel ({', '.join(PLOT_FORMATS)};"
        " needs matplotlib)",
    )
    plot.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        default=20,
        metavar="K",
        help="training steps per epoch (default %(default)s)",
    )
    plot.add_argument(
        "--static-decay",
        type=float,
        default=DEFAULT_STATIC_DECAY,
        metavar="D",
        help="the static decay to compare with (default %(default)s: PyTorch's default "
        "momentum 0.1)",
    )
    plot.add_argument(
        "--drift",
        type=float,
        default=1.0,
        help="the population mean moves from 0 to this over the run, in population standard "
        "deviations (default %(default)s)",
    )
    plot.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="biased",
        help="batch variance entering the running/inference variance (default %(default)s, "
        "the paper's)",
    )
    plot.add_argument("--seed", type=int, default=0, help="data seed (default %(default)s)")
    sched.set_defaults(run=run)
    return sched


# ------------------------------------------------------------------------------ table


def _lam_function(args: argparse.Namespace) -> Callable[[int], float]:
    """Eq. 11 as a function of the 1-indexed epoch, validated once.

    Each call computes one epoch: the command computes only the epochs it prints, plus all
    of them for JSON.
    """
    schedule = mbn_lambda_schedule(
        total_epochs=args.epochs,
        batch_size=args.batch_size,
        ideal_batch_size=args.ideal_batch_size,
    )

    def lam(t: int) -> float:
        return schedule(t - 1)

    return lam


def _schedule_summary(args: argparse.Namespace, lam_end: float) -> dict[str, Any]:
    """Everything the report holds but the per-epoch lists."""
    tau = mbn_tau(
        batch_size=args.batch_size, ideal_batch_size=args.ideal_batch_size, tau0=args.tau0
    )
    return {
        "conventions": {
            "values": "decays (weight on history): s <- d*s + (1-d)*batch",
            "torch_momentum": "PyTorch momentum = update rate = 1 - decay",
            "epoch": "1-indexed as in the paper (t = 1..T)",
        },
        "batch_size": args.batch_size,
        "ideal_batch_size": args.ideal_batch_size,
        "total_epochs": args.epochs,
        "tau0": args.tau0,
        "tau": tau,
        "tau_torch_momentum": update_rate_from_decay(tau),
        # what the end point lam(T) really buys, with the corrected Eq. 10 (erratum 3)
        "end_point_effective_batch_size": {
            "mean_noise": float(noise.effective_batch_size(args.batch_size, lam_end)),
            "variance_noise": (  # a batch of one value has no variance noise
                float(noise.effective_batch_size_sigma(args.batch_size, lam_end))
                if args.batch_size >= 2
                else None
            ),
        },
    }


def _report(summary: dict[str, Any], total: int, lam: Callable[[int], float]) -> dict[str, Any]:
    """The JSON report: the summary with every epoch's values (computed only when asked)."""
    epochs = range(1, total + 1)
    values = [lam(t) for t in epochs]
    head = ("conventions", "batch_size", "ideal_batch_size", "total_epochs", "tau0")
    return {
        **{k: summary[k] for k in head},
        "epoch": list(epochs),
        "lam": values,
        "lam_torch_momentum": [update_rate_from_decay(v) for v in values],
        **{k: v for k, v in summary.items() if k not in head},
    }


def _table_epochs(total: int, every: int) -> Iterator[int]:
    """The epochs printed: 1, every K-th, and T, ascending, each once."""
    yield 1
    last = 1
    for t in range(every, total + 1, every):
        if t > last:
            yield t
            last = t
    if last != total:
        yield total


def _write_table(
    out: IO[str], summary: dict[str, Any], lam: Callable[[int], float], lam_end: float, every: int
) -> None:
    total = summary["total_epochs"]
    out.write(
        "\n".join(
            [
                "# mbn-ref schedule: Momentum BN (Yong et al., ECCV 2020), Eq. 11 and Eq. 12",
                f"# m = {summary['batch_size']} (batch size), m0 = {summary['ideal_batch_size']} "
                f"(ideal batch size), T = {total} epochs, tau0 = {summary['tau0']}",
                "# lam and tau are decays (weight on history): s <- d*s + (1-d)*batch.",
                "# PyTorch's BatchNorm momentum is the update rate 1 - d.",
                "# Epochs are 1-indexed as in the paper: t = 1..T (t = completed epochs + 1).",
                "",
                "epoch t  lam (Eq. 11)  torch momentum (1 - lam)",
                "",
            ]
        )
    )
    for t in _table_epochs(total, every):
        value = lam_end if t == total else lam(t)
        out.write(f"{t:7d}  {value:12.6f}  {update_rate_from_decay(value):24.6f}\n")
    lines = [
        "",
        f"tau (Eq. 12, inference) = {summary['tau']:.6f}   "
        f"torch momentum (1 - tau) = {summary['tau_torch_momentum']:.6f}",
    ]
    eff = summary["end_point_effective_batch_size"]
    variance = "-" if eff["variance_noise"] is None else f"{eff['variance_noise']:.1f}"
    if lam_end > 0:
        lines += [
            "",
            f"At t = T, lam = {lam_end:.6f}: batch size {summary['batch_size']} has the "
            "statistics noise of BN with batch size",
            f"{eff['mean_noise']:.1f} in the mean and {variance} in the variance, "
            f"not m0 = {summary['ideal_batch_size']} as the paper's misprinted",
            "Eq. 10 suggests (docs/errata.md, erratum 3).",
        ]
    out.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ run


def _error(message: str) -> UsageError:
    return UsageError(f"{PROG} {NAME}: error: {message}")


def _check_plot(args: argparse.Namespace) -> str:
    """The plot's format, after checking matplotlib and the path (nothing is written)."""
    path: Path = args.plot
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise _error(
            f"--plot {path}: expected a file name ending in "
            f"{', '.join('.' + f for f in PLOT_FORMATS)}"
        )
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise _error(
            f"--plot needs matplotlib ({exc}): pip install matplotlib, or the docs extra "
            "pip install 'mbn-ref[docs]'"
        ) from None
    try:
        validate_decay(args.static_decay, "--static-decay")
    except ValueError as exc:
        raise _error(str(exc)) from None
    if not math.isfinite(args.drift):
        raise _error(f"--drift must be a finite number, got {args.drift}")
    if args.batch_size < 2:
        raise _error(
            f"--plot needs --batch-size >= 2 (a batch of one value has no variance), "
            f"got {args.batch_size}"
        )
    check_writable_file(NAME, path, "--plot")
    return fmt


def run(args: argparse.Namespace) -> int:
    """Run ``mbn-ref schedule`` for parsed ``args``; returns the exit status."""
    from . import trajectories

    try:
        lam = _lam_function(args)
        lam_end = lam(args.epochs)
        summary = _schedule_summary(args, lam_end)
    except (TypeError, ValueError) as exc:
        raise _error(str(exc)) from None
    fmt = _check_plot(args) if args.plot is not None else None
    if args.json not in (None, "-"):  # can it be written? Known before anything is printed
        check_writable_file(NAME, Path(args.json), "--json")
    traj = None
    if fmt is not None:
        try:
            traj = trajectories.simulate(
                batch_size=args.batch_size,
                epochs=args.epochs,
                steps_per_epoch=args.steps_per_epoch,
                static_decay=args.static_decay,
                seed=args.seed,
                drift=args.drift,
                ideal_batch_size=args.ideal_batch_size,
                tau0=args.tau0,
                estimator=args.estimator,
            )
        except (TypeError, ValueError) as exc:
            raise _error(" ".join(str(exc).split())) from None
    report = None if args.json is None else _report(summary, args.epochs, lam)
    if report is not None and traj is not None:
        report["trajectories"] = traj.as_json()
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        every = args.every if args.every is not None else max(1, args.epochs // 20)
        _write_table(sys.stdout, summary, lam, lam_end, every)
    if traj is not None and fmt is not None:
        with atomic_output(args.plot, "wb") as f:
            trajectories.plot(traj, f, fmt)
        print(f"{PROG} {NAME}: wrote {args.plot}", file=sys.stderr)
    if report is not None and args.json != "-":
        with atomic_output(Path(args.json)) as f:
            dump_json(report, f)
    return 0
