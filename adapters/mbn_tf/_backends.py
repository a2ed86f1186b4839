"""Per Keras backend: the Array API namespace for the core, and the custom gradient.

The layers compute with the core (:func:`mbn_ref.mbn_forward`, :func:`mbn_ref.bn_forward`)
and differentiate with its analytic backward (:func:`mbn_ref.backward`) on every Keras
backend. What differs per backend is only the plumbing, kept here:

=========== =========================================== ====================================
backend     namespace handed to the core (``xp=``)      custom gradient
=========== =========================================== ====================================
tensorflow  :mod:`mbn_tf._namespace` (TensorFlow ops)   ``tf.custom_gradient``
jax         ``jax.numpy`` (an Array API namespace)      ``jax.custom_gradient``
torch       ``array_api_compat.torch``                  a ``torch.autograd.Function``
=========== =========================================== ====================================

``keras.ops.custom_gradient`` is ``tf.custom_gradient``/``jax.custom_gradient`` on the first
two; on PyTorch it supports one output only (``CustomGradientFunction.backward(ctx,
grad_output)``) and calls the forward a second time when it raises, so the torch path is
its own ``autograd.Function``, the pattern of ``docs/adapters.md``.

One differentiable call returns the output and the new state: the state tensors are extra
outputs that receive no gradient. The backward context travels as
:meth:`mbn_ref.NormContext.split` gives it: its arrays in the closure of the gradient
function (TensorFlow, JAX: they become the backward's captured tensors or residuals) or in
``save_for_backward`` (PyTorch), its static part as Python values.

>>> namespace("tensorflow").__name__
'mbn_tf._namespace'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import mbn_ref as mr
from mbn_ref.context import NormContext

__all__ = ["BACKENDS", "Forward", "differentiable", "namespace"]

Array = Any

Forward = Callable[
    [Array, Array | None, Array | None, Sequence[Array]],
    tuple[Array, tuple[Array, ...], NormContext],
]
"""``forward(x, gamma, beta, consts) -> (y, new_state, ctx)``: one call of the core.

``consts`` are the state and decay tensors (no gradient); ``new_state`` is empty when the
call updates nothing (evaluation)."""

_NAMESPACES = {
    "tensorflow": "mbn_tf._namespace",
    "jax": "jax.numpy",
    "torch": "array_api_compat.torch",
}

BACKENDS: tuple[str, ...] = tuple(_NAMESPACES)
"""The Keras backends the layers run on."""


def namespace(backend: str) -> ModuleType:
    """The Array API namespace the core computes with on a Keras ``backend``.

    Parameters
    ----------
    backend : str
        ``keras.backend.backend()``: ``"tensorflow"``, ``"jax"`` or ``"torch"``.

    Returns
    -------
    module
        The namespace, imported on first use (TensorFlow, JAX and PyTorch are imported
        only for the backend that runs).

    Raises
    ------
    NotImplementedError
        Another backend (e.g. ``"numpy"``, which has no gradients).

    Examples
    --------
    >>> namespace("torch").__name__
    'array_api_compat.torch'
    """
    if backend not in _NAMESPACES:
        raise NotImplementedError(
            f"mbn_tf layers run on the Keras backends {BACKENDS}, not on {backend!r}"
        )
    return importlib.import_module(_NAMESPACES[backend])


def differentiable(
    forward: Forward,
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    consts: Sequence[Array],
    *,
    backend: str,
) -> tuple[Array, tuple[Array, ...]]:
    """Run ``forward`` with the core's backward as the gradient of ``x``, ``gamma``, ``beta``.

    Parameters
    ----------
    forward : Forward
        One call of the core on the backend's namespace.
    x : tensor
        The input.
    gamma, beta : tensor or None
        The per-channel parameters (``None`` when absent: no gradient is returned for them).
    consts : sequence of tensors
        State and decays: inputs without a gradient.
    backend : str
        The Keras backend (:data:`BACKENDS`).

    Returns
    -------
    y : tensor
        The output; its gradient is :func:`mbn_ref.backward`'s.
    new_state : tuple of tensors
        ``forward``'s new state (no gradient flows through it).

    Examples
    --------
    >>> import tensorflow as tf
    >>> import mbn_ref as mr
    >>> xp = namespace("tensorflow")
    >>> def forward(x, gamma, beta, consts):
    ...     y, _, ctx = mr.bn_forward(x, None, gamma, beta, axis=-1, xp=xp)
    ...     return y, (), ctx
    >>> x, beta = tf.constant([[1.0], [3.0]]), tf.constant([0.5])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch([x, beta])
    ...     y, _ = differentiable(forward, x, None, beta, (), backend="tensorflow")
    ...     loss = tf.reduce_sum(y * tf.constant([[2.0], [3.0]]))
    >>> [round(v, 3) for v in y.numpy().ravel().tolist()]
    [-0.5, 1.5]
    >>> dx, dbeta = tape.gradient(loss, [x, beta])
    >>> dbeta.numpy().tolist()                   # sum(dy), from mbn_ref.backward
    [5.0]
    """
    present = (gamma is not None, beta is not None)
    params = tuple(p for p in (gamma, beta) if p is not None)
    if backend == "tensorflow":
        return _tensorflow(forward, x, params, tuple(consts), present)
    if backend == "jax":
        return _jax(forward, x, params, tuple(consts), present)
    if backend == "torch":
        return _torch(forward, x, params, tuple(consts), present)
    namespace(backend)  # raises with the list of backends
    raise AssertionError  # pragma: no cover


def _unpack(present: tuple[bool, bool], params: Sequence[Array]) -> tuple[Any, Any]:
    it = iter(params)
    gamma = next(it) if present[0] else None
    beta = next(it) if present[1] else None
    return gamma, beta


def _param_grads(present: tuple[bool, bool], dgamma: Any, dbeta: Any) -> list[Any]:
    return [d for d, p in zip((dgamma, dbeta), present, strict=True) if p]


def _tensorflow(
    forward: Forward,
    x: Array,
    params: tuple[Array, ...],
    consts: tuple[Array, ...],
    present: tuple[bool, bool],
) -> tuple[Array, tuple[Array, ...]]:
    import tensorflow as tf

    xp = namespace("tensorflow")
    n_params = len(params)

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def op(x: Any, *rest: Any) -> Any:
        gamma, beta = _unpack(present, rest[:n_params])
        y, new_state, ctx = forward(x, gamma, beta, rest[n_params:])
        arrays, static = ctx.split()

        def grad(dy: Any, *unused: Any) -> list[Any]:
            dx, dgamma, dbeta = mr.backward(dy, NormContext.join(arrays, static), xp=xp)
            return [dx, *_param_grads(present, dgamma, dbeta)] + [None] * len(consts)

        return (y, *new_state), grad

    # variables are read here, outside the custom gradient (which would otherwise ask its
    # gradient function for the variables' gradients): the tape sees the reads
    out = op(*(tf.convert_to_tensor(a) for a in (x, *params, *consts)))
    return out[0], tuple(out[1:])


def _jax(
    forward: Forward,
    x: Array,
    params: tuple[Array, ...],
    consts: tuple[Array, ...],
    present: tuple[bool, bool],
) -> tuple[Array, tuple[Array, ...]]:
    import jax
    import jax.numpy as jnp

    @jax.custom_gradient  # type: ignore[untyped-decorator]
    def op(x: Any, params: Any, consts: Any) -> Any:
        gamma, beta = _unpack(present, params)
        y, new_state, ctx = forward(x, gamma, beta, consts)
        arrays, static = ctx.split()

        def vjp(cotangents: Any) -> Any:
            dy = cotangents[0]
            dx, dgamma, dbeta = mr.backward(dy, NormContext.join(arrays, static), xp=jnp)
            return (
                dx,
                tuple(_param_grads(present, dgamma, dbeta)),
                tuple(jnp.zeros_like(c) for c in consts),
            )

        return (y, tuple(new_state)), vjp

    y, new_state = op(x, params, consts)
    return y, tuple(new_state)


def _torch(
    forward: Forward,
    x: Array,
    params: tuple[Array, ...],
    consts: tuple[Array, ...],
    present: tuple[bool, bool],
) -> tuple[Array, tuple[Array, ...]]:
    out = _torch_function().apply(forward, present, len(params), x, *params, *consts)
    return out[0], tuple(out[1:])


_TORCH_FUNCTION: Any = None


def _torch_function() -> Any:
    """The ``torch.autograd.Function`` (defined on first use: torch is imported lazily)."""
    global _TORCH_FUNCTION
    if _TORCH_FUNCTION is not None:
        return _TORCH_FUNCTION
    import torch

    xp = namespace("torch")

    class CoreFunction(torch.autograd.Function):
        """The core's forward and backward; the new state is a non-differentiable output."""

        @staticmethod
        def forward(  # type: ignore[override]
            ctx: Any,
            forward: Forward,
            present: tuple[bool, bool],
            n_params: int,
            x: Any,
            *rest: Any,
        ) -> Any:
            gamma, beta = _unpack(present, rest[:n_params])
            y, new_state, core_ctx = forward(x, gamma, beta, rest[n_params:])
            arrays, static = core_ctx.split()
            ctx.saved_mask = tuple(a is not None for a in arrays)
            ctx.save_for_backward(*(a for a in arrays if a is not None))
            ctx.static = static
            ctx.present = present
            ctx.n_consts = len(rest) - n_params
            ctx.mark_non_differentiable(*new_state)
            return (y, *new_state)

        @staticmethod
        def backward(ctx: Any, dy: Any, *unused: Any) -> Any:
            saved = iter(ctx.saved_tensors)
            arrays = [next(saved) if kept else None for kept in ctx.saved_mask]
            core_ctx = NormContext.join(arrays, ctx.static)
            dx, dgamma, dbeta = mr.backward(dy, core_ctx, xp=xp)
            grads = _param_grads(ctx.present, dgamma, dbeta)
            return (None, None, None, dx, *grads) + (None,) * ctx.n_consts

    _TORCH_FUNCTION = CoreFunction
    return CoreFunction
