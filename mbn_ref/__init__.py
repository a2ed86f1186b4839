"""mbn-ref: the reference implementation of BN with dynamic momentum and of Momentum BN.

The core is a set of pure functions over any Python Array API namespace (NumPy, CuPy,
PyTorch tensors, ``array-api-strict``) with explicit state.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_LAZY_SUBMODULES = ("conventions", "schedules", "noise", "noise_sim", "distributed")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from ._normalization import KernelTerms, backward, kernel_terms  # noqa: E402
from .bn import (  # noqa: E402
    BNState,
    bn_backward,
    bn_forward,
    init_bn_state,
    update_running_statistics,
)
from .context import ContextStatic, NormContext  # noqa: E402
from .errors import NonFiniteError  # noqa: E402
from .mbn import (  # noqa: E402
    MBNState,
    init_state,
    mbn_backward,
    mbn_forward,
    mbn_from_moments,
)

__all__ = [
    "BNState",
    "ContextStatic",
    "KernelTerms",
    "MBNState",
    "NonFiniteError",
    "NormContext",
    "__version__",
    "backward",
    "bn_backward",
    "bn_forward",
    "conventions",
    "distributed",
    "init_bn_state",
    "init_state",
    "kernel_terms",
    "mbn_backward",
    "mbn_forward",
    "mbn_from_moments",
    "noise",
    "noise_sim",
    "schedules",
    "update_running_statistics",
]
