"""The ``mbn-ref`` command line.

Subcommands (the set grows; ``reproduce`` is planned):

- ``mbn-ref schedule``: the paper's Eq. 11 training decay ``lam`` per epoch and Eq. 12
  inference decay ``tau`` for a batch size, as a table (and optionally JSON).
- ``mbn-ref conformance``: the conformance suite against an implementation (implemented in
  :mod:`mbn_conformance.cli`, registered lazily: the core never imports the suite at module
  level, and without it the subcommand says so).

Exit status: 0 on success, 2 on a usage or input error (one line on stderr, no traceback),
1 when the output cannot be written.

>>> main(["schedule", "--batch-size", "2", "--epochs", "3"])
# mbn-ref schedule: Momentum BN (Yong et al., ECCV 2020), Eq. 11 and Eq. 12
# m = 2 (batch size), m0 = 32 (ideal batch size), T = 3 epochs, tau0 = 0.85
# lam and tau are decays (weight on history): s <- d*s + (1-d)*batch.
# PyTorch's BatchNorm momentum is the update rate 1 - d.
# Epochs are 1-indexed as in the paper: t = 1..T (t = completed epochs + 1).
<BLANKLINE>
epoch t  lam (Eq. 11)  torch momentum (1 - lam)
      1      0.000000                  1.000000
      2      0.187500                  0.812500
      3      0.937500                  0.062500
<BLANKLINE>
tau (Eq. 12, inference) = 0.989894   torch momentum (1 - tau) = 0.010106
<BLANKLINE>
At t = T, lam = 0.937500: batch size 2 has the statistics noise of BN with batch size
62.0 in the mean and 123.0 in the variance, not m0 = 32 as the paper's misprinted
Eq. 10 suggests (docs/errata.md, erratum 3).
0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from mbn_ref import __version__, noise
from mbn_ref.schedules.paper import PAPER_DEFAULTS_SEC_5_2, mbn_lambda, mbn_tau

__all__ = ["main"]

PROG = "mbn-ref"


class _UsageError(Exception):
    """A bad command line: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and do not exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Reference implementation of BN with dynamic momentum and Momentum BN.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sched = sub.add_parser(
        "schedule",
        help="print the paper's lam (Eq. 11) per epoch and tau (Eq. 12)",
        description=(
            "Print MBN's training decay lam (Eq. 11) for each 1-indexed epoch t = 1..T and its "
            "inference decay tau (Eq. 12). Both are decays (weight on history); PyTorch's "
            "momentum is 1 - decay."
        ),
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
        help="also write every epoch's values as JSON to PATH ('-': JSON on stdout instead)",
    )
    sched.set_defaults(run=_run_schedule)
    _register_conformance(sub)
    return parser


def _register_conformance(sub: Any) -> None:
    """The ``conformance`` subcommand from :mod:`mbn_conformance.cli`, imported only now."""
    try:
        from mbn_conformance.cli import register
    except ImportError as exc:
        reason = str(exc)
        stub = sub.add_parser(
            "conformance",
            help="run the conformance suite (unavailable: mbn_conformance is not importable)",
            add_help=False,
            prefix_chars="\0",  # every argument is positional: the stub takes anything
        )
        stub.add_argument("rest", nargs="*")

        def unavailable(args: argparse.Namespace) -> int:
            raise _UsageError(
                f"{PROG} conformance: error: the conformance suite (mbn_conformance) is not "
                f"importable ({reason}); install the full mbn-ref distribution"
            )

        stub.set_defaults(run=unavailable)
        return
    register(sub)


def _schedule_report(args: argparse.Namespace) -> dict[str, Any]:
    epochs = list(range(1, args.epochs + 1))
    lam = [
        mbn_lambda(
            t,
            total_epochs=args.epochs,
            batch_size=args.batch_size,
            ideal_batch_size=args.ideal_batch_size,
        )
        for t in epochs
    ]
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
        "epoch": epochs,
        "lam": lam,
        "lam_torch_momentum": [1.0 - v for v in lam],
        "tau": tau,
        "tau_torch_momentum": 1.0 - tau,
        # what the end point lam(T) really buys, with the corrected Eq. 10 (erratum 3)
        "end_point_effective_batch_size": {
            "mean_noise": float(noise.effective_batch_size(args.batch_size, lam[-1])),
            "variance_noise": float(noise.effective_batch_size_sigma(args.batch_size, lam[-1])),
        },
    }


def _schedule_table(report: dict[str, Any], every: int) -> str:
    total = report["total_epochs"]
    rows = sorted({1, total, *range(every, total + 1, every)})
    lines = [
        "# mbn-ref schedule: Momentum BN (Yong et al., ECCV 2020), Eq. 11 and Eq. 12",
        f"# m = {report['batch_size']} (batch size), m0 = {report['ideal_batch_size']} "
        f"(ideal batch size), T = {total} epochs, tau0 = {report['tau0']}",
        "# lam and tau are decays (weight on history): s <- d*s + (1-d)*batch.",
        "# PyTorch's BatchNorm momentum is the update rate 1 - d.",
        "# Epochs are 1-indexed as in the paper: t = 1..T (t = completed epochs + 1).",
        "",
        "epoch t  lam (Eq. 11)  torch momentum (1 - lam)",
    ]
    for t in rows:
        lam = report["lam"][t - 1]
        lines.append(f"{t:7d}  {lam:12.6f}  {1.0 - lam:24.6f}")
    lines += [
        "",
        f"tau (Eq. 12, inference) = {report['tau']:.6f}   "
        f"torch momentum (1 - tau) = {report['tau_torch_momentum']:.6f}",
    ]
    eff = report["end_point_effective_batch_size"]
    if report["lam"][-1] > 0:
        lines += [
            "",
            f"At t = T, lam = {report['lam'][-1]:.6f}: batch size {report['batch_size']} has the "
            "statistics noise of BN with batch size",
            f"{eff['mean_noise']:.1f} in the mean and {eff['variance_noise']:.1f} in the variance, "
            f"not m0 = {report['ideal_batch_size']} as the paper's misprinted",
            "Eq. 10 suggests (docs/errata.md, erratum 3).",
        ]
    return "\n".join(lines)


def _run_schedule(args: argparse.Namespace) -> int:
    try:
        report = _schedule_report(args)
    except ValueError as exc:
        raise _UsageError(f"{PROG} schedule: error: {exc}") from None
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    every = args.every if args.every is not None else max(1, args.epochs // 20)
    print(_schedule_table(report, every))
    if args.json is not None:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
        except OSError as exc:
            print(f"{PROG} schedule: error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        status: int = args.run(args)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    return status


if __name__ == "__main__":
    raise SystemExit(main())
