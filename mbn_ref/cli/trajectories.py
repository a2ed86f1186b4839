"""Running statistics of one simulated channel under a static and a dynamic momentum.

What ``mbn-ref schedule --plot`` draws. One channel of Gaussian data whose mean drifts
linearly from 0 to ``drift`` (standard deviation 1) is fed, ``batch_size`` values per step,
``steps_per_epoch`` steps per epoch, to three sets of statistics, all updated by the core:

- **static**: BN's running statistics with one fixed decay (:func:`mbn_ref.bn_forward`);
- **MBN training**: MBN's moving statistics with Eq. 11's ``lam(t)``, constant within the
  1-indexed epoch ``t`` (:func:`mbn_ref.mbn_forward`);
- **MBN inference**: MBN's inference statistics with Eq. 12's ``tau``, from the same calls.

The draws are ``rng.standard_normal((steps, batch_size)) + mean[:, None]`` with
``rng = numpy.random.default_rng(seed)`` and ``mean = drift * arange(steps) / steps``, so
anyone can recompute them.

>>> t = simulate(batch_size=4, epochs=3, steps_per_epoch=2, static_decay=0.9, seed=0)
>>> t.steps, len(t.static_mean), t.lam
(6, 6, [0.0, 0.0, 0.2285533905932738, 0.2285533905932738, 0.875, 0.875])
>>> bool(t.mbn_mean[0] == t.batch_mean[0])  # lam(1) = 0: the first epoch is BN
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

import mbn_ref as mr
from mbn_ref.conventions import Estimator
from mbn_ref.schedules.paper import PAPER_DEFAULTS_SEC_5_2, mbn_lambda_schedule, mbn_tau

__all__ = ["Trajectories", "plot", "simulate"]


@dataclass
class Trajectories:
    """Per-step values of one simulated channel (lists of floats, one entry per step).

    ``*_mean``/``*_var`` are the statistics **after** the step's update.
    """

    batch_size: int
    epochs: int
    steps_per_epoch: int
    seed: int
    drift: float
    estimator: str
    static_decay: float
    tau: float
    lam: list[float] = field(default_factory=list)
    population_mean: list[float] = field(default_factory=list)
    population_var: list[float] = field(default_factory=list)
    batch_mean: list[float] = field(default_factory=list)
    batch_var: list[float] = field(default_factory=list)
    static_mean: list[float] = field(default_factory=list)
    static_var: list[float] = field(default_factory=list)
    mbn_mean: list[float] = field(default_factory=list)
    mbn_var: list[float] = field(default_factory=list)
    inference_mean: list[float] = field(default_factory=list)
    inference_var: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """The number of training steps."""
        return self.epochs * self.steps_per_epoch

    def as_json(self) -> dict[str, Any]:
        """The JSON form (``trajectories`` of ``mbn-ref schedule --plot ... --json``)."""
        steps = list(range(1, self.steps + 1))
        return {
            "data": "one channel: rng = numpy.random.default_rng(seed); x = "
            "rng.standard_normal((steps, batch_size)) + population_mean[:, None]; "
            "population_mean = drift * (step - 1) / steps, population std 1",
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
            "drift": self.drift,
            "estimator": self.estimator,
            "step": steps,
            "epoch": [(s - 1) // self.steps_per_epoch + 1 for s in steps],
            "population_mean": self.population_mean,
            "population_var": self.population_var,
            "batch_mean": self.batch_mean,
            "batch_var": self.batch_var,
            "static": {
                "decay": self.static_decay,
                "mean": self.static_mean,
                "var": self.static_var,
            },
            "mbn_training": {"lam": self.lam, "mean": self.mbn_mean, "var": self.mbn_var},
            "mbn_inference": {
                "tau": self.tau,
                "mean": self.inference_mean,
                "var": self.inference_var,
            },
        }


def simulate(
    *,
    batch_size: int,
    epochs: int,
    steps_per_epoch: int,
    static_decay: float,
    seed: int,
    drift: float = 1.0,
    ideal_batch_size: int = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
    tau0: float = PAPER_DEFAULTS_SEC_5_2.tau0,
    estimator: Estimator = "biased",
) -> Trajectories:
    """Feed one simulated channel to BN (static decay) and MBN (Eq. 11/12), step by step.

    Parameters
    ----------
    batch_size, epochs, steps_per_epoch : int
        ``m`` (at least 2: a batch of one value has no variance), ``T`` and the steps of
        one epoch.
    static_decay : float
        BN's decay (weight on history) in ``[0, 1]``.
    seed : int
        Seed of :func:`numpy.random.default_rng`.
    drift : float, optional
        The population mean moves linearly from 0 towards ``drift`` over the run.
    ideal_batch_size, tau0 : optional
        Eq. 11's ``m0`` and Eq. 12's ``tau0``.
    estimator : {"biased", "unbiased"}, optional
        The batch variance that enters BN's running and MBN's inference variance.

    Returns
    -------
    Trajectories
        The per-step values.

    Raises
    ------
    ValueError
        A batch size below 2, or what the core rejects (a decay outside ``[0, 1]``, ...).
    """
    if batch_size < 2:
        raise ValueError(
            f"the trajectories need --batch-size >= 2 (a batch of one value has no variance), "
            f"got {batch_size}"
        )
    lam_of = mbn_lambda_schedule(
        total_epochs=epochs, batch_size=batch_size, ideal_batch_size=ideal_batch_size
    )
    tau = mbn_tau(batch_size=batch_size, ideal_batch_size=ideal_batch_size, tau0=tau0)
    steps = epochs * steps_per_epoch
    rng = np.random.default_rng(seed)
    population = drift * np.arange(steps, dtype=np.float64) / steps
    x = rng.standard_normal((steps, batch_size)) + population[:, None]
    t = Trajectories(
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        drift=float(drift),
        estimator=estimator,
        static_decay=float(static_decay),
        tau=tau,
        population_mean=population.tolist(),
        population_var=[1.0] * steps,
        batch_mean=x.mean(axis=1).tolist(),
        batch_var=x.var(axis=1).tolist(),
    )
    bn_state: mr.BNState | None = mr.init_bn_state(1, dtype=np.float64)
    mbn_state = mr.init_state(1, dtype=np.float64)
    for step in range(steps):
        lam = lam_of(step // steps_per_epoch)
        batch = x[step][:, None]  # (m, 1): one channel
        _, bn_state, _ = mr.bn_forward(batch, bn_state, decay=static_decay, estimator=estimator)
        _, mbn_state, _ = mr.mbn_forward(batch, mbn_state, lam=lam, tau=tau, estimator=estimator)
        t.lam.append(lam)
        assert bn_state is not None  # the state is tracked
        t.static_mean.append(float(bn_state.running_mean[0]))
        t.static_var.append(float(bn_state.running_var[0]))
        t.mbn_mean.append(float(mbn_state.moving_mean[0]))
        t.mbn_var.append(float(mbn_state.moving_var[0]))
        t.inference_mean.append(float(mbn_state.running_mean[0]))
        t.inference_var.append(float(mbn_state.running_var[0]))
    return t


def plot(t: Trajectories, target: IO[bytes], fmt: str = "png") -> None:
    """Draw the trajectories into the binary file ``target`` as ``fmt`` (needs matplotlib).

    Three panels over the epochs: the running means, the running variances (each against
    the population's value and the batch statistics), and the decays.
    """
    from matplotlib.figure import Figure

    epochs = np.arange(1, t.steps + 1) / t.steps_per_epoch  # completed epochs after the step
    fig = Figure(figsize=(9, 8.5), layout="constrained")
    ax_mean, ax_var, ax_decay = fig.subplots(3, 1, sharex=True, height_ratios=(3, 3, 1.6))
    d, tau = t.static_decay, t.tau
    expected_var = (t.batch_size - 1) / t.batch_size if t.estimator == "biased" else 1.0
    for ax, what, batch, static, mbn, inference, population in (
        (
            ax_mean,
            "mean",
            t.batch_mean,
            t.static_mean,
            t.mbn_mean,
            t.inference_mean,
            t.population_mean,
        ),
        (
            ax_var,
            "variance",
            t.batch_var,
            t.static_var,
            t.mbn_var,
            t.inference_var,
            t.population_var,
        ),
    ):
        ax.plot(epochs, batch, ".", ms=2, color="0.75", label=f"batch {what} (m = {t.batch_size})")
        ax.plot(epochs, population, color="black", lw=1.5, label=f"population {what}")
        if what == "variance" and expected_var != 1.0:
            ax.axhline(
                expected_var,
                color="black",
                lw=1,
                ls=":",
                label="(m-1)/m: what the biased estimator averages to",
            )
        ax.plot(
            epochs,
            mbn,
            color="tab:orange",
            lw=0.9,
            alpha=0.75,
            label="MBN training, lam(t) (Eq. 11)",
        )
        ax.plot(epochs, static, color="tab:blue", lw=1.3, label=f"static decay {d:g} (BN)")
        ax.plot(
            epochs,
            inference,
            color="tab:green",
            lw=1.3,
            label=f"MBN inference, tau = {tau:.4f} (Eq. 12)",
        )
        ax.set_ylabel(f"running {what}")
        ax.grid(alpha=0.3)
    batch_var_top = float(np.quantile(t.batch_var, 0.99)) if t.batch_var else 1.0
    ax_var.set_ylim(0, max(2.0, batch_var_top))
    ax_mean.legend(fontsize=8, loc="upper left", ncol=2)
    ax_var.legend(fontsize=8, loc="upper left", ncol=2)
    ax_decay.plot(epochs, [d] * t.steps, color="tab:blue", label="static decay")
    ax_decay.plot(epochs, t.lam, color="tab:orange", label="lam(t)")
    ax_decay.plot(epochs, [tau] * t.steps, color="tab:green", label="tau")
    ax_decay.set_ylim(-0.05, 1.05)
    ax_decay.set_ylabel("decay")
    ax_decay.set_xlabel("epoch (1-indexed epoch t covers (t-1, t])")
    ax_decay.legend(fontsize=8, loc="lower right", ncol=3)
    ax_decay.grid(alpha=0.3)
    fig.suptitle(
        f"One channel, batch size m = {t.batch_size}, mean drifting 0 -> {t.drift:g}, "
        f"{t.steps_per_epoch} steps per epoch, seed {t.seed} ({t.estimator} variance)",
        fontsize=10,
    )
    fig.savefig(target, format=fmt, dpi=110)
