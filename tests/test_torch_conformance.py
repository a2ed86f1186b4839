"""``mbn_torch``'s conformance adapter and its entry point (``mbn-ref conformance --backend
torch``).

The whole suite (golden cases, synchronized ones included, refusals, the own-schedule checks
and the hypothesis properties) runs against the modules; each verdict is pinned: no failure,
no error, and exactly the declared skips and known failures. The two paths of the modules are
shown to run in passing checks: PyTorch's fused ``torch.batch_norm`` (``DynamicBatchNorm*d``,
``MomentumBatchNorm*d`` with ``lam = 0``) and the core's ``mbn_ref.mbn_forward`` (``lam > 0``,
synchronized statistics). Then the entry point: found by name without the suite importing
``mbn_torch``, through the CLI and the pytest plugin, with clear errors for unknown and broken
backends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch.overrides import TorchFunctionMode

import mbn_ref
from mbn_conformance import Setup, Step, checks
from mbn_conformance.loading import (
    ENTRY_POINT_GROUP,
    AdapterLoadError,
    backend_adapter,
    backend_names,
    backend_spec,
    registered_backends,
)
from mbn_ref.cli import main
from mbn_torch.conformance import KNOWN_FAILURES, Layer, TorchModulesAdapter, make

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SKIPS = {
    "mbn/NC/N1/float64/eps1e-05/lam0.5/init-random": (
        "unbiased running variance undefined for one value per channel"
    ),
}
"""Every skip of the adapter, with its reason: the one case PyTorch's estimator cannot hold."""
PROPERTY_SETTINGS = settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
VARIANTS = {"dynamic": None, "mbn": "mbn"}  # BN through DynamicBatchNorm*d, or MBN lam = 0


# -- what ran: PyTorch's kernel, or the core ----------------------------------------------------


# PyTorch's batch-norm kernels as the modules may call them; ``training`` is argument 5 of each
FUSED = {
    f
    for f in (
        torch.batch_norm,
        F.batch_norm,
        torch.native_batch_norm,
        getattr(torch, "_native_batch_norm_legit", None),
    )
    if f is not None
}


class _Paths(TorchFunctionMode):
    """Records every call of PyTorch's batch-norm kernels (:data:`FUSED`), training or not.

    The core's ``mbn_ref.mbn_forward`` is recorded by :func:`paths` (its ``lam``, training
    flag and whether a collective was passed); modes are thread-local, so the synchronized
    cases' threads show only the core's calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fused: list[bool] = []
        self.core: list[tuple[float, bool, bool]] = []
        self.kernel: list[float] = []  # mbn_ref.kernel_terms: MBN on PyTorch's kernels

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in FUSED:
            self.fused.append(bool(args[5] if len(args) > 5 else kwargs.get("training", False)))
        return func(*args, **kwargs)

    def reset(self) -> None:
        self.fused.clear()
        self.core.clear()
        self.kernel.clear()

    @property
    def fused_training(self) -> int:
        """BN's training kernel (the MBN kernel path normalizes in evaluation mode)."""
        return sum(self.fused)

    @property
    def core_lam_positive(self) -> int:
        """MBN with ``lam > 0``: the core's forward, or the kernels with the core's terms."""
        return sum(1 for lam, training, _ in self.core if training and lam > 0) + len(self.kernel)

    @property
    def core_training(self) -> int:
        return sum(1 for _, training, _ in self.core if training)


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Paths]:
    recorder = _Paths()
    core = mbn_ref.mbn_forward

    def recorded(*args: Any, **kwargs: Any) -> Any:
        lam = kwargs.get("lam", 0.0)
        recorder.core.append(
            (float(lam), bool(kwargs.get("training", True)), kwargs.get("all_sum") is not None)
        )
        return core(*args, **kwargs)

    monkeypatch.setattr(mbn_ref, "mbn_forward", recorded)  # mbn_torch calls mr.mbn_forward
    terms = mbn_ref.kernel_terms

    def recorded_kernel(ctx: mbn_ref.NormContext, **kwargs: Any) -> Any:
        recorder.kernel.append(1.0 - float(ctx.stats_weight))  # lam
        return terms(ctx, **kwargs)

    monkeypatch.setattr(mbn_ref, "kernel_terms", recorded_kernel)
    with recorder:
        yield recorder


def _outcomes(adapter: TorchModulesAdapter, recorder: _Paths | None = None) -> dict[str, Any]:
    """Every check's outcome (and, with ``recorder``, the paths it took) by id."""
    found = checks(adapter, properties=True, hypothesis_settings=PROPERTY_SETTINGS)
    out = {}
    for check in found:
        if recorder is not None:
            recorder.reset()
        result = check.outcome()
        ran = None
        if recorder is not None:
            ran = (recorder.fused_training, recorder.core_lam_positive, recorder.core_training)
            ran += (sum(synced for _, t, synced in recorder.core if t), len(recorder.kernel))
        out[check.id] = (result, ran)
    return out


# -- the whole suite -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_check_passes(variant: str, paths: _Paths) -> None:
    adapter = make(VARIANTS[variant])
    outcomes = _outcomes(adapter, paths)
    by_status: dict[str, list[str]] = {}
    for cid, (result, _) in outcomes.items():
        by_status.setdefault(result.status, []).append(cid)
    problems = {s: ids for s, ids in by_status.items() if s in ("fail", "error", "xpass")}
    detail = {
        cid: (outcomes[cid][0].reason, outcomes[cid][0].failures[:3])
        for ids in problems.values()
        for cid in ids
    }
    assert not problems, detail
    assert {cid: outcomes[cid][0].reason for cid in by_status.get("skip", [])} == SKIPS
    assert sorted(by_status.get("xfail", [])) == sorted(KNOWN_FAILURES)
    kinds = {outcomes[cid][0].kind for cid in by_status["pass"]}
    assert kinds == {"golden", "refusal", "schedule", "property"}
    assert len(by_status["pass"]) == len(outcomes) - len(SKIPS) - len(KNOWN_FAILURES) >= 75
    passed = {cid: outcomes[cid][1] for cid in by_status["pass"]}

    # BN: PyTorch's fused kernel in every training step (DynamicBatchNorm*d, or MBN lam = 0)
    bn = [c for c in passed if c.split("/")[0] in ("bn", "dynamic_bn", "cumulative")]
    assert len(bn) >= 25
    for cid in bn:
        fused, _, core, _, _ = passed[cid]
        if "/N0/" in cid:  # an empty batch: nothing to normalize in training
            assert fused == 0, cid
        elif "/float16/" in cid and variant == "mbn":  # MBN in half precision on the CPU: core
            assert (fused, core) == (0, 5), (cid, passed[cid])
        else:
            assert (fused, core) == (5, 0), (cid, passed[cid])
    # MBN with lam > 0: the kernels and the core's terms; lam = 0 (lam0.0): BN's kernel
    mbn = [c for c in passed if c.startswith("mbn/") and "/N0/" not in c]
    assert len(mbn) >= 20
    for cid in mbn:
        fused, lam_positive, core, _, kernel = passed[cid]
        assert fused + core + kernel == 5, (cid, passed[cid])
        half_on_cpu = "/float16/" in cid  # the core also at lam = 0 (see _path)
        if "/lam0.0/" in cid:
            assert (fused, core) == ((0, 5) if half_on_cpu else (5, 0)), cid
        elif "lameq11" in cid:  # lam(1) = 0, then lam > 0
            want = (0, 4) if half_on_cpu else (1, 4)
            assert (fused, lam_positive) == want, (cid, passed[cid])
        else:  # lam > 0: PyTorch's kernels with the core's terms; the core in half precision
            assert lam_positive == 5, (cid, passed[cid])
            assert kernel == (0 if half_on_cpu else 5), (cid, passed[cid])
    # synchronized BN and MBN: the core with a collective, on every shard of every step
    sync = [c for c in passed if c.startswith("sync")]
    assert len(sync) == 7
    for cid in sync:
        shards = len(cid.split("/shards")[1].split("/")[0].split("-"))
        assert passed[cid][3] == 5 * shards, (cid, passed[cid])
    assert sum(passed[c][0] > 0 for c in passed) >= 30
    assert sum(passed[c][1] > 0 for c in passed) >= 25


# -- the adapter's plumbing --------------------------------------------------------------------


def test_channels_last_data_are_not_copied() -> None:
    """NHWC data reach the module as a channels_last (N, C, H, W) view of the same memory."""
    adapter = make()
    rng = np.random.default_rng(0)
    x = adapter.from_numpy(rng.normal(size=(2, 3, 4, 5)))  # NHWC, C = 5
    layer = adapter.init_state(Setup("bn", "NHWC", (2, 3, 4, 5), -1, 5, "float64", True))
    seen: list[torch.Tensor] = []
    layer.module.register_forward_hook(lambda m, args, y: seen.extend([args[0], y]))
    step = Step("bn", 0, True, 1e-5, -1, "unbiased")
    gamma, beta = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    y, _, ctx = adapter.train_step(step, layer, x, gamma, beta)
    given, out = seen
    assert given.shape == (2, 5, 3, 4) and given.is_contiguous(memory_format=torch.channels_last)
    assert given.data_ptr() == x.data_ptr()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == x.shape and y.is_contiguous() and y.data_ptr() == out.data_ptr()
    dx, _, _ = adapter.backward(ctx, torch.ones_like(y))
    assert dx.shape == x.shape


def test_state_is_copied_out() -> None:
    """state_to_numpy returns copies: a later step never changes an earlier snapshot."""
    adapter = make()
    layer = adapter.init_state(Setup("mbn", "NC", (4, 3), 1, 3, "float64", False))
    before = adapter.state_to_numpy(layer)
    step = Step("mbn", 0, True, 1e-5, 1, "unbiased", lam=0.5)
    adapter.train_step(step, layer, torch.randn(4, 3, dtype=torch.float64), None, None)
    after = adapter.state_to_numpy(layer)
    assert before["running_mean"].tolist() == [0.0] * 3
    assert after["running_mean"].tolist() != [0.0] * 3
    assert int(after["num_batches_tracked"]) == 1 and sorted(after) == sorted(before)


def test_layer_keys_follow_the_kind() -> None:
    adapter = make("mbn")
    bn = adapter.init_state(Setup("bn", "NC", (4, 3), 1, 3, "float32", False))
    assert isinstance(bn, Layer) and type(bn.module).__name__ == "MomentumBatchNorm1d"
    assert sorted(adapter.state_to_numpy(bn)) == [
        "num_batches_tracked",
        "running_mean",
        "running_var",
    ]
    assert type(make().init_state(bn_setup()).module).__name__ == "DynamicBatchNorm3d"


def bn_setup() -> Setup:
    return Setup("bn", "NCDHW", (2, 3, 2, 2, 2), 1, 3, "float16", True)


def test_make_rejects_an_unknown_argument() -> None:
    with pytest.raises(ValueError, match="takes nothing or 'mbn', got 'fast'"):
        make("fast")


# -- the entry point ----------------------------------------------------------------------------


def test_torch_is_a_registered_backend() -> None:
    assert registered_backends()["torch"] == "mbn_torch.conformance:make"
    names = backend_names(["numpy"])  # built-ins first, then the registered ones, sorted
    assert names[0] == "numpy" and "torch" in names and names[1:] == sorted(names[1:])
    assert backend_spec("torch") == "mbn_torch.conformance:make"
    assert backend_spec("torch:mbn") == "mbn_torch.conformance:make(mbn)"
    assert backend_spec("numpy") == "mbn_conformance.builtin:make(numpy)"
    assert backend_adapter("torch").name == make().name
    assert backend_adapter("torch:mbn").name == make("mbn").name


def test_the_suite_finds_it_without_importing_mbn_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from mbn_conformance import cli, loading
        import argparse
        cli.add_arguments(argparse.ArgumentParser())
        print("torch" in loading.backend_names([]), "mbn_torch" in sys.modules)
        adapter = loading.backend_adapter("torch")
        print(type(adapter).__module__, "mbn_torch" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "mbn_torch.conformance", "True"]
    source = "\n".join(p.read_text() for p in (ROOT / "conformance").rglob("*.py"))
    assert "import mbn_torch" not in source and "from mbn_torch" not in source


def _fake_distribution(root: Path, entries: str) -> None:
    """A distribution registering ``entries`` in the backends' group, found on ``root``."""
    info = root / "fake_backends-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-backends\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entries}\n")


def test_unknown_backend_lists_builtin_and_registered() -> None:
    with pytest.raises(AdapterLoadError) as err:
        backend_adapter("nope")
    message = str(err.value)
    assert message.startswith("unknown backend 'nope'; built-in: numpy, array-api-strict")
    assert "torch (mbn_torch.conformance:make)" in message and "\n" not in message


def test_broken_backend_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(
        tmp_path,
        "broken = no_such_module_for_mbn:make\nnumpy = no_such_module_for_mbn:make\n"
        "faulty = mbn_torch.conformance:make(fast)",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    names = backend_names(["numpy"])
    assert names[0] == "numpy" and {"broken", "faulty", "torch"} <= set(names[1:])
    assert backend_adapter("numpy").name == "mbn_ref[numpy]"  # built-in names win
    with pytest.raises(AdapterLoadError) as err:
        backend_adapter("broken")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "backend 'broken' (entry point 'no_such_module_for_mbn:make' of group "
        "'mbn_conformance.backends'): cannot import module 'no_such_module_for_mbn'"
    )
    assert "ModuleNotFoundError" in message
    with pytest.raises(AdapterLoadError, match=r"raised ValueError: mbn_torch\.conformance\.make"):
        backend_adapter("faulty")


def test_cli_backend_torch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "torch", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["implementation"]["source"] == "--backend torch"
    assert doc["implementation"]["name"] == make().name
    assert "torch" in doc["environment"]["frameworks"]
    s = doc["summary"]
    assert (s["fail"], s["error"], s["xpass"], s["skip"]) == (0, 0, 0, len(SKIPS))
    assert s["xfail"] == len(KNOWN_FAILURES) and s["succeeded"]
    assert s["pass"] == s["total"] - len(SKIPS) - len(KNOWN_FAILURES)
    assert s["verdict"].startswith(f"CONFORMS: {s['total'] - 1} of {s['total']} checks run")


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'torch'" in err
    assert main(["conformance", "--help"]) == 0
    out = capsys.readouterr().out
    assert "entry-point group mbn_conformance.backends" in out


def test_console_script_sync_cases() -> None:
    exe = Path(sys.executable).parent / "mbn-ref"
    out = subprocess.run(
        [str(exe), "conformance", "--backend", "torch", "--cases", "sync*", "--plain"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("CONFORMS: 7 of 7 checks run (7 passed)")


def test_pytest_plugin_backend_torch(pytester: pytest.Pytester) -> None:
    args = ("--pyargs", "mbn_conformance.suite", "-p", "no:cacheprovider")
    result = pytester.runpytest(*args, "--mbn-backend", "torch", "-k", "sync or schedule", "-q")
    assert result.ret == 0, result.stdout.str()
    # 7 synchronized cases, 2 schedule checks, the property sync_shard_equivalence
    result.stdout.fnmatch_lines(["*CONFORMS: 10 of 10 checks run (10 passed)*"])
    header = pytester.runpytest(*args, "--mbn-backend", "torch", "--co").stdout.str()
    assert "= mbn_torch.conformance:make (from --mbn-backend)" in header
