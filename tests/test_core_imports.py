"""What the core imports: NumPy and array-api-compat, never the suite, SciPy or a framework.

- ``mbn_ref`` never imports ``mbn_conformance``: ``mbn-ref conformance`` is a plugin found
  through the ``mbn_ref.commands`` entry points (checked on the source, every module).
- ``import mbn_ref`` and the BN/MBN compute functions load neither SciPy nor any framework;
  SciPy is a declared dependency used by :mod:`mbn_ref.noise` only, imported by the functions
  that need it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mbn_ref

PACKAGE = Path(mbn_ref.__file__).parent
FRAMEWORKS = ("torch", "jax", "tensorflow", "keras", "cupy", "dask", "sparse", "array_api_strict")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` for every import statement and every ``import_module("...")`` /
    ``__import__("...")`` call with a literal name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                found.append((node.lineno, str(arg.value)))
    return found


def test_the_ast_walk_finds_every_kind_of_import() -> None:
    tree = ast.parse(
        "import a.b\nfrom c import d\nimport importlib\nimportlib.import_module('e')\n"
        "def f():\n    from g.h import i\n    __import__('j')\n"
    )
    assert sorted(m for _, m in _imported_modules(tree)) == [
        "a.b",
        "c",
        "e",
        "g.h",
        "importlib",
        "j",
    ]


def test_the_core_never_imports_the_suite() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in modules
        for line, name in _imported_modules(ast.parse(path.read_text(encoding="utf-8")))
        if name.split(".")[0] == "mbn_conformance"
    ]
    assert offenders == []


def _loaded_after(code: str) -> set[str]:
    """Top-level names of the modules loaded after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return {m.split(".")[0] for m in json.loads(out.stdout.splitlines()[-1])}


COMPUTE = """
import numpy as np
import mbn_ref as mr
x = np.random.default_rng(0).normal(size=(4, 3, 2))
y, s, ctx = mr.bn_forward(x, mr.init_bn_state(3), decay=np.float32(0.9))
mr.bn_backward(np.ones_like(y), ctx)
y, s, ctx = mr.mbn_forward(x, mr.init_state(3), lam=0.5, tau=0.9)
mr.mbn_backward(np.ones_like(y), ctx)
"""


def test_import_and_compute_load_no_scipy_and_no_framework() -> None:
    loaded = _loaded_after(COMPUTE)
    assert "numpy" in loaded and "mbn_ref" in loaded
    assert loaded & {"scipy", "mbn_conformance", *FRAMEWORKS} == set()


def test_importing_every_module_loads_no_scipy() -> None:
    """mbn_ref.noise imports SciPy when a function needs it, not at its own import."""
    code = (
        "import mbn_ref.cli, mbn_ref.conventions, mbn_ref.distributed, mbn_ref.noise, "
        "mbn_ref.noise_sim, mbn_ref.schedules\n"
        "mbn_ref.noise.effective_batch_size(4, 0.5)"
    )
    loaded = _loaded_after(code)
    assert loaded.isdisjoint({"scipy", "mbn_conformance", *FRAMEWORKS})
    # the check can fail: a function that needs SciPy loads it
    assert "scipy" in _loaded_after(code + "\nmbn_ref.noise.log_xi_sigma_var(4)")


def test_the_schedule_command_does_not_load_the_suite() -> None:
    code = (
        "import contextlib, io\nfrom mbn_ref.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['schedule', '--batch-size', '2', '--epochs', '10']) == 0"
    )
    assert "mbn_conformance" not in _loaded_after(code)
