"""Data augmentation with torch ops on batches: random crop of a padded image, horizontal flip.

The random numbers come from a seeded CPU :class:`torch.Generator`, so a run is
reproducible on any device; the crop and the flip are one gather on the batch's device.

>>> x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
>>> y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
>>> all(torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1)) for i in range(2))
True
"""

from __future__ import annotations

import torch

__all__ = ["random_crop_flip"]


def random_crop_flip(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    padding: int = 4,
    fill: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Pad, crop back at a random offset, flip left-right with probability 1/2: per image.

    Each image is padded by ``padding`` pixels on every side and cropped back to its size.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)`` images.
    generator : torch.Generator
        A CPU generator: the offsets (uniform in ``0..2*padding``) and the flips.
    padding : int, optional
        The border added on every side (4 for CIFAR).
    fill : float or torch.Tensor, optional
        The border's value: a number, or one per channel (``(C,)``), e.g. the normalized
        value of a black pixel.

    Returns
    -------
    torch.Tensor
        A new tensor of the shape, dtype and device of ``x``.

    Examples
    --------
    >>> x = torch.ones(1, 1, 2, 2)
    >>> gen = torch.Generator().manual_seed(3)
    >>> random_crop_flip(x, gen, padding=1, fill=0.0).shape
    torch.Size([1, 1, 2, 2])
    """
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    padded = torch.empty((n, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype, device=x.device)
    padded[:] = torch.as_tensor(fill, dtype=x.dtype).to(x.device).reshape(-1, 1, 1)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = offsets[0, :, None] + torch.arange(h)  # (n, h)
    cols = torch.arange(w).expand(n, w)
    cols = offsets[1, :, None] + torch.where(flips[:, None], w - 1 - cols, cols)  # (n, w)
    index = (
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    )
    return padded[tuple(i.to(x.device) for i in index)]
