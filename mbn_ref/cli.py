"""The ``mbn-ref`` command line.

Subcommands (``reproduce`` comes from the plugin ``mbn_torch.reproduce.cli:register``):

- ``mbn-ref schedule``: the paper's Eq. 11 training decay ``lam`` per epoch and Eq. 12
  inference decay ``tau`` for a batch size, as a table (and optionally JSON).
- ``mbn-ref noise``: BN's and MBN's statistics noise and MBN's effective batch size for a
  batch size and training decays (:mod:`mbn_ref.noise`), as a table (and optionally JSON).
- subcommands from **plugins**: each entry point of the group ``mbn_ref.commands`` (like
  pytest's ``pytest11``) adds the subcommand named after it. Its object is a function
  ``register(subparsers)`` that adds a parser of that name to an ``add_subparsers()`` object
  and sets the default ``run``, a function ``run(args) -> int`` (the exit status). mbn-ref
  itself declares ``conformance = "mbn_conformance.cli:register"``, so ``mbn-ref
  conformance`` comes from the suite and the core never imports it. A plugin is loaded only
  when its subcommand is used (or ``mbn-ref --help`` lists it); one that fails to load is
  reported on one line (exit status 2) when its subcommand is used, and the other
  subcommands keep working.

Exit status: 0 on success, 2 on a usage or input error, an output path that cannot be written
included (one line on stderr, no traceback; the output is checked before anything is
printed). A subcommand may add its own: ``mbn-ref conformance`` exits 1 when the
implementation does not conform. A reader that stops early (``mbn-ref schedule ... | head``)
ends the command quietly with status 1.

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
import contextlib
import importlib.metadata
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, NoReturn

from mbn_ref import __version__, noise
from mbn_ref.conventions import update_rate_from_decay
from mbn_ref.schedules.paper import PAPER_DEFAULTS_SEC_5_2, mbn_lambda_schedule, mbn_tau

__all__ = ["COMMAND_GROUP", "main"]

PROG = "mbn-ref"

COMMAND_GROUP = "mbn_ref.commands"
"""The entry-point group of subcommand plugins (see the module docstring)."""

_BUILTIN_COMMANDS = ("schedule",)


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


# ------------------------------------------------------------------------------ plugins


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of :data:`COMMAND_GROUP`."""
    return list(importlib.metadata.entry_points(group=COMMAND_GROUP))


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Plugin subcommands by name: the first entry point of a name wins, built-ins win."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in _entry_points():
        if ep.name not in _BUILTIN_COMMANDS and ep.name not in found:
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
            raise _UsageError(
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
    raise _UsageError(f"{PROG}: error: internal: a plugin placeholder ran")


# ------------------------------------------------------------------------------ parser


def _build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
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

    noise_cmd = sub.add_parser(
        "noise",
        help="BN's and MBN's statistics noise and MBN's effective batch size",
        description=(
            "For batch size m and each training decay lam: the variance of the mean noise "
            "xi_mu for BN (1/m) and MBN (the corrected Eq. 10, (1-lam)/((1+lam) m)), of the "
            "variance noise xi_sigma (Gaussian data), and the batch size at which BN is as "
            "noisy as MBN in each (mbn_ref.noise)."
        ),
        epilog="example: mbn-ref noise --batch-size 2 --lam 0 0.5 0.9 0.9375 --json -",
    )
    noise_cmd.add_argument("--batch-size", type=_positive_int, required=True, help="batch size m")
    noise_cmd.add_argument(
        "--lam",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 0.9, 0.99],
        help="training decays (weight on history) in [0, 1] (default: %(default)s)",
    )
    noise_cmd.add_argument(
        "--json", metavar="PATH", default=None, help="also write the rows as JSON ('-': stdout)"
    )
    noise_cmd.set_defaults(run=_run_noise)
    _add_plugins(sub, argv)
    return parser


# ------------------------------------------------------------------------------ schedule


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
            "variance_noise": float(noise.effective_batch_size_sigma(args.batch_size, lam_end)),
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
    if lam_end > 0:
        lines += [
            "",
            f"At t = T, lam = {lam_end:.6f}: batch size {summary['batch_size']} has the "
            "statistics noise of BN with batch size",
            f"{eff['mean_noise']:.1f} in the mean and {eff['variance_noise']:.1f} in the variance, "
            f"not m0 = {summary['ideal_batch_size']} as the paper's misprinted",
            "Eq. 10 suggests (docs/errata.md, erratum 3).",
        ]
    out.write("\n".join(lines) + "\n")


def _run_schedule(args: argparse.Namespace) -> int:
    try:
        lam = _lam_function(args)
        lam_end = lam(args.epochs)
        summary = _schedule_summary(args, lam_end)
    except (TypeError, ValueError) as exc:
        raise _UsageError(f"{PROG} schedule: error: {exc}") from None
    if args.json == "-":
        print(json.dumps(_report(summary, args.epochs, lam), indent=2))
        return 0
    with contextlib.ExitStack() as stack:
        target = None
        if args.json is not None:  # can it be written? Known before anything is printed
            try:
                target = stack.enter_context(open(args.json, "w", encoding="utf-8"))
            except OSError as exc:
                raise _UsageError(
                    f"{PROG} schedule: error: cannot write {args.json}: {exc.strerror or exc}"
                ) from None
        every = args.every if args.every is not None else max(1, args.epochs // 20)
        _write_table(sys.stdout, summary, lam, lam_end, every)
        if target is not None:
            json.dump(_report(summary, args.epochs, lam), target, indent=2)
            target.write("\n")
    return 0


# ------------------------------------------------------------------------------ noise


def _noise_rows(m: int, lams: Sequence[float]) -> list[dict[str, float | None]]:
    """One row per decay: the noise variances and effective batch sizes of docs/spec.md §6."""
    rows: list[dict[str, float | None]] = []
    for lam in lams:
        sigma_ok = m >= 2  # the variance noise needs two values
        rows.append(
            {
                "lam": float(lam),
                "bn_var_xi_mu": float(noise.bn_xi_mu_var(m)),
                "mbn_var_xi_mu": float(noise.mbn_xi_mu_var(m, lam)),
                "bn_var_xi_sigma": float(noise.bn_xi_sigma_var(m)) if sigma_ok else None,
                "mbn_var_xi_sigma": float(noise.mbn_xi_sigma_var(m, lam)) if sigma_ok else None,
                "effective_batch_size_mean": float(noise.effective_batch_size(m, lam)),
                "effective_batch_size_variance": (
                    float(noise.effective_batch_size_sigma(m, lam)) if sigma_ok else None
                ),
            }
        )
    return rows


def _finite_or_none(v: float | None) -> float | None:
    """``None`` (JSON null) for an infinite value (``lam = 1``), else the value."""
    return None if v is None or math.isinf(v) else v


def _number(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def _run_noise(args: argparse.Namespace) -> int:
    try:
        rows = _noise_rows(args.batch_size, args.lam)
    except (TypeError, ValueError) as exc:
        raise _UsageError(f"{PROG} noise: error: {exc}") from None
    report = {
        "batch_size": args.batch_size,
        "conventions": "lam is a decay (weight on history); variances are of the noise of "
        "standardized data (Gaussian for xi_sigma)",
        "rows": [{k: _finite_or_none(v) for k, v in row.items()} for row in rows],
    }
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    with contextlib.ExitStack() as stack:
        target = None
        if args.json is not None:
            try:
                target = stack.enter_context(open(args.json, "w", encoding="utf-8"))
            except OSError as exc:
                raise _UsageError(
                    f"{PROG} noise: error: cannot write {args.json}: {exc.strerror or exc}"
                ) from None
        header = ("lam", "Var xi_mu BN", "Var xi_mu MBN", "Var xi_sigma BN", "Var xi_sigma MBN",
                  "BN-equivalent m (mean)", "(variance)")  # fmt: skip
        print(f"# mbn-ref noise: batch size m = {args.batch_size}; MBN's stationary noise "
              "(corrected Eq. 10) against BN's")  # fmt: skip
        print("  ".join(f"{h:>{max(len(h), 10)}}" for h in header))
        for row in rows:
            cells = [_number(v) for v in row.values()]
            print("  ".join(f"{c:>{max(len(h), 10)}}" for c, h in zip(cells, header, strict=True)))
        if target is not None:
            json.dump(report, target, indent=2)
            target.write("\n")
    return 0


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = _build_parser(args_list)
        args = parser.parse_args(args_list)
        run = getattr(args, "run", None)
        if run is None:
            raise _UsageError(f"{PROG} {args.command}: error: the subcommand set no run function")
        status: int = run(args)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # `mbn-ref schedule ... | head`: stop quietly
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
