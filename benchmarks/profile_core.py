"""Where the core's BN/MBN time goes, and what cheaper formulations would save.

Run (from the repository root)::

    python benchmarks/profile_core.py                 # -> benchmarks/results/profile.json
    python benchmarks/profile_core.py --repeats 21 --shape 32x64x32x32
    python benchmarks/profile_core.py --quick --json /tmp/p.json

Two parts:

``profile``
    cProfile of ``mr.bn_forward``/``bn_backward``/``mbn_forward``/``mbn_backward`` on NumPy
    arrays and on torch tensors: the functions with the largest own time, and how many
    array-API calls one step makes.
``experiments``
    Groups of interchangeable formulations of one step (same result, checked with
    ``allclose`` before timing), timed side by side with the interleaved-median method of
    ``bench_timing.py``. Each group's first entry is what the core does today; the JSON and
    the table give every entry's median and its ratio to that first entry.

Nothing here edits ``mbn_ref``; the experiments reimplement single steps to measure them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np
from bench_timing import (  # type: ignore[import-not-found]  # sibling script module
    environment_header,
    paired_ratio,
    time_interleaved,
)

import mbn_ref as mr

SCHEMA = "mbn-ref/profile-core/1"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "profile.json"
EPS = 1e-5

Group = dict[str, Callable[[], Any]]


# ---------------------------------------------------------------- cProfile of the real core


def profile_paths(shape: tuple[int, ...], calls: int, top: int) -> dict[str, Any]:
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[1]
    g = np.ones(c, np.float32)
    b = np.zeros(c, np.float32)
    out: dict[str, Any] = {}
    for lib in ("numpy", "torch"):
        ns: Any = np if lib == "numpy" else torch
        arrays: tuple[Any, ...] = (x, dy, g, b)
        if lib == "torch":
            arrays = tuple(torch.from_numpy(a) for a in arrays)
        xx, dd, gg, bb = arrays
        for algo in ("bn", "mbn"):
            if algo == "bn":
                st: Any = mr.init_bn_state(c, xp=ns, dtype=ns.float32)

                def fwd(st: Any = st, xx: Any = xx, gg: Any = gg, bb: Any = bb) -> Any:
                    return mr.bn_forward(xx, st, gg, bb, decay=0.9)

                bwd = mr.bn_backward
            else:
                st = mr.init_state(c, xp=ns, dtype=ns.float32)

                def fwd(st: Any = st, xx: Any = xx, gg: Any = gg, bb: Any = bb) -> Any:
                    return mr.mbn_forward(xx, st, gg, bb, lam=0.5, tau=0.99)

                bwd = mr.mbn_backward
            _, _, ctx = fwd()
            for part, fn in (("forward", fwd), ("backward", lambda: bwd(dd, ctx))):  # noqa: B023
                fn()
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(calls):
                    fn()
                prof.disable()
                stats = pstats.Stats(prof)
                rows = []
                for (file, line, func), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
                    rows.append(
                        {
                            "function": f"{Path(file).name}:{line}({func})",
                            "ncalls_per_step": nc / calls,
                            "tottime_ms_per_step": tt / calls * 1e3,
                            "cumtime_ms_per_step": ct / calls * 1e3,
                        }
                    )
                rows.sort(key=lambda r: -r["tottime_ms_per_step"])
                total = sum(r["tottime_ms_per_step"] for r in rows)
                compat = sum(
                    r["ncalls_per_step"]
                    for r in rows
                    if "array_api_compat" in r["function"]
                    or r["function"].startswith(("_aliases.py", "_helpers.py"))
                )
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
                out[f"{algo}_{lib}_{part}"] = {
                    "total_ms_per_step": total,
                    "function_calls_per_step": sum(r["ncalls_per_step"] for r in rows),
                    "array_api_compat_calls_per_step": compat,
                    "top": rows[:top],
                }
    return out


# ---------------------------------------------------------------- experiments (NumPy)


def numpy_groups(shape: tuple[int, ...]) -> dict[str, Group]:
    """Alternatives for each full-size step of the NumPy path (NCHW, channel axis 1)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5
    dy = rng.standard_normal(shape, dtype=np.float32)
    n, c = shape[:2]
    m = x.size // c
    axes = (0, *range(2, x.ndim))
    x3 = x.reshape(n, c, -1)
    dy3 = dy.reshape(n, c, -1)
    mean = x.mean(axis=axes)
    bshape = (1, c) + (1,) * (x.ndim - 2)
    mean_b = mean.reshape(bshape)
    centered = x - mean_b
    c3 = centered.reshape(n, c, -1)
    rstd = (1 / np.sqrt(centered.var(axis=axes) + EPS)).astype(np.float32)
    scale_b = (rstd * 1.5).reshape(bshape)
    offset_b = np.full(bshape, 0.25, np.float32)
    xp = array_api_compat.array_namespace(x)

    def affine_inplace() -> Any:
        y = centered * scale_b
        y += offset_b
        return y

    groups: dict[str, Group] = {
        "mean over (0,2,3) [batch_moments pass 1]": {
            "np.mean(x, axis=(0,2,3)) [core]": lambda: np.mean(x, axis=axes),
            "x.reshape(N,C,HW).sum(2).sum(0)/m": lambda: x3.sum(axis=2).sum(axis=0) / m,
            "np.einsum('ncl->c')/m": lambda: np.einsum("ncl->c", x3) / m,
            "x.reshape(N,C,HW).sum(axis=(0,2))/m": lambda: x3.sum(axis=(0, 2)) / m,
        },
        "sum of squared deviations [batch_moments pass 2]": {
            "np.mean(c*c, axis=(0,2,3)) [core]": lambda: np.mean(centered * centered, axis=axes),
            "np.einsum('ncl,ncl->c', c, c)/m": lambda: np.einsum("ncl,ncl->c", c3, c3) / m,
            "np.vecdot(c3, c3).sum(0)/m (no temporary)": lambda: np.vecdot(c3, c3).sum(0) / m,
        },
        "batch moments, whole step (mean, centered, var)": {
            "core: mean; x-mean; mean(c*c)": lambda: (
                lambda mu: (lambda cen: (mu, np.mean(cen * cen, axis=axes), cen))(
                    x - mu.reshape(bshape)
                )
            )(np.mean(x, axis=axes)),
            "reshape-sum mean; x-mean; vecdot": lambda: (
                lambda mu: (
                    lambda cen: (
                        mu,
                        np.vecdot(cen.reshape(n, c, -1), cen.reshape(n, c, -1)).sum(0) / m,
                        cen,
                    )
                )(x - mu.reshape(bshape))
            )(x3.sum(axis=2).sum(axis=0) / m),
        },
        "affine: centered*scale + offset": {
            "c*scale + offset (2 temporaries) [core]": lambda: centered * scale_b + offset_b,
            "y = c*scale; y += offset (in place)": affine_inplace,
        },
        "final cast to the input dtype (same dtype)": {
            "xp.astype(y, float32) [core, copies]": lambda: xp.astype(centered, xp.float32),
            "xp.astype(y, float32, copy=False)": lambda: xp.astype(
                centered, xp.float32, copy=False
            ),
        },
        "backward, whole step (BN, gamma given)": {
            "core normalize_backward": lambda: _core_backward_np(dy, x, mean, rstd, m),
            "fused: centered once, vecdot, in-place": lambda: _fused_backward_np(
                dy, x, mean, rstd, m
            ),
        },
        "sum(dy*xhat) [backward]": {
            "sum(dy*((x-mean)*rstd)) [core]": lambda: np.sum(
                dy * ((x - mean_b) * rstd.reshape(bshape)), axis=axes
            ),
            "rstd*vecdot(dy3, c3).sum(0) (centered kept)": lambda: rstd * np.vecdot(dy3, c3).sum(0),
        },
    }
    return groups


def _core_backward_np(
    dy: np.ndarray, x: np.ndarray, mean: np.ndarray, rstd: np.ndarray, m: int
) -> np.ndarray:
    from mbn_ref import _kernels

    xp = array_api_compat.array_namespace(x)
    gamma = np.full_like(mean, 1.5)
    axes = (0, *range(2, x.ndim))
    dx, _, _ = _kernels.normalize_backward(xp, dy, x, 1, axes, mean, rstd, gamma, 1.0, mean, m)
    return np.asarray(dx)


def _fused_backward_np(
    dy: np.ndarray, x: np.ndarray, mean: np.ndarray, rstd: np.ndarray, m: int
) -> np.ndarray:
    """Same dx as the core (BN, w=1, mean = mu_B) with 1 temporary besides dx.

    ``dx = scale*dy - k1*xhat - k0`` with ``xhat = (x - mean)*rstd`` is
    ``A*dy + B*(x - mean) + D`` per channel: ``A = scale``, ``B = -k1*rstd``, ``D = -k0``.
    """
    n, c = x.shape[:2]
    bshape = (1, c) + (1,) * (x.ndim - 2)
    gamma = np.full_like(mean, 1.5)
    scale = gamma * rstd
    dx = x - mean.reshape(bshape)  # the one full-size allocation besides dy*A
    sum_dy = dy.reshape(n, c, -1).sum(axis=2).sum(axis=0)
    sum_dy_xhat = rstd * np.vecdot(dy.reshape(n, c, -1), dx.reshape(n, c, -1)).sum(axis=0)
    coef = scale / m
    k1 = coef * sum_dy_xhat
    k0 = coef * sum_dy  # (mean - mu_B) = 0 in BN
    dx *= (-k1 * rstd).reshape(bshape)
    dx += dy * scale.reshape(bshape)
    dx -= k0.reshape(bshape)
    return np.asarray(dx)


# ---------------------------------------------------------------- experiments (torch)


def torch_groups(shape: tuple[int, ...]) -> dict[str, Group]:
    import array_api_compat.torch as cxp
    import torch

    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5)
    tiny = torch.ones((2, 3, 1, 1))
    c = shape[1]
    axes = (0, *range(2, t.ndim))
    bshape = (1, c) + (1,) * (t.ndim - 2)
    mean = t.mean(dim=axes)
    centered = t - mean.reshape(bshape)
    w = torch.full((c,), 1.5)
    b = torch.full((c,), 0.25)
    rstd = torch.rsqrt(centered.var(dim=axes, unbiased=False) + EPS)
    scale_b = (w * rstd).reshape(bshape)
    off_b = b.reshape(bshape)
    g = torch.from_numpy(np.ones(c, np.float32))

    def two_pass_compat() -> Any:
        mu = cxp.mean(t, axis=axes)
        cen = t - cxp.reshape(mu, bshape)
        return mu, cxp.mean(cen * cen, axis=axes), cen

    def two_pass_raw() -> Any:
        mu = torch.mean(t, dim=axes)
        cen = t - mu.reshape(bshape)
        return mu, torch.mean(cen * cen, dim=axes), cen

    def var_mean_then_center() -> Any:
        var, mu = torch.var_mean(t, dim=axes, correction=0)
        return mu, var, t - mu.reshape(bshape)

    def affine_inplace() -> Any:
        y = centered * scale_b
        y += off_b
        return y

    return {
        "torch batch moments (mean, var, centered)": {
            "core two-pass via array-api-compat [core]": two_pass_compat,
            "same two-pass, raw torch calls": two_pass_raw,
            "torch.var_mean(correction=0) + x-mean": var_mean_then_center,
        },
        "torch affine: centered*scale + offset": {
            "c*scale + offset [core]": lambda: centered * scale_b + off_b,
            "in place +=": affine_inplace,
            "torch.addcmul(off, c, scale)": lambda: torch.addcmul(off_b, centered, scale_b),
        },
        "torch final cast (same dtype)": {
            "astype(y, float32) [core, copies]": lambda: cxp.astype(centered, torch.float32),
            "astype(..., copy=False)": lambda: cxp.astype(centered, torch.float32, copy=False),
        },
        "torch whole BN forward, for scale": {
            "mr.bn_forward on tensors [core]": lambda: mr.bn_forward(t, None, w, b, eps=EPS),
            "torch.nn.functional.batch_norm(training=True)": lambda: torch.nn.functional.batch_norm(
                t, None, None, w, b, True, 0.1, EPS
            ),
        },
        "compat wrapper per-call overhead (tiny 2x3x1x1 tensor)": {
            "array_api_compat.torch.mean(axis=(0,2,3))": lambda: cxp.mean(tiny, axis=(0, 2, 3)),
            "torch.mean(dim=(0,2,3))": lambda: torch.mean(tiny, dim=(0, 2, 3)),
            "array_namespace(x, gamma, beta)": lambda: array_api_compat.array_namespace(tiny, g, g),
        },
    }


# ---------------------------------------------------------------- running the experiments


def _np_of(a: Any) -> Any:
    if isinstance(a, tuple):
        return tuple(_np_of(v) for v in a if v is not None and not isinstance(v, (dict,)))
    if isinstance(a, types.ModuleType):
        return None
    if hasattr(a, "detach"):
        return a.detach().numpy()
    return a


def _agree(a: Any, b: Any) -> bool:
    a, b = _np_of(a), _np_of(b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_agree(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=1e-4))
    return True  # mixed result kinds (e.g. whole-forward tuples): not compared


def run_groups(
    groups: dict[str, Group], *, rounds: int, min_sample_s: float, check: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for title, group in groups.items():
        names = list(group)
        results = {k: f() for k, f in group.items()}
        agrees = {k: _agree(results[names[0]], results[k]) for k in names} if check else {}
        timings = time_interleaved(group, rounds=rounds, warmup=2, min_sample_s=min_sample_s)
        base = timings[names[0]]
        out[title] = {
            k: {
                "median_ms": timings[k].median_s * 1e3,
                "ratio_to_first": paired_ratio(timings[k], base)["median"],
                "iqr_rel": timings[k].iqr_rel,
                "agrees_with_first": agrees.get(k),
            }
            for k in names
        }
        print(f"\n{title}", file=sys.stderr)
        for k, v in out[title].items():
            print(
                f"  {v['median_ms']:9.4f} ms  x{v['ratio_to_first']:5.2f}  {k}"
                f"{'' if v['agrees_with_first'] in (True, None) else '  (DISAGREES)'}",
                file=sys.stderr,
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from bench_core import parse_shape  # type: ignore[import-not-found]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(32, 64, 32, 32))
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 11, quick 1)")
    p.add_argument("--calls", type=int, default=None, help="profiled calls (default 20)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--torch-threads", type=int, default=None)
    args = p.parse_args(argv)
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    shape = (4, 8, 4, 4) if args.quick and args.shape == (32, 64, 32, 32) else args.shape
    rounds = args.repeats or (1 if args.quick else 11)
    calls = args.calls or (2 if args.quick else 20)
    min_sample_s = 0.0 if args.quick else 0.05
    header = environment_header(
        ["numpy", "torch", "array_api_compat", "mbn_ref"],
        {"shape": list(shape), "rounds": rounds, "calls": calls},
        str(REPO),
    )
    header["mbn_ref_file"] = mr.__file__
    print(f"profiling {shape}; torch threads {torch.get_num_threads()}", file=sys.stderr)
    prof = profile_paths(shape, calls, args.top)
    for key, v in prof.items():
        print(
            f"{key:22s} {v['total_ms_per_step']:8.3f} ms/step (profiled), "
            f"{v['function_calls_per_step']:.0f} Python calls, "
            f"{v['array_api_compat_calls_per_step']:.0f} in array-api-compat",
            file=sys.stderr,
        )
        for r in v["top"][:6]:
            print(
                f"    {r['tottime_ms_per_step']:8.3f} ms  x{r['ncalls_per_step']:.0f}  "
                f"{r['function']}",
                file=sys.stderr,
            )
    experiments = run_groups(
        {**numpy_groups(shape), **torch_groups(shape)}, rounds=rounds, min_sample_s=min_sample_s
    )
    report = {"schema": SCHEMA, "header": header, "profile": prof, "experiments": experiments}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nJSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
