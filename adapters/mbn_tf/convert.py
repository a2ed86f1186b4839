"""From ``keras.layers.BatchNormalization`` to the layers of :mod:`mbn_tf`.

- :func:`load_batchnorm_weights`: a trained BN layer's weights into one of ours;
- :func:`from_batchnorm`: a new layer of ours with a BN layer's configuration and weights,
  for ``keras.models.clone_model``'s ``clone_function`` (docs/keras.md).

The mapping is ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` by name (Keras'
names are ours); an MBN layer's training statistics ``moving_train_mean``/
``moving_train_variance`` start from the loaded moving statistics, as the PyTorch adapter's
checkpoint loader does. Inference outputs are then Keras BN's.

>>> import numpy as np
>>> import keras
>>> import mbn_tf
>>> bn = keras.layers.BatchNormalization(momentum=0.9)
>>> _ = bn(np.arange(6.0, dtype="float32").reshape(3, 2), training=True)
>>> layer = mbn_tf.from_batchnorm(bn, lam=0.5)
>>> layer.momentum, float(layer.lam.numpy())
(0.9, 0.5)
>>> x = np.ones((1, 2), dtype="float32")
>>> bool(np.allclose(layer(x), bn(x)))
True
"""

from __future__ import annotations

from typing import Any

import keras

from .layers import DynamicBatchNormalization, MomentumBatchNormalization, _DecayNormalization

__all__ = ["from_batchnorm", "load_batchnorm_weights"]

_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def _geometry(layer: Any, what: str) -> tuple[int, int]:
    """``(ndim, channel axis >= 0)`` of a built layer; ``ValueError`` when not built."""
    spec = getattr(layer, "input_spec", None)
    ndim = getattr(spec, "ndim", None)
    if not getattr(layer, "built", False) or ndim is None:
        raise ValueError(
            f"{what} {layer.name!r} is not built: call it on an input (or build it) first"
        )
    return ndim, layer.axis % ndim


def load_batchnorm_weights(layer: _DecayNormalization, bn_layer: Any) -> None:
    """Copy a BN layer's weights into one of ours (all or nothing).

    Parameters
    ----------
    layer : MomentumBatchNormalization or DynamicBatchNormalization
        The built layer to load into. Its decays (``momentum``, ``lam``) are kept.
    bn_layer : keras.layers.BatchNormalization
        A built Keras BN layer (or one of ours) with the same input rank, channel axis,
        channel count, ``center``, ``scale`` and ``epsilon``.

    Raises
    ------
    ValueError
        Either layer is not built, or they differ in one of the above (every difference is
        named); nothing was assigned.

    Examples
    --------
    >>> import numpy as np
    >>> import keras
    >>> bn = keras.layers.BatchNormalization()
    >>> _ = bn(np.ones((2, 3), dtype="float32"))
    >>> _ = bn.moving_mean.assign([1.0, 2.0, 3.0])
    >>> layer = MomentumBatchNormalization()
    >>> _ = layer(np.ones((2, 3), dtype="float32"))
    >>> load_batchnorm_weights(layer, bn)
    >>> layer.moving_mean.numpy().tolist(), layer.moving_train_mean.numpy().tolist()
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    """
    ndim, axis = _geometry(layer, "layer")
    bn_ndim, bn_axis = _geometry(bn_layer, "bn_layer")
    problems = []
    for name, ours, theirs in [
        ("input rank", ndim, bn_ndim),
        ("channel axis", axis, bn_axis),
        ("channels", tuple(layer.moving_mean.shape), tuple(bn_layer.moving_mean.shape)),
        ("center", layer.center, bool(bn_layer.center)),
        ("scale", layer.scale, bool(bn_layer.scale)),
        ("epsilon", layer.epsilon, float(bn_layer.epsilon)),
    ]:
        if ours != theirs:
            problems.append(f"{name} {ours!r} vs {theirs!r}")
    if problems:
        raise ValueError(
            f"cannot load the weights of {bn_layer.name!r} into {layer.name!r}: "
            + "; ".join(problems)
            + ". Nothing was loaded."
        )
    pairs = [
        (getattr(layer, name), getattr(bn_layer, name))
        for name in _WEIGHTS
        if getattr(layer, name) is not None
    ]
    if isinstance(layer, MomentumBatchNormalization):
        pairs += [
            (layer.moving_train_mean, bn_layer.moving_mean),
            (layer.moving_train_variance, bn_layer.moving_variance),
        ]
    values = [keras.ops.cast(source, target.dtype) for target, source in pairs]
    for (target, _), value in zip(pairs, values, strict=True):
        target.assign(value)


def from_batchnorm(
    bn_layer: Any, *, lam: float | None = 0.0, name: str | None = None
) -> _DecayNormalization:
    """A layer of ours with a BN layer's configuration and (when built) weights.

    Parameters
    ----------
    bn_layer : keras.layers.BatchNormalization
        The layer to convert. ``renorm=True`` is refused: its training differs.
    lam : float or None, optional
        The training decay of the new :class:`MomentumBatchNormalization` (0: the same
        training as ``bn_layer``); ``None`` gives a :class:`DynamicBatchNormalization`.
    name : str, optional
        The new layer's name (default: ``bn_layer``'s).

    Returns
    -------
    MomentumBatchNormalization or DynamicBatchNormalization
        Built and loaded when ``bn_layer`` is built; same ``momentum``, ``epsilon``, axis,
        flags, initializers, regularizers, constraints, ``trainable`` and dtype policy.

    Raises
    ------
    ValueError
        ``bn_layer`` uses ``renorm`` or synchronized statistics.

    Examples
    --------
    >>> import keras
    >>> layer = from_batchnorm(keras.layers.BatchNormalization(axis=1, momentum=0.8), lam=None)
    >>> type(layer).__name__, layer.axis, layer.momentum
    ('DynamicBatchNormalization', 1, 0.8)
    """
    config = dict(bn_layer.get_config())
    if config.pop("renorm", False):
        raise ValueError(
            f"{bn_layer.name!r} uses batch renormalization (renorm=True), which mbn_tf does "
            "not implement"
        )
    for key in ("renorm_clipping", "renorm_momentum"):
        config.pop(key, None)
    if name is not None:
        config["name"] = name
    layer: _DecayNormalization
    if lam is None:
        layer = DynamicBatchNormalization.from_config(config)
    else:
        layer = MomentumBatchNormalization.from_config({**config, "lam": lam})
    if getattr(bn_layer, "built", False):
        ndim, axis = _geometry(bn_layer, "bn_layer")
        shape: list[int | None] = [None] * ndim
        shape[axis] = int(bn_layer.moving_mean.shape[0])
        layer.build(tuple(shape))
        layer.built = True
        load_batchnorm_weights(layer, bn_layer)
    return layer
