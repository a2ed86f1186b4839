"""Finding the implementation under test: ``module:factory`` specs and named backends.

One loader for the CLI (``--impl``, ``--backend``) and the pytest plugin (``--mbn-impl``,
``MBN_IMPL``, ``--mbn-backend``); each front end turns :class:`AdapterLoadError` into its own
usage error.

A backend name is a built-in one (:data:`mbn_conformance.builtin.BACKENDS`, the core on an
Array API namespace) or one that an installed package registers in the entry-point group
:data:`ENTRY_POINT_GROUP` (``name = "module:factory"``), as ``mbn-ref`` registers ``torch``
for ``mbn_torch.conformance:make``: the suite finds it without importing the package by
name, and imports it only when it is asked for. Built-in names win.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from importlib import metadata
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


ENTRY_POINT_GROUP = "mbn_conformance.backends"
"""The entry-point group of third-party backends: ``name = "module:factory"``."""

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


def registered_backends() -> dict[str, str]:
    """Backends registered in :data:`ENTRY_POINT_GROUP`: name -> ``module:factory``.

    Nothing is imported (the metadata of installed distributions is read). Where two
    distributions register one name, the first in sorted order of their values wins.

    >>> registered_backends().get("torch")
    'mbn_torch.conformance:make'
    """
    found: dict[str, str] = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.value):
        found.setdefault(ep.name, ep.value)
    return dict(sorted(found.items()))


def backend_names(builtin: Sequence[str]) -> list[str]:
    """The names ``--backend`` accepts: the ``builtin`` ones, then the registered others.

    >>> backend_names(["numpy"])[:1], "torch" in backend_names(["numpy"])
    (['numpy'], True)
    """
    return [*builtin, *(n for n in registered_backends() if n not in builtin)]


def _unknown_backend(name: str, builtin: Sequence[str], registered: dict[str, str]) -> str:
    listed = ", ".join(f"{n} ({spec})" for n, spec in registered.items() if n not in builtin)
    return (
        f"unknown backend {name!r}; built-in: {', '.join(builtin)}; registered in the "
        f"entry-point group {ENTRY_POINT_GROUP!r}: {listed or 'none'}"
    )


def backend_spec(name: str) -> str:
    """The ``module:factory(arg)`` spec that backend ``name`` (``name:arg`` too) stands for.

    A built-in name is ``mbn_conformance.builtin:make(name)``; a registered one is its entry
    point's value, called with ``arg`` when ``name`` carries one (``torch:mbn``).
    :class:`AdapterLoadError` for an unknown name, listing the built-in and the registered
    backends.

    >>> backend_spec("numpy"), backend_spec("torch:mbn")
    ('mbn_conformance.builtin:make(numpy)', 'mbn_torch.conformance:make(mbn)')
    """
    from .builtin import BACKENDS

    base, sep, arg = name.partition(":")
    if base in BACKENDS:
        return f"mbn_conformance.builtin:make({name})"
    registered = registered_backends()
    if base not in registered:
        raise AdapterLoadError(_unknown_backend(name, BACKENDS, registered))
    return registered[base] + (f"({arg})" if sep else "")


def backend_adapter(name: str) -> Adapter:
    """The adapter of backend ``name``: a built-in one (``numpy``...) or a registered one.

    A registered backend that cannot be imported or built is an :class:`AdapterLoadError` of
    one line naming the backend, its entry point and the cause.

    >>> backend_adapter("numpy").name
    'mbn_ref[numpy]'
    """
    from . import builtin

    spec = backend_spec(name)
    if name.partition(":")[0] not in builtin.BACKENDS:
        try:
            return load_adapter(spec)
        except AdapterLoadError as exc:
            cause = (str(exc).strip().splitlines() or [""])[0]
            raise AdapterLoadError(
                f"backend {name!r} (entry point {spec!r} of group {ENTRY_POINT_GROUP!r}): {cause}"
            ) from None
    try:
        return builtin.make(name)
    except ImportError as exc:
        raise AdapterLoadError(f"backend {name!r} is not available: {exc}") from None
    except (RuntimeError, ValueError) as exc:
        raise AdapterLoadError(f"backend {name!r}: {exc}") from None
