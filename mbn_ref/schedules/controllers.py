"""Adaptive decay controllers: small pure state machines with exactly restorable state.

Each controller is a frozen dataclass (its configuration, validated on construction) with

- ``init() -> State``: the state before any update;
- ``update(state, observation) -> State``: pure, never mutates its arguments;
- ``state_to_dict(state) -> dict``: plain ``float``/``int``/``list``/``None`` values
  (JSON-compatible, round-trips bit-exactly through :mod:`json`);
- ``state_from_dict(d) -> State``: strict; ``ValueError`` naming the missing, unknown or bad
  key, and nothing is built from a partly valid dictionary.

:class:`GradientNoiseController` works on gradients of any Array API namespace (NumPy,
PyTorch on CPU or CUDA, CuPy, JAX, ``array-api-strict``) and keeps its per-coordinate
moments in the gradient's namespace, on its device; only a few scalars per update are read
on the host. Its ``state_to_dict(state, arrays=True)`` keeps the moments as arrays, for
checkpoints of large models.

``State`` is a ``NamedTuple`` whose ``decay`` field is the decay (weight on history) to use for
the next normalization updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import array_api_compat
import numpy as np
from numpy.typing import ArrayLike

from .._array import Array, Namespace, device_of, namespace
from .._validate import check_decay, check_int, check_nonnegative, check_positive, check_real
from ..noise import lam_for_effective_batch_size
from . import _state_dict as sd

__all__ = [
    "GradientNoiseController",
    "GradientNoiseState",
    "PlateauController",
    "PlateauState",
]


# --------------------------------------------------------------------------------------------
# Plateau on a monitored metric: the validation-loss example of the article "How can batch
# normalization momentum be dynamically adjusted in TensorFlow 2?"
# --------------------------------------------------------------------------------------------


class PlateauState(NamedTuple):
    """State of :class:`PlateauController`."""

    decay: float
    #: Best finite metric seen so far; ``None`` before the first finite one.
    best: float | None


@dataclass(frozen=True)
class PlateauController:
    """Raise the decay while a monitored metric improves, lower it otherwise.

    The validation-loss controller of "How can batch normalization momentum be dynamically
    adjusted in TensorFlow 2?", with its numbers as parameters.

    On each ``update(state, metric)`` (typically once per epoch with the validation loss):

    - *improvement* (mode ``"min"``: ``metric < best - min_delta``; mode ``"max"``:
      ``metric > best + min_delta``; the first finite metric always improves):
      ``decay <- min(decay + step_up, max_decay)`` and ``best <- metric``;
    - otherwise ``decay <- max(decay - step_down, min_decay)``.

    A non-finite metric (NaN, ``inf``) counts as no improvement and never becomes ``best``: a
    diverging run gets more responsive statistics, and the state stays finite (strict JSON).

    Examples
    --------
    >>> ctl = PlateauController()
    >>> s = ctl.init()
    >>> for loss in [1.0, 0.8, 0.9]:
    ...     s = ctl.update(s, loss)
    >>> round(s.decay, 12), s.best
    (0.91, 0.8)
    >>> ctl.state_from_dict(ctl.state_to_dict(s)) == s
    True
    """

    initial: float = 0.9
    step_up: float = 0.01
    step_down: float = 0.01
    max_decay: float = 0.99
    min_decay: float = 0.8
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        lo = check_decay("min_decay", self.min_decay)
        hi = check_decay("max_decay", self.max_decay)
        init = check_decay("initial", self.initial)
        if not lo <= init <= hi:
            raise ValueError(
                f"need min_decay <= initial <= max_decay, got {self.min_decay!r}, "
                f"{self.initial!r}, {self.max_decay!r}"
            )
        for name in ("step_up", "step_down", "min_delta"):
            check_nonnegative(name, getattr(self, name))
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def init(self) -> PlateauState:
        """The state before any metric: ``decay = initial``, no best value."""
        return PlateauState(decay=float(self.initial), best=None)

    def improved(self, best: float | None, metric: float) -> bool:
        """Whether ``metric`` improves on ``best`` (see the class docstring)."""
        if not math.isfinite(metric):
            return False
        if best is None:
            return True
        if self.mode == "min":
            return metric < best - self.min_delta
        return metric > best + self.min_delta

    def update(self, state: PlateauState, metric: float) -> PlateauState:
        """Step the decay after observing ``metric``; returns a new state."""
        value = check_real("metric", metric, finite=False)
        if self.improved(state.best, value):
            return PlateauState(decay=min(state.decay + self.step_up, self.max_decay), best=value)
        return PlateauState(
            decay=max(state.decay - self.step_down, self.min_decay), best=state.best
        )

    def state_to_dict(self, state: PlateauState) -> dict[str, Any]:
        """The state as a plain dictionary: ``{"decay": float, "best": float | None}``."""
        return {
            "decay": float(state.decay),
            "best": None if state.best is None else float(state.best),
        }

    def state_from_dict(self, d: object) -> PlateauState:
        """Inverse of :meth:`state_to_dict`; ``ValueError`` naming a missing/unknown/bad key."""
        what = "PlateauController"
        m = sd.check_keys(d, ("decay", "best"), what)
        return PlateauState(
            decay=sd.read_decay(m, "decay", what),
            best=sd.read_float(m, "best", what, optional=True),
        )


# --------------------------------------------------------------------------------------------
# Gradient noise scale: replaces the gradient-noise example of "How can batch normalization
# momentum be dynamically adjusted in TensorFlow 2?", which measures nothing (erratum 7)
# --------------------------------------------------------------------------------------------

#: Floor for the estimate of |G|^2, which can come out <= 0 when the noise dominates.
_GRAD_SQ_FLOOR = 1e-300
#: Cap on the noise scale handed to the decay mapping (keeps it finite).
_NOISE_SCALE_CAP = 1e300


class GradientNoiseState(NamedTuple):
    """State of :class:`GradientNoiseController`.

    ``mean`` and ``var`` are the exponentially weighted mean and (biased, weighted) variance
    of the flattened gradients, per coordinate: 1-D arrays in the gradients' namespace, on
    their device, in float64 where that device has it (float32 otherwise; empty NumPy arrays
    before the first update). ``weight_sq`` is the sum of the squared weights of that
    average, so that ``Var[mean] = weight_sq * per-step variance`` and ``E[var] = (1 -
    weight_sq) * per-step variance``. The controller never writes into these arrays.
    """

    decay: float
    #: Number of gradients folded in.
    num_updates: int
    weight_sq: float
    mean: Array
    var: Array


# --- the per-coordinate part: arrays of any namespace, on their device ----------------------


def _moment_dtype(xp: Namespace, device: Any) -> Any:
    """float64 where ``xp`` has it on ``device``, else float32 (JAX without x64, MPS...)."""
    try:
        available = xp.__array_namespace_info__().dtypes(device=device, kind="real floating")
    except (AttributeError, TypeError):  # a namespace without the inspection API
        return xp.float64
    return available.get("float64", available.get("float32", xp.float64))


def _gradient_pieces(grad: object) -> tuple[Namespace, list[Array]]:
    """``grad`` (one array, a sequence of arrays, or an array-like) as a namespace and pieces.

    A list or tuple of arrays is a gradient in pieces (e.g. one per parameter); anything else
    that is not an array goes through ``np.asarray`` (Python lists of numbers). Every piece
    must have a real floating dtype.
    """
    if (
        isinstance(grad, (list, tuple))
        and grad
        and all(map(array_api_compat.is_array_api_obj, grad))
    ):
        pieces = list(grad)
    elif array_api_compat.is_array_api_obj(grad):
        pieces = [grad]
    else:
        pieces = [np.asarray(grad)]
    xp = namespace(*pieces)
    for piece in pieces:
        if not xp.isdtype(piece.dtype, "real floating"):
            raise TypeError(f"grad must be a floating-point array, got dtype {piece.dtype}")
    return xp, pieces


def _flatten(xp: Namespace, pieces: list[Array], dtype: Any) -> Array:
    """The pieces as one flat vector of ``dtype``, on their device (never via the host)."""
    flat = [xp.reshape(xp.astype(p, dtype, copy=False), (-1,)) for p in pieces]
    return flat[0] if len(flat) == 1 else xp.concat(flat)


def _fold_moments(
    xp: Namespace, moments: tuple[Array, Array] | None, g: Array, a: float
) -> tuple[Array, Array]:
    """Fold the flat gradient ``g`` into the per-coordinate moments with update rate ``a``.

    West's stable form, never ``E[g^2] - E[g]^2``: ``diff = g - mean``, ``mean + a*diff``,
    ``(1-a) * (var + a*diff**2)``. ``moments=None`` (the first gradient) gives ``(g, 0)``, with
    ``g`` copied (the caller may overwrite its gradient in place later). Elementwise, on
    ``g``'s device; new arrays, the inputs are not written.
    """
    if moments is None:
        return xp.asarray(g, copy=True), xp.zeros_like(g)
    mean, var = moments
    diff = g - mean
    incr = a * diff
    return mean + incr, (1.0 - a) * (var + diff * incr)


def _moment_sums(xp: Namespace, mean: Array, var: Array) -> tuple[float, float]:
    """``sum(var)`` and ``|mean|^2``: two reductions on the device, two host scalars."""
    return float(xp.sum(var)), float(xp.vecdot(mean, mean))


# --- the scalar part: host floats ------------------------------------------------------------


def _simple_noise_scale(
    batch_size: float, var_sum: float, mean_sq: float, weight_sq: float
) -> float:
    """``B_simple = batch_size * s2 / max(|mean|^2 - W*s2, floor)``, ``s2 = sum(var)/(1-W)``."""
    step_var = var_sum / (1.0 - weight_sq)
    grad_sq = mean_sq - weight_sq * step_var
    return float(batch_size) * step_var / max(grad_sq, _GRAD_SQ_FLOOR)


def _host_list(x: Array) -> list[float]:
    """A 1-D array's values as a Python list (a copy to the host, for JSON)."""
    if isinstance(x, np.ndarray):
        values: list[float] = x.tolist()
        return values
    tolist = getattr(x, "tolist", None)  # torch, CuPy, JAX: from any device
    if callable(tolist):
        return list(tolist())
    return list(np.asarray(x).tolist())


@dataclass(frozen=True)
class GradientNoiseController:
    """Decay from the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2``.

    McCandlish et al. 2018, *An Empirical Model of Large-Batch Training*: ``G`` is the true
    gradient, ``Sigma`` the per-example gradient covariance. Each update receives the
    mini-batch gradient ``g_t`` (any shape, flattened; or a list of arrays, e.g. one per
    parameter, flattened and concatenated on their device) computed from ``batch_size``
    examples, so ``Cov[g_t] = Sigma / batch_size``.

    **Estimator.** Per coordinate, an exponentially weighted mean and variance with update
    rate ``a_n = max(alpha, 1/n)`` at the ``n``-th gradient (the exact mean and variance
    until ``1/n`` falls below ``alpha``, an EMA afterwards), in West's stable form::

        diff = g - mean;  mean += a*diff;  var = (1-a) * (var + a*diff**2)

    (never ``E[g^2] - E[g]^2``). With ``W`` = sum of squared weights (``W_n = (1-a)**2
    W_{n-1} + a**2``; ``1/n`` at first, then tending to ``alpha/(2-alpha)``), the per-step
    variance is ``s2 = sum(var) / (1 - W)``; ``tr(Sigma) = batch_size * s2`` and
    ``|G|^2 = |mean|^2 - W*s2`` (the bias of the averaged mean), floored at a tiny positive.

    **Any array library, on its device.** The gradient may be an array of any Array API
    namespace (NumPy, PyTorch on CPU or CUDA, CuPy, JAX, ``array-api-strict``); the moments
    stay in that namespace, on the gradient's device, in float64 where the device has it
    (float32 otherwise). Per update the host reads one flag (are all values finite?) and,
    after the warm-up, two sums (``sum(var)``, ``|mean|^2``); the gradient itself is never
    copied to the host. A gradient in another namespace or on another device than the
    moments raises (no silent transfer).

    **Mapping to a decay** (deliberately the opposite direction of that article's "noise
    lowers the momentum"): ``B_simple`` is the batch size at which gradient noise stops dominating,
    so it is taken as the batch size whose statistics noise the normalization should have;
    MBN's stationary mean noise at decay ``lam`` equals BN's at batch size
    ``m (1+lam)/(1-lam)`` (:func:`mbn_ref.noise.effective_batch_size`), hence::

        decay = clip(lam_for_effective_batch_size(norm_batch_size, B_simple),
                     min_decay, max_decay)

    non-decreasing in ``B_simple``: a noisier gradient gets smoother statistics; ``B_simple <=
    norm_batch_size`` gives ``lam = 0`` (BN), clipped to ``min_decay``. For the first
    ``warmup_steps`` updates the decay stays at ``initial``.

    Non-finite gradients (e.g. steps an AMP loss scaler skips) leave the state unchanged.

    Parameters
    ----------
    batch_size : float
        Examples per gradient ``B`` (global batch in data-parallel training).
    norm_batch_size : float, optional
        Batch size ``m`` of the normalization statistics (per device when the statistics are
        per device); defaults to ``batch_size``.
    alpha : float
        Update rate of the moment averages, in ``(0, 1]``.
    warmup_steps : int
        Updates during which the decay stays at ``initial`` (``>= 1``).
    initial, min_decay, max_decay : float
        Decays, ``min_decay <= max_decay``.

    Examples
    --------
    Gradients of batch size 4 with per-step noise ``N(0, I)`` around ``G = 0.5`` (100
    coordinates): ``tr(Sigma) = 4*100``, ``|G|^2 = 25``, ``B_simple = 16``, and MBN at
    ``m = 4`` matches BN at 16 with ``lam = (16-4)/(16+4) = 0.6``:

    >>> rng = np.random.default_rng(0)
    >>> ctl = GradientNoiseController(batch_size=4, alpha=0.02, warmup_steps=50)
    >>> s = ctl.init()
    >>> for _ in range(500):
    ...     s = ctl.update(s, 0.5 + rng.standard_normal(100))
    >>> round(ctl.noise_scale(s), 1), round(s.decay, 2)
    (16.0, 0.6)

    A gradient in pieces (one array per parameter) is the same as their concatenation:

    >>> g = [np.ones((2, 3)), np.zeros(4)]
    >>> ctl.update(ctl.init(), g).mean.shape
    (10,)
    """

    batch_size: float
    norm_batch_size: float | None = None
    alpha: float = 0.01
    warmup_steps: int = 100
    initial: float = 0.9
    min_decay: float = 0.0
    max_decay: float = 0.99

    def __post_init__(self) -> None:
        check_positive("batch_size", self.batch_size)
        if self.norm_batch_size is not None:
            check_positive("norm_batch_size", self.norm_batch_size)
        a = check_real("alpha", self.alpha)
        if not 0.0 < a <= 1.0:
            raise ValueError(f"alpha must be an update rate in (0, 1], got {self.alpha!r}")
        check_int("warmup_steps", self.warmup_steps, minimum=1)
        check_decay("initial", self.initial)
        if check_decay("min_decay", self.min_decay) > check_decay("max_decay", self.max_decay):
            raise ValueError(
                f"need min_decay <= max_decay, got {self.min_decay!r} > {self.max_decay!r}"
            )

    def init(self) -> GradientNoiseState:
        """No gradient seen: ``decay = initial``, empty moments."""
        empty = np.zeros(0, dtype=np.float64)
        return GradientNoiseState(
            decay=float(self.initial), num_updates=0, weight_sq=0.0, mean=empty, var=empty.copy()
        )

    def update(self, state: GradientNoiseState, grad: ArrayLike | Array) -> GradientNoiseState:
        """Fold in one mini-batch gradient; returns a new state.

        Parameters
        ----------
        state : GradientNoiseState
            The current state (not modified).
        grad : array or sequence of arrays
            The gradient: one floating-point array of any shape and any Array API namespace,
            or a list/tuple of such arrays (one namespace, one device), flattened and
            concatenated in order on their device. After the first update it must have the
            moments' size, namespace and device.

        Returns
        -------
        GradientNoiseState
            The new state; ``state`` itself when ``grad`` holds a NaN or an infinity.

        Raises
        ------
        TypeError
            ``grad`` is not floating point, or not in the moments' namespace.
        ValueError
            ``grad`` is empty, has another size than the moments, or lives on another device.
        """
        xp, pieces = _gradient_pieces(grad)
        if state.num_updates > 0:
            _check_same_place(xp, pieces[0], state.mean)
            dtype = state.mean.dtype
        else:
            dtype = _moment_dtype(xp, device_of(pieces[0]))
        g = _flatten(xp, pieces, dtype)
        size = array_api_compat.size(g)
        if size == 0:
            raise ValueError("grad is empty")
        if state.num_updates > 0 and size != state.mean.shape[0]:
            raise ValueError(
                f"grad has {size} elements, the controller's moments have {state.mean.shape[0]}"
            )
        if not bool(xp.all(xp.isfinite(g))):
            return state
        count = state.num_updates + 1
        a = max(float(self.alpha), 1.0 / count)
        previous = (state.mean, state.var) if state.num_updates > 0 else None
        mean, var = _fold_moments(xp, previous, g, a)
        weight_sq = (1.0 - a) ** 2 * state.weight_sq + a * a
        new = GradientNoiseState(
            decay=state.decay, num_updates=count, weight_sq=weight_sq, mean=mean, var=var
        )
        if count <= self.warmup_steps:
            return new._replace(decay=float(self.initial))
        scale = self.noise_scale(new)
        assert scale is not None  # count >= 2 after warm-up
        return new._replace(decay=self.decay_for_noise_scale(scale))

    def noise_scale(self, state: GradientNoiseState) -> float | None:
        """The estimate of ``B_simple = tr(Sigma)/|G|^2`` (``None`` before two gradients).

        Reads two scalars of the moments on the host (``sum(var)``, ``|mean|^2``).
        """
        if state.num_updates < 2:
            return None
        var_sum, mean_sq = _moment_sums(namespace(state.mean), state.mean, state.var)
        return _simple_noise_scale(self.batch_size, var_sum, mean_sq, state.weight_sq)

    def decay_for_noise_scale(self, noise_scale: float) -> float:
        """The mapping ``clip(lam_for_effective_batch_size(m, B_simple), min, max)``."""
        if math.isnan(noise_scale):
            raise ValueError("noise_scale is NaN (overflowing gradients?)")
        m = self.batch_size if self.norm_batch_size is None else self.norm_batch_size
        target = min(max(float(noise_scale), _GRAD_SQ_FLOOR), _NOISE_SCALE_CAP)
        lam = float(lam_for_effective_batch_size(m, target))
        return min(max(lam, float(self.min_decay)), float(self.max_decay))

    def state_to_dict(self, state: GradientNoiseState, *, arrays: bool = False) -> dict[str, Any]:
        """The state as a plain dictionary.

        ``decay``, ``num_updates``, ``weight_sq`` and the ``mean``/``var`` vectors: as lists
        (JSON-compatible; a copy of the moments to the host), or with ``arrays=True`` as the
        state's own arrays, in their namespace and on their device (for checkpoints of large
        models, e.g. through ``torch.save``; the controller never writes into them).
        :meth:`state_from_dict` takes either form.

        Examples
        --------
        >>> ctl = GradientNoiseController(batch_size=4)
        >>> d = ctl.state_to_dict(ctl.update(ctl.init(), np.array([1.0, 2.0])))
        >>> d["mean"], d["num_updates"]
        ([1.0, 2.0], 1)
        """
        mean, var = state.mean, state.var
        return {
            "decay": float(state.decay),
            "num_updates": int(state.num_updates),
            "weight_sq": float(state.weight_sq),
            "mean": mean if arrays else _host_list(mean),
            "var": var if arrays else _host_list(var),
        }

    def state_from_dict(self, d: object) -> GradientNoiseState:
        """Inverse of :meth:`state_to_dict`; ``ValueError`` naming a missing/unknown/bad key.

        ``mean`` and ``var`` are lists (NumPy float64 moments) or 1-D real arrays of one
        Array API namespace and device (copied, in float64 where the device has it, and
        kept on that device; the checks read three flags on the host).
        """
        what = "GradientNoiseController"
        m = sd.check_keys(d, ("decay", "num_updates", "weight_sq", "mean", "var"), what)
        decay = sd.read_decay(m, "decay", what)
        count = sd.read_count(m, "num_updates", what)
        weight_sq: float = sd.read_float(m, "weight_sq", what)
        mean = _read_moment(m, "mean", what)
        var = _read_moment(m, "var", what)
        try:
            xp = namespace(mean, var)
        except TypeError:
            raise ValueError(
                f"{what} state: keys 'mean' and 'var' must be of one kind (two lists, or two "
                f"arrays of one namespace), got {type(mean).__name__} and {type(var).__name__}"
            ) from None
        if device_of(mean) != device_of(var):
            raise ValueError(
                f"{what} state: keys 'mean' and 'var' are on different devices "
                f"({device_of(mean)}, {device_of(var)})"
            )
        if var.shape != mean.shape:
            raise ValueError(
                f"{what} state: key 'var' has length {var.shape[0]}, key 'mean' {mean.shape[0]}"
            )
        if (count == 0) != (mean.shape[0] == 0):
            raise ValueError(
                f"{what} state: key 'mean' has length {mean.shape[0]} with num_updates {count} "
                "(empty exactly when num_updates is 0)"
            )
        if not (0.0 < weight_sq <= 1.0 if count else weight_sq == 0.0):
            raise ValueError(f"{what} state: key 'weight_sq' out of range: {weight_sq!r}")
        if bool(xp.any(var < 0)):
            raise ValueError(f"{what} state: key 'var' holds negative values")
        return GradientNoiseState(
            decay=decay, num_updates=count, weight_sq=weight_sq, mean=mean, var=var
        )


def _check_same_place(xp: Namespace, grad: Array, moment: Array) -> None:
    """The gradient must be in the moments' namespace and on their device (no transfer)."""
    try:
        namespace(grad, moment)
    except TypeError:
        raise TypeError(
            f"grad is a {type(grad).__module__}.{type(grad).__name__}, the controller's "
            f"moments are {type(moment).__module__}.{type(moment).__name__}: the moments stay "
            "in the namespace of the gradients they were built from; restore the state with "
            "state_from_dict from arrays of the gradient's namespace"
        ) from None
    if device_of(grad) != device_of(moment):
        raise ValueError(
            f"grad is on device {device_of(grad)}, the controller's moments on "
            f"{device_of(moment)}; move the state's mean and var explicitly"
        )


def _read_moment(d: Mapping[str, Any], key: str, what: str) -> Array:
    """A moment vector: a list (as :func:`_state_dict.read_vector`) or a 1-D real array."""
    value = d[key]
    if not array_api_compat.is_array_api_obj(value):
        return sd.read_vector(d, key, what)
    xp = namespace(value)
    if value.ndim != 1:
        raise ValueError(
            f"{what} state: key {key!r} must be a 1-D array, got shape {tuple(value.shape)}"
        )
    if not xp.isdtype(value.dtype, ("real floating", "integral")):
        raise ValueError(f"{what} state: key {key!r} must hold real numbers, got {value.dtype}")
    arr = xp.astype(value, _moment_dtype(xp, device_of(value)), copy=True)
    if not bool(xp.all(xp.isfinite(arr))):
        raise ValueError(f"{what} state: key {key!r} holds non-finite values")
    return arr
