"""``mbn-ref schedule --plot``: running statistics under a static and a dynamic momentum."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mbn_ref.cli import main

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = ["schedule", "--batch-size", "4", "--epochs", "6", "--steps-per-epoch", "5"]


def _expected(
    m: int,
    epochs: int,
    steps_per_epoch: int,
    seed: int,
    drift: float,
    static: float,
    unbiased: bool = False,
) -> dict[str, np.ndarray]:
    """The trajectories recomputed from the documented recipe, in plain NumPy.

    Eq. 11 in the spec's form ``r**((T-t)/(T-1)) - r`` with ``r = min(m/m0, 1)``, Eq. 12's
    ``tau = tau0**(m/m0)`` (m0 = 32, tau0 = 0.85), exponential averages from mean 0 and
    variance 1.
    """
    steps = epochs * steps_per_epoch
    rng = np.random.default_rng(seed)
    pop = drift * np.arange(steps) / steps
    x = rng.standard_normal((steps, m)) + pop[:, None]
    mean, var = x.mean(axis=1), x.var(axis=1)
    var_r = var * m / (m - 1) if unbiased else var
    r = min(m / 32, 1.0)
    t = np.arange(steps) // steps_per_epoch + 1
    lam = r ** ((epochs - t) / (epochs - 1)) - r
    tau = 0.85 ** (m / 32)
    out = {k: np.empty(steps) for k in ("sm", "sv", "mm", "mv", "im", "iv")}
    sm, sv, mm, mv, im, iv = 0.0, 1.0, 0.0, 1.0, 0.0, 1.0
    for i in range(steps):
        sm, sv = static * sm + (1 - static) * mean[i], static * sv + (1 - static) * var_r[i]
        mm, mv = lam[i] * mm + (1 - lam[i]) * mean[i], lam[i] * mv + (1 - lam[i]) * var[i]
        im, iv = tau * im + (1 - tau) * mean[i], tau * iv + (1 - tau) * var_r[i]
        for k, v in zip(out, (sm, sv, mm, mv, im, iv), strict=True):
            out[k][i] = v
    return {**out, "lam": lam, "tau": np.array(tau), "pop": pop, "mean": mean, "var": var}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_is_a_png_with_content_and_json_holds_the_trajectories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png, report = tmp_path / "s.png", tmp_path / "s.json"
    argv = [*BASE, "--seed", "3", "--drift", "2", "--plot", str(png), "--json", str(report)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "epoch t" in captured.out and f"wrote {png}" in captured.err
    width, height = _png_size(png.read_bytes())
    assert width > 500 and height > 500
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]
    colors = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50  # lines, markers, text: not a blank canvas
    assert (pixels < 0.9).mean() > 0.02  # ink covers a real part of the figure
    traj = json.loads(report.read_text())["trajectories"]
    want = _expected(4, 6, 5, seed=3, drift=2.0, static=0.9)
    assert traj["step"] == list(range(1, 31)) and traj["epoch"][:6] == [1] * 5 + [2]
    np.testing.assert_allclose(traj["population_mean"], want["pop"], rtol=1e-12)
    np.testing.assert_allclose(traj["batch_mean"], want["mean"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(traj["batch_var"], want["var"], rtol=1e-12)
    assert traj["static"]["decay"] == 0.9
    np.testing.assert_allclose(traj["static"]["mean"], want["sm"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(traj["static"]["var"], want["sv"], rtol=1e-10)
    np.testing.assert_allclose(traj["mbn_training"]["lam"], want["lam"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(traj["mbn_training"]["mean"], want["mm"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(traj["mbn_training"]["var"], want["mv"], rtol=1e-10)
    assert traj["mbn_inference"]["tau"] == pytest.approx(float(want["tau"]), rel=1e-15)
    np.testing.assert_allclose(traj["mbn_inference"]["mean"], want["im"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(traj["mbn_inference"]["var"], want["iv"], rtol=1e-10)


def test_unbiased_estimator_static_decay_and_json_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "s.svg"
    argv = [*BASE, "--static-decay", "0.5", "--estimator", "unbiased", "--plot", str(png)]
    assert main([*argv, "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)  # the JSON alone on stdout
    traj: dict[str, Any] = doc["trajectories"]
    want = _expected(4, 6, 5, seed=0, drift=1.0, static=0.5, unbiased=True)
    np.testing.assert_allclose(traj["static"]["var"], want["sv"], rtol=1e-10)
    np.testing.assert_allclose(traj["mbn_inference"]["var"], want["iv"], rtol=1e-10)
    np.testing.assert_allclose(traj["mbn_training"]["var"], want["mv"], rtol=1e-10)  # biased
    assert doc["lam"] == sorted(set(traj["mbn_training"]["lam"]))  # one lam per epoch
    assert png.read_text().lstrip().startswith("<?xml") and "<svg" in png.read_text()


@pytest.mark.parametrize(
    ("plot", "extra", "match"),
    [
        ("missing/s.png", [], "no such directory"),
        ("d.png", [], "it is a directory"),
        ("s.jpg", [], "expected a file name ending in .png"),
        ("s.png", ["--static-decay", "1.5"], "--static-decay"),
        ("s.png", ["--drift", "nan"], "--drift"),
    ],
)
def test_bad_plot_requests_exit_2_and_write_nothing(
    plot: str,
    extra: list[str],
    match: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "r.json"
    before = []
    if plot == "d.png":
        (tmp_path / plot).mkdir()
        before = [tmp_path / plot]
    argv = [*BASE, "--plot", str(tmp_path / plot), "--json", str(report), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbn-ref schedule: error:")
    assert match in lines[0] and captured.out == ""
    assert list(tmp_path.iterdir()) == before  # neither the plot nor the JSON


def test_batch_size_one_cannot_be_plotted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["schedule", "--batch-size", "1", "--epochs", "3", "--plot", str(tmp_path / "s.png")]
    assert main(argv) == 2
    assert "--batch-size >= 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_a_usage_error_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main([*BASE, "--plot", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mbn-ref schedule: error: --plot needs matplotlib")
    assert "pip install matplotlib" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert main(BASE) == 0  # without --plot matplotlib is not needed


def test_batch_size_one_has_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    """m = 1 has no variance noise: the table says so instead of failing."""
    assert main(["schedule", "--batch-size", "1", "--epochs", "3", "--json", "-"]) == 0
    eff = json.loads(capsys.readouterr().out)["end_point_effective_batch_size"]
    assert eff["variance_noise"] is None and eff["mean_noise"] > 1
    assert main(["schedule", "--batch-size", "1", "--epochs", "3"]) == 0
    assert "in the mean and - in the variance" in capsys.readouterr().out
