"""Interleaved, repeated timing of several contenders, and the environment header.

Shared by ``bench_core.py`` and ``profile_core.py`` (scripts in this folder, run as
``python benchmarks/<script>.py``; the folder is on ``sys.path`` then, so they import this
module by its bare name).

Method (also in ``benchmarks/README.md``):

1. **Warm up**: every contender runs ``warmup`` times before anything is timed (allocator
   caches, lazy imports, torch's thread pool, NumPy's dispatch caches).
2. **Calibrate**: each contender gets its own loop count ``loops`` so that one sample (a
   timed loop of ``loops`` calls) lasts at least ``min_sample_s``; a sample's time divided by
   ``loops`` is one per-call time. Short calls are thus not dominated by the timer.
3. **Rounds, interleaved**: ``rounds`` rounds; in each round every contender takes one sample,
   in a freshly shuffled (seeded) order. Load from other processes then hits every contender
   alike instead of whichever happened to run during a burst.
4. **Medians**: a contender's time is the median of its per-round times; a ratio ``A / B`` is
   the median over rounds of the *paired* per-round ratios (A and B sampled in the same round,
   seconds apart), which cancels slow drifts in machine load better than a ratio of medians.

The garbage collector is disabled while a sample runs, as :mod:`timeit` does.

5. **A steady allocator** (:func:`steady_malloc`): the scripts re-execute themselves with
   glibc's malloc told never to return freed memory to the kernel, so that a step's large
   buffers are not mapped afresh (and page-faulted in) on some steps and reused on others,
   depending on each contender's order of allocations.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    """Per-call times (seconds) of one contender, one entry per round."""

    loops: int
    rounds_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.rounds_s)

    @property
    def min_s(self) -> float:
        return min(self.rounds_s)

    @property
    def iqr_rel(self) -> float:
        """Interquartile range over the median: the spread between rounds (0 = perfectly steady)."""
        if len(self.rounds_s) < 4:
            return 0.0
        q = statistics.quantiles(self.rounds_s, n=4)
        return (q[2] - q[0]) / self.median_s

    def as_json(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "iqr_rel": self.iqr_rel,
            "loops": self.loops,
            "rounds_ms": [t * 1e3 for t in self.rounds_s],
        }


def _sample(fn: Callable[[], Any], loops: int) -> float:
    """Per-call seconds of ``loops`` back-to-back calls, GC off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        return (time.perf_counter() - t0) / loops
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(fn: Callable[[], Any], min_sample_s: float, max_loops: int = 10_000) -> int:
    """Smallest loop count (1, 2, 5, 10, 20, ...) whose sample lasts ``min_sample_s``."""
    if min_sample_s <= 0:
        return 1
    loops = 1
    steps = (1, 2, 5)
    decade = 1
    i = 0
    while loops < max_loops:
        if _sample(fn, loops) * loops >= min_sample_s:
            return loops
        i += 1
        if i == len(steps):
            i, decade = 0, decade * 10
        loops = steps[i] * decade
    return max_loops


def time_interleaved(
    contenders: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    seed: int = 0,
) -> dict[str, Timing]:
    """Time every contender ``rounds`` times, shuffling the order in each round (see module doc)."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    timings = {name: Timing(_calibrate(contenders[name], min_sample_s)) for name in names}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            timings[name].rounds_s.append(_sample(contenders[name], timings[name].loops))
    return timings


def paired_ratio(num: Timing, den: Timing) -> dict[str, Any]:
    """Median over rounds of ``num/den`` sampled in the same round (see module doc)."""
    per_round = [a / b for a, b in zip(num.rounds_s, den.rounds_s, strict=True)]
    return {
        "median": statistics.median(per_round),
        "of_medians": num.median_s / den.median_s,
        "per_round": per_round,
    }


def is_positive_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# ---------------------------------------------------------------- environment header


_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def numpy_blas_info() -> dict[str, Any]:
    """NumPy's BLAS and its threads: threadpoolctl when installed, else ``np.show_config``."""
    import numpy as np

    info: dict[str, Any] = {"source": None}
    try:
        from threadpoolctl import threadpool_info  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        info["source"] = "threadpoolctl"
        info["threadpools"] = [
            {
                k: p.get(k)
                for k in (
                    "user_api",
                    "internal_api",
                    "num_threads",
                    "version",
                    "threading_layer",
                    "architecture",
                    "prefix",
                )
            }
            for p in threadpool_info()
        ]
        return info
    try:
        cfg = np.show_config(mode="dicts")
    except TypeError:  # NumPy < 1.26 has no mode=
        cfg = None
    if isinstance(cfg, dict):
        deps = cfg.get("Build Dependencies", {})
        info["source"] = "numpy.show_config"
        info["blas"] = deps.get("blas")
        info["lapack"] = deps.get("lapack")
        simd = cfg.get("SIMD Extensions", {})
        info["simd_found"] = simd.get("found")
        info["num_threads"] = "not reported (install threadpoolctl for the live count)"
    return info


def _git_commit(repo: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_busy(threshold: float = 0.5) -> bool | None:
    """Whether the 1-minute load average exceeds ``threshold`` per CPU (numbers then noisy)."""
    load = load_average()
    cpus = os.cpu_count()
    if load is None or not cpus:
        return None
    return load[0] > threshold * cpus


MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
"""Buffers up to 1 GiB from the heap, not ``mmap``; freed memory kept unless 4 GiB are free.

glibc's defaults serve a large buffer with a fresh ``mmap`` until one is freed, then raise
the thresholds; the heap's top is trimmed back to the kernel when enough is free. Whether a
training step's 1-8 MiB activations and gradients then come from reused pages or from new
ones that fault in page by page (up to 2,000 faults, 1-2 ms, per step measured at
``32x64x32x32``) depends on the order in which a contender allocates and frees, not on
its arithmetic: two contenders doing the same work differed by 1.3x. Fixing the thresholds
is what PyTorch's CPU performance guide achieves with jemalloc or tcmalloc.
"""


def uses_glibc_malloc() -> bool:
    """Linux with glibc: where :data:`MALLOC_TUNABLES` applies."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def steady_malloc(argv: Sequence[str]) -> None:
    """Re-execute this script under :data:`MALLOC_TUNABLES`, unless asked not to.

    Does nothing with ``--default-malloc`` in ``argv``, off Linux's glibc, or when
    ``GLIBC_TUNABLES`` already sets the malloc thresholds (the re-executed process).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        "--default-malloc" in argv
        or "glibc.malloc.mmap_threshold" in tunables
        or not uses_glibc_malloc()
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, MALLOC_TUNABLES) if t))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def environment_header(
    modules: Sequence[str], settings: Mapping[str, Any], repo: str
) -> dict[str, Any]:
    """Versions, threads and machine facts that a reader needs to judge the numbers."""
    import importlib

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in modules:
        try:
            versions[name] = str(importlib.import_module(name).__version__)
        except Exception:  # a missing or broken optional contender
            versions[name] = None
    header: dict[str, Any] = {
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions,
        "git_commit": _git_commit(repo),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy_blas": numpy_blas_info(),
        "thread_env": {k: os.environ.get(k) for k in _THREAD_ENV},
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "load_average_start": load_average(),
        "busy_at_start": machine_busy(),
        "settings": dict(settings),
        "executable": sys.executable,
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        header["torch_num_threads"] = torch.get_num_threads()
        header["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return header
