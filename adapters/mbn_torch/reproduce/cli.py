"""``mbn-ref reproduce``: BN collapses at batch size 2, MBN does not (the paper's Fig. 4).

    mbn-ref reproduce                      # the default: MLP, none/BN/MBN/GN, m = 2..32
    mbn-ref reproduce --quick              # CI: BN and MBN on the MLP, m = 2 and 32
    mbn-ref reproduce --full               # both models, every normalization, 3 seeds
    mbn-ref reproduce --norms bn,mbn --batch-sizes 2,4 --seeds 0,1,2 --epochs 20
    mbn-ref reproduce --quick --nproc 2     # the paper's multi-device setting (gloo)

Trains on scikit-learn's digits (no download) and writes, under ``--out`` (default
``mbn-reproduce``): ``reproduce.png`` (accuracy against batch size, ``lam(t)`` and ``tau``,
batch statistics against the noise model) and ``reproduce.json`` (every number, the
configuration and the versions). The table goes to stdout, the progress bar to stderr.

:func:`register` is the entry point ``reproduce`` of the group ``mbn_ref.commands``
(``pyproject.toml``); :mod:`mbn_ref.cli` loads it only when ``mbn-ref reproduce`` is used.
Exit status: 0 on success, 2 on a usage error (a bad option value, an option not
implemented yet (``--data cifar10``, ``--framework keras``), an output that cannot be
written, a missing optional dependency).

>>> import argparse
>>> parser = argparse.ArgumentParser(prog="mbn-ref")
>>> _ = register(parser.add_subparsers())
>>> args = parser.parse_args(["reproduce", "--quick", "--seeds", "3"])
>>> config_from_args(args).seeds, config_from_args(args).preset
((3,), 'custom')
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .experiment import PRESETS, Config, steps_per_run

__all__ = ["config_from_args", "main", "register", "run_command"]

PROG = "mbn-ref reproduce"

EPILOG = """\
examples:
  mbn-ref reproduce                                   README's command (about 2 minutes)
  mbn-ref reproduce --quick --out /tmp/r              the CI check (under a minute)
  mbn-ref reproduce --full                            everything (about 10 minutes)
  mbn-ref reproduce --norms bn,mbn --batch-sizes 2 --seeds 0,1,2,3 --no-plot --json r.json
  mbn-ref reproduce --quick --nproc 2                 2 processes (gloo), m per process

normalizations: none, bn (BatchNorm), mbn (Momentum BN), gn (GroupNorm), ln (LayerNorm),
in (InstanceNorm, CNN only). BN and MBN share the inference decay tau of Eq. 12.
exit status: 0 success, 2 usage error (also: not implemented yet, unwritable output).
"""


class UsageError(Exception):
    """A command-line problem the user can fix; one line on stderr, exit status 2."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated value in {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated name in {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options, on ``parser``."""
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick", action="store_true", help="the CI preset: BN and MBN, m = 2 and 32, 1 seed"
    )
    preset.add_argument(
        "--full",
        action="store_true",
        help="both models, every normalization, m = 2, 4, 8, 16, 32, three seeds",
    )
    grid = parser.add_argument_group("the grid (each overrides the preset)")
    grid.add_argument("--models", type=_name_list, metavar="LIST", help="mlp,cnn")
    grid.add_argument("--norms", type=_name_list, metavar="LIST", help="none,bn,mbn,gn,ln,in")
    grid.add_argument("--batch-sizes", type=_int_list, metavar="LIST", help="e.g. 2,8,32")
    grid.add_argument("--seeds", type=_int_list, metavar="LIST", help="e.g. 0,1")
    grid.add_argument("--epochs", type=_positive_int, metavar="T", help="epochs per run")
    grid.add_argument(
        "--lr", type=float, metavar="LR", help="SGD learning rate at m = 32 (scaled by m/32)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        default=Path("mbn-reproduce"),
        metavar="DIR",
        help="directory of reproduce.png and reproduce.json (default: %(default)s)",
    )
    out.add_argument(
        "--json", type=Path, metavar="PATH", help="the JSON report (default: DIR/reproduce.json)"
    )
    out.add_argument("--no-plot", action="store_true", help="write no figure")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    grid.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        metavar="K",
        help="the paper's multi-device setting: K gloo processes per run, batch sizes per "
        "process, per-device BN/MBN statistics merged for inference (default 1)",
    )
    later = parser.add_argument_group("not implemented yet (usage error when changed)")
    later.add_argument("--data", default="digits", help="digits (cifar10: not yet)")
    later.add_argument("--data-dir", type=Path, default=None, help="CIFAR-10 binary directory")
    later.add_argument("--framework", default="torch", help="torch (keras: not yet)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand to an ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "reproduce",
        help="reproduce the paper's claim: BN collapses at batch size 2, MBN does not",
        description=(
            "Train an MLP (and a small CNN) on scikit-learn's digits with no normalization, "
            "BN, MBN (Eq. 11/12 through mbn_torch.MomentumScheduler), GroupNorm, LayerNorm "
            "and InstanceNorm at small and large batch sizes; print the test accuracy "
            "table, write a figure after the paper's Fig. 4 and Fig. 1 and a JSON report."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run_command)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`~mbn_torch.reproduce.experiment.Config` the options select.

    Raises
    ------
    UsageError
        A bad value (unknown name, batch size below 2, ...).
    """
    base = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    changes = {
        name: getattr(args, name)
        for name in ("models", "norms", "batch_sizes", "seeds", "epochs", "lr")
        if getattr(args, name) is not None
    }
    if args.nproc != 1:
        changes["nproc"] = args.nproc
    if changes:
        changes["preset"] = "custom"
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _not_yet(args: argparse.Namespace) -> None:
    if args.data != "digits" or args.data_dir is not None:
        raise UsageError(
            "--data cifar10 / --data-dir (CIFAR-10, ResNet-18) are not implemented yet"
        )
    if args.framework != "torch":
        raise UsageError("--framework keras is not implemented yet (only torch)")


def _check_dependencies() -> None:
    missing = []
    for module in ("sklearn", "tqdm", "scipy"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(
            f"missing {', '.join(missing)}: install the extra, pip install 'mbn-ref[reproduce]'"
        )


def _outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Create the output directory and check the outputs can be written, before any run."""
    json_path: Path = args.json if args.json is not None else args.out / "reproduce.json"
    png = None if args.no_plot else args.out / "reproduce.png"
    try:
        for path in (json_path, png):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8"):
                    pass
    except OSError as exc:
        raise UsageError(f"cannot write the outputs under {args.out}: {exc}") from None
    return json_path, png


def _progress(total: int, disable: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar = tqdm(total=total, unit="step", file=sys.stderr, disable=disable, desc=PROG)

    def step() -> None:
        bar.update(1)

    return step, bar.close


def run_command(args: argparse.Namespace) -> int:
    """Run the subcommand for parsed ``args``; returns the exit status."""
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    _not_yet(args)
    config = config_from_args(args)
    _check_dependencies()
    json_path, png = _outputs(args)

    import torch

    from .data import load_digits_split
    from .experiment import run_experiment
    from .output import SAME_TAU_NOTE, format_table, make_report, plot, write_json

    torch.set_num_threads(1)  # tiny models: one thread is the fastest, and reproducible
    data = load_digits_split()
    runs = config.runs()
    procs = f"{config.nproc} processes per run (m per process), " if config.nproc > 1 else ""
    print(
        f"# {PROG}: {len(runs)} runs ({config.preset} preset), {config.epochs} epochs each, "
        f"{procs}digits: {len(data.y_train)} train / {len(data.y_test)} test images",
        flush=True,
    )
    print(f"# {SAME_TAU_NOTE}", flush=True)
    start = time.perf_counter()
    step, close = _progress(sum(steps_per_run(config, len(data.y_train))), args.no_progress)
    try:
        results = run_experiment(config, data, on_step=step)
    finally:
        close()
    seconds = time.perf_counter() - start
    print(format_table(results))
    report = make_report(
        config,
        results,
        data={
            "name": "sklearn.datasets.load_digits",
            "train": len(data.y_train),
            "test": len(data.y_test),
            "split_seed": data.split_seed,
            "split": "stratified, standardized with the training set's statistics",
        },
        seconds=seconds,
        argv=sys.argv[1:],
    )
    write_json(report, json_path)
    written = [str(json_path)]
    if png is not None:
        plot(results, png)
        written.insert(0, str(png))
    print(f"# {seconds:.0f} s; wrote {', '.join(written)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mbn_torch.reproduce.cli``: the subcommand without the ``mbn-ref`` wrapper."""
    from mbn_ref.cli import main as mbn_main

    return mbn_main(["reproduce", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
