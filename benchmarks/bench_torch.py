"""Side-by-side timings and peak memory of ``mbn_torch``'s modules against ``nn.BatchNorm*d``.

Run (from the repository root)::

    python benchmarks/bench_torch.py                  # full run -> benchmarks/results/torch.json
    python benchmarks/bench_torch.py --quick --json /tmp/t.json   # seconds: tiny shapes, 1 round
    python benchmarks/bench_torch.py --cases resnet18_stage --modes eager_train
    python benchmarks/bench_torch.py --device cuda --dtype bfloat16   # where a GPU is
    python benchmarks/bench_torch.py --modes compiled_train --skip-global-guards

Every contender is the same model as the baseline with its batch-norm layers replaced (same
weights, same inputs, same process, same thread count: 2 by default), timed in interleaved
rounds (``benchmarks/bench_timing.py``):

==============  ==========================================================================
``native``      ``torch.nn.BatchNorm2d`` (``BatchNorm1d`` for ``(N, C)``): the baseline
``mbn``         ``mbn_torch.MomentumBatchNorm*d`` with ``lam = 0.9``: the core's path
``mbn_lam0``    ``MomentumBatchNorm*d`` with ``lam = 0``: PyTorch's fused kernel in eager mode
``dynamic_bn``  ``mbn_torch.DynamicBatchNorm*d``: BN with its momentum as runtime state
==============  ==========================================================================

Cases: ``32x64x32x32`` (one ``BatchNorm2d``), ``256x1024`` (one ``BatchNorm1d``) and
``resnet18_stage`` (ResNet-18's first stage: two BasicBlocks, conv3x3-BN-ReLU-conv3x3-BN
plus the identity, 64 channels, input ``(8, 64, 56, 56)``: what a batch norm costs inside a
real network). Modes: ``eager_train`` (forward, then ``torch.autograd.grad`` of the input
and every parameter), ``eager_eval`` (forward under ``torch.no_grad()``) and
``compiled_train`` (``torch.compile(model, fullgraph=True)``, inductor, then the same
gradients; the ratio is to the compiled baseline; ``--skip-global-guards`` compiles every
contender with ``guard_filter_fn=torch.compiler.skip_guard_on_globals_unsafe``, to measure
what Dynamo's guards on module globals cost per call). A time ratio is the median over rounds of
the contender's time over the baseline's in the same round (the targets' measure); the ratio
of the two minima over rounds is printed beside it (``of_minima``: closer to a quiet
machine's when other processes compete for the cores).

**Peak memory** of one step, measured after a warm-up step: on CUDA the allocator's peak
(``torch.cuda.max_memory_allocated``) above what was allocated before the step; on the CPU,
which keeps no such statistics, the peak of the bytes of live tensor storage created by
ATen operators during the step (a ``TorchDispatchMode`` counts every new storage an
operator returns and a finalizer uncounts it when it is freed; the scratch a fused kernel
allocates inside itself is not seen, which favours the baseline's single kernel). The CPU
count needs eager execution: compiled modes report memory on CUDA only. ``retained`` is
what lives between forward and backward (outputs and what autograd saved), the rest of the
peak is the backward's.

Before timing, every contender's output ``y`` (and ``dx`` in training) is compared with a
float64 reference of the same computation (the native model for ``native``, ``mbn_lam0``
and ``dynamic_bn``, the ``lam = 0.9`` MBN model for ``mbn``; relative error in the 2-norm),
so a ratio never compares unlike computations. Targets (issue 9) are reported as PASS/FAIL;
nothing asserts them.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_timing import steady_malloc  # type: ignore[import-not-found]  # sibling module

if __name__ == "__main__":  # before the frameworks load
    steady_malloc(sys.argv)

import bench_cli  # type: ignore[import-not-found]  # sibling script module
import torch
from bench_timing import (  # type: ignore[import-not-found]  # sibling script module
    environment_header,
    is_positive_finite,
    load_average,
    machine_busy,
    paired_ratio,
    time_interleaved,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mbn_ref
import mbn_torch

SCHEMA = "mbn-ref/bench-torch/1"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "torch.json"
LAM, MOMENTUM, EPS = 0.9, 0.1, 1e-5
CONTENDERS = ("native", "mbn", "mbn_lam0", "dynamic_bn")
MODES = ("eager_train", "eager_eval", "compiled_train")
LABELS = {
    "native": "torch.nn.BatchNorm{1,2}d (baseline)",
    "mbn": "mbn_torch.MomentumBatchNorm*d, lam=0.9 (the core's path)",
    "mbn_lam0": "mbn_torch.MomentumBatchNorm*d, lam=0 (torch's fused kernel in eager mode)",
    "dynamic_bn": "mbn_torch.DynamicBatchNorm*d (momentum as runtime state)",
}

# (mode, contender) -> (limit, aim or None): "ratio to native <= limit" passes
TIME_TARGETS: dict[tuple[str, str], tuple[float, float | None]] = {
    ("eager_train", "mbn"): (1.5, 1.2),
    ("eager_train", "mbn_lam0"): (1.1, None),
    ("eager_train", "dynamic_bn"): (1.1, None),
    ("eager_eval", "mbn"): (1.1, None),
    ("eager_eval", "mbn_lam0"): (1.1, None),
    ("eager_eval", "dynamic_bn"): (1.1, None),
    ("compiled_train", "mbn"): (1.1, None),
    ("compiled_train", "mbn_lam0"): (1.1, None),
    ("compiled_train", "dynamic_bn"): (1.1, None),
}
MEMORY_TARGET = 1.2


@dataclass(frozen=True)
class Case:
    """One benchmark model: a single batch-norm layer, or ResNet-18's first stage."""

    name: str
    kind: str  # "layer" or "stage"
    shape: tuple[int, ...]


CASES = (
    Case("32x64x32x32", "layer", (32, 64, 32, 32)),
    Case("256x1024", "layer", (256, 1024)),
    Case("resnet18_stage", "stage", (8, 64, 56, 56)),
)
QUICK_CASES = (
    Case("4x8x4x4", "layer", (4, 8, 4, 4)),
    Case("16x8", "layer", (16, 8)),
    Case("resnet18_stage", "stage", (2, 8, 8, 8)),
)


# ---------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock without downsampling (stride 1, same channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, eps=EPS, momentum=MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=EPS, momentum=MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def native_model(case: Case, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """The baseline model, with seeded weights (affine parameters not at their defaults)."""
    torch.manual_seed(seed)
    channels = case.shape[1]
    if case.kind == "stage":
        model: nn.Module = nn.Sequential(BasicBlock(channels), BasicBlock(channels))
    else:
        cls = nn.BatchNorm1d if len(case.shape) <= 3 else nn.BatchNorm2d
        model = cls(channels, eps=EPS, momentum=MOMENTUM)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.to(device=device, dtype=dtype)


def _ours(contender: str, bn: nn.Module) -> nn.Module:
    """The module of ``contender`` replacing ``bn``, with its parameters and statistics."""
    dim = 1 if isinstance(bn, nn.BatchNorm1d) else 2
    p = bn.weight
    kw: dict[str, Any] = {
        "eps": bn.eps,
        "momentum": bn.momentum,
        "device": p.device,
        "dtype": p.dtype,
    }
    if contender == "dynamic_bn":
        new: nn.Module = getattr(mbn_torch, f"DynamicBatchNorm{dim}d")(bn.num_features, **kw)
    else:
        lam = LAM if contender == "mbn" else 0.0
        new = getattr(mbn_torch, f"MomentumBatchNorm{dim}d")(bn.num_features, lam=lam, **kw)
    new.load_state_dict(bn.state_dict())  # a BatchNorm*d checkpoint loads (docs/torch.md)
    return new


def build(contender: str, case: Case, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """``contender``'s model: the baseline with every batch norm replaced."""
    model = native_model(case, device, dtype, seed)
    if contender == "native":
        return model
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _ours(contender, model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, _ours(contender, child))
    return model


# ---------------------------------------------------------------- steps


@dataclass
class Data:
    """One case's input and output gradient, shared by every contender."""

    x: torch.Tensor
    dy: torch.Tensor

    @classmethod
    def make(cls, case: Case, device: str, dtype: torch.dtype, seed: int) -> Data:
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(case.shape, generator=g, dtype=torch.float64) * 2 + 0.5
        dy = torch.randn(case.shape, generator=g, dtype=torch.float64)
        return cls(x.to(device=device, dtype=dtype), dy.to(device=device, dtype=dtype))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Step:
    """One contender's step in one mode, split into forward and backward (for memory)."""

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        data: Data,
        device: str,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        self.mode, self.data, self.device = mode, data, device
        model.train(mode != "eager_eval")
        self.params = list(model.parameters())
        self.model: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model, fullgraph=True, options=compile_options)
            if mode == "compiled_train"
            else model
        )
        self.x = data.x.detach().clone().requires_grad_(mode != "eager_eval")

    def forward(self) -> torch.Tensor:
        if self.mode == "eager_eval":
            with torch.no_grad():
                return self.model(self.x)
        return self.model(self.x)

    def backward(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.mode == "eager_eval":
            return (y,)
        return torch.autograd.grad(y, [self.x, *self.params], self.data.dy)

    def __call__(self) -> tuple[torch.Tensor, ...]:
        out = self.backward(self.forward())
        _sync(self.device)
        return out


# ---------------------------------------------------------------- memory


class LiveStorage(TorchDispatchMode):
    """Bytes of live tensor storage created by ATen operators while active, and their peak.

    An operator's output whose storage is not one of its inputs' is new: its bytes are
    counted, and a finalizer on the storage (whose Python object PyTorch keeps while the
    storage lives) uncounts them when it is freed, also after the mode is left.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owned: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size and ptr not in given and ptr not in self._owned:
                self._owned.add(ptr)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr, size)
        return out

    def _free(self, ptr: int, size: int) -> None:
        if ptr in self._owned:
            self._owned.discard(ptr)
            self.live -= size


def peak_memory(step: Step) -> dict[str, Any]:
    """Peak and retained bytes of one step (after a warm-up step), or why not measured."""
    step()
    if step.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = step.forward()
        torch.cuda.synchronize()
        retained = torch.cuda.memory_allocated() - base
        grads = step.backward(y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del y, grads
        return {
            "peak_bytes": peak,
            "retained_bytes": retained,
            "method": "torch.cuda.max_memory_allocated above the step's start",
        }
    if step.mode.startswith("compiled"):
        return {
            "peak_bytes": None,
            "retained_bytes": None,
            "method": "not measured on the CPU: inductor's buffers bypass the dispatcher",
        }
    with LiveStorage() as mem:
        y = step.forward()
        retained = mem.live
        grads = step.backward(y)
        del y, grads
    return {
        "peak_bytes": mem.peak,
        "retained_bytes": retained,
        "method": "live storage created by ATen operators (TorchDispatchMode)",
    }


# ---------------------------------------------------------------- agreement


def _rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` (2-norms over all elements; 0 when both are 0).

    A norm, not a maximum: a ReLU whose input lies within rounding of 0 takes the other
    branch in float32 for one element, which moves that element's gradient by O(1) in any
    correct implementation but the norm by O(1/sqrt(size)).
    """
    ref64 = ref.detach().double().cpu()
    err = float((a.detach().double().cpu() - ref64).norm())
    scale = float(ref64.norm())
    return err / scale if scale else err


def agreement(
    contender: str,
    mode: str,
    case: Case,
    data: Data,
    y: torch.Tensor,
    dx: torch.Tensor | None,
    seed: int,
) -> dict[str, float]:
    """Relative differences of ``y`` (and ``dx``) from a float64 reference (:func:`_rel_error`).

    The reference runs the same computation eagerly in float64: the native model for
    ``native``, ``mbn_lam0`` and ``dynamic_bn``, the ``lam = 0.9`` MBN model for ``mbn``.
    """
    reference = build(
        "mbn" if contender == "mbn" else "native", case, data.x.device.type, torch.float64, seed
    )
    ref_mode = "eager_eval" if mode == "eager_eval" else "eager_train"
    ref_data = Data(data.x.double(), data.dy.double())
    ref_step = Step(reference, ref_mode, ref_data, data.x.device.type)
    y_ref = ref_step.forward()
    diffs = {"y": _rel_error(y, y_ref)}
    if dx is not None:
        diffs["dx"] = _rel_error(dx, ref_step.backward(y_ref)[0])
    return diffs


# ---------------------------------------------------------------- one case


def run_case(
    case: Case,
    mode: str,
    *,
    device: str,
    dtype: torch.dtype,
    rounds: int,
    warmup: int,
    min_sample_s: float,
    seed: int,
    compile_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data = Data.make(case, device, dtype, seed)
    torch._dynamo.reset()  # compiled models of earlier cases do not count toward the limit
    steps: dict[str, Callable[[], Any]] = {}
    checks: dict[str, dict[str, float]] = {}
    memory: dict[str, dict[str, Any]] = {}
    first_call_s: dict[str, float] = {}
    for contender in CONTENDERS:
        model = build(contender, case, device, dtype, seed)
        step = Step(model, mode, data, device, compile_options)
        t0 = time.perf_counter()
        y = step.forward()  # the first call compiles in compiled mode; fresh state
        dx = step.backward(y)[0] if mode != "eager_eval" else None
        _sync(device)
        first_call_s[contender] = time.perf_counter() - t0
        checks[contender] = agreement(contender, mode, case, data, y, dx, seed)
        memory[contender] = peak_memory(step)
        steps[contender] = step
    timings = time_interleaved(
        steps, rounds=rounds, warmup=warmup, min_sample_s=min_sample_s, seed=seed
    )
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for contender in CONTENDERS[1:]:
        name = f"{contender}/native"
        r = paired_ratio(timings[contender], timings["native"])
        of_minima = timings[contender].min_s / timings["native"].min_s
        ratios[name] = {
            "numerator": contender,
            "denominator": "native",
            **r,
            "of_minima": of_minima,
        }
        limit, aim = TIME_TARGETS[(mode, contender)]
        targets[name] = {
            "limit": limit,
            "aim": aim,
            "ratio": r["median"],
            "pass": bool(r["median"] <= limit),
        }
        ours, base = memory[contender]["peak_bytes"], memory["native"]["peak_bytes"]
        if ours is not None and base:
            ratio = ours / base
            targets[f"memory:{name}"] = {
                "limit": MEMORY_TARGET,
                "aim": None,
                "ratio": ratio,
                "pass": bool(ratio <= MEMORY_TARGET),
            }
    return {
        "case": case.name,
        "kind": case.kind,
        "shape": list(case.shape),
        "mode": mode,
        "contenders": {
            k: {
                "label": LABELS[k],
                **t.as_json(),
                "first_call_s": first_call_s[k],
                "memory": memory[k],
            }
            for k, t in timings.items()
        },
        "ratios": ratios,
        "targets": targets,
        "agreement_rel_error": checks,
    }


# ---------------------------------------------------------------- report


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def _target(case: dict[str, Any], name: str) -> str:
    t = case["targets"].get(name)
    if t is None:
        return "-"
    aim = f", aim {t['aim']:g}" if t["aim"] is not None else ""
    return f"{t['ratio']:.2f} {'PASS' if t['pass'] else 'FAIL'} (<= {t['limit']:g}{aim})"


def table(cases: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per case, mode and contender, ratios to ``native``."""
    head = (
        "| case | mode | contender | native ms | ours ms | time ratio (target) | of minima "
        "| native peak MiB | ours peak MiB | memory ratio (target) |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in cases:
        c = case["contenders"]
        for contender in CONTENDERS[1:]:
            name = f"{contender}/native"
            rows.append(
                f"| {case['case']} | {case['mode']} | {contender} "
                f"| {c['native']['median_ms']:.3f} | {c[contender]['median_ms']:.3f} "
                f"| {_target(case, name)} | {case['ratios'][name]['of_minima']:.2f} "
                f"| {_mib(c['native']['memory']['peak_bytes'])} "
                f"| {_mib(c[contender]['memory']['peak_bytes'])} "
                f"| {_target(case, f'memory:{name}')} |"
            )
    return "\n".join(rows)


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's schema or values (empty when fine); used by the smoke test."""
    problems, cases = bench_cli.report_problems(
        report,
        SCHEMA,
        ("versions", "torch_num_threads", "settings", "load_average_start", "device"),
    )
    if not cases:
        return problems
    for case in cases:
        where = f"{case.get('case')}/{case.get('mode')}"
        if set(case.get("contenders", {})) != set(CONTENDERS):
            problems.append(f"{where}: contenders {sorted(case.get('contenders', {}))}")
        for name, t in case.get("contenders", {}).items():
            for key in ("median_ms", "min_ms", "first_call_s"):
                if not is_positive_finite(t.get(key)):
                    problems.append(f"{where}: {name}.{key} = {t.get(key)!r}")
            peak = t.get("memory", {}).get("peak_bytes")
            if peak is not None and not is_positive_finite(peak):
                problems.append(f"{where}: {name} peak_bytes = {peak!r}")
        for name, r in case.get("ratios", {}).items():
            values = [
                r.get("median"),
                r.get("of_medians"),
                r.get("of_minima"),
                *r.get("per_round", [None]),
            ]
            if not all(is_positive_finite(v) for v in values):
                problems.append(f"{where}: ratio {name} has a non-positive/non-finite value")
        for name, t in case.get("targets", {}).items():
            if not isinstance(t.get("pass"), bool) or not is_positive_finite(t.get("ratio")):
                problems.append(f"{where}: target {name} is malformed")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = bench_cli.parser(__doc__)
    bench_cli.add_timing_arguments(
        p, DEFAULT_JSON, "tiny shapes, 1 round, no calibration (smoke test)"
    )
    names = [c.name for c in CASES]
    p.add_argument(
        "--cases",
        nargs="+",
        choices=names,
        default=None,
        help="which cases (default: all; with --quick their tiny versions)",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--skip-global-guards",
        action="store_true",
        help="compiled_train: every contender compiled with torch.compile's guard_filter_fn="
        "torch.compiler.skip_guard_on_globals_unsafe (no per-call guards on module globals)",
    )
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    t = bench_cli.timing(args)
    rounds, warmup, min_sample_s = t.rounds, t.warmup, t.min_sample_s

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pool = QUICK_CASES if args.quick else CASES
    chosen = args.cases or names
    cases = [case for case, name in zip(pool, names, strict=True) if name in chosen]
    settings = {
        **t.settings(args.quick, args.seed),
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "skip_global_guards": args.skip_global_guards,
        "cases": {c.name: list(c.shape) for c in cases},
        "modes": args.modes,
        "lam": LAM,
        "momentum": MOMENTUM,
        "eps": EPS,
    }
    header = environment_header(
        ["torch", "numpy", "array_api_compat", "mbn_ref"], settings, str(REPO)
    )
    header["device"] = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    )
    print(
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, device "
        f"{header['device']}, {args.dtype}, load {header['load_average_start']}, "
        f"{rounds} rounds",
        file=sys.stderr,
    )
    compile_options = (
        {"guard_filter_fn": torch.compiler.skip_guard_on_globals_unsafe}
        if args.skip_global_guards
        else None
    )
    results = []
    for case in cases:
        for mode in args.modes:
            print(f"  timing {case.name} {mode} ...", file=sys.stderr)
            results.append(
                run_case(
                    case,
                    mode,
                    device=args.device,
                    dtype=dtype,
                    rounds=rounds,
                    warmup=warmup,
                    min_sample_s=min_sample_s,
                    seed=args.seed,
                    compile_options=compile_options,
                )
            )
    header["load_average_end"] = load_average()
    header["busy_at_end"] = machine_busy()
    header["mbn_ref_file"] = mbn_ref.__file__
    header["mbn_torch_file"] = mbn_torch.__file__
    report = {"schema": SCHEMA, "header": header, "cases": results}
    bench_cli.write_json(report, args.json)
    return bench_cli.finish(
        report, args.json, table(results), validate_report(report), ": rerun quietly"
    )


if __name__ == "__main__":
    raise SystemExit(main())
