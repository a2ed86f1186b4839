"""Side-by-side timings of the core BN/MBN against PyTorch's native BN and ONNX's reference.

Run (from the repository root)::

    python benchmarks/bench_core.py                   # full run -> benchmarks/results/core.json
    python benchmarks/bench_core.py --repeats 31      # more rounds on a quiet machine
    python benchmarks/bench_core.py --quick --json /tmp/q.json   # seconds; tiny shapes, 1 round
    python benchmarks/bench_core.py --shapes 32x64x32x32 256x1024 --modes train_forward

What is timed, per shape and mode, in one process on the same float32 inputs:

==================  ====================================================================
``torch_native``    ``torch.nn.BatchNorm2d`` (``BatchNorm1d`` for ``(N, C)``), the baseline
``bn_numpy``        ``mr.bn_forward`` / ``mr.bn_backward`` on NumPy arrays
``mbn_numpy``       ``mr.mbn_forward`` / ``mr.mbn_backward`` (``lam=0.5, tau=0.99``), NumPy
``bn_torch``        ``mr.bn_*`` on torch tensors (through array-api-compat), analytic backward
``mbn_torch``       ``mr.mbn_*`` on torch tensors
``onnx_evaluator``  ``onnx.reference.ReferenceEvaluator.run`` on a one-node
                    ``BatchNormalization`` model (opset 15), end to end; forward only
``onnx_op``         the evaluator's NumPy helper for that node, called directly (the private
                    ``_batchnorm_training_mode`` / ``_batchnorm_test_mode``); forward only
==================  ====================================================================

Modes: ``train_forward`` (batch statistics, running statistics updated; native under
``torch.no_grad()``), ``train_forward_backward`` (native: forward with autograd then
``torch.autograd.grad`` for ``dx, dgamma, dbeta``; ours: forward then our analytic backward)
and ``eval_forward`` (running statistics). Timing method: ``benchmarks/bench_timing.py``.

Reading the output: every time is the median per-call time over rounds; every ratio
``A/B`` is the median over rounds of A and B timed in the same round. ``np/native`` is ours on
NumPy over native torch (target at most 4), ``torch/native`` ours on torch tensors over
native torch (target at most 3), ``np/onnx`` ours on NumPy over the ONNX evaluator end to end
(target below 1). The targets are reported as PASS/FAIL; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_timing import steady_malloc  # type: ignore[import-not-found]  # sibling module

if __name__ == "__main__":  # before the frameworks load
    steady_malloc(sys.argv)

import bench_cli  # type: ignore[import-not-found]  # sibling script module
import numpy as np
from bench_timing import (  # type: ignore[import-not-found]  # sibling script module
    environment_header,
    is_positive_finite,
    load_average,
    machine_busy,
    paired_ratio,
    time_interleaved,
)

import mbn_ref as mr

SCHEMA = "mbn-ref/bench-core/1"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "core.json"
DEFAULT_SHAPES = ((32, 64, 32, 32), (256, 1024))
QUICK_SHAPES = ((4, 8, 4, 4), (16, 8))
MODES = ("train_forward", "train_forward_backward", "eval_forward")
LAM, TAU, DECAY, EPS = 0.5, 0.99, 0.9, 1e-5

LABELS = {
    "torch_native": "torch.nn.BatchNorm{1,2}d (baseline)",
    "bn_numpy": "mbn_ref BN on NumPy",
    "mbn_numpy": "mbn_ref MBN on NumPy (lam=0.5, tau=0.99)",
    "bn_torch": "mbn_ref BN on torch tensors (array-api-compat)",
    "mbn_torch": "mbn_ref MBN on torch tensors (array-api-compat)",
    "onnx_evaluator": "onnx.reference.ReferenceEvaluator.run, end to end (opset 15)",
    "onnx_op": "onnx reference NumPy helper called directly (no evaluator overhead)",
}

# (name, numerator, denominator, target limit or None): "ratio <= limit" passes; the ONNX
# target is "faster than", i.e. ratio < 1.
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("bn_numpy/torch_native", "bn_numpy", "torch_native", 4.0),
    ("mbn_numpy/torch_native", "mbn_numpy", "torch_native", 4.0),
    ("bn_torch/torch_native", "bn_torch", "torch_native", 3.0),
    ("mbn_torch/torch_native", "mbn_torch", "torch_native", 3.0),
    ("bn_numpy/onnx_evaluator", "bn_numpy", "onnx_evaluator", 1.0),
    ("mbn_numpy/onnx_evaluator", "mbn_numpy", "onnx_evaluator", 1.0),
    ("bn_numpy/onnx_op", "bn_numpy", "onnx_op", None),
    ("mbn_numpy/onnx_op", "mbn_numpy", "onnx_op", None),
)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x64x32x32"`` or ``"32,64,32,32"`` -> ``(32, 64, 32, 32)``."""
    parts = text.replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is not like 32x64x32x32 or 256,1024"
        ) from None
    if len(shape) > 5:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} has more than 5 dims; torch.nn.BatchNorm*d takes 2 to 5"
        )
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} needs at least 2 positive dims (N, C, ...)"
        )
    return shape


# ---------------------------------------------------------------- inputs and contenders


class Inputs:
    """One shape's float32 data, shared by every contender (torch tensors share NumPy memory)."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        import torch

        rng = np.random.default_rng(seed)
        c = shape[1]
        self.shape = shape
        self.x = rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5
        self.dy = rng.standard_normal(shape, dtype=np.float32)
        self.gamma = (rng.random(c, dtype=np.float32) + 0.5).astype(np.float32)
        self.beta = rng.standard_normal(c, dtype=np.float32)
        self.mean0 = np.zeros(c, np.float32)
        self.var0 = np.ones(c, np.float32)
        self.tx, self.tdy, self.tgamma, self.tbeta = (
            torch.from_numpy(a) for a in (self.x, self.dy, self.gamma, self.beta)
        )


def native_contender(inp: Inputs, mode: str) -> Callable[[], Any]:
    import torch

    c = inp.shape[1]
    classes: dict[int, Any] = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }
    if len(inp.shape) not in classes:
        raise ValueError(f"no torch.nn.BatchNorm*d for input of rank {len(inp.shape)}")
    cls = classes[len(inp.shape)]
    bn = cls(c, eps=EPS, momentum=1 - DECAY)
    with torch.no_grad():
        bn.weight.copy_(inp.tgamma)
        bn.bias.copy_(inp.tbeta)
    if mode == "eval_forward":
        bn.eval()

        def run_eval() -> Any:
            with torch.no_grad():
                return bn(inp.tx)

        return run_eval
    bn.train()
    if mode == "train_forward":

        def run_fwd() -> Any:
            with torch.no_grad():
                return bn(inp.tx)

        return run_fwd
    xg = inp.tx.detach().clone().requires_grad_(True)

    def run_fwd_bwd() -> Any:
        y = bn(xg)
        return torch.autograd.grad(y, (xg, bn.weight, bn.bias), inp.tdy)

    return run_fwd_bwd


def ours_contender(inp: Inputs, mode: str, algo: str, lib: str) -> Callable[[], Any]:
    import torch

    c = inp.shape[1]
    arrays: tuple[Any, ...] = (
        (inp.x, inp.dy, inp.gamma, inp.beta, np)
        if lib == "numpy"
        else (inp.tx, inp.tdy, inp.tgamma, inp.tbeta, torch)
    )
    x, dy, gamma, beta, xp = arrays
    training = mode != "eval_forward"
    if algo == "bn":
        state: Any = mr.init_bn_state(c, xp=xp, dtype=xp.float32)

        def fwd() -> Any:
            return mr.bn_forward(
                x, state, gamma, beta, decay=DECAY, eps=EPS, training=training, estimator="unbiased"
            )

        bwd = mr.bn_backward
    else:
        state = mr.init_state(c, xp=xp, dtype=xp.float32)

        def fwd() -> Any:
            return mr.mbn_forward(
                x,
                state,
                gamma,
                beta,
                lam=LAM,
                tau=TAU,
                eps=EPS,
                training=training,
                estimator="unbiased",
            )

        bwd = mr.mbn_backward
    if mode != "train_forward_backward":
        return fwd

    def fwd_bwd() -> Any:
        y, _, ctx = fwd()
        return y, bwd(dy, ctx)

    return fwd_bwd


def onnx_contenders(inp: Inputs, mode: str) -> dict[str, Callable[[], Any]]:
    """The ONNX reference evaluator end to end, and its op helper directly (forward only)."""
    if mode == "train_forward_backward":
        return {}
    try:
        import onnx
        from onnx import TensorProto, helper
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.ops import op_batch_normalization as op_bn
    except ImportError:
        return {}
    training = mode == "train_forward"
    shape = list(inp.shape)
    c = shape[1]
    outputs = ["Y", "running_mean", "running_var"] if training else ["Y"]
    node = helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "input_mean", "input_var"],
        outputs,
        epsilon=EPS,
        momentum=DECAY,
        training_mode=int(training),
    )
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "bn",
        [helper.make_tensor_value_info("X", f32, shape)]
        + [
            helper.make_tensor_value_info(n, f32, [c])
            for n in ("scale", "B", "input_mean", "input_var")
        ],
        [helper.make_tensor_value_info("Y", f32, shape)]
        + [helper.make_tensor_value_info(n, f32, [c]) for n in outputs[1:]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    sess = ReferenceEvaluator(model)
    feeds = {
        "X": inp.x,
        "scale": inp.gamma,
        "B": inp.beta,
        "input_mean": inp.mean0,
        "input_var": inp.var0,
    }

    def evaluator() -> Any:
        return sess.run(None, feeds)

    if training:

        def op() -> Any:
            return op_bn._batchnorm_training_mode(
                inp.x, inp.gamma, inp.beta, inp.mean0, inp.var0, DECAY, EPS
            )
    else:

        def op() -> Any:
            return op_bn._batchnorm_test_mode(
                inp.x, inp.gamma, inp.beta, inp.mean0, inp.var0, epsilon=EPS
            )

    return {"onnx_evaluator": evaluator, "onnx_op": op}


def build_contenders(inp: Inputs, mode: str) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {"torch_native": native_contender(inp, mode)}
    for algo in ("bn", "mbn"):
        for lib in ("numpy", "torch"):
            out[f"{algo}_{lib}"] = ours_contender(inp, mode, algo, lib)
    out.update(onnx_contenders(inp, mode))
    return out


# ---------------------------------------------------------------- agreement checks


def _np(a: Any) -> np.ndarray:
    return a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)


def agreement(results: dict[str, Any], mode: str) -> dict[str, float]:
    """Max abs differences that show the contenders compute the same thing (not timed)."""

    def y_of(name: str) -> np.ndarray:
        r = results[name]
        if name == "torch_native":
            return _np(r) if mode != "train_forward_backward" else np.empty(0)
        if isinstance(r, np.ndarray):  # the ONNX inference helper returns y alone
            return r
        return _np(r[0])  # (y, state, ctx) from ours, [y, ...] from ONNX

    checks: dict[str, float] = {}
    if mode != "train_forward_backward":
        ref = y_of("torch_native")
        for name in ("bn_numpy", "bn_torch", "onnx_evaluator", "onnx_op"):
            if name in results:
                checks[f"y:{name}-torch_native"] = float(np.max(np.abs(y_of(name) - ref)))
        checks["y:mbn_torch-mbn_numpy"] = float(
            np.max(np.abs(y_of("mbn_torch") - y_of("mbn_numpy")))
        )
    else:
        ref_dx = _np(results["torch_native"][0])
        for name in ("bn_numpy", "bn_torch"):
            checks[f"dx:{name}-torch_native"] = float(
                np.max(np.abs(_np(results[name][1][0]) - ref_dx))
            )
        checks["dx:mbn_torch-mbn_numpy"] = float(
            np.max(np.abs(_np(results["mbn_torch"][1][0]) - _np(results["mbn_numpy"][1][0])))
        )
    return checks


# ---------------------------------------------------------------- run, report


def run_case(
    shape: tuple[int, ...],
    mode: str,
    *,
    rounds: int,
    warmup: int,
    min_sample_s: float,
    seed: int,
) -> dict[str, Any]:
    inp = Inputs(shape, seed)
    contenders = build_contenders(inp, mode)
    checks = agreement({k: f() for k, f in contenders.items()}, mode)
    timings = time_interleaved(
        contenders, rounds=rounds, warmup=warmup, min_sample_s=min_sample_s, seed=seed
    )
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for name, num, den, limit in RATIOS:
        if num not in timings or den not in timings:
            continue
        r = paired_ratio(timings[num], timings[den])
        ratios[name] = {"numerator": num, "denominator": den, **r}
        if limit is not None:
            ok = r["median"] < limit if den.startswith("onnx") else r["median"] <= limit
            targets[name] = {"limit": limit, "ratio": r["median"], "pass": bool(ok)}
    return {
        "shape": list(shape),
        "mode": mode,
        "contenders": {k: {"label": LABELS[k], **t.as_json()} for k, t in timings.items()},
        "ratios": ratios,
        "targets": targets,
        "agreement_max_abs_diff": checks,
    }


def _fmt_ms(t: dict[str, Any] | None) -> str:
    return "-" if t is None else f"{t['median_ms']:.3f}"


def _fmt_ratio(case: dict[str, Any], name: str) -> str:
    r = case["ratios"].get(name)
    if r is None:
        return "-"
    tgt = case["targets"].get(name)
    mark = "" if tgt is None else (" PASS" if tgt["pass"] else " FAIL")
    return f"{r['median']:.2f}{mark}"


def table(cases: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per shape, mode and algorithm (BN, MBN)."""
    head = (
        "| shape | mode | algo | native ms | ours np ms | ours torch ms | onnx eval ms "
        "| onnx op ms | np/native (<=4) | torch/native (<=3) | np/onnx eval (<1) "
        "| np/onnx op |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in cases:
        c = case["contenders"]
        shape = "x".join(map(str, case["shape"]))
        for algo in ("bn", "mbn"):
            rows.append(
                f"| {shape} | {case['mode']} | {algo.upper()} | {_fmt_ms(c.get('torch_native'))} "
                f"| {_fmt_ms(c.get(f'{algo}_numpy'))} | {_fmt_ms(c.get(f'{algo}_torch'))} "
                f"| {_fmt_ms(c.get('onnx_evaluator'))} | {_fmt_ms(c.get('onnx_op'))} "
                f"| {_fmt_ratio(case, f'{algo}_numpy/torch_native')} "
                f"| {_fmt_ratio(case, f'{algo}_torch/torch_native')} "
                f"| {_fmt_ratio(case, f'{algo}_numpy/onnx_evaluator')} "
                f"| {_fmt_ratio(case, f'{algo}_numpy/onnx_op')} |"
            )
    return "\n".join(rows)


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's schema or values (empty when fine); used by the smoke test."""
    problems, cases = bench_cli.report_problems(
        report,
        SCHEMA,
        ("versions", "torch_num_threads", "numpy_blas", "settings", "load_average_start"),
    )
    if not cases:
        return problems
    for case in cases:
        where = f"{case.get('shape')}/{case.get('mode')}"
        for name, t in case.get("contenders", {}).items():
            for key in ("median_ms", "min_ms"):
                if not is_positive_finite(t.get(key)):
                    problems.append(f"{where}: {name}.{key} = {t.get(key)!r}")
        if "torch_native" not in case.get("contenders", {}):
            problems.append(f"{where}: no torch_native baseline")
        for name, r in case.get("ratios", {}).items():
            values = [r.get("median"), r.get("of_medians"), *r.get("per_round", [None])]
            if not all(is_positive_finite(v) for v in values):
                problems.append(f"{where}: ratio {name} has a non-positive/non-finite value")
        for name, t in case.get("targets", {}).items():
            if not isinstance(t.get("pass"), bool):
                problems.append(f"{where}: target {name} has no boolean pass")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = bench_cli.parser(__doc__)
    bench_cli.add_timing_arguments(
        p, DEFAULT_JSON, "tiny shapes, 1 round, no warm-up or calibration (smoke test)"
    )
    p.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=None,
        help="e.g. 32x64x32x32 256x1024 (N, C, ...; channels on axis 1)",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads before timing (default: leave torch's choice)",
    )
    args = p.parse_args(argv)

    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    t = bench_cli.timing(args)
    settings = {
        **t.settings(args.quick, args.seed),
        "dtype": "float32",
        "shapes": [list(s) for s in shapes],
        "modes": args.modes,
        "lam": LAM,
        "tau": TAU,
        "decay": DECAY,
        "eps": EPS,
        "torch_threads_arg": args.torch_threads,
    }
    header = environment_header(
        ["numpy", "torch", "onnx", "array_api_compat", "mbn_ref"], settings, str(REPO)
    )
    print(
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load {header['load_average_start']}, {t.rounds} rounds",
        file=sys.stderr,
    )
    cases = []
    for shape in shapes:
        for mode in args.modes:
            print(f"  timing {'x'.join(map(str, shape))} {mode} ...", file=sys.stderr)
            cases.append(
                run_case(
                    shape,
                    mode,
                    rounds=t.rounds,
                    warmup=t.warmup,
                    min_sample_s=t.min_sample_s,
                    seed=args.seed,
                )
            )
    header["load_average_end"] = load_average()
    header["busy_at_end"] = machine_busy()
    header["mbn_ref_file"] = mr.__file__
    report = {"schema": SCHEMA, "header": header, "cases": cases}
    bench_cli.write_json(report, args.json)
    return bench_cli.finish(
        report,
        args.json,
        table(cases),
        validate_report(report),
        "; torch's thread pool suffers most from that; rerun quietly, or compare with "
        "--torch-threads 1",
    )


if __name__ == "__main__":
    raise SystemExit(main())
