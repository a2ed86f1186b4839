"""The golden vectors: regenerated bit-identically, schema-checked, loadable with NumPy alone."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mbn_conformance import cases, runner, tolerances, vectors
from mbn_conformance.builtin import make


def test_committed_vectors_regenerate_bit_identically(tmp_path: Path) -> None:
    """Same seeds, same core: every array and the manifest come out byte for byte."""
    out = tmp_path / "golden.npz"
    assert cases.main(["--out", str(out)]) == 0
    committed = vectors.DEFAULT_PATH.read_bytes()
    regenerated = out.read_bytes()
    if committed != regenerated:  # name the first differing member, not just "differs"
        with zipfile.ZipFile(io.BytesIO(committed)) as a, zipfile.ZipFile(out) as b:
            assert a.namelist() == b.namelist()
            for name in a.namelist():
                assert a.read(name) == b.read(name), f"{name} differs; rerun cases.py?"
    assert committed == regenerated


def test_vectors_are_small_and_cover_spec_section_10() -> None:
    assert vectors.DEFAULT_PATH.stat().st_size < 800_000
    metas = [c.meta for c in vectors.read()]
    assert {m["layout"] for m in metas} == {"NC", "NCL", "NCHW", "NCDHW", "NHWC"}
    assert {m["shape"][0] for m in metas} >= {1, 2, 3, 64}
    assert {m["eps"] for m in metas} >= {1e-5, 1e-3, 0.5}
    lams = {s["lam"] for m in metas if m["algorithm"] == "mbn" for s in m["steps"]}
    assert lams >= {0.0, 0.5, 0.9375, 1.0}
    assert all(sum(s["training"] for s in m["steps"]) >= 5 for m in metas)
    assert {m["dtype"] for m in metas} == {"float16", "float32", "float64"}
    tags = {t for m in metas for t in m["tags"]}
    assert {"zero_var_channel", "offset"} <= tags
    shards = [m["shards"] for m in metas if m["shards"] is not None]
    assert any(0 in s for s in shards) and any(len(set(s)) > 1 for s in shards)
    assert {m["estimator"] for m in metas} == {"biased", "unbiased"}
    assert any(m["steps"][0]["tau"] is None for m in metas if m["algorithm"] == "mbn")
    assert any(
        s["decay"] is None for m in metas if m["algorithm"] == "cumulative" for s in m["steps"]
    )


def test_vectors_load_without_pickle_and_without_the_suite() -> None:
    with np.load(vectors.DEFAULT_PATH, allow_pickle=False) as npz:
        manifest = json.loads(npz["manifest"].item())
        first = manifest["cases"][0]["id"]
        x = npz[f"{first}/x"]
    assert manifest["format"] == vectors.FORMAT and manifest["version"] == vectors.VERSION
    assert x.dtype == np.dtype(manifest["cases"][0]["dtype"])


def _rewrite(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    with np.load(vectors.DEFAULT_PATH, allow_pickle=False) as npz:
        manifest = json.loads(npz["manifest"].item())
        arrays = {k: npz[k] for k in npz.files if k != "manifest"}
    edit(manifest, arrays)
    path = tmp_path / "edited.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.npy", _npy(np.asarray(json.dumps(manifest))))
        for k, v in arrays.items():
            zf.writestr(k + ".npy", _npy(v))
    return path


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, a: m.update(version=99), "'version' 99 is not supported"),
        (lambda m, a: m.update(format="other"), "'format' must be"),
        (lambda m, a: m["cases"][0].pop("eps"), r"cases\[0\]: missing keys \['eps'\]"),
        (lambda m, a: m["cases"][1].update(extra=1), r"unknown keys \['extra'\]"),
        (lambda m, a: m["cases"][0]["steps"][0].update(lam="x"), r"steps\[0\]\.lam has type str"),
        (lambda m, a: m["cases"].append(dict(m["cases"][0])), "duplicate id"),
        (lambda m, a: a.pop(m["cases"][0]["id"] + "/dparams"), "has no array 'dparams'"),
        (
            lambda m, a: a.update({m["cases"][0]["id"] + "/y": np.zeros((1, 1))}),
            "array 'y' has shape",
        ),
    ],
)
def test_schema_errors_name_the_key(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _rewrite(tmp_path, edit)
    with pytest.raises(vectors.VectorFormatError, match=message):
        vectors.read(path)


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    manifest, _ = json.loads(np.load(vectors.DEFAULT_PATH)["manifest"].item()), None
    with pytest.raises(vectors.VectorFormatError, match="object dtype"):
        vectors.write(tmp_path / "x.npz", manifest, {"a/x": np.array([object()])})


@pytest.mark.parametrize("backend", ["numpy", "array-api-strict", "torch-xp"])
def test_every_builtin_backend_passes_every_case(backend: str) -> None:
    results = runner.run(make(backend))
    assert runner.succeeded(results), [r for r in results if r.status != "pass"]
    counts = runner.summary(results)
    # array-api-strict has no float16 in the standard: exactly those cases are skipped
    expected_skips = 5 if backend == "array-api-strict" else 0
    assert counts["skip"] == expected_skips
    assert counts["pass"] == len(results) - expected_skips


def test_tolerances_scale_with_trajectory_and_reduction_and_override_has_reason() -> None:
    base, _ = tolerances.tolerance_for("bn/NC/N2/float64", "y", "float64", 0, 2)
    later, _ = tolerances.tolerance_for("bn/NC/N2/float64", "y", "float64", 15, 2)
    big, _ = tolerances.tolerance_for("bn/NC/N2/float64", "y", "float64", 0, 2**16)
    assert base == tolerances.TOLERANCES["float64"]
    assert later.rtol == pytest.approx(4 * base.rtol)
    assert big.rtol == pytest.approx(4 * base.rtol)
    tol, reason = tolerances.tolerance_for(
        "bn/NCHW/N3/float32/eps1e-05/biased/offset", "dx", "float32", 0, 18
    )
    assert tol.atol > tolerances.TOLERANCES["float32"].atol and "ulp" in reason
    _, none = tolerances.tolerance_for(
        "bn/NCHW/N3/float32/eps1e-05/biased/offset", "running_var", "float32", 0, 18
    )
    assert none == ""  # statistics of offset data get no leniency (docs/spec.md §7)


def test_compare_judges_nan_shape_and_scale() -> None:
    tol = tolerances.Tolerance(rtol=1e-6, atol=1e-6)
    assert tolerances.compare(np.array([np.nan]), np.array([np.nan]), tol).ok
    assert not tolerances.compare(np.array([np.nan]), np.array([1.0]), tol).ok
    assert not tolerances.compare(np.zeros(2), np.zeros(3), tol).ok
    # atol is relative to the array's magnitude: 1e-4 on values of 1e3 is within 1e-6*1e3
    assert tolerances.compare(np.array([1e3 + 1e-4, 0.0]), np.array([1e3, 0.0]), tol).ok
    assert not tolerances.compare(np.array([1.0 + 1e-4]), np.array([1.0]), tol).ok
