"""Shared fixtures: the Array API namespaces under test and the hypothesis profiles.

Namespaces: NumPy, ``array-api-strict`` (the proof of portability), PyTorch tensors through
array-api-compat, JAX (CPU, float64 enabled: immutable arrays, so an in-place write to an
input fails there), and CuPy (skipped with a reason without a GPU). ``MBN_TEST_NAMESPACES``
(comma-separated) narrows the set.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

NAMESPACES = ("numpy", "array_api_strict", "torch", "jax", "cupy")


def _load(name: str) -> Any:
    """The namespace module for ``name``, or ``pytest.skip`` with the reason."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        return xp
    if name == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as xp

        return xp
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)  # float64 is the spec precision
        import jax.numpy as xp

        return xp
    if name == "cupy":
        cp = pytest.importorskip("cupy", reason="CuPy is not installed (needs a CUDA GPU)")
        try:
            if cp.cuda.runtime.getDeviceCount() < 1:
                pytest.skip("CuPy is installed but no CUDA GPU is visible")
        except Exception as exc:  # pragma: no cover - depends on the machine
            pytest.skip(f"CuPy cannot reach a CUDA GPU: {exc}")
        import array_api_compat.cupy as xp

        return xp
    raise ValueError(name)


def _selected() -> list[str]:
    wanted = os.environ.get("MBN_TEST_NAMESPACES")
    return [n for n in NAMESPACES if wanted is None or n in wanted.split(",")]


@pytest.fixture(params=_selected())
def xp(request: pytest.FixtureRequest) -> Any:
    """Each Array API namespace in turn (CuPy skips without a GPU)."""
    return _load(request.param)


def to_numpy(a: Any) -> np.ndarray:
    """Any namespace's array as a NumPy array (on the host)."""
    if a is None:
        return None  # type: ignore[return-value]
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "get"):  # cupy
        return a.get()
    return np.asarray(a)


@pytest.fixture
def helpers() -> SimpleNamespace:
    return SimpleNamespace(to_numpy=to_numpy)
