"""The versions a report records: one list of frameworks for the CLI and the pytest plugin.

Only the standard library is imported here: the pytest plugin loads this module in every
session.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

FRAMEWORKS: tuple[str, ...] = (
    "torch",
    "tensorflow",
    "keras",
    "jax",
    "flax",
    "mlx",
    "cupy",
    "array_api_strict",
    "onnx",
    "onnxruntime",
)
"""Modules whose versions a report lists when the implementation has imported them."""

_OWN = ("mbn_conformance", "mbn_ref", "numpy")


def module_version(name: str) -> str | None:
    """The version of the imported module ``name``, or of its distribution; ``None`` if unknown."""
    v = getattr(sys.modules.get(name), "__version__", None)
    if isinstance(v, str):
        return v
    for dist in (name, name.replace("_", "-")):
        try:
            return metadata.version(dist)
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def frameworks(adapter: Any) -> dict[str, str]:
    """Versions of the adapter's own top-level package and of :data:`FRAMEWORKS` it imported."""
    top = type(adapter).__module__.split(".")[0]
    out: dict[str, str] = {}
    for name in (top, *FRAMEWORKS):
        if name in _OWN or name in out or name not in sys.modules or name == "__main__":
            continue
        v = module_version(name)
        if v is not None:
            out[name] = v
    return out


def environment(adapter: Any) -> dict[str, Any]:
    """Python, platform, NumPy, ``mbn_ref`` and the frameworks the implementation imported."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "numpy": module_version("numpy") or "unknown",
        "mbn_ref": module_version("mbn_ref") or "unknown",
        "frameworks": frameworks(adapter),
    }


def versions_line(env: Mapping[str, Any]) -> str:
    """The versions of an :func:`environment` on one line.

    >>> versions_line({"python": "3.11.7", "numpy": "2.0", "mbn_ref": "0.1", "frameworks":
    ...                {"torch": "2.5"}})
    'python 3.11.7, numpy 2.0, mbn_ref 0.1, torch 2.5'
    """
    parts = [f"python {env['python']}", f"numpy {env['numpy']}", f"mbn_ref {env['mbn_ref']}"]
    return ", ".join(parts + [f"{k} {v}" for k, v in env["frameworks"].items()])
