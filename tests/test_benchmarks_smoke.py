"""The benchmark scripts run end to end and write well-formed JSON.

``benchmarks/bench_core.py --quick`` (tiny shapes, one round, no calibration) must exit 0 and
write a report whose schema is complete, whose every time and ratio is a positive finite
number, and whose contenders agree on the output they time (so a benchmark never compares
unlike computations). ``benchmarks/bench_torch.py --quick`` likewise (its eager modes on every
case, the compiled mode on one), with its peak-memory numbers, and its contenders within
float32 rounding of a float64 reference of what each computes. ``benchmarks/bench_keras.py
--quick`` on its dense case (both TensorFlow modes, and the JAX backend in its subprocess),
with its BN contenders' first-step loss and gradients equal to Keras' BN's within float32
rounding. Nothing here asserts a speed:
timings belong in the JSON, not in tests (benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
MODES = {"train_forward", "train_forward_backward", "eval_forward"}
OURS = {"bn_numpy", "mbn_numpy", "bn_torch", "mbn_torch"}


def _positive_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _run(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "core.json"
    proc = _run("bench_core.py", "--quick", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, f"bench_core.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "| shape | mode |" in proc.stdout, "the readable table was not printed"
    return json.loads(out.read_text())


def test_header_names_versions_and_threads(quick_report: dict[str, Any]) -> None:
    assert quick_report["schema"] == "mbn-ref/bench-core/1"
    header = quick_report["header"]
    for lib in ("python", "numpy", "torch", "onnx", "array_api_compat", "mbn_ref"):
        assert header["versions"][lib], f"no version for {lib}"
    assert isinstance(header["torch_num_threads"], int) and header["torch_num_threads"] >= 1
    assert header["numpy_blas"]["source"] in ("threadpoolctl", "numpy.show_config")
    assert header["settings"]["quick"] is True
    assert header["settings"]["rounds"] == 1


def test_scripts_run_under_steady_malloc(quick_report: dict[str, Any]) -> None:
    """The script re-executed itself with the malloc thresholds (benchmarks/README.md)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        from bench_timing import MALLOC_TUNABLES, uses_glibc_malloc
    finally:
        sys.path.remove(str(BENCH_DIR))
    if not uses_glibc_malloc():
        pytest.skip("glibc's malloc only")
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        pytest.skip("this session sets its own malloc thresholds")
    assert MALLOC_TUNABLES in quick_report["header"]["glibc_tunables"]


def test_default_malloc_keeps_glibcs_thresholds(tmp_path: Path) -> None:
    """``--default-malloc``: no re-execution, no tunables set."""
    out = tmp_path / "core.json"
    proc = _run(
        "bench_core.py",
        "--quick",
        "--modes",
        "eval_forward",
        "--default-malloc",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["header"]["glibc_tunables"] is None


def test_every_case_has_all_contenders_and_modes(quick_report: dict[str, Any]) -> None:
    cases = quick_report["cases"]
    shapes = {tuple(c["shape"]) for c in cases}
    assert sorted(len(s) for s in shapes) == [2, 4], shapes
    for shape in shapes:
        assert {c["mode"] for c in cases if tuple(c["shape"]) == shape} == MODES
    for case in cases:
        names = set(case["contenders"])
        assert {"torch_native", *OURS} <= names, (case["shape"], case["mode"], names)
        onnx = {"onnx_evaluator", "onnx_op"}
        if case["mode"] == "train_forward_backward":
            assert not names & onnx, "ONNX has no backward; it must not appear in fwd+bwd"
        else:
            assert onnx <= names


def test_times_and_ratios_are_positive_finite(quick_report: dict[str, Any]) -> None:
    n_ratios = 0
    for case in quick_report["cases"]:
        for name, t in case["contenders"].items():
            assert _positive_finite(t["median_ms"]), (name, t)
            assert _positive_finite(t["min_ms"]), (name, t)
            assert len(t["rounds_ms"]) == 1 and t["loops"] >= 1
        for name, r in case["ratios"].items():
            for v in (r["median"], r["of_medians"], *r["per_round"]):
                assert _positive_finite(v), (case["shape"], case["mode"], name, r)
            n_ratios += 1
        for name, t in case["targets"].items():
            assert isinstance(t["pass"], bool) and _positive_finite(t["limit"]), (name, t)
            assert t["ratio"] == case["ratios"][name]["median"]
    # 4 vs native and 4 vs ONNX per forward case, 4 vs native per fwd+bwd case; 2 shapes.
    assert n_ratios == 2 * (8 + 4 + 8)


def test_contenders_compute_the_same_thing(quick_report: dict[str, Any]) -> None:
    for case in quick_report["cases"]:
        diffs = case["agreement_max_abs_diff"]
        assert diffs, "no agreement checks recorded"
        for name, d in diffs.items():
            assert 0 <= d < 1e-4, f"{case['shape']} {case['mode']}: {name} differs by {d}"


def test_bad_shape_is_a_usage_error(tmp_path: Path) -> None:
    proc = _run("bench_core.py", "--quick", "--shapes", "32", "--json", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert "needs at least 2 positive dims" in proc.stderr


def test_profile_script_runs_quick(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    proc = _run("profile_core.py", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "mbn-ref/profile-core/1"
    assert {"bn_numpy_forward", "mbn_torch_backward"} <= set(report["profile"])
    for title, group in report["experiments"].items():
        for name, entry in group.items():
            assert _positive_finite(entry["median_ms"]), (title, name)
            assert _positive_finite(entry["ratio_to_first"]), (title, name)
            assert entry["agrees_with_first"] in (True, None), (title, name)


# -- benchmarks/bench_torch.py ---------------------------------------------------------------

TORCH_CONTENDERS = {"native", "mbn", "mbn_lam0", "dynamic_bn"}
TORCH_CASES = {"4x8x4x4", "16x8", "resnet18_stage"}


@pytest.fixture(scope="module")
def torch_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``--quick`` eager modes on every case, and the compiled mode on the smallest one
    (with ``--skip-global-guards``: the option's name is torch's to change); the compiled
    run's header and stderr under ``compiled_header`` and ``compiled_stderr``."""
    out = tmp_path_factory.mktemp("bench") / "torch.json"
    proc = _run(
        "bench_torch.py", "--quick", "--modes", "eager_train", "eager_eval", "--json", str(out)
    )
    assert proc.returncode == 0, f"bench_torch.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "| case | mode | contender |" in proc.stdout, "the readable table was not printed"
    report = json.loads(out.read_text())
    compiled = out.with_name("compiled.json")
    proc = _run(
        "bench_torch.py",
        "--quick",
        "--cases",
        "256x1024",
        "--modes",
        "compiled_train",
        "--skip-global-guards",
        "--json",
        str(compiled),
    )
    assert proc.returncode == 0, f"bench_torch.py compiled failed:\n{proc.stdout}\n{proc.stderr}"
    compiled_report = json.loads(compiled.read_text())
    report["cases"] += compiled_report["cases"]
    report["compiled_header"] = compiled_report["header"]
    report["compiled_stderr"] = proc.stderr
    return report


def test_torch_header(torch_report: dict[str, Any]) -> None:
    assert torch_report["schema"] == "mbn-ref/bench-torch/1"
    header = torch_report["header"]
    for lib in ("python", "torch", "numpy", "mbn_ref"):
        assert header["versions"][lib], f"no version for {lib}"
    assert header["torch_num_threads"] == 2 and header["device"] == "cpu"
    settings = header["settings"]
    assert settings["quick"] is True and settings["rounds"] == 1
    assert settings["dtype"] == "float32" and settings["threads"] == 2
    assert settings["skip_global_guards"] is False
    assert torch_report["compiled_header"]["settings"]["skip_global_guards"] is True


def test_torch_compiles_without_warnings(torch_report: dict[str, Any]) -> None:
    """Compiling the modules traces the core with ``xp=array_api_compat.torch`` given: no
    namespace lookup is traced, whose ``functools.lru_cache`` dynamo warns about."""
    assert "lru_cache" not in torch_report["compiled_stderr"], torch_report["compiled_stderr"]


def test_torch_cases_modes_and_contenders(torch_report: dict[str, Any]) -> None:
    cases = torch_report["cases"]
    seen = {(c["case"], c["mode"]) for c in cases}
    eager = {(name, mode) for name in TORCH_CASES for mode in ("eager_train", "eager_eval")}
    assert seen == eager | {("16x8", "compiled_train")}
    stage = next(c for c in cases if c["case"] == "resnet18_stage")
    assert stage["kind"] == "stage" and stage["shape"] == [2, 8, 8, 8]
    for case in cases:
        assert set(case["contenders"]) == TORCH_CONTENDERS, (case["case"], case["mode"])
        assert set(case["ratios"]) == {f"{c}/native" for c in TORCH_CONTENDERS - {"native"}}


def test_torch_numbers_are_positive_finite(torch_report: dict[str, Any]) -> None:
    n_memory = 0
    for case in torch_report["cases"]:
        where = (case["case"], case["mode"])
        for name, t in case["contenders"].items():
            for key in ("median_ms", "min_ms", "first_call_s"):
                assert _positive_finite(t[key]), (where, name, key, t[key])
            assert len(t["rounds_ms"]) == 1 and t["loops"] >= 1
            peak, retained = t["memory"]["peak_bytes"], t["memory"]["retained_bytes"]
            if case["mode"] == "compiled_train":  # measured on CUDA only
                assert peak is None and "not measured" in t["memory"]["method"]
            else:
                assert _positive_finite(peak) and _positive_finite(retained), (where, name)
                assert retained <= peak
        for name, r in case["ratios"].items():
            for v in (r["median"], r["of_medians"], r["of_minima"], *r["per_round"]):
                assert _positive_finite(v), (where, name, r)
        for name, t in case["targets"].items():
            assert isinstance(t["pass"], bool) and _positive_finite(t["limit"]), (name, t)
            assert _positive_finite(t["ratio"])
            n_memory += name.startswith("memory:")
    assert n_memory == 3 * 2 * 3  # 3 cases x 2 eager modes x 3 contenders


def test_torch_contenders_compute_the_same_thing(torch_report: dict[str, Any]) -> None:
    for case in torch_report["cases"]:
        diffs = case["agreement_rel_error"]
        assert set(diffs) == TORCH_CONTENDERS
        for name, d in diffs.items():
            quantities = {"y"} if case["mode"] == "eager_eval" else {"y", "dx"}
            assert set(d) == quantities
            for q, v in d.items():
                assert 0 <= v < 1e-5, f"{case['case']} {case['mode']}: {name} {q} off by {v}"


def test_torch_bad_device_is_a_usage_error(tmp_path: Path) -> None:
    proc = _run("bench_torch.py", "--quick", "--device", "tpu", "--json", str(tmp_path / "x"))
    assert proc.returncode == 2 and "expected cpu or cuda" in proc.stderr


# -- benchmarks/bench_keras.py ---------------------------------------------------------------

KERAS_CONTENDERS = {"keras", "mbn", "mbn_lam0", "dynamic_bn"}


@pytest.fixture(scope="module")
def keras_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``--quick`` on the dense case: both TensorFlow modes, and JAX in its subprocess."""
    pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("bench") / "keras.json"
    proc = _run("bench_keras.py", "--quick", "--cases", "256x1024", "--json", str(out))
    assert proc.returncode == 0, f"bench_keras.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "| case | mode | contender |" in proc.stdout, "the readable table was not printed"
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_keras_header_and_cases(keras_report: dict[str, Any]) -> None:
    assert keras_report["schema"] == "mbn-ref/bench-keras/1"
    header = keras_report["header"]
    for lib in ("python", "keras", "tensorflow", "numpy", "mbn_ref"):
        assert header["versions"][lib], f"no version for {lib}"
    assert header["settings"]["quick"] is True and header["settings"]["dtype"] == "float32"
    assert header["backends"]["tensorflow"] == "ran"
    modes = {"tf_function", "tf_function_xla"}
    if header["backends"]["jax"] == "ran":
        modes.add("jax_jit")
    cases = keras_report["cases"]
    assert {(c["case"], c["mode"]) for c in cases} == {("256x1024", m) for m in modes}
    for case in cases:
        assert case["bn_shape"] == [16, 32]
        assert set(case["contenders"]) == KERAS_CONTENDERS
        assert set(case["ratios"]) == {f"{c}/keras" for c in KERAS_CONTENDERS - {"keras"}}


def test_keras_numbers_are_positive_finite(keras_report: dict[str, Any]) -> None:
    for case in keras_report["cases"]:
        where = (case["case"], case["mode"])
        for name, t in case["contenders"].items():
            for key in ("median_ms", "min_ms", "first_call_s"):
                assert _positive_finite(t[key]), (where, name, key, t[key])
            assert len(t["rounds_ms"]) == 1 and t["loops"] >= 1
        for name, r in case["ratios"].items():
            for v in (r["median"], r["of_minima"], *r["per_round"]):
                assert _positive_finite(v), (where, name, r)
        for name, t in case["targets"].items():
            assert isinstance(t["pass"], bool) and (t["limit"], t["aim"]) == (1.5, 1.2), name


def test_keras_bn_contenders_compute_keras_bn(keras_report: dict[str, Any]) -> None:
    for case in keras_report["cases"]:
        diffs = case["agreement_rel_error"]
        assert set(diffs) == {"mbn_lam0", "dynamic_bn"}
        for name, d in diffs.items():
            assert set(d) == {"loss", "grads"}
            for q, v in d.items():
                assert 0 <= v < 1e-5, f"{case['case']} {case['mode']}: {name} {q} off by {v}"
