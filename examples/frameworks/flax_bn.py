"""Flax's own ``flax.linen.BatchNorm`` through the conformance suite: plain and under ``pmap``.

Two adapters, three factories:

- ``mbn-ref conformance --impl examples.frameworks.flax_bn:make``: the module on one device.
- ``mbn-ref conformance --impl examples.frameworks.flax_bn:make_pmap``: the same, plus
  synchronized steps under ``jax.pmap`` with ``axis_name`` over virtual CPU devices.
- ``...:make_two_pass``: the module with ``use_fast_variance=False``, a control.

Each step builds ``nn.BatchNorm`` with the step's ``momentum`` (a decay) and ``epsilon`` and
Flax's defaults otherwise (``use_fast_variance=True``, ``force_float32_reductions=True``),
and applies it eagerly with ``mutable=["batch_stats"]``; the gradients come from
``jax.vjp`` of the apply (``dx``, ``dscale``, ``dbias``). The state is the ``batch_stats``
collection (``mean``, ``var``).

**Setup it needs.** Importing the module enables ``jax_enable_x64`` (the float64 cases need
it; it changes JAX's default dtypes for the whole process) and asks for :data:`DEVICES` CPU
devices with ``jax.config.update("jax_num_cpu_devices", ...)``, the configuration form of
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Both must happen before JAX
initializes its backend: import this module before any JAX operation runs (``--impl`` does),
or set ``XLA_FLAGS`` yourself. In a process whose JAX is already initialized the plain
adapter still works, and the ``pmap`` adapter runs as many shards as there are devices
(``tests/test_frameworks.py`` and ``findings.py`` run it in a fresh process).

What they declare, and why:

- ``running_var="biased"`` (``_compute_stats`` divides by ``m``); ``momentum`` is a decay
  (``ra = momentum * ra + (1 - momentum) * batch`` in ``BatchNorm.__call__``).
- every layout (``axis=1``, or ``-1`` for ``NHWC``), affine parameters optional
  (``use_scale=use_bias=False``), float16/32/64: float16 runs ``dtype=float16`` with float32
  parameters (Flax reduces in at least float32); the statistics are held in
  ``promote_types(dtype, float32)``, which is what ``BatchNorm.__call__`` stores after a step
  (its initializer's float32 becomes float64 at the first float64 update).
- ``batch_counter=False`` (no counter, no cumulative average), no MBN, ``refuses`` nothing
  (Flax checks neither ``momentum`` nor ``epsilon``; one value per channel normalizes to the
  bias).

**Unequal and empty shards under pmap.** ``pmap`` maps equal slices, so the adapter pads
every shard with zero rows to the largest one and passes ``BatchNorm``'s ``mask`` argument
(``True`` on the real rows), which is what ``mask`` is for; padded outputs are dropped. Equal
shards run without a mask. The statistics Flax then computes are its own.

Known failures, found by the suite and read in the installed Flax source
(``flax/linen/normalization.py``; the reasons are in :data:`KNOWN_FAILURES` and
:data:`PMAP_KNOWN_FAILURES`):

- **Fast variance on offset data.** ``_compute_stats`` with the default
  ``use_fast_variance=True`` computes ``var = maximum(0, E[x^2] - E[x]^2)`` (in one fusion
  with the mean, ``maybe_distributed_mean(x, _abs_sq(x))``): on data at ``1e4`` with unit
  spread, float32 loses the variance entirely (the golden offset case: ``y`` off by about
  900, ``dx`` by ``1e7``) and float64 keeps half its digits (``y`` off by ``1e-8``, beyond
  the float64 tolerance); the offset examples of the properties ``bn_affine_invariance`` and
  ``bn_normalized_moments`` fail too. ``make_two_pass`` (``use_fast_variance=False``, the
  variance as the mean of ``_abs_sq(x - mean)``) passes them all.
- **An empty batch makes the running statistics NaN.** ``_compute_stats`` takes
  ``x.mean(axes)`` of zero elements (NaN) and ``BatchNorm.__call__`` updates ``mean``/``var``
  on every training call.
- **pmap: a plain mean of shard means** (``make_pmap`` only). ``_compute_stats``'
  ``maybe_distributed_mean`` takes each device's mean and then ``lax.pmean`` over
  ``axis_name``: an unweighted average of per-shard means, right only for equal shards (the
  equal-shard case passes); with unequal shards the mean and variance are wrong (shards of
  1, 3 and 2 rows: ``y`` off by 0.3 in float64), and an empty shard's mean of nothing
  (``where=mask`` all false) is NaN on every device. The property ``sync_shard_equivalence``
  fails for both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEVICES = 8
"""Virtual CPU devices asked for: the most shards a ``pmap`` step can have."""


def configure_jax(devices: int = DEVICES) -> int:
    """Enable float64 and ask for ``devices`` CPU devices; the number JAX has.

    The device count can only be set before JAX initializes its backend (and is left alone
    when ``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``); afterwards
    the count stays what it is.

    Parameters
    ----------
    devices : int
        CPU devices wanted.

    Returns
    -------
    int
        ``jax.local_device_count()``.
    """
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # once the backend is initialized the update raises: keep its devices then
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", devices)
    jax.config.update("jax_enable_x64", True)
    return jax.local_device_count()


configure_jax()

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402

from mbn_conformance.protocol import Capabilities, Setup, Step  # noqa: E402

_FAST_VARIANCE = (
    "use_fast_variance=True (the default): _compute_stats (flax/linen/normalization.py) "
    "computes var = E[x^2] - E[x]^2, which loses the variance of data at 1e4 (all of it in "
    "float32, half its digits in float64)"
)

KNOWN_FAILURES: dict[str, str] = {
    "*/N0/*": "an empty batch makes batch_stats NaN: _compute_stats "
    "(flax/linen/normalization.py) takes the mean of zero elements and "
    "BatchNorm.__call__ updates mean/var on every training call",
    "*/offset": _FAST_VARIANCE,
    "property/bn_affine_invariance": _FAST_VARIANCE + "; the property shifts x by up to 1e4",
    "property/bn_normalized_moments": _FAST_VARIANCE + "; the property draws offset batches",
}
"""The plain module's known failures (Flax's defaults): check-id patterns and reasons."""

_SHARD_MEANS = (
    "a plain mean of shard means: _compute_stats' maybe_distributed_mean "
    "(flax/linen/normalization.py) lax.pmean's each device's own (masked) mean, unweighted"
)

PMAP_KNOWN_FAILURES: dict[str, str] = {
    "sync/*/shards1-0-4": "an empty shard makes everything NaN under pmap: "
    "_compute_stats' maybe_distributed_mean (flax/linen/normalization.py) takes each "
    "device's masked mean (NaN for zero elements) and lax.pmean's them",
    "sync/*/shards1-3-2/offset": _SHARD_MEANS + ", wrong for these unequal shards (with "
    "use_fast_variance=True the offset data's variance is lost too)",
    "property/sync_shard_equivalence": _SHARD_MEANS + ": wrong for unequal shards, NaN "
    "with an empty one",
    **KNOWN_FAILURES,
}
"""The ``pmap`` adapter's known failures: its own first, then the plain module's."""


def stats_dtype(dtype: str) -> Any:
    """The dtype of the statistics and parameters for inputs of ``dtype``."""
    return jnp.promote_types(dtype, jnp.float32)


@dataclass(frozen=True)
class FlaxState:
    """The ``batch_stats`` collection and the layer geometry.

    Attributes
    ----------
    mean, var : jax.Array
        ``batch_stats["mean"]`` and ``batch_stats["var"]``.
    setup : Setup
        The geometry the suite announced.
    """

    mean: jax.Array
    var: jax.Array
    setup: Setup

    def variables(self, gamma: Any, beta: Any) -> dict[str, Any]:
        """The variables ``nn.BatchNorm.apply`` takes, with ``gamma``/``beta`` if given."""
        out: dict[str, Any] = {"batch_stats": {"mean": self.mean, "var": self.var}}
        if gamma is not None:
            out["params"] = params(self.setup, gamma, beta)
        return out


def params(setup: Setup, gamma: Any, beta: Any) -> dict[str, Any]:
    """``{"scale", "bias"}`` in the parameter dtype."""
    dt = stats_dtype(setup.dtype)
    return {"scale": jnp.asarray(gamma, dt), "bias": jnp.asarray(beta, dt)}


def module(
    setup: Setup,
    step: Step,
    *,
    training: bool,
    fast_variance: bool = True,
    axis_name: str | None = None,
) -> nn.BatchNorm:
    """``nn.BatchNorm`` for ``setup`` and ``step`` (Flax's defaults otherwise).

    Parameters
    ----------
    setup : Setup
        The geometry: axis, dtype, affinity.
    step : Step
        Its ``decay`` becomes ``momentum`` (0.99, Flax's default, when ``None``: evaluation
        steps do not use it), its ``eps`` ``epsilon``.
    training : bool
        ``use_running_average=not training``.
    fast_variance : bool
        ``use_fast_variance`` (Flax's default ``True``).
    axis_name : str, optional
        The ``pmap`` axis to synchronize the statistics over.

    Returns
    -------
    nn.BatchNorm
        The module.
    """
    return nn.BatchNorm(
        use_running_average=not training,
        axis=setup.axis,
        momentum=0.99 if step.decay is None else float(step.decay),
        epsilon=float(step.eps),
        dtype=jnp.dtype(setup.dtype),
        param_dtype=stats_dtype(setup.dtype),
        use_bias=setup.affine,
        use_scale=setup.affine,
        axis_name=axis_name,
        use_fast_variance=fast_variance,
    )


def _without_fast_variance(failures: Mapping[str, str], fast: bool) -> dict[str, str]:
    """``failures``, less the fast variance's when ``use_fast_variance=False``."""
    return {k: v for k, v in failures.items() if fast or not v.startswith(_FAST_VARIANCE)}


class FlaxBatchNorm:
    """A conformance adapter for ``flax.linen.BatchNorm`` (see the module docstring).

    Parameters
    ----------
    fast_variance : bool
        ``use_fast_variance`` (default ``True``, Flax's default). ``False`` computes the
        variance around the mean and passes the offset cases.
    """

    name = f"flax.linen.BatchNorm (flax {flax.__version__}, jax {jax.__version__})"

    def __init__(self, *, fast_variance: bool = True) -> None:
        self.fast_variance = fast_variance
        if not fast_variance:
            self.name = f"{self.name}, use_fast_variance=False"
        self.capabilities = Capabilities(
            dtypes=frozenset({"float16", "float32", "float64"}),
            layouts=frozenset({"NC", "NCL", "NCHW", "NCDHW", "NHWC"}),
            algorithms=frozenset({"bn", "dynamic_bn"}),
            running_var="biased",
            native_momentum="decay",
            batch_counter=False,
            version=flax.__version__,
            known_failures=self._known_failures(),
        )

    def _known_failures(self) -> dict[str, str]:
        return _without_fast_variance(KNOWN_FAILURES, self.fast_variance)

    def from_numpy(self, a: np.ndarray) -> jax.Array:
        """``a`` as a JAX array of the same dtype."""
        return jnp.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        """A JAX array as a NumPy array."""
        return np.asarray(a)

    def init_state(self, setup: Setup) -> FlaxState:
        """Flax's initial ``batch_stats`` (mean 0, var 1) in the statistics dtype."""
        dt = stats_dtype(setup.dtype)
        c = setup.num_features
        return FlaxState(jnp.zeros(c, dt), jnp.ones(c, dt), setup)

    def load_state(self, state: FlaxState, values: Mapping[str, np.ndarray]) -> FlaxState:
        """``batch_stats`` holding ``values``."""
        dt = stats_dtype(state.setup.dtype)
        return replace(
            state,
            mean=jnp.asarray(values["running_mean"], dt),
            var=jnp.asarray(values["running_var"], dt),
        )

    def state_to_numpy(self, state: FlaxState) -> dict[str, np.ndarray]:
        """``batch_stats`` under the canonical keys (no counter)."""
        return {"running_mean": np.asarray(state.mean), "running_var": np.asarray(state.var)}

    def train_step(
        self, step: Step, state: FlaxState, x: Any, gamma: Any, beta: Any
    ) -> tuple[Any, FlaxState, Any]:
        """One training apply under ``jax.vjp``; the context is the pullback."""
        mod = module(state.setup, step, training=True, fast_variance=self.fast_variance)
        stats = {"mean": state.mean, "var": state.var}

        def forward(x: Any, *p: Any) -> tuple[Any, Any]:
            variables: dict[str, Any] = {"batch_stats": stats}
            if p:
                variables["params"] = {"scale": p[0], "bias": p[1]}
            y, updates = mod.apply(variables, x, mutable=["batch_stats"])
            return y, updates["batch_stats"]

        p = () if gamma is None else tuple(params(state.setup, gamma, beta).values())
        y, pullback, new = jax.vjp(forward, x, *p, has_aux=True)
        return y, replace(state, mean=new["mean"], var=new["var"]), (pullback, y.dtype)

    def eval_step(self, step: Step, state: FlaxState, x: Any, gamma: Any, beta: Any) -> Any:
        """One apply with ``use_running_average=True``."""
        mod = module(state.setup, step, training=False, fast_variance=self.fast_variance)
        return mod.apply(state.variables(gamma, beta), x)

    def backward(self, ctx: Any, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` from the step's pullback."""
        pullback, dtype = ctx
        grads = pullback(jnp.asarray(dy, dtype))
        if len(grads) == 1:
            return grads[0], None, None
        return grads[0], grads[1], grads[2]


AXIS = "shards"
"""The ``pmap`` axis name the statistics are synchronized over."""


class FlaxPmapBatchNorm(FlaxBatchNorm):
    """A fused-sync conformance adapter: ``nn.BatchNorm(axis_name=...)`` under ``jax.pmap``.

    Single-device steps are :class:`FlaxBatchNorm`'s; a synchronized step pads the shards to
    equal size (with ``mask``, see the module docstring) and runs forward and ``jax.vjp``
    in one ``pmap`` over one CPU device per shard.
    """

    name = (
        f"flax.linen.BatchNorm(axis_name=...) under jax.pmap "
        f"(flax {flax.__version__}, jax {jax.__version__})"
    )

    def __init__(self, *, fast_variance: bool = True) -> None:
        super().__init__(fast_variance=fast_variance)
        caps = self.capabilities
        self.capabilities = replace(caps, algorithms=caps.algorithms | {"sync"})
        self.devices = jax.local_device_count()

    def _known_failures(self) -> dict[str, str]:
        return _without_fast_variance(PMAP_KNOWN_FAILURES, self.fast_variance)

    def sync_step(
        self,
        step: Step,
        state: FlaxState,
        shards: Sequence[Any],
        gamma: Any,
        beta: Any,
        dys: Sequence[Any] | None,
    ) -> tuple[list[Any], FlaxState, list[Any] | None, Any, Any]:
        """One synchronized training step: forward and pullback in one ``pmap``.

        Parameters
        ----------
        step : Step
            The training step.
        state : FlaxState
            The state before the step.
        shards : sequence of jax.Array
            One input per device (empty ones included).
        gamma, beta : jax.Array or None
            The affine parameters.
        dys : sequence of jax.Array or None
            The upstream gradients per shard, or ``None`` for no backward.

        Returns
        -------
        tuple
            ``(ys, new_state, dxs, dgamma, dbeta)``; the last three ``None`` without
            ``dys``; ``dgamma``/``dbeta`` summed over the devices.
        """
        n = len(shards)
        if n > self.devices:
            raise ValueError(
                f"{n} shards but JAX has {self.devices} CPU devices: import flax_bn before "
                f"JAX initializes, or set XLA_FLAGS=--xla_force_host_platform_device_count"
            )
        setup = state.setup
        sizes = [int(s.shape[0]) for s in shards]
        rows = max(sizes)
        masked = len(set(sizes)) > 1
        ndim = len(setup.shape)

        def pad(a: Any) -> jax.Array:
            return jnp.pad(jnp.asarray(a), [(0, rows - a.shape[0])] + [(0, 0)] * (ndim - 1))

        xs = jnp.stack([pad(s) for s in shards])
        dys_ = jnp.zeros_like(xs) if dys is None else jnp.stack([pad(d) for d in dys])
        mask = jnp.stack(
            [(jnp.arange(rows) < k).reshape((rows,) + (1,) * (ndim - 1)) for k in sizes]
        )
        mod = module(setup, step, training=True, fast_variance=self.fast_variance, axis_name=AXIS)
        stats = {"mean": state.mean, "var": state.var}
        p = () if gamma is None else tuple(params(setup, gamma, beta).values())

        def device(x: Any, dy: Any, m: Any, *p: Any) -> tuple[Any, ...]:
            def forward(x: Any, *p: Any) -> tuple[Any, Any]:
                variables: dict[str, Any] = {"batch_stats": stats}
                if p:
                    variables["params"] = {"scale": p[0], "bias": p[1]}
                kw = {"mask": m} if masked else {}
                y, updates = mod.apply(variables, x, mutable=["batch_stats"], **kw)
                return y, updates["batch_stats"]

            y, pullback, new = jax.vjp(forward, x, *p, has_aux=True)
            return (y, new["mean"], new["var"], *pullback(dy.astype(y.dtype)))

        in_axes = (0, 0, 0, *([None] * len(p)))
        run = jax.pmap(device, axis_name=AXIS, in_axes=in_axes, devices=jax.devices()[:n])
        y, mean, var, dx, *dp = run(xs, dys_, mask, *p)
        ys = [y[i, : sizes[i]] for i in range(n)]
        new_state = replace(state, mean=mean[0], var=var[0])
        if dys is None:
            return ys, new_state, None, None, None
        dxs = [dx[i, : sizes[i]] for i in range(n)]
        if not dp:
            return ys, new_state, dxs, None, None
        return ys, new_state, dxs, dp[0].sum(axis=0), dp[1].sum(axis=0)


def make() -> FlaxBatchNorm:
    """The factory for ``--impl examples.frameworks.flax_bn:make`` (Flax's defaults)."""
    return FlaxBatchNorm()


def make_pmap() -> FlaxPmapBatchNorm:
    """The factory for ``--impl examples.frameworks.flax_bn:make_pmap``."""
    return FlaxPmapBatchNorm()


def make_two_pass() -> FlaxBatchNorm:
    """The factory for ``--impl examples.frameworks.flax_bn:make_two_pass``.

    ``use_fast_variance=False``: the control that shows the offset failures of :func:`make`
    come from the fast variance.
    """
    return FlaxBatchNorm(fast_variance=False)
