"""``mbn-ref reproduce``: BN collapses at batch size 2, MBN does not (the paper's Fig. 4).

    mbn-ref reproduce                      # the default: MLP, none/BN/MBN/GN, m = 2..32
    mbn-ref reproduce --quick              # CI: BN and MBN on the MLP, m = 2 and 32
    mbn-ref reproduce --full               # both models, every normalization, 3 seeds
    mbn-ref reproduce --norms bn,mbn --batch-sizes 2,4 --seeds 0,1,2 --epochs 20
    mbn-ref reproduce --quick --nproc 2     # the paper's multi-device setting (gloo)
    mbn-ref reproduce --data cifar10 --data-dir PATH --quick   # ResNet-18 on CIFAR-10
    mbn-ref reproduce --framework keras --quick                # the Keras adapter (mbn_tf)

Trains on scikit-learn's digits (no download) or, with ``--data cifar10 --data-dir PATH``,
on CIFAR-10's binary files (:mod:`~mbn_torch.reproduce.cifar`) with a ResNet-18, and writes,
under ``--out`` (default ``mbn-reproduce``): ``reproduce.png`` (accuracy against batch
size, ``lam(t)`` and ``tau``, batch statistics against the noise model) and
``reproduce.json`` (every number, the data set, the configuration and the versions). The
table goes to stdout, the progress bar to stderr. ``--framework keras`` runs the digits
with ``mbn_tf.reproduce.run_experiment`` (the Keras adapter) instead of PyTorch.

:func:`register` is the entry point ``reproduce`` of the group ``mbn_ref.commands``
(``pyproject.toml``); :mod:`mbn_ref.cli` loads it only when ``mbn-ref reproduce`` is used.
Exit status: 0 on success, 1 when a run fails (a process of ``--nproc`` that failed, one
line with its error), 2 on a usage error (a bad option value or combination, CIFAR-10 files
that are missing or malformed, an output that cannot be written, a missing optional
dependency: scikit-learn, TensorFlow for ``--framework keras``, CUDA for ``--device cuda``).

>>> import argparse
>>> parser = argparse.ArgumentParser(prog="mbn-ref")
>>> _ = register(parser.add_subparsers())
>>> args = parser.parse_args(["reproduce", "--quick", "--seeds", "3"])
>>> config_from_args(args).seeds, config_from_args(args).preset
((3,), 'custom')
>>> args = parser.parse_args(["reproduce", "--data", "cifar10", "--data-dir", "d", "--quick"])
>>> cfg = config_from_args(args)
>>> cfg.models, cfg.epochs, cfg.train_limit, cfg.lr_batch_size, cfg.weight_decay
(('resnet18',), 2, 5000, 64, 0.0001)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mbn_ref.cli import UsageError, positive_int

from .data import DATASETS
from .experiment import PRESETS_BY_DATA, Config, RunResult, steps_per_run

__all__ = ["config_from_args", "main", "register", "run_command"]

PROG = "mbn-ref reproduce"

FRAMEWORKS = ("torch", "keras")

EPILOG = """\
examples:
  mbn-ref reproduce                                   README's command (about 2 minutes)
  mbn-ref reproduce --quick --out /tmp/r              the CI check (under a minute)
  mbn-ref reproduce --full                            everything (about 10 minutes)
  mbn-ref reproduce --norms bn,mbn --batch-sizes 2 --seeds 0,1,2,3 --no-plot --json r.json
  mbn-ref reproduce --quick --nproc 2                 2 processes (gloo), m per process
  mbn-ref reproduce --data cifar10 --data-dir ~/data --quick       CIFAR-10, to try it
  mbn-ref reproduce --data cifar10 --data-dir ~/data --full --device cuda   the paper's
  mbn-ref reproduce --data cifar10 --data-dir ~/data --train-limit 2000 --epochs 3
  mbn-ref reproduce --framework keras --quick         the digits with Keras (mbn_tf)

normalizations: none, bn (BatchNorm), mbn (Momentum BN), gn (GroupNorm), ln (LayerNorm),
in (InstanceNorm, not on the MLP). BN and MBN share the inference decay tau of Eq. 12.

digits (default): scikit-learn's 8x8 digits, no download; models mlp, cnn; lr 0.1 * m / 32.
cifar10: CIFAR-10's binary version (cifar-10-binary.tar.gz, unpacked: PATH is its
  cifar-10-batches-bin directory or the parent), ResNet-18, SGD lr 0.1 * m / 64, momentum
  0.9, weight decay 1e-4, /10 at 60% and 90%, random crop and flip. Presets: --full is the
  paper's (none/BN/MBN/GN, m = 2..32, 200 epochs: days on a GPU); the default (BN/MBN/GN,
  m = 2, 8, 32, 10 epochs, 1 seed) takes hours on a GPU (estimated), too long on a CPU;
  --quick (BN/MBN, m = 2, 32, 2 epochs, first 5000 train / 1000 test images) is to try
  it: about 1.5 hours on 2 CPU cores. --train-limit/--test-limit N keep the first N images.
  The device is cuda when available (--device to choose); the digits run on cpu.
exit status: 0 success, 1 a run failed (a --nproc process: its error), 2 usage error
(bad option or data files, unwritable output, missing dependency).
"""


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options, on ``parser``."""
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        action="store_true",
        help="the short preset: BN and MBN, m = 2 and 32 (digits: the CI check; cifar10: "
        "2 epochs on 5000 training images)",
    )
    preset.add_argument(
        "--full",
        action="store_true",
        help="digits: both models, every normalization, m = 2, 4, 8, 16, 32, three seeds; "
        "cifar10: the paper's setting (200 epochs)",
    )
    grid = parser.add_argument_group("the grid (each overrides the preset)")
    grid.add_argument(
        "--models", type=_name_list, metavar="LIST", help="mlp,cnn (digits); resnet18 (cifar10)"
    )
    grid.add_argument("--norms", type=_name_list, metavar="LIST", help="none,bn,mbn,gn,ln,in")
    grid.add_argument("--batch-sizes", type=_int_list, metavar="LIST", help="e.g. 2,8,32")
    grid.add_argument("--seeds", type=_int_list, metavar="LIST", help="e.g. 0,1")
    grid.add_argument("--epochs", type=positive_int, metavar="T", help="epochs per run")
    grid.add_argument(
        "--lr",
        type=float,
        metavar="LR",
        help="SGD learning rate at m = 32 on digits, m = 64 on cifar10 (scaled by m)",
    )
    grid.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        metavar="K",
        help="the paper's multi-device setting: K processes per run (gloo on the CPU; NCCL, "
        "one GPU each, with --device cuda), batch sizes per process, per-device BN/MBN "
        "statistics merged for inference (default 1)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", choices=DATASETS, default="digits", help="the data set (default: digits)"
    )
    data.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="cifar10: the cifar-10-batches-bin directory of CIFAR-10's binary version (or "
        "its parent); required with cifar10",
    )
    data.add_argument(
        "--train-limit",
        type=positive_int,
        metavar="N",
        help="use the first N training samples only (overrides the preset)",
    )
    data.add_argument(
        "--test-limit",
        type=positive_int,
        metavar="N",
        help="use the first N test samples only (overrides the preset)",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--framework",
        choices=FRAMEWORKS,
        default="torch",
        help="torch (mbn_torch) or keras (mbn_tf; the digits, one process) (default: torch)",
    )
    engine.add_argument(
        "--device",
        metavar="DEVICE",
        help="torch device: cpu, cuda, cuda:1 (default: cuda if available for cifar10, else cpu)",
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
        "--json",
        type=Path,
        metavar="PATH",
        help="the JSON report (default: DIR/reproduce.json; '-': stdout, the table then goes "
        "to stderr)",
    )
    out.add_argument("--no-plot", action="store_true", help="write no figure")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand to an ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "reproduce",
        help="reproduce the paper's claim: BN collapses at batch size 2, MBN does not",
        description=(
            "Train an MLP (and a small CNN) on scikit-learn's digits, or a ResNet-18 on "
            "CIFAR-10 (--data cifar10 --data-dir PATH), with no normalization, BN, MBN "
            "(Eq. 11/12 through mbn_torch.MomentumScheduler), GroupNorm, LayerNorm and "
            "InstanceNorm at small and large batch sizes; print the test accuracy table, "
            "write a figure after the paper's Fig. 4 and Fig. 1 and a JSON report."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run_command)
    return parser


def _device(args: argparse.Namespace) -> str:
    """The torch device: ``--device``, else cuda for CIFAR-10 when there is one, else cpu."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device is None:
        use_cuda = args.data == "cifar10" and count >= args.nproc
        return "cuda" if use_cuda else "cpu"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: not a torch device: {args.device!r}") from None
    if device.type == "cuda":
        if (device.index or 0) >= count:
            raise UsageError(
                f"--device {args.device}: CUDA is not available here ({count} CUDA devices, "
                f"torch {torch.__version__}); use --device cpu"
            )
        if args.nproc > count:
            raise UsageError(
                f"--nproc {args.nproc} on {args.device} needs one CUDA device per process; "
                f"{count} here"
            )
    elif device.type != "cpu":
        raise UsageError(f"--device {args.device}: only cpu and cuda are supported")
    return args.device  # type: ignore[no-any-return]


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`~mbn_torch.reproduce.experiment.Config` the options select.

    The preset (``--quick``, ``--full``, or the default) is the data set's
    (:data:`~mbn_torch.reproduce.experiment.PRESETS_BY_DATA`); the grid and limit options
    override it (the preset is then ``custom``); the device is :func:`_device`'s.

    Raises
    ------
    UsageError
        A bad value (unknown name, batch size below 2, a device that is not there, ...).
    """
    base = PRESETS_BY_DATA[args.data]["quick" if args.quick else "full" if args.full else "default"]
    names = ("models", "norms", "batch_sizes", "seeds", "epochs", "lr", "train_limit")
    changes = {
        name: getattr(args, name)
        for name in (*names, "test_limit")
        if getattr(args, name) is not None
    }
    if args.nproc != 1:
        changes["nproc"] = args.nproc
    if changes:
        changes["preset"] = "custom"
    device = _device(args) if args.framework == "torch" else "cpu"
    try:
        return dataclasses.replace(base, **changes, device=device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_options(args: argparse.Namespace) -> None:
    """The combinations of options that make no sense, as usage errors."""
    if args.data == "cifar10" and args.data_dir is None:
        raise UsageError(
            "--data cifar10 needs --data-dir PATH: the cifar-10-batches-bin directory of "
            "CIFAR-10's binary version (cifar-10-binary.tar.gz, unpacked), or its parent"
        )
    if args.data == "digits" and args.data_dir is not None:
        raise UsageError(
            "--data-dir is for --data cifar10 (the digits ship with scikit-learn); "
            "add --data cifar10 or drop --data-dir"
        )
    if args.framework == "keras":
        if args.data != "digits":
            raise UsageError(
                "--framework keras runs the digits (MLP/CNN) only; CIFAR-10 needs --framework torch"
            )
        if args.nproc != 1:
            raise UsageError("--framework keras runs in one process; --nproc needs torch")
        if args.device is not None:
            raise UsageError("--device is for --framework torch (Keras picks its device)")


def _check_dependencies(args: argparse.Namespace) -> None:
    missing = []
    for module in ("sklearn", "tqdm", "scipy") if args.data == "digits" else ("tqdm", "scipy"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(
            f"missing {', '.join(missing)}: install the extra, pip install 'mbn-ref[reproduce]'"
        )


Experiment = Callable[..., list[RunResult]]


def _experiment(framework: str) -> Experiment:
    """The ``run_experiment`` of ``framework``: mbn_torch's, or mbn_tf's for keras."""
    if framework == "keras":
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before Keras is imported
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines
        try:
            import keras

            from mbn_tf.reproduce import run_experiment as keras_experiment
        except ImportError as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise UsageError(
                f"--framework keras needs TensorFlow/Keras and mbn_tf.reproduce, which cannot "
                f"be imported ({reason}); pip install 'mbn-ref[tensorflow]' or use "
                f"--framework torch"
            ) from None
        backend = keras.backend.backend()
        if backend != "tensorflow":  # Keras was imported on another backend already
            raise UsageError(
                f"--framework keras needs Keras' TensorFlow backend, but Keras runs on "
                f"{backend!r}: set KERAS_BACKEND=tensorflow"
            )
        return keras_experiment  # type: ignore[no-any-return]
    from .experiment import run_experiment

    return run_experiment


def _load_data(args: argparse.Namespace, config: Config) -> Any:
    from .data import load_dataset

    path = None if args.data_dir is None else str(args.data_dir)
    try:
        return load_dataset(
            args.data, path=path, train_limit=config.train_limit, test_limit=config.test_limit
        )
    except ValueError as exc:  # Cifar10Error included: missing or malformed files
        raise UsageError(str(exc)) from None


def _outputs(args: argparse.Namespace) -> tuple[Path, Path | None, list[Path]]:
    """Create the output directory and check the outputs can be written, before any run.

    Returns the JSON and figure paths and the files this check created (empty: removed if
    the runs fail).
    """
    json_path: Path = args.json if args.json is not None else args.out / "reproduce.json"
    png = None if args.no_plot else args.out / "reproduce.png"
    created = []
    try:
        for path in (None if _to_stdout(args) else json_path, png):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    created.append(path)
                with open(path, "a", encoding="utf-8"):
                    pass
    except OSError as exc:
        raise UsageError(f"cannot write the outputs under {args.out}: {exc}") from None
    return json_path, png, created


def _to_stdout(args: argparse.Namespace) -> bool:
    """``--json -``: the report on stdout, everything else on stderr."""
    return args.json is not None and str(args.json) == "-"


def _progress(total: int, disable: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar = tqdm(total=total, unit="step", file=sys.stderr, disable=disable, desc=PROG)

    def step() -> None:
        bar.update(1)

    return step, bar.close


def run_command(args: argparse.Namespace) -> int:
    """Run the subcommand for parsed ``args``; returns the exit status."""
    from .multiproc import WorkerError

    try:  # a UsageError is mbn-ref's to report (one line, exit status 2)
        return _run(args)
    except WorkerError as exc:
        print(f"{PROG}: error: a run failed: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    config = config_from_args(args)
    _check_dependencies(args)
    run_experiment = _experiment(args.framework)
    data = _load_data(args, config)  # before any output: bad files leave nothing behind
    largest = max(config.batch_sizes) * config.nproc
    if len(data.y_train) < largest:
        raise UsageError(
            f"{len(data.y_train)} training samples are fewer than one batch of {largest} "
            f"(batch size {max(config.batch_sizes)} x {config.nproc} processes): raise "
            f"--train-limit or lower --batch-sizes"
        )
    json_path, png, created = _outputs(args)
    say = functools.partial(print, file=sys.stderr if _to_stdout(args) else sys.stdout, flush=True)

    import torch

    from .output import SAME_TAU_NOTE, format_table, make_report, plot, write_json

    if config.data == "digits":
        torch.set_num_threads(1)  # tiny models: one thread is the fastest, and reproducible
    runs = config.runs()
    total_steps = sum(steps_per_run(config, len(data.y_train)))
    procs = f"{config.nproc} processes per run (m per process), " if config.nproc > 1 else ""
    where = f"{args.framework}" + (f" on {config.device}" if args.framework == "torch" else "")
    say(
        f"# {PROG}: {len(runs)} runs ({config.preset} preset), {config.epochs} epochs each, "
        f"{procs}{config.data} ({', '.join(config.models)}, {where}): "
        f"{len(data.y_train)} train / {len(data.y_test)} test images, {total_steps} steps",
        flush=True,
    )
    if config.data == "cifar10":
        say(
            "# CIFAR-10: the paper trains 200 epochs (--full); "
            + (
                "ResNet-18 on a CPU is slow: --quick, --train-limit N and --epochs T make it "
                "shorter, --device cuda faster"
                if config.device == "cpu"
                else "--epochs T and --train-limit N make it shorter"
            ),
            flush=True,
        )
    say(f"# {SAME_TAU_NOTE}")
    start = time.perf_counter()
    step, close = _progress(total_steps, args.no_progress)
    try:
        results = run_experiment(config, data, on_step=step)
    except BaseException:
        for path in created:  # a failed run leaves no empty report behind
            if path.exists() and path.stat().st_size == 0:
                path.unlink()
        raise
    finally:
        close()
    seconds = time.perf_counter() - start
    say(format_table(results))
    report = make_report(
        config,
        results,
        data=data.describe(),
        seconds=seconds,
        argv=sys.argv[1:],
        framework=args.framework,
    )
    if _to_stdout(args):
        write_json(report, sys.stdout)
        written = []
    else:
        write_json(report, json_path)
        written = [str(json_path)]
    if png is not None:
        plot(results, png, data_name=config.data)
        written.insert(0, str(png))
    say(f"# {seconds:.0f} s; wrote {', '.join(written) or 'the report to stdout'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mbn_torch.reproduce.cli``: the subcommand without the ``mbn-ref`` wrapper."""
    from mbn_ref.cli import main as mbn_main

    return mbn_main(["reproduce", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
