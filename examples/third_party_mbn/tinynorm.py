"""TinyNorm: a small, hand-written NumPy BN / Momentum BN layer, as a third party would write it.

It knows nothing of ``mbn_ref`` and speaks PyTorch's conventions, so that its conformance
adapter (:mod:`examples.third_party_mbn.adapter`) has real translating to do:

- ``momentum`` is an **update rate** (weight on the new batch), ``None`` for the cumulative
  average; MBN's training statistics have their own update rate ``train_momentum``
  (``None``: plain BN);
- the running variance is **unbiased** (``var * m/(m-1)``) unless ``unbiased=False``;
- the channel axis is 1 (``(N, C, *)``) and the layer is float32 or float64 only;
- buffers are named like PyTorch's (``running_mean``, ...) plus ``train_mean``/``train_var``;
- like PyTorch it refuses a training batch with one value per channel, even in MBN mode
  where the moving statistics would normalize it.

Forward and backward are methods; ``backward`` uses the cache of the last ``forward``.

>>> import numpy as np
>>> layer = MomentumBatchNorm(2, momentum=0.1, dtype=np.float64)
>>> y = layer.forward(np.array([[0.0, 1.0], [2.0, 5.0]]))
>>> y.round(3).tolist()
[[-1.0, -1.0], [1.0, 1.0]]
>>> layer.running_mean.round(6).tolist(), layer.running_var.round(6).tolist()
([0.1, 0.3], [1.1, 1.7])
"""

from __future__ import annotations

from typing import Any

import numpy as np


class MomentumBatchNorm:
    """BN (``train_momentum=None``) or Momentum BN over ``(N, C, *)`` arrays."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        train_momentum: float | None = None,
        affine: bool = True,
        unbiased: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"TinyNorm supports float32 and float64, not {self.dtype}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.train_momentum = train_momentum
        self.affine = affine
        self.unbiased = unbiased
        self.training = True
        c = num_features
        self.weight = np.ones(c, self.dtype) if affine else None
        self.bias = np.zeros(c, self.dtype) if affine else None
        self.weight_grad: np.ndarray | None = None
        self.bias_grad: np.ndarray | None = None
        self.running_mean = np.zeros(c, self.dtype)
        self.running_var = np.ones(c, self.dtype)
        self.train_mean = np.zeros(c, self.dtype)
        self.train_var = np.ones(c, self.dtype)
        self.num_batches_tracked = 0
        self._cache: tuple[Any, ...] | None = None

    # -- helpers ------------------------------------------------------------------------
    def _shape(self, x: np.ndarray) -> tuple[int, ...]:
        return (1, self.num_features) + (1,) * (x.ndim - 2)

    def _axes(self, x: np.ndarray) -> tuple[int, ...]:
        return (0, *range(2, x.ndim))

    def state_dict(self) -> dict[str, Any]:
        """Parameters and buffers by name, like PyTorch's ``Module.state_dict``."""
        return {
            "weight": self.weight,
            "bias": self.bias,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
            "train_mean": self.train_mean,
            "train_var": self.train_var,
            "num_batches_tracked": self.num_batches_tracked,
        }

    # -- forward / backward -------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` of shape ``(N, C, *)``.

        In training, also update the buffers and keep the cache that :meth:`backward` uses.
        """
        if x.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} input, got {x.dtype}")
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}, *), got {x.shape}")
        shape, axes = self._shape(x), self._axes(x)
        if not self.training:
            mean, var = self.running_mean, self.running_var
            rstd = 1.0 / np.sqrt(var + self.eps)
            xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
            self._cache = None
            return self._affine(xhat, shape)
        m = x.size // self.num_features
        if m == 0:  # nothing to learn from: empty output, state unchanged, zero gradients
            self._cache = (x, None, None, None, None, 0.0, 0)
            return x.copy()
        if m == 1:
            raise ValueError("expected more than 1 value per channel when training")
        mean = x.mean(axis=axes)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)  # two-pass, biased
        self.num_batches_tracked += 1
        u = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        unb = var * (m / (m - 1)) if self.unbiased else var
        self.running_mean = ((1 - u) * self.running_mean + u * mean).astype(self.dtype)
        self.running_var = ((1 - u) * self.running_var + u * unb).astype(self.dtype)
        if self.train_momentum is None:  # BN: the batch's own statistics
            norm_mean, norm_var, grad_scale = mean, var, 1.0
        else:  # MBN (Yong et al. 2020, Algorithm 1): the updated moving statistics
            a = self.train_momentum
            self.train_mean = ((1 - a) * self.train_mean + a * mean).astype(self.dtype)
            self.train_var = ((1 - a) * self.train_var + a * var).astype(self.dtype)
            norm_mean, norm_var, grad_scale = self.train_mean, self.train_var, a
        rstd = (1.0 / np.sqrt(norm_var + self.eps)).astype(self.dtype)
        xc = x - norm_mean.reshape(shape)
        xhat = xc * rstd.reshape(shape)
        self._cache = (x, xc, xhat, mean, rstd, grad_scale, m)
        return self._affine(xhat, shape)

    def _affine(self, xhat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.weight is None or self.bias is None:
            return xhat.astype(self.dtype)
        return (xhat * self.weight.reshape(shape) + self.bias.reshape(shape)).astype(self.dtype)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """``dx`` of the last training ``forward``; sets ``weight_grad`` and ``bias_grad``."""
        if self._cache is None:
            raise RuntimeError("backward needs a training forward first")
        x, xc, xhat, mean, rstd, scale, m = self._cache
        shape, axes = self._shape(x), self._axes(x)
        if m == 0:
            self.weight_grad = np.zeros(self.num_features, self.dtype)
            self.bias_grad = np.zeros(self.num_features, self.dtype)
            return dy.copy()
        g = dy if self.weight is None else dy * self.weight.reshape(shape)
        sum_g = g.sum(axis=axes)
        sum_gxc = (g * xc).sum(axis=axes)
        r = rstd.reshape(shape)
        dx = r * g - (scale / m) * r * (
            sum_g.reshape(shape) + (x - mean.reshape(shape)) * r**2 * sum_gxc.reshape(shape)
        )
        self.weight_grad = (dy * xhat).sum(axis=axes)
        self.bias_grad = dy.sum(axis=axes)
        return dx.astype(self.dtype)
