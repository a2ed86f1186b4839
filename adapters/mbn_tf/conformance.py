"""The conformance adapter of ``mbn_tf``: ``mbn-ref conformance --backend keras``.

It runs the Keras 3 **layers** through the suite (``docs/conformance.md``, protocol version
2) on Keras' TensorFlow backend, as a user runs them: the state is the layer itself (its
variables), each step's decays are assigned to the layer's decay variables and the gradients
come from ``tf.GradientTape``.

========================  ======================================================================
suite (canonical)         ``mbn_tf``
========================  ======================================================================
``Setup`` kind ``"mbn"``  ``MomentumBatchNormalization``
``Setup`` kind ``"bn"``   ``DynamicBatchNormalization``; ``make("mbn")``:
                          ``MomentumBatchNormalization`` with ``lam = 0`` instead
layout                    ``axis=1`` for ``NC`` to ``NCDHW``, ``axis=-1`` for ``NHWC``
dtype                     the Keras dtype policy :data:`POLICIES`: float16 runs
                          ``mixed_float16`` (float32 variables and statistics)
``step.lam``              ``layer.lam = lam`` (assigns the variable ``lam``; validated)
``step.decay``/``tau``    ``layer.momentum = decay`` (assigns ``inference_decay``; validated)
``step.eps``              ``layer.epsilon`` (the core refuses ``eps <= 0`` at the call)
``running_var``           declared ``"biased"`` (Keras' ``moving_variance``)
state keys                ``running_mean``/``running_var``: ``moving_mean``/``moving_variance``;
                          MBN's ``moving_mean``/``moving_var``: ``moving_train_mean``/
                          ``moving_train_variance``; no counter (Keras counts no batches)
gradients                 ``tf.GradientTape`` of the layer's output (the core's backward through
                          ``tf.custom_gradient``)
synchronized steps        one replica layer per shard, on threads
                          (:func:`mbn_ref.distributed.simulate`), whose ``_all_sum`` hook
                          returns the simulated collective; the backward runs on threads too
========================  ======================================================================

Not declared, and why: the cumulative average (``decay=None``, ``tau=None``; Keras keeps no
batch counter, so the layers have none), and the refusal of a batch of one value per channel
(Keras normalizes it to ``beta``, its variance being 0, and so do the layers). The
``schedule/*`` checks run the callback :class:`mbn_tf.MomentumScheduler` through Keras'
callback hooks (:meth:`KerasLayersAdapter.scheduled_train_step`).

The synchronized cases run the layers' own training path with a collective among threads,
in one process; the ``tf.distribute`` path of the same hook (``synchronized=True``) is not
exercised here.

Known failures (:data:`KNOWN_FAILURES`) are declared with their reasons: the report lists
them as expected failures, and one that starts passing fails the run (remove it then).

>>> from mbn_conformance import checks
>>> adapter = make()
>>> adapter.capabilities.running_var, adapter.capabilities.native_momentum
('biased', 'decay')
>>> found = checks(adapter, select=["bn/NC/N2/*", "sync-mbn/NC/*"])
>>> [(c.id, c.outcome().status) for c in found]  # doctest: +NORMALIZE_WHITESPACE
[('bn/NC/N2/float64/eps1e-05', 'pass'),
 ('sync-mbn/NC/N7/float64/eps1e-05/lam0.5/shards0-2-0-5/init-random', 'pass')]
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import mbn_ref
from mbn_conformance.protocol import Capabilities, Kind, ScheduleSetup, Setup, Step
from mbn_ref.distributed import AllSum, simulate

from .callbacks import MomentumScheduler
from .layers import (
    DynamicBatchNormalization,
    MomentumBatchNormalization,
    _DecayNormalization,
)

__all__ = ["KNOWN_FAILURES", "POLICIES", "Call", "KerasLayersAdapter", "Layer", "make"]

if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    raise ImportError(
        "mbn_tf.conformance runs the layers on Keras' TensorFlow backend; "
        f"KERAS_BACKEND={keras.backend.backend()!r}"
    )

POLICIES: dict[str, str] = {
    "float16": "mixed_float16",
    "float32": "float32",
    "float64": "float64",
}
"""The Keras dtype policy a layer runs under, per input dtype of the suite."""

KNOWN_FAILURES: dict[str, str] = {}
"""Check-id patterns the layers fail, and why."""

# canonical key -> the layer's variable, per kind
_STATE_VARIABLES: dict[str, dict[str, str]] = {
    "bn": {"running_mean": "moving_mean", "running_var": "moving_variance"},
    "mbn": {
        "moving_mean": "moving_train_mean",
        "moving_var": "moving_train_variance",
        "running_mean": "moving_mean",
        "running_var": "moving_variance",
    },
}


@dataclass
class Layer:
    """The state the suite holds: a built layer and the kind of layer it plays.

    Attributes
    ----------
    kind : {"bn", "mbn"}
        The suite's kind: which canonical keys the state has (``moving_*`` for MBN only).
    layer : mbn_tf.layers._DecayNormalization
        The built layer; its variables are the state.
    """

    kind: Kind
    layer: _DecayNormalization
    scheduler: MomentumScheduler | None = None

    @property
    def keys(self) -> dict[str, str]:
        """Canonical key -> the name of the layer's variable holding it."""
        return _STATE_VARIABLES[self.kind]

    def variable(self, key: str) -> Any:
        """The layer's variable under the canonical ``key``."""
        return getattr(self.layer, self.keys[key])


@dataclass
class Call:
    """One training call of a layer, what its backward needs.

    Attributes
    ----------
    layer : mbn_tf.layers._DecayNormalization
        The layer called (its ``gamma`` and ``beta`` are differentiated).
    tape : tf.GradientTape
        The (persistent) tape that recorded the call.
    x, y : tf.Tensor
        The input (watched) and the output.
    """

    layer: _DecayNormalization
    tape: tf.GradientTape
    x: tf.Tensor
    y: tf.Tensor

    def grads(self, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` from the tape (``None`` without affine parameters).

        An input the output does not depend on gets zeros (an empty batch's ``gamma``).
        """
        params = _params(self.layer)
        sources = [self.x, *params]
        got = self.tape.gradient(
            self.y,
            sources,
            output_gradients=tf.cast(dy, self.y.dtype),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        if not params:
            return got[0], None, None
        return got[0], got[1], got[2]


def _params(layer: _DecayNormalization) -> list[Any]:
    """``[gamma, beta]`` as the TensorFlow variables a tape differentiates (empty if none)."""
    if layer.gamma is None or layer.beta is None:
        return []
    return [layer.gamma.value, layer.beta.value]


class KerasLayersAdapter:
    """``mbn_tf``'s layers under the conformance suite (see the module docstring).

    Parameters
    ----------
    bn_through_mbn : bool, optional
        Run BN (kind ``"bn"``) through ``MomentumBatchNormalization`` with ``lam = 0``
        instead of ``DynamicBatchNormalization``.
    """

    def __init__(self, *, bn_through_mbn: bool = False) -> None:
        self.bn_class: type[_DecayNormalization] = (
            MomentumBatchNormalization if bn_through_mbn else DynamicBatchNormalization
        )
        via = "MomentumBatchNormalization lam=0" if bn_through_mbn else "DynamicBatchNormalization"
        self.name = (
            f"mbn_tf layers (BN: {via}; keras {keras.__version__}, tensorflow {tf.__version__})"
        )
        self.capabilities = Capabilities(
            dtypes=frozenset(POLICIES),
            layouts=frozenset({"NC", "NCL", "NCHW", "NCDHW", "NHWC"}),
            algorithms=frozenset({"bn", "dynamic_bn", "mbn", "sync"}),
            running_var="biased",
            native_momentum="decay",
            batch_counter=False,
            cumulative_tau=False,
            refuses=frozenset({"decay_out_of_range", "eps_not_positive"}),
            version=mbn_ref.__version__,
            known_failures=KNOWN_FAILURES,
        )

    # -- arrays -------------------------------------------------------------------------
    def from_numpy(self, a: np.ndarray) -> tf.Tensor:
        """``a`` as a ``tf.Tensor`` of the same dtype (a copy)."""
        return tf.constant(np.array(a))

    def to_numpy(self, a: Any) -> np.ndarray:
        """A tensor (or variable) as a NumPy array."""
        return np.array(a.numpy())

    # -- state: the layer's variables ---------------------------------------------------
    def _build(self, kind: Kind, setup: Setup) -> _DecayNormalization:
        cls = MomentumBatchNormalization if kind == "mbn" else self.bn_class
        layer = cls(
            axis=setup.axis,
            center=setup.affine,
            scale=setup.affine,
            dtype=POLICIES[setup.dtype],
        )
        layer.build((None, *setup.shape[1:]))
        return layer

    def init_state(self, setup: Setup) -> Layer:
        """A layer built for ``setup``'s kind, axis, dtype policy and affinity."""
        if setup.dtype not in POLICIES:
            raise ValueError(f"no Keras policy for dtype {setup.dtype!r}")
        return Layer(setup.kind, self._build(setup.kind, setup))

    def load_state(self, state: Layer, values: Mapping[str, np.ndarray]) -> Layer:
        """``state`` with the canonical ``values`` assigned to its layer's variables."""
        for key in state.keys:
            if key in values:
                variable = state.variable(key)
                variable.assign(np.asarray(values[key], dtype=variable.dtype))
        return state

    def state_to_numpy(self, state: Layer) -> dict[str, np.ndarray]:
        """Copies of the layer's statistics under the canonical keys of its kind."""
        return {key: self.to_numpy(state.variable(key)) for key in state.keys}

    # -- steps --------------------------------------------------------------------------
    @staticmethod
    def _configure(
        step: Step, layer: _DecayNormalization, gamma: Any, beta: Any, *, decays: bool = True
    ) -> None:
        """Set ``step``'s decays (unless not ``decays``), eps and affine parameters.

        The decays go through the layer's validating setters; a refused value leaves the
        layer's decays as they were.
        """
        if decays:
            before = [v.numpy() for v in _decay_variables(layer)]
            try:
                if step.inference_decay is None:
                    raise ValueError("the mbn_tf layers have no cumulative average (decay=None)")
                layer.momentum = step.inference_decay
                if isinstance(layer, MomentumBatchNormalization):
                    layer.lam = step.lam if step.kind == "mbn" else 0.0
            except Exception:
                for variable, value in zip(_decay_variables(layer), before, strict=True):
                    variable.assign(value)
                raise
        layer.epsilon = step.eps
        if layer.gamma is not None and layer.beta is not None:
            layer.gamma.assign(tf.cast(gamma, layer.gamma.dtype))
            layer.beta.assign(tf.cast(beta, layer.beta.dtype))

    @staticmethod
    def _call(layer: _DecayNormalization, x: Any) -> Call:
        """``layer`` on ``x`` in training, under a tape watching ``x``."""
        tape = tf.GradientTape(persistent=True)
        with tape:
            tape.watch(x)
            y = layer(x, training=True)
        return Call(layer, tape, x, y)

    def train_step(
        self, step: Step, state: Layer, x: Any, gamma: Any, beta: Any
    ) -> tuple[Any, Layer, Call]:
        """One eager training call of the layer, which assigns its statistics."""
        self._configure(step, state.layer, gamma, beta)
        call = self._call(state.layer, x)
        return call.y, state, call

    def eval_step(self, step: Step, state: Layer, x: Any, gamma: Any, beta: Any) -> Any:
        """One eager call with ``training=False`` (normalizes with the moving statistics)."""
        self._configure(step, state.layer, gamma, beta, decays=False)
        return state.layer(x, training=False)

    def backward(self, ctx: Call, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` from the step's tape."""
        return ctx.grads(dy)

    def scheduled_train_step(
        self,
        schedule: ScheduleSetup,
        epoch: int,
        step: Step,
        state: Layer,
        x: Any,
        gamma: Any,
        beta: Any,
    ) -> tuple[Any, Layer, Call, tuple[float, float]]:
        """An MBN training step with the decays of the callback :class:`mbn_tf.MomentumScheduler`.

        The callback (the paper's Eq. 11 and Eq. 12 for ``schedule``, per epoch) is attached
        to a model holding the layer at the first call and driven through Keras' callback
        hooks, one epoch per completed epoch, as ``fit`` would; the decays reported are the
        layer's variables ``lam`` and ``inference_decay`` that the call used.
        """
        layer = state.layer
        if not isinstance(layer, MomentumBatchNormalization):
            raise TypeError(f"a scheduled MBN step needs an MBN layer, got {type(layer)}")
        callback = state.scheduler
        if callback is None or callback.epochs > epoch:
            callback = MomentumScheduler(
                batch_size=schedule.batch_size,
                total_epochs=schedule.total_epochs,
                ideal_batch_size=schedule.ideal_batch_size,
                tau0=schedule.tau0,
            )
            callback.set_model(keras.Sequential([layer]))
            callback.on_train_begin()
            state.scheduler = callback
        while callback.epochs < epoch:
            callback.on_epoch_end(callback.epochs)
        callback.on_epoch_begin(epoch)
        self._configure(step, layer, gamma, beta, decays=False)
        used = (float(layer.lam.numpy()), float(layer.inference_decay.numpy()))
        call = self._call(layer, x)
        return call.y, state, call, used

    # -- synchronized statistics --------------------------------------------------------
    def sync_train_step(
        self, step: Step, state: Layer, shards: Sequence[Any], gamma: Any, beta: Any
    ) -> tuple[list[Any], Layer, list[Call]]:
        """A synchronized training step: one replica layer per shard, on threads.

        The replicas are layers of ``state``'s class and configuration holding its
        statistics; each one's ``_all_sum`` hook returns its rank's collective of
        :func:`mbn_ref.distributed.simulate`, so the layer's own training path computes the
        global statistics. Every rank must end with the same state (checked), which is
        assigned to ``state``'s layer.
        """
        source = state.layer
        replicas = [type(source).from_config(source.get_config()) for _ in shards]
        for replica in replicas:
            replica.build((None, *shards[0].shape[1:]))
            for ours, theirs in zip(replica.weights, source.weights, strict=True):
                ours.assign(theirs)
            self._configure(step, replica, gamma, beta)

        def run_rank(r: int, all_sum: AllSum) -> Call:
            replicas[r]._all_sum = _returning(all_sum)
            return self._call(replicas[r], shards[r])

        calls = simulate(len(shards), run_rank)
        states = [self.state_to_numpy(Layer(state.kind, r)) for r in replicas]
        for r, other in enumerate(states[1:], start=1):
            differ = [k for k in other if not np.array_equal(other[k], states[0][k])]
            if differ:
                raise RuntimeError(f"rank {r} ended with another state than rank 0: {differ}")
        self._configure(step, source, gamma, beta)
        for key in state.keys:
            state.variable(key).assign(Layer(state.kind, replicas[0]).variable(key))
        return [c.y for c in calls], state, calls

    def sync_backward(self, ctx: Sequence[Call], dys: Sequence[Any]) -> tuple[list[Any], Any, Any]:
        """Every rank's tape gradient, on threads (the core's backward sums two C-vectors).

        ``dgamma``/``dbeta`` are the ranks' sums added, as data-parallel training reduces
        them.
        """
        if len(dys) != len(ctx):
            raise ValueError(f"got {len(dys)} gradients for {len(ctx)} shards")
        grads = simulate(len(ctx), lambda r, _: ctx[r].grads(dys[r]))
        dxs = [g[0] for g in grads]
        if grads[0][1] is None:
            return dxs, None, None
        return dxs, tf.add_n([g[1] for g in grads]), tf.add_n([g[2] for g in grads])


def _decay_variables(layer: _DecayNormalization) -> list[Any]:
    """The layer's decay variables (``inference_decay``, and MBN's ``lam``)."""
    if isinstance(layer, MomentumBatchNormalization):
        return [layer.inference_decay, layer.lam]
    return [layer.inference_decay]


def _returning(all_sum: AllSum) -> Callable[[], AllSum]:
    """A layer's ``_all_sum`` hook that returns ``all_sum``."""

    def hook() -> AllSum:
        return all_sum

    return hook


def make(arg: str | None = None) -> KerasLayersAdapter:
    """The factory of ``--backend keras`` (entry point group ``mbn_conformance.backends``).

    Parameters
    ----------
    arg : {None, "mbn"}, optional
        ``"mbn"``: BN through ``MomentumBatchNormalization`` with ``lam = 0`` instead of
        ``DynamicBatchNormalization`` (``--impl 'mbn_tf.conformance:make(mbn)'``, or
        ``mbn_conformance.loading.backend_adapter("keras:mbn")``).

    Returns
    -------
    KerasLayersAdapter
        The adapter.

    Raises
    ------
    ValueError
        An unknown ``arg``.

    Examples
    --------
    >>> make("mbn").name.split(";")[0]
    'mbn_tf layers (BN: MomentumBatchNormalization lam=0'
    """
    if arg not in (None, "", "mbn"):
        raise ValueError(f"mbn_tf.conformance.make takes nothing or 'mbn', got {arg!r}")
    return KerasLayersAdapter(bn_through_mbn=arg == "mbn")
