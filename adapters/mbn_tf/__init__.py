"""mbn_tf: the Keras 3 adapter of mbn-ref (docs/keras.md; its seams: docs/adapters.md).

One layer on every Keras backend (TensorFlow, JAX, PyTorch): the core's forward and
backward run on the backend's own arrays.

>>> import numpy as np
>>> import mbn_tf
>>> layer = mbn_tf.MomentumBatchNormalization(lam=0.5)
>>> tuple(layer(np.ones((2, 3), dtype="float32"), training=True).shape)
(2, 3)
"""

from .callbacks import (
    GradientRecordingModel,
    MomentumFromGradientNoise,
    MomentumOnPlateau,
    MomentumScheduler,
)
from .convert import from_batchnorm, load_batchnorm_weights
from .layers import DynamicBatchNormalization, MomentumBatchNormalization

__all__ = [
    "DynamicBatchNormalization",
    "GradientRecordingModel",
    "MomentumBatchNormalization",
    "MomentumFromGradientNoise",
    "MomentumOnPlateau",
    "MomentumScheduler",
    "from_batchnorm",
    "load_batchnorm_weights",
]
