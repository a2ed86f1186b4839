"""The documentation site: ``sphinx-build -W`` succeeds and the pages a reader checks are there.

One build per test session (``docs/conf.py``; about 20 s on 2 cores, most of it importing
torch and TensorFlow for the API reference), in a subprocess with a time limit, into a
temporary directory. Proxies point at a closed local port, so a build that tried to fetch
anything would warn, and warnings are errors.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

for _module in ("sphinx", "myst_parser", "numpydoc", "pydata_sphinx_theme"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (the docs extra)", allow_module_level=True)

BUILD_TIMEOUT_S = 240

PAGES = [
    "index",
    "quickstart",
    "spec",
    "conventions",
    "derivations/backward",
    "derivations/noise",
    "schedules",
    "torch",
    "keras",
    "distributed",
    "conformance",
    "porting",
    "frameworks",
    "reproduce",
    "benchmarks",
    "adapters",
    "errata",
    "api/index",
    "api/mbn_ref",
    "api/schedules",
    "api/distributed",
    "api/noise",
    "api/conventions",
    "api/mbn_torch",
    "api/mbn_tf",
    "api/mbn_conformance",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q"]
    try:
        done = subprocess.run(
            [*cmd, str(DOCS), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:  # subprocess.run kills the build
        pytest.fail(f"sphinx-build did not finish within {BUILD_TIMEOUT_S} s")
    assert done.returncode == 0, (
        f"sphinx-build -W failed (exit {done.returncode}):\n{done.stderr[-5000:]}"
    )
    return out


def text(site: Path, page: str) -> str:
    """A built page's visible text (tags removed, entities decoded, whitespace collapsed)."""
    raw = (site / f"{page}.html").read_text(encoding="utf-8")
    raw = re.sub(r"<(script|style)\b.*?</\1>", " ", raw, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", raw)))


def readme_command(marker: str) -> str:
    """The command of README.md's fenced block after ``<!-- marker -->``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert found, f"README.md has no ```bash block after <!-- {marker} -->"
    return found.group(1).strip()


def test_every_page_is_built(site: Path) -> None:
    missing = [p for p in PAGES if not (site / f"{p}.html").is_file()]
    assert not missing, f"pages not built: {missing}"
    assert "Porting MBN to a new framework" in text(site, "index")


def test_index_lists_every_guide(site: Path) -> None:
    index = (site / "index.html").read_text(encoding="utf-8")
    for page in PAGES[1:18]:
        assert f'href="{page}.html"' in index, page


def test_quickstart_shows_the_readme_commands(site: Path) -> None:
    page = text(site, "quickstart")
    for marker in ("main-command", "test-command"):
        assert readme_command(marker) in page, marker
    assert "mr.mbn_forward(x, state, lam=lam, tau=tau)" in page  # the taste


def test_api_page_has_momentum_batch_norm_2d_and_its_signature(site: Path) -> None:
    raw = (site / "api" / "mbn_torch.html").read_text(encoding="utf-8")
    found = re.search(
        r'<dt class="sig[^"]*" id="mbn_torch\.MomentumBatchNorm2d">(.*?)</dt>', raw, re.S
    )
    assert found, "no entry for mbn_torch.MomentumBatchNorm2d"
    signature = re.sub(r"\s+", "", html.unescape(re.sub(r"<[^>]+>", "", found.group(1))))
    assert signature.startswith("classmbn_torch.MomentumBatchNorm2d(num_features,"), signature
    assert "lam=" in signature, signature
    # numpydoc sections rendered, not left as raw text
    assert (
        "Parameters" in raw
        and "num_features" in raw
        and "------" not in text(site, "api/mbn_torch")
    )


def test_equations_are_rendered_with_mathjax(site: Path) -> None:
    raw = (site / "derivations" / "backward.html").read_text(encoding="utf-8")
    assert '<div class="math notranslate nohighlight">' in raw
    assert r"\frac{\partial L}{\partial x_i}" in raw
    assert re.search(r"<script[^>]*src=\"[^\"]*mathjax[^\"]*\"", raw, re.I), "MathJax not loaded"
    assert "$$" not in text(site, "derivations/backward"), "unrendered $$ math"


def test_figures_and_tables_are_on_their_pages(site: Path) -> None:
    bench = (site / "benchmarks.html").read_text(encoding="utf-8")
    assert re.search(r'<img [^>]*src="_images/bench\.png"', bench)
    assert (site / "_images" / "bench.png").stat().st_size > 10_000
    # the ratio table of docs/plots/bench/bench.md (mbn-ref bench), included
    table_rows = (DOCS / "plots" / "bench" / "bench.md").read_text(encoding="utf-8").count("\n| ")
    assert table_rows > 10 and bench.count("<tr") >= table_rows
    assert "Peak memory" in text(site, "benchmarks")  # benchmarks/README.md, included
    reproduce = (site / "reproduce.html").read_text(encoding="utf-8")
    assert re.search(r'<img [^>]*src="_images/reproduce\.png"', reproduce)
    noise = (site / "derivations" / "noise.html").read_text(encoding="utf-8")
    assert "noise_variance.png" in noise


def test_guides_hold_what_the_issue_asks(site: Path) -> None:
    assert "FAQ" in text(site, "keras")
    distributed = text(site, "distributed")
    assert "torch.distributed" in distributed and "tf.distribute" in distributed
    porting = text(site, "porting")
    # code excerpts read from the adapter's files at build time
    assert "def _tensorflow(" in porting and "NormContext.join(arrays, static)" in porting
    assert "def isdtype(" in porting and 'mbn_conformance.backends"]' in porting
    assert "Golden vectors" in text(site, "conformance")
