"""``mbn_torch.distributed`` on real ``torch.distributed`` process groups (gloo, loopback).

Each world size (2 and 3 processes) is spawned once and runs every scenario; the ranks send
their outputs, input gradients, all-reduced weight/bias gradients and module state back to
this process, which checks them against the single-process core (``mbn_ref.mbn_forward`` /
``mbn_ref.backward`` on the concatenated batch, float64, 1e-12):

- synchronized MBN (``lam > 0``, changed between steps) and BN (``lam = 0``, cumulative
  average), unequal per-rank batches, empty per-rank batches (``[3, 0, 5]``), a step where
  every rank is empty, per-rank batches of one sample, no running statistics, a subgroup
  (``process_group``);
- a global batch of one value per channel, NaN on one rank: every rank raises or skips;
- float32 statistics for bfloat16 inputs under ``torch.autocast``;
- per-device MBN and ``merge_inference_statistics`` against the core's merge, and its bad
  input raising on every rank with nothing changed; DDP's buffer copy with and without
  ``forward_sync_buffers``;
- DDP over a small CNN with synchronized MBN (gradients as one process's);
- ``torch.compile`` of the collective (fullgraph) and of the module (2 processes);
- the DDP example ``examples/torch_ddp/train.py --nproc 2``, per-device and synchronized.

A world that does not finish within ``TIMEOUT_S`` is killed and fails its tests.
"""

from __future__ import annotations

import copy
import datetime
import doctest
import os
import re
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mbn_ref as mr

torch = pytest.importorskip("torch")
import array_api_compat.torch as txp  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import mbn_torch  # noqa: E402
import mbn_torch.distributed  # noqa: E402
from mbn_torch import MomentumBatchNorm2d, convert_to_mbn  # noqa: E402
from mbn_torch.distributed import (  # noqa: E402
    SyncMomentumBatchNorm,
    merge_inference_statistics,
    process_group_sum,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120.0
"""Seconds a spawned world may take in all (it takes a few)."""
C = 3
EPS = 1e-5
TOL = {"atol": 1e-12, "rtol": 1e-12}

# -- the scenarios: shared by the ranks (which run them) and this process (which checks) ----

# per step: lam, and each rank's batch size; "shape": the dims after the channel
SYNC_CASES: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "sync_mbn": {
            "shape": (2, 3),
            "lams": [0.5, 0.5, 0.9, 0.0, 0.7],
            "momentum": 0.1,
            "sizes": [[3, 5], [1, 2], [0, 4], [0, 0], [2, 0]],
            "track": True,
        },
        "sync_bn": {
            "shape": (),
            "lams": [0.0, 0.0, 0.0],
            "momentum": None,
            "sizes": [[1, 1], [3, 2], [0, 5]],
            "track": True,
        },
        "sync_no_stats": {
            "shape": (4,),
            "lams": [0.0, 0.0],
            "momentum": 0.1,
            "sizes": [[2, 3], [0, 1]],
            "track": False,
        },
    },
    3: {
        "sync_mbn": {
            "shape": (2, 3),
            "lams": [0.5, 0.9, 0.9, 0.0, 0.7],
            "momentum": 0.1,
            "sizes": [[3, 0, 5], [1, 1, 1], [0, 0, 2], [0, 0, 0], [2, 3, 0]],
            "track": True,
        },
        "sync_bn": {
            "shape": (),
            "lams": [0.0, 0.0, 0.0],
            "momentum": None,
            "sizes": [[1, 1, 1], [3, 0, 5], [0, 2, 0]],
            "track": True,
        },
        "sync_no_stats": {
            "shape": (4,),
            "lams": [0.0, 0.0],
            "momentum": 0.1,
            "sizes": [[2, 0, 3], [1, 1, 0]],
            "track": False,
        },
    },
}
BF16_SIZES = {2: [2, 3], 3: [2, 0, 3]}
PER_DEVICE_SIZES = {2: [2, 3], 3: [2, 3, 1]}  # per-rank batch sizes, also the merge weights
PER_DEVICE_STEPS = 3
DDP_SIZES = {2: [[3, 5], [1, 2]], 3: [[3, 0, 5], [1, 1, 2]]}
COMPILE_SIZES = [2, 3]  # world 2 only


def _rng(*key: Any) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in key])


def _bounds(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _affine(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(name, "affine")
    return rng.uniform(0.5, 1.5, size=C), rng.normal(size=C)


def _sync_data(name: str, case: dict[str, Any], step: int) -> tuple[np.ndarray, np.ndarray]:
    """The step's whole batch (all ranks' parts, concatenated) and its output gradient."""
    shape = (sum(case["sizes"][step]), C, *case["shape"])
    rng = _rng(name, step)
    return rng.normal(1.0 + step, 2.0, size=shape), rng.normal(size=shape)


def _per_device_data(rank: int, step: int, size: int) -> np.ndarray:
    return _rng("per_device", rank, step).normal(rank - 1.0, 1.0 + rank, size=(size, C, 2, 3))


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    ).double()


def _ddp_data(step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng("ddp", step)
    return rng.normal(0.5, 1.5, size=(n, 2, 3, 3)), rng.normal(size=(n, 2))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    names = mr.MBNState._fields if hasattr(module, "moving_mean") else mr.BNState._fields
    return {k: getattr(module, k).detach().clone() for k in names}


def _summed(*tensors: torch.Tensor) -> torch.Tensor:
    """The tensors' sum over the ranks (what DDP's gradient reduction gives, times W)."""
    total = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(total)
    return total


# -- what each rank runs ------------------------------------------------------------------


def _run_sync(rank: int, world: int, name: str) -> list[dict[str, Any]]:
    case = SYNC_CASES[world][name]
    gamma, beta = _affine(name)
    m = SyncMomentumBatchNorm(
        C, momentum=case["momentum"], track_running_stats=case["track"], dtype=torch.float64
    )
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
    steps = []
    for step, lam in enumerate(case["lams"]):
        x_all, dy_all = _sync_data(name, case, step)
        part = _bounds(case["sizes"][step], rank)
        m.lam.fill_(lam)
        x = torch.from_numpy(x_all[part]).requires_grad_()
        y = m(x)
        (y * torch.from_numpy(dy_all[part])).sum().backward()
        steps.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "dparams": _summed(m.weight.grad, m.bias.grad),
                "state": _state(m) if case["track"] else {},
            }
        )
        m.zero_grad()
    return steps


def _run_bf16(rank: int, world: int) -> dict[str, Any]:
    sizes = BF16_SIZES[world]
    x_all, dy_all = _sync_data("bf16", {"sizes": [sizes], "shape": (2, 3)}, 0)
    gamma, beta = _affine("bf16")
    m = SyncMomentumBatchNorm(C, lam=0.5)  # float32 parameters and statistics
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
    part = _bounds(sizes, rank)
    x = torch.from_numpy(x_all[part]).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    (y * torch.from_numpy(dy_all[part]).to(torch.bfloat16)).sum().backward()
    return {
        "y_dtype": str(y.dtype),
        "y": y.detach().float(),
        "dx": x.grad.float(),
        "dparams": _summed(m.weight.grad, m.bias.grad),
        "state": _state(m),
    }


def _per_device_model() -> nn.Module:
    return nn.Sequential(
        MomentumBatchNorm2d(C, lam=0.5, dtype=torch.float64), nn.BatchNorm2d(C).double()
    )


def _states(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [_state(model[0]), _state(model[1])]


def _run_per_device(rank: int, world: int) -> dict[str, Any]:
    size = PER_DEVICE_SIZES[world][rank]
    model = _per_device_model()
    with torch.no_grad():
        for step in range(PER_DEVICE_STEPS):
            model(torch.from_numpy(_per_device_data(rank, step, size)))
    before = _states(model)
    merged = merge_inference_statistics(model, weight=size)
    after = _states(model)
    x_eval = torch.from_numpy(_rng("per_device_eval").normal(size=(4, C, 2, 3)))
    with torch.no_grad():
        y_eval = model.eval()(x_eval)
    model.train()
    errors = []
    # bad input on one rank: every rank raises, nothing changes
    for kwargs in ({"weight": -1.0 if rank == 1 else 1.0}, {"weight": 0.0}):
        try:
            merge_inference_statistics(model, **kwargs)
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    try:  # a different architecture on rank 0
        merge_inference_statistics(model if rank else model[0])
        errors.append("no error")
    except ValueError as exc:
        errors.append(str(exc))
    unchanged = all(
        torch.equal(a[k], b[k]) for a, b in zip(_states(model), after, strict=True) for k in a
    )
    return {
        "merged_nothing": merge_inference_statistics(nn.Linear(2, 2)),
        "merged": merged,
        "before": before,
        "after": after,
        "y_eval": y_eval,
        "errors": errors,
        "unchanged": unchanged,
    }


def _run_ddp_buffers(rank: int, world: int) -> dict[str, Any]:
    """Per-device MBN under DDP, with and without DDP's buffer copy before each forward."""
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for sync_buffers in (True, False):
        model = nn.Sequential(MomentumBatchNorm2d(C, lam=0.5, dtype=torch.float64))
        ddp = DistributedDataParallel(model, forward_sync_buffers=sync_buffers)
        for step in range(2):
            ddp(torch.from_numpy(_per_device_data(rank, step, 2))).sum().backward()
        out[f"forward_sync_buffers={sync_buffers}"] = _state(model[0])
    return out


def _run_ddp(rank: int, world: int) -> list[dict[str, Any]]:
    from torch.nn.parallel import DistributedDataParallel

    model = convert_to_mbn(nn.SyncBatchNorm.convert_sync_batchnorm(_ddp_model()), lam=0.5)
    assert type(model[1]) is SyncMomentumBatchNorm
    ddp = DistributedDataParallel(model)  # buffers synchronized: equal anyway
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    steps = []
    for step, sizes in enumerate(DDP_SIZES[world]):
        x_all, w_all = _ddp_data(step, sum(sizes))
        part = _bounds(sizes, rank)
        out = ddp(torch.from_numpy(x_all[part]))
        # DDP averages the ranks' gradients: W times this rank's part of the loss makes
        # the average the gradient of the whole batch's loss
        (out * torch.from_numpy(w_all[part])).sum().mul(world).backward()
        steps.append(
            {
                "out": out.detach(),
                "grads": [p.grad.clone() for p in model.parameters()],
                "state": _state(model[1]),
            }
        )
        opt.step()
        opt.zero_grad()
    return steps


SUBGROUP = [0, 2]  # world 3: ranks 0 and 2 synchronize, rank 1 is outside the group
SUBGROUP_CASE = {"shape": (2,), "sizes": [[2, 3, 4], [0, 1, 5]]}


def _run_subgroup(rank: int, world: int) -> list[dict[str, Any]]:
    group = dist.new_group(SUBGROUP)  # every rank takes part in creating it
    m = SyncMomentumBatchNorm(C, lam=0.5, process_group=group, dtype=torch.float64)
    steps = []
    for step in range(len(SUBGROUP_CASE["sizes"])):
        x_all, dy_all = _sync_data("subgroup", SUBGROUP_CASE, step)
        x = torch.from_numpy(x_all[_bounds(SUBGROUP_CASE["sizes"][step], rank)]).requires_grad_()
        y = m(x)
        (y * torch.from_numpy(dy_all[_bounds(SUBGROUP_CASE["sizes"][step], rank)])).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad, "state": _state(m)})
    return steps


def _run_bad_input(rank: int, world: int) -> dict[str, Any]:
    """Input that is bad only globally: every rank must raise (none left waiting)."""
    errors, unchanged = {}, {}
    # one value per channel in the global batch (rank 0's single sample, the others empty)
    one = torch.randn(1 if rank == 0 else 0, C, dtype=torch.float64)
    # NaN on the last rank only: the global statistics are NaN on every rank
    bad = torch.ones(2, C, dtype=torch.float64).cumsum(0)
    if rank == world - 1:
        bad[0, 0] = float("nan")
    cases = {
        "one_value_lam0": (SyncMomentumBatchNorm(C, dtype=torch.float64), one),
        "one_value_lam_positive": (SyncMomentumBatchNorm(C, lam=0.5, dtype=torch.float64), one),
        "one_value_no_stats": (
            SyncMomentumBatchNorm(C, track_running_stats=False, dtype=torch.float64),
            one,
        ),
        "nan_raise": (SyncMomentumBatchNorm(C, nonfinite="raise", dtype=torch.float64), bad),
    }
    for key, (m, x) in cases.items():
        before = {k: v.clone() for k, v in m.state_dict().items()}
        try:
            m(x)
            errors[key] = "no error"
        except ValueError as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
        unchanged[key] = all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    skip = SyncMomentumBatchNorm(C, lam=0.5, nonfinite="skip_update", dtype=torch.float64)
    before = {k: v.clone() for k, v in skip.state_dict().items()}
    y = skip(bad)
    unchanged["nan_skip_update"] = all(
        torch.equal(v, skip.state_dict()[k]) for k, v in before.items()
    )
    nan_channels = y.isnan().all(dim=0).tolist()
    return {"errors": errors, "unchanged": unchanged, "skip_nan_channels": nan_channels}


def _run_compile(rank: int, world: int) -> dict[str, Any]:
    torch._dynamo.reset()
    summed = torch.compile(process_group_sum(), fullgraph=True, backend="aot_eager")
    total = summed(torch.arange(3.0, dtype=torch.float64) + 10 * rank)
    eager = SyncMomentumBatchNorm(C, lam=0.5, dtype=torch.float64)
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    diffs = []
    for step in range(2):
        x_all, dy_all = _sync_data("compile", {"sizes": [COMPILE_SIZES] * 2, "shape": (2, 3)}, step)
        part = _bounds(COMPILE_SIZES, rank)
        grads = []
        outs = []
        for module in (eager, compiled):
            x = torch.from_numpy(x_all[part]).requires_grad_()
            y = module(x)
            (y * torch.from_numpy(dy_all[part])).sum().backward()
            outs.append(y.detach())
            grads.append(x.grad)
        a, b = _state(eager), _state(compiled._orig_mod)
        diffs.append(
            max(
                float((outs[0] - outs[1]).abs().max()),
                float((grads[0] - grads[1]).abs().max()),
                max(float((a[k] - b[k]).abs().max()) for k in a),
            )
        )
    torch._dynamo.reset()
    return {"total": total, "diffs": diffs}


def _scenarios(world: int) -> list[str]:
    names = [*SYNC_CASES[world], "bad_input", "bf16", "per_device", "ddp", "ddp_buffers"]
    return [*names, "compile"] if world == 2 else [*names, "subgroup"]


def _worker(rank: int, world: int, store_port: int, out_dir: str) -> None:
    """One rank: every scenario in order; the results (or a traceback) go to a file."""
    results: dict[str, Any] = {}
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S / 2)
    try:
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        for name in _scenarios(world):
            try:
                if name in SYNC_CASES[world]:
                    results[name] = _run_sync(rank, world, name)
                else:
                    results[name] = globals()[f"_run_{name}"](rank, world)
            except Exception:
                # the ranks' collectives may no longer pair up: stop here
                results[name] = {"error": traceback.format_exc()}
                break
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


class World:
    """The results of one spawned world: ``result(name)`` is each rank's, in rank order."""

    def __init__(self, size: int, results: list[dict[str, Any]]) -> None:
        self.size = size
        self.results = results

    def result(self, name: str) -> list[Any]:
        out = []
        for rank, res in enumerate(self.results):
            got = res.get(name)
            if got is None:
                pytest.fail(f"rank {rank} did not run {name!r} (an earlier scenario failed)")
            if isinstance(got, dict) and "error" in got:
                pytest.fail(f"rank {rank} failed in {name!r}:\n{got['error']}")
            out.append(got)
        return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    """Spawn ``W`` gloo processes once; kill them after ``TIMEOUT_S``."""
    size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{size}")
    # the rendezvous store: here, on a free port of 127.0.0.1, outliving every rank
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )  # fmt: skip
    context = torch.multiprocessing.start_processes(
        _worker,
        args=(size, store.port, str(out_dir)),
        nprocs=size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {size}-process world did not finish within {TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
            p.join()
        del store
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(size)]
    return World(size, results)


# -- checks ------------------------------------------------------------------------------


def _close(actual: Any, expected: Any, what: str, **tol: float) -> None:
    expected = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected)
    actual = torch.as_tensor(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), msg=what, **(tol or TOL)
    )


def _reference_sync(name: str, case: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The core on the concatenated batch: ``(y, dx, dgamma, dbeta, state)`` per step."""
    gamma, beta = _affine(name)
    tau = None if case["momentum"] is None else 1.0 - case["momentum"]
    state = mr.init_state(C)
    out = []
    for step, lam in enumerate(case["lams"]):
        x, dy = _sync_data(name, case, step)
        if case["track"]:
            y, state, ctx = mr.mbn_forward(
                x, state, gamma, beta, lam=lam, tau=tau, eps=EPS, estimator="unbiased"
            )
        else:
            y, _, ctx = mr.bn_forward(x, None, gamma, beta, eps=EPS)
        dx, dgamma, dbeta = mr.backward(dy, ctx)
        out.append((y, dx, dgamma, dbeta, state))
    return out


@pytest.mark.parametrize("name", ["sync_mbn", "sync_bn", "sync_no_stats"])
def test_sync_equals_one_process_on_the_concatenated_batch(world: World, name: str) -> None:
    """Outputs, input and parameter gradients, state: every rank, every step, 1e-12."""
    case = SYNC_CASES[world.size][name]
    reference = _reference_sync(name, case)
    for rank, steps in enumerate(world.result(name)):
        assert len(steps) == len(reference)
        for step, (got, (y, dx, dgamma, dbeta, state)) in enumerate(
            zip(steps, reference, strict=True)
        ):
            where = f"{name} rank {rank} step {step} sizes {case['sizes'][step]}"
            part = _bounds(case["sizes"][step], rank)
            _close(got["y"], y[part], f"{where}: y")
            _close(got["dx"], dx[part], f"{where}: dx")
            _close(got["dparams"], np.concatenate([dgamma, dbeta]), f"{where}: dweight, dbias")
            for k, v in got["state"].items():
                _close(v, getattr(state, k), f"{where}: {k}")
            if case["track"]:
                assert set(got["state"]) == set(mr.MBNState._fields)


def test_sync_state_after_an_all_empty_step_is_unchanged(world: World) -> None:
    """Every rank empty: empty output, zero gradients, no update (docs/spec.md §5)."""
    case = SYNC_CASES[world.size]["sync_mbn"]
    step = case["sizes"].index([0] * world.size)
    for steps in world.result("sync_mbn"):
        before, empty = steps[step - 1]["state"], steps[step]
        assert empty["y"].shape == (0, C, *case["shape"])
        assert float(empty["dparams"].abs().max()) == 0.0
        for k in before:
            assert torch.equal(empty["state"][k], before[k]), k


def test_sync_over_a_subgroup(world: World) -> None:
    """``process_group`` is honoured: ranks 0 and 2 share statistics, rank 1 keeps its own."""
    if world.size != 3:
        pytest.skip("a subgroup needs the 3-process world")
    results = world.result("subgroup")
    state = {tuple(SUBGROUP): mr.init_state(C), (1,): mr.init_state(C)}
    for step, sizes in enumerate(SUBGROUP_CASE["sizes"]):
        x_all, dy_all = _sync_data("subgroup", SUBGROUP_CASE, step)
        for ranks in state:
            parts = [_bounds(sizes, r) for r in ranks]
            x = np.concatenate([x_all[p] for p in parts])
            dy = np.concatenate([dy_all[p] for p in parts])
            y, state[ranks], ctx = mr.mbn_forward(
                x, state[ranks], lam=0.5, tau=0.9, eps=EPS, estimator="unbiased"
            )
            dx, _, _ = mr.backward(dy, ctx)
            start = 0
            for r in ranks:
                got, n = results[r][step], sizes[r]
                where = f"rank {r} step {step} (with ranks {ranks})"
                _close(got["y"], y[start : start + n], f"{where}: y")
                _close(got["dx"], dx[start : start + n], f"{where}: dx")
                for k, v in got["state"].items():
                    _close(v, getattr(state[ranks], k), f"{where}: {k}")
                start += n


def test_sync_bad_global_batch_raises_on_every_rank(world: World) -> None:
    """One value per channel over all ranks, NaN on one rank: every rank decides alike."""
    for rank, got in enumerate(world.result("bad_input")):
        errors = got["errors"]
        # the unbiased running variance needs 2 values (docs/spec.md §1.5, §3.5)
        assert "at least 2 values per channel, got 1" in errors["one_value_lam0"], errors
        assert "at least 2 values per channel, got 1" in errors["one_value_lam_positive"]
        assert "expected more than 1 value per channel" in errors["one_value_no_stats"]
        if rank > 0:  # where the local batch is empty, the message says why
            assert "in total over all shards" in errors["one_value_no_stats"]
        assert errors["nan_raise"].startswith("NonFiniteError: "), errors["nan_raise"]
        assert all(got["unchanged"].values()), (rank, got["unchanged"])
        # channel 0's global statistics are NaN on every rank, the others' are finite
        assert got["skip_nan_channels"] == [True, False, False], rank


def test_sync_half_precision_has_float32_statistics(world: World) -> None:
    sizes = BF16_SIZES[world.size]
    x_all, dy_all = _sync_data("bf16", {"sizes": [sizes], "shape": (2, 3)}, 0)
    gamma, beta = (torch.from_numpy(a).float() for a in _affine("bf16"))
    x = torch.from_numpy(x_all).to(torch.bfloat16)
    y, state, ctx = mr.mbn_forward(
        x, mr.init_state(C, xp=txp), gamma, beta, lam=0.5, tau=0.9, estimator="unbiased", xp=txp
    )
    dx, dgamma, dbeta = mr.backward(torch.from_numpy(dy_all).to(torch.bfloat16), ctx, xp=txp)
    half = {"atol": 1e-2, "rtol": 1e-2}  # bfloat16 outputs: 8 bits of mantissa
    for rank, got in enumerate(world.result("bf16")):
        part = _bounds(sizes, rank)
        assert got["y_dtype"] == "torch.bfloat16"
        _close(got["y"], y[part].float(), f"rank {rank}: y", **half)
        _close(got["dx"], dx[part].float(), f"rank {rank}: dx", **half)
        _close(got["dparams"], torch.cat([dgamma, dbeta]), f"rank {rank}: dparams", **half)
        for k, v in got["state"].items():
            assert v.dtype == torch.float32 if k != "num_batches_tracked" else torch.int64
            _close(v, getattr(state, k), f"rank {rank}: {k}", atol=1e-5, rtol=1e-5)


def _reference_per_device(world: World) -> list[tuple[mr.MBNState, mr.BNState]]:
    """The core's per-device trajectory of each rank (MBN, then BN on its output)."""
    out = []
    for rank, size in enumerate(PER_DEVICE_SIZES[world.size]):
        mbn, bn = mr.init_state(C), mr.init_bn_state(C)
        for step in range(PER_DEVICE_STEPS):
            x = _per_device_data(rank, step, size)
            y, mbn, _ = mr.mbn_forward(x, mbn, lam=0.5, tau=0.9, eps=EPS, estimator="unbiased")
            _, bn, _ = mr.bn_forward(y, bn, decay=0.9, eps=EPS, estimator="unbiased")
        out.append((mbn, bn))
    return out


def test_per_device_statistics_merge_like_the_core(world: World) -> None:
    """Each rank's own statistics before; the core's count-weighted merge on every rank after."""
    reference = _reference_per_device(world)
    counts = PER_DEVICE_SIZES[world.size]
    merged_mbn = mr.distributed.merge_inference_statistics([r[0] for r in reference], counts)
    merged_bn = mr.distributed.merge_inference_statistics(
        [mr.MBNState(*b[:2], *b) for _, b in reference], counts
    )
    results = world.result("per_device")
    for rank, got in enumerate(results):
        assert got["merged"] == 2 and got["merged_nothing"] == 0
        (mbn, bn), (own_mbn, own_bn) = got["before"], reference[rank]
        for k in mr.MBNState._fields:
            _close(mbn[k], getattr(own_mbn, k), f"rank {rank} before: MBN {k}")
            _close(got["after"][0][k], getattr(merged_mbn, k), f"rank {rank} after: MBN {k}")
        for k in mr.BNState._fields:
            _close(bn[k], getattr(own_bn, k), f"rank {rank} before: BN {k}")
            _close(got["after"][1][k], getattr(merged_bn, k), f"rank {rank} after: BN {k}")
        # one model after the merge: the same evaluation on every rank
        assert torch.equal(got["y_eval"], results[0]["y_eval"])
    # the ranks' statistics did differ before the merge
    assert not torch.equal(
        results[0]["before"][0]["running_var"], results[1]["before"][0]["running_var"]
    )


def test_ddp_buffer_copy_overwrites_per_device_statistics(world: World) -> None:
    """What docs/distributed.md says about DDP and per-device MBN, two steps of batch 2.

    With DDP's copy (the default) every rank starts each step from rank 0's statistics; with
    ``forward_sync_buffers=False`` each rank keeps its own trajectory.
    """

    def step(state: mr.MBNState, rank: int, i: int) -> mr.MBNState:
        x = _per_device_data(rank, i, 2)
        return mr.mbn_forward(x, state, lam=0.5, tau=0.9, eps=EPS, estimator="unbiased")[1]

    first = [step(mr.init_state(C), r, 0) for r in range(world.size)]
    for rank, got in enumerate(world.result("ddp_buffers")):
        own = step(first[rank], rank, 1)
        from_rank0 = step(first[0], rank, 1)
        for k in mr.MBNState._fields:
            _close(got["forward_sync_buffers=False"][k], getattr(own, k), f"rank {rank}: {k}")
            _close(got["forward_sync_buffers=True"][k], getattr(from_rank0, k), f"rank {rank}: {k}")
        if rank > 0:
            assert not torch.equal(
                got["forward_sync_buffers=True"]["running_mean"],
                got["forward_sync_buffers=False"]["running_mean"],
            )


def test_merge_bad_input_raises_on_every_rank_and_changes_nothing(world: World) -> None:
    for rank, got in enumerate(world.result("per_device")):
        bad_weight, zero_total, other_model = got["errors"]
        assert "weight must be a finite number >= 0" in bad_weight and "-1.0" in bad_weight
        assert "> 0 on some rank" in zero_total
        assert "models differ" in other_model and "rank 0: 1 modules" in other_model
        assert got["unchanged"], f"rank {rank}: a failed merge changed the statistics"


def test_ddp_with_sync_mbn_equals_one_process(world: World) -> None:
    """DDP over a CNN with SyncMomentumBatchNorm (converted from BatchNorm2d via
    SyncBatchNorm), unequal and empty per-rank batches, two SGD steps."""
    model = convert_to_mbn(_ddp_model(), lam=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = []
    for step, sizes in enumerate(DDP_SIZES[world.size]):
        x, w = _ddp_data(step, sum(sizes))
        out = model(torch.from_numpy(x))
        (out * torch.from_numpy(w)).sum().backward()
        reference.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        reference[-1] += (_state(model[1]),)
        opt.step()
        opt.zero_grad()
    for rank, steps in enumerate(world.result("ddp")):
        for step, (got, (out, grads, state)) in enumerate(zip(steps, reference, strict=True)):
            where = f"rank {rank} step {step}"
            _close(got["out"], out[_bounds(DDP_SIZES[world.size][step], rank)], f"{where}: out")
            for i, (g, r) in enumerate(zip(got["grads"], grads, strict=True)):
                _close(g, r, f"{where}: gradient of parameter {i}")
            for k, v in got["state"].items():
                _close(v, state[k], f"{where}: {k}")


def test_compiled_collective_and_module(world: World) -> None:
    if world.size != 2:
        pytest.skip("compiled in the 2-process world only (compiling costs seconds)")
    for rank, got in enumerate(world.result("compile")):
        # the functional collective traced with fullgraph=True: 0+10, 1+11, 2+12
        assert got["total"].tolist() == [10.0, 12.0, 14.0], rank
        # the compiled module, in one graph (the global count stays a tensor)
        assert max(got["diffs"]) <= 1e-12, (rank, got["diffs"])


# -- the DDP example -----------------------------------------------------------------------

EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+)  lam ([\d.]+)  train loss ([\d.]+)  test loss ([\d.]+)  "
    r"accuracy ([\d.]+)"
)


EXAMPLE_ARGS = ["--nproc", "2", "--epochs", "2", "--train-samples", "64", "--test-samples", "64"]


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Both modes of the example, started together (each spawns 2 gloo processes)."""
    runs = {}
    for mode in ("per_device", "sync"):
        out = tmp_path_factory.mktemp(f"example_{mode}")
        argv = [*EXAMPLE_ARGS, "--checkpoint", str(out / "ck.pt"), "--timeout", "60"]
        argv += ["--sync"] if mode == "sync" else []
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "torch_ddp" / "train.py"), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=out,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        runs[mode] = (proc, out / "ck.pt")
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("mode", ["per_device", "sync"])
def test_ddp_example_runs_and_its_checkpoint_reproduces_the_accuracy(
    example_runs: Any, mode: str
) -> None:
    proc, checkpoint = example_runs[mode]
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the example ({mode}) did not finish within {TIMEOUT_S} s")
    assert proc.returncode == 0, stderr[-4000:]
    epochs = [EPOCH_LINE.fullmatch(line) for line in stdout.splitlines()[:2]]
    assert all(epochs), stdout
    sync = mode == "sync"
    lams = [float(e[3]) for e in epochs]  # type: ignore[index]
    # Eq. 11: 0 in the first epoch, 1 - m/32 in the last (m: per device 2, global 4)
    assert lams == [0.0, 1 - (4 if sync else 2) / 32]
    losses = [float(e[4]) for e in epochs]  # type: ignore[index]
    assert losses[1] < losses[0]
    # the saved model evaluates to the accuracy rank 0 printed (merged statistics included)
    if str(ROOT) not in sys.path:  # `examples` is a package of the repository
        sys.path.insert(0, str(ROOT))
    from examples.torch_ddp import train

    model = train.to_mbn(train.make_model(), sync=sync)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    x, y = train.make_data(64, seed=2)
    with torch.no_grad():
        accuracy = float((model.eval()(x).argmax(1) == y).double().mean())
    assert accuracy == pytest.approx(float(epochs[-1][6]), abs=1e-4)  # type: ignore[index]
    steps = 64 // 2 // 2 * 2  # samples / ranks / batch size, times epochs
    assert int(model[1].num_batches_tracked) == steps


# -- without a process group ---------------------------------------------------------------


def test_doctests() -> None:
    result = doctest.testmod(mbn_torch.distributed, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_without_process_group_is_single_process_mbn() -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    sync = SyncMomentumBatchNorm(C, momentum=None, lam=0.5, dtype=torch.float64)
    plain = MomentumBatchNorm2d(C, momentum=None, lam=0.5, dtype=torch.float64)
    assert sync._all_sum() is None
    for _ in range(2):
        x = torch.randn(2, C, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(sync(x), plain(x), atol=0, rtol=0)
    for k, v in _state(plain).items():
        assert torch.equal(getattr(sync, k), v), k
    assert "process_group" not in repr(sync) and "lam=0.5" in repr(sync)


@pytest.mark.parametrize(
    "shape", [(4, C), (4, C, 2), (2, C, 2, 2), (2, C, 1, 2, 2), (2, C, 1, 1, 2, 2)]
)
def test_any_input_rank_from_two(shape: tuple[int, ...]) -> None:
    bn = SyncMomentumBatchNorm(C, track_running_stats=False)
    assert bn(torch.randn(shape)).shape == shape


def test_bad_input_raises() -> None:
    bn = SyncMomentumBatchNorm(C)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        bn(torch.randn(C))
    with pytest.raises(ValueError, match="3 channels"):
        bn(torch.randn(2, C + 1))
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel"):
        bn(torch.randn(1, C))  # no process group: this batch alone normalizes
    with pytest.raises(ValueError, match="lam"):
        SyncMomentumBatchNorm(C, lam=1.5)
    model = nn.Sequential(MomentumBatchNorm2d(C))
    for weight in (-1.0, 0.0, float("nan"), True, "2", torch.ones(2)):
        with pytest.raises(ValueError, match="weight must be a finite number > 0"):
            merge_inference_statistics(model, weight=weight)
    assert merge_inference_statistics(model, weight=torch.tensor(3)) == 1
    assert merge_inference_statistics(nn.Linear(2, 2)) == 0
