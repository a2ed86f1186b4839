"""Finding the implementation under test: ``module:factory`` specs and built-in backends.

One loader for the CLI (``--impl``, ``--backend``) and the pytest plugin (``--mbn-impl``,
``MBN_IMPL``, ``--mbn-backend``); each front end turns :class:`AdapterLoadError` into its own
usage error.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from .protocol import Adapter

PROTOCOL_MEMBERS = (
    "name",
    "capabilities",
    "from_numpy",
    "to_numpy",
    "init_state",
    "load_state",
    "state_to_numpy",
    "train_step",
    "eval_step",
    "backward",
)


_V1_KEYWORDS = frozenset({"eps", "axis", "decay", "lam", "tau", "estimator"})


class AdapterLoadError(ValueError):
    """The implementation could not be found or is not an :class:`Adapter` (says why)."""


def load_adapter(spec: str) -> Adapter:
    """The adapter named by ``module:factory`` or ``module:factory(arg)``.

    The factory is called (with the one string argument, if given); an attribute that already
    is an adapter is used as it is. The current directory is importable, as with
    ``python -m``.

    >>> load_adapter("mbn_conformance.builtin:make(numpy)").name
    'mbn_ref[numpy]'
    """
    target, paren, rest = spec.partition("(")
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr or (paren and not rest.endswith(")")):
        raise AdapterLoadError(
            f"{spec!r} is malformed: expected 'module:factory', e.g. 'my_package.adapter:make'"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise AdapterLoadError(
            f"cannot import module {module_name!r} of {spec!r}: {type(exc).__name__}: {exc} "
            "(is it installed, or on sys.path?)"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AdapterLoadError(
                f"module {module_name!r} has no attribute {attr!r} (from {spec!r})"
            ) from None
    args = [rest[:-1]] if paren else []
    adapter = obj
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Adapter)):
        try:
            adapter = obj(*args)
        except Exception as exc:
            raise AdapterLoadError(
                f"the factory {spec!r} raised {type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(adapter, Adapter):
        missing = [n for n in PROTOCOL_MEMBERS if not hasattr(adapter, n)]
        raise AdapterLoadError(
            f"{spec!r} returned {type(adapter).__name__}, not an Adapter (missing: {missing}); "
            "see mbn_conformance.protocol.Adapter"
        )
    old = protocol_v1_methods(adapter)
    if old:
        raise AdapterLoadError(
            f"{spec!r} speaks protocol version 1: {', '.join(old)} take(s) the step's settings "
            "as keywords; version 2 passes one Step (and init_state a Setup): see "
            "docs/conformance.md, 'Writing an adapter'"
        )
    return adapter


def protocol_v1_methods(adapter: Any) -> list[str]:
    """The adapter's methods with a version-1 signature (keyword ``eps``/``decay``...).

    Version 2 passes a :class:`~mbn_conformance.protocol.Step` positionally; a method that
    still declares the keywords of version 1 cannot work, so the loader says so at once.
    """
    old = []
    for name in ("train_step", "eval_step", "sync_train_step"):
        method = getattr(adapter, name, None)
        if method is None:
            continue
        try:
            params = inspect.signature(method).parameters
        except (TypeError, ValueError):  # a builtin or C callable: nothing to tell
            continue
        if any(
            p.kind is inspect.Parameter.KEYWORD_ONLY and p.name in _V1_KEYWORDS
            for p in params.values()
        ):
            old.append(f"{name}()")
    return old


def backend_adapter(name: str) -> Adapter:
    """The built-in adapter of the core on backend ``name`` (``numpy``, ...)."""
    from . import builtin

    try:
        return builtin.make(name)
    except ImportError as exc:
        raise AdapterLoadError(f"backend {name!r} is not available: {exc}") from None
    except (RuntimeError, ValueError) as exc:
        raise AdapterLoadError(f"backend {name!r}: {exc}") from None
