"""Built-in adapters: the core (:mod:`mbn_ref`) on each Array API namespace.

``numpy``, ``array-api-strict``, ``torch-xp`` (PyTorch tensors through array-api-compat) and
``cupy`` (needs a CUDA GPU). They are what the golden vectors were computed with, so they
check the suite's plumbing and the core's portability; third-party adapters follow the same
pattern (see ``docs/conformance.md``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

import mbn_ref as mr
from mbn_ref import distributed, schedules

from .protocol import REFUSALS, Capabilities, ScheduleSetup, Setup, Step

BACKENDS = ("numpy", "array-api-strict", "torch-xp", "cupy")


def _namespace(backend: str) -> tuple[Any, frozenset[str]]:
    """The backend's Array API namespace and the dtypes it offers."""
    all_dtypes = frozenset({"float16", "float32", "float64"})
    if backend == "numpy":
        return importlib.import_module("array_api_compat.numpy"), all_dtypes
    if backend == "array-api-strict":
        # the standard has no float16: strict namespaces run float32/float64 only
        return importlib.import_module("array_api_strict"), frozenset({"float32", "float64"})
    if backend == "torch-xp":
        return importlib.import_module("array_api_compat.torch"), all_dtypes
    if backend == "cupy":
        cp = importlib.import_module("cupy")
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("the cupy backend needs a CUDA GPU; none is visible")
        return importlib.import_module("array_api_compat.cupy"), all_dtypes
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


class CoreAdapter:
    """The core's functions on one namespace, a :class:`~mbn_conformance.protocol.SyncAdapter`.

    It speaks the suite's canonical convention (decays, canonical state keys) natively and
    refuses every bad input of :data:`~mbn_conformance.protocol.REFUSALS`.

    Parameters
    ----------
    backend : str
        One of :data:`BACKENDS`.
    running_var : {"biased", "unbiased"}
        The running-variance estimator it stores (the core offers both).
    """

    def __init__(self, backend: str = "numpy", *, running_var: str = "biased") -> None:
        self.xp, dtypes = _namespace(backend)
        self.name = f"mbn_ref[{backend}]" + ("" if running_var == "biased" else f"[{running_var}]")
        self.capabilities = Capabilities(
            dtypes=dtypes,
            running_var=running_var,
            refuses=frozenset(REFUSALS),
            version=mr.__version__,
        )

    # -- arrays -------------------------------------------------------------------------
    def from_numpy(self, a: np.ndarray) -> Any:
        """``a`` as an array of the backend's namespace."""
        return self.xp.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        """The backend's array ``a`` as a NumPy array (moved to the host first: torch, CuPy)."""
        if hasattr(a, "detach"):
            return np.asarray(a.detach().cpu().numpy())
        if hasattr(a, "get"):
            return np.asarray(a.get())
        return np.asarray(a)

    # -- state --------------------------------------------------------------------------
    def init_state(self, setup: Setup) -> Any:
        """A fresh :class:`mbn_ref.MBNState` (MBN) or :class:`mbn_ref.BNState`, float64.

        The golden state is float64 whatever the input dtype: states are kept at the spec
        precision, inputs and outputs in the case's dtype.
        """
        init = mr.init_state if setup.kind == "mbn" else mr.init_bn_state
        return init(setup.num_features, xp=self.xp, dtype=self.xp.float64)

    def load_state(self, state: Any, values: Mapping[str, np.ndarray]) -> Any:
        """A state of ``state``'s type holding ``values`` (canonical keys are the core's)."""
        return type(state)(**{f: self.xp.asarray(values[f]) for f in state._fields})

    def state_to_numpy(self, state: Any) -> dict[str, np.ndarray]:
        """The state's fields as NumPy arrays, keyed by field name (the canonical keys)."""
        return {f: self.to_numpy(v) for f, v in zip(state._fields, state, strict=True)}

    # -- steps --------------------------------------------------------------------------
    @staticmethod
    def _kwargs(step: Step) -> dict[str, Any]:
        """The core's keyword arguments for ``step`` (its names are the suite's)."""
        kw: dict[str, Any] = {"eps": step.eps, "axis": step.axis, "estimator": step.estimator}
        if step.kind == "mbn":
            kw.update(lam=step.lam, tau=step.tau)
        else:
            kw.update(decay=step.decay)
        return kw

    @staticmethod
    def _forward(step: Step) -> Any:
        return mr.mbn_forward if step.kind == "mbn" else mr.bn_forward

    def train_step(
        self, step: Step, state: Any, x: Any, gamma: Any, beta: Any
    ) -> tuple[Any, Any, Any]:
        """``(y, new_state, ctx)`` of :func:`mbn_ref.mbn_forward` or :func:`mbn_ref.bn_forward`."""
        out: tuple[Any, Any, Any] = self._forward(step)(x, state, gamma, beta, **self._kwargs(step))
        return out

    def eval_step(self, step: Step, state: Any, x: Any, gamma: Any, beta: Any) -> Any:
        """``y`` of the core's forward function with ``training=False``."""
        return self._forward(step)(
            x, state, gamma, beta, eps=step.eps, axis=step.axis, training=False
        )[0]

    def backward(self, ctx: Any, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` from :func:`mbn_ref.backward` (BN and MBN alike)."""
        return mr.mbn_backward(dy, ctx)

    def sync_train_step(
        self, step: Step, state: Any, shards: Sequence[Any], gamma: Any, beta: Any
    ) -> tuple[list[Any], Any, Any]:
        """``(ys, new_state, ctxs)`` of :mod:`mbn_ref.distributed`'s simulated sync forward.

        Every shard's state is the same; the first one is returned.
        """
        sync = distributed.sync_mbn_forward if step.kind == "mbn" else distributed.sync_bn_forward
        ys, states, ctxs = sync(shards, state, gamma, beta, **self._kwargs(step))
        return ys, states[0], ctxs

    def scheduled_train_step(
        self,
        schedule: ScheduleSetup,
        epoch: int,
        step: Step,
        state: Any,
        x: Any,
        gamma: Any,
        beta: Any,
    ) -> tuple[Any, Any, Any, tuple[float, float]]:
        """An MBN step with the decays of :mod:`mbn_ref.schedules` (Eq. 11 and Eq. 12).

        The core drives its own decays like an adapter's scheduler would: ``epoch`` completed
        epochs are the paper's 1-indexed ``t = epoch + 1``.
        """
        lam = schedules.mbn_lambda(
            epoch + 1,
            total_epochs=schedule.total_epochs,
            batch_size=schedule.batch_size,
            ideal_batch_size=schedule.ideal_batch_size,
        )
        tau = schedules.mbn_tau(
            batch_size=schedule.batch_size,
            ideal_batch_size=schedule.ideal_batch_size,
            tau0=schedule.tau0,
        )
        y, new_state, ctx = self.train_step(replace(step, lam=lam, tau=tau), state, x, gamma, beta)
        return y, new_state, ctx, (lam, tau)

    def sync_backward(self, ctx: Any, dys: Sequence[Any]) -> tuple[list[Any], Any, Any]:
        """``(dxs, dgamma, dbeta)`` of :func:`mbn_ref.distributed.sync_backward`.

        ``ctx`` is the list of per-shard contexts :meth:`sync_train_step` returned.
        """
        return distributed.sync_backward(dys, ctx)


def make(backend: str = "numpy") -> CoreAdapter:
    """Factory for ``--backend`` (and ``--impl mbn_conformance.builtin:make``).

    ``backend`` may end in ``:unbiased`` for the core storing the unbiased running variance
    (``--impl 'mbn_conformance.builtin:make(numpy:unbiased)'``).
    """
    name, _, estimator = backend.partition(":")
    return CoreAdapter(name, running_var=estimator or "biased")
