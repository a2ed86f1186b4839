"""The Keras models of ``mbn-ref reproduce --framework keras``: the torch experiment's models.

The same MLP and CNN as :mod:`mbn_torch.reproduce.models` (same layers, widths, parameter
counts and PyTorch's default initialization), channels-last as Keras is, with the same
normalizations (:data:`~mbn_torch.reproduce.models.NORMS`): ``none``; ``bn``,
:class:`mbn_tf.DynamicBatchNormalization` (Keras' BN whose ``momentum`` is a variable, so it
gets MBN's inference decay); ``mbn``, :class:`mbn_tf.MomentumBatchNormalization`; ``gn``,
``keras.layers.GroupNormalization`` (8 groups); ``ln``, ``keras.layers.LayerNormalization``
(for the CNN, GroupNormalization with one group: over channels and pixels, per-channel
affine, as PyTorch's ``GroupNorm(1, C)``); ``in``, GroupNormalization with one group per
channel (InstanceNorm, CNN only). Every ``epsilon`` is PyTorch's ``1e-5``.

>>> import numpy as np
>>> mlp = make_model("mlp", "mbn")
>>> tuple(mlp(np.zeros((4, 64), dtype="float32")).shape)
(4, 10)
>>> sum(int(w.numpy().size) for w in mlp.trainable_weights)  # as the torch MLP with MBN
26634
>>> tuple(make_model("cnn", "in")(np.zeros((4, 64), dtype="float32")).shape)
(4, 10)
"""

from __future__ import annotations

import math
from typing import Any

import keras

from mbn_torch.reproduce.models import MODELS, NORMS

from ..layers import DynamicBatchNormalization, MomentumBatchNormalization

__all__ = ["EPSILON", "make_model", "make_norm"]

EPSILON = 1e-5
"""PyTorch's ``eps`` of every normalization (Keras' default is ``1e-3``)."""

_GROUPS = 8


def make_norm(norm: str, num_features: int, *, spatial: bool) -> keras.layers.Layer:
    """One normalization layer over the last axis (``num_features`` channels).

    Parameters
    ----------
    norm : str
        One of :data:`~mbn_torch.reproduce.models.NORMS`.
    num_features : int
        The number of channels (features).
    spatial : bool
        ``True`` for ``(N, H, W, C)`` input (the CNN), ``False`` for ``(N, C)`` (the MLP).

    Returns
    -------
    keras.layers.Layer
        The layer; ``keras.layers.Identity`` for ``none``.

    Raises
    ------
    ValueError
        An unknown name, or ``in`` for the MLP (one feature per channel: nothing to normalize).

    Examples
    --------
    >>> type(make_norm("bn", 16, spatial=True)).__name__
    'DynamicBatchNormalization'
    >>> make_norm("in", 16, spatial=True).groups
    16
    """
    if norm not in NORMS:
        raise ValueError(f"unknown normalization {norm!r}; expected one of {', '.join(NORMS)}")
    if norm == "none":
        return keras.layers.Identity()
    if norm == "bn":
        return DynamicBatchNormalization(epsilon=EPSILON)
    if norm == "mbn":
        return MomentumBatchNormalization(epsilon=EPSILON)
    if norm == "gn":
        return keras.layers.GroupNormalization(_GROUPS, epsilon=EPSILON)
    if norm == "ln":
        if spatial:
            return keras.layers.GroupNormalization(1, epsilon=EPSILON)
        return keras.layers.LayerNormalization(epsilon=EPSILON)
    if not spatial:
        raise ValueError("InstanceNorm ('in') needs spatial input: use it with the CNN only")
    return keras.layers.GroupNormalization(num_features, epsilon=EPSILON)


def _torch_init(fan_in: int) -> dict[str, Any]:
    """PyTorch's default initialization of ``Linear``/``Conv2d``: ``U(-b, b)`` for both.

    ``b = 1/sqrt(fan_in)``. ``VarianceScaling(1/3, "fan_in", "uniform")`` draws the kernel
    from ``U(-sqrt(1/fan_in), sqrt(1/fan_in))``: PyTorch's ``kaiming_uniform_(a=sqrt(5))``.
    """
    bound = 1 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def _dense(units: int, fan_in: int) -> keras.layers.Layer:
    return keras.layers.Dense(units, **_torch_init(fan_in))


def _conv(filters: int, channels_in: int, *, strides: int = 1) -> keras.layers.Layer:
    # "valid" after explicit padding: PyTorch's padding=1 pads both sides, Keras' "same"
    # with stride 2 pads only the bottom and right
    return keras.layers.Conv2D(
        filters, 3, strides=strides, padding="valid", **_torch_init(9 * channels_in)
    )


def make_model(model: str, norm: str, num_classes: int = 10) -> keras.Sequential:
    """The model ``model`` with the normalization ``norm`` after each hidden layer.

    Parameters
    ----------
    model : str
        ``mlp``: 64 -> 128 -> 128 -> 10, a normalization after each hidden ``Dense``, ReLU.
        ``cnn``: the 8x8 digits as 8x8x1 images, conv 3x3 (16 channels), conv 3x3 stride 2
        (32 channels), conv 3x3 (32 channels), each with zero padding 1 and followed by the
        normalization and ReLU, global average pooling, a ``Dense`` classifier.
    norm : str
        One of :data:`~mbn_torch.reproduce.models.NORMS` (``in`` for the CNN only).
    num_classes : int, optional
        The number of outputs.

    Returns
    -------
    keras.Sequential
        The model (built); it takes ``(N, 64)`` features and returns logits.

    Raises
    ------
    ValueError
        An unknown model or normalization.

    Examples
    --------
    >>> make_model("mlp", "none").count_params()  # as the torch MLP
    26122
    >>> make_model("cnn", "none").count_params()
    14378
    """
    if model == "mlp":
        return keras.Sequential(
            [
                keras.Input((64,)),
                _dense(128, 64),
                make_norm(norm, 128, spatial=False),
                keras.layers.ReLU(),
                _dense(128, 128),
                make_norm(norm, 128, spatial=False),
                keras.layers.ReLU(),
                _dense(num_classes, 128),
            ],
            name=f"mlp_{norm}",
        )
    if model == "cnn":
        layers: list[keras.layers.Layer] = [keras.Input((64,)), keras.layers.Reshape((8, 8, 1))]
        for channels_in, filters, strides in ((1, 16, 1), (16, 32, 2), (32, 32, 1)):
            layers += [
                keras.layers.ZeroPadding2D(1),
                _conv(filters, channels_in, strides=strides),
                make_norm(norm, filters, spatial=True),
                keras.layers.ReLU(),
            ]
        layers += [keras.layers.GlobalAveragePooling2D(), _dense(num_classes, 32)]
        return keras.Sequential(layers, name=f"cnn_{norm}")
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
