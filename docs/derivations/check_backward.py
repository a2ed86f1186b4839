"""Print the backward pass's verification table (docs/derivations/backward.md).

    python docs/derivations/check_backward.py

Three checks of ``mbn_ref.mbn_backward`` (``lam = 0`` is BN) in float64: against PyTorch
autograd of an independent forward, against central finite differences, and the paper's
printed Eq. 13 against the same autograd. Needs torch.
"""

from __future__ import annotations

import numpy as np
import torch

import mbn_ref as mr

LAYOUTS = {
    "(N,C)": ((8, 3), 1),
    "(N,C,H,W)": ((4, 3, 3, 2), 1),
    "channels-last": ((4, 2, 3, 3), -1),
}


def autograd(x, w, gamma, beta, prev_mean, prev_var, lam, eps, axis):  # type: ignore[no-untyped-def]
    """Algorithm 1's training forward in plain torch; previous statistics are constants."""
    t = {
        k: torch.tensor(v, requires_grad=k in "xgb")
        for k, v in {"x": x, "g": gamma, "b": beta}.items()
    }
    dims = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    mu_b = t["x"].mean(dim=dims)
    var_b = ((t["x"] - mu_b.reshape(shape)) ** 2).mean(dim=dims)
    mu = lam * torch.tensor(prev_mean) + (1 - lam) * mu_b
    var = lam * torch.tensor(prev_var) + (1 - lam) * var_b
    y = t["g"].reshape(shape) * (t["x"] - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    y = y + t["b"].reshape(shape)
    (y * torch.tensor(w)).sum().backward()
    return t["x"].grad.numpy(), t["g"].grad.numpy(), t["b"].grad.numpy()


def ours(x, w, gamma, beta, prev_mean, prev_var, lam, eps, axis):  # type: ignore[no-untyped-def]
    state = mr.init_state(gamma.size)._replace(moving_mean=prev_mean, moving_var=prev_var)
    _, _, ctx = mr.mbn_forward(x, state, gamma, beta, lam=lam, eps=eps, axis=axis)
    return mr.mbn_backward(w, ctx)


def loss(x, w, gamma, beta, prev_mean, prev_var, lam, eps, axis):  # type: ignore[no-untyped-def]
    state = mr.init_state(gamma.size)._replace(moving_mean=prev_mean, moving_var=prev_var)
    y, _, _ = mr.mbn_forward(x, state, gamma, beta, lam=lam, eps=eps, axis=axis)
    return float(np.sum(y * w))


def finite_differences(args, h=1e-6):  # type: ignore[no-untyped-def]
    x = args[0]
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (loss(xp, *args[1:]) - loss(xm, *args[1:])) / (2 * h)
    return grad


def printed_eq13(x, w, gamma, prev_mean, prev_var, lam, eps):  # type: ignore[no-untyped-def]
    """The paper's Eq. 13 for (N, C), with its (xhat_i - mu_M) as printed."""
    m = x.shape[0]
    mu_b, var_b = x.mean(0), x.var(0)
    mu, var = lam * prev_mean + (1 - lam) * mu_b, lam * prev_var + (1 - lam) * var_b
    dxhat, inv = w * gamma, 1 / np.sqrt(var + eps)
    xhat = (x - mu) * inv
    dvar_b = np.sum(dxhat * (xhat - mu), 0) * -0.5 * (var + eps) ** -1.5 * (1 - lam)
    dmu_b = np.sum(dxhat * (lam - 1) * inv, 0) + dvar_b * np.sum(-2 * (x - mu_b), 0) / m
    return dxhat * inv + dvar_b * 2 * (x - mu_b) / m + dmu_b / m


def main() -> None:
    rng = np.random.default_rng(0)
    print(
        "| layout | lam | max rel err vs autograd (dx, dgamma, dbeta) | max rel err vs FD (dx) "
        "| printed Eq. 13 rel err |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, (shape, axis) in LAYOUTS.items():
        c = shape[axis]
        for lam in (0.0, 0.5, 0.9375, 1.0):
            x = rng.normal(3.0, 2.0, size=shape)
            w = rng.normal(size=shape)
            args = (
                x,
                w,
                rng.uniform(0.5, 1.5, c),
                rng.normal(size=c),
                rng.normal(size=c),
                rng.uniform(0.5, 2.0, c),
                lam,
                1e-5,
                axis,
            )
            got = ours(*args)
            ref = autograd(*args)
            err = max(
                np.max(np.abs(a - b)) / np.max(np.abs(b)) for a, b in zip(got, ref, strict=True)
            )
            fd = finite_differences(args)
            fd_err = np.max(np.abs(got[0] - fd)) / np.max(np.abs(fd))
            printed = "n/a"
            if name == "(N,C)":
                p = printed_eq13(x, w, args[2], args[4], args[5], lam, 1e-5)
                printed = f"{np.max(np.abs(p - ref[0])) / np.max(np.abs(ref[0])):.2e}"
            print(f"| {name} | {lam} | {err:.1e} | {fd_err:.1e} | {printed} |")


if __name__ == "__main__":
    main()
