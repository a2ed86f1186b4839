"""``mbn-ref reproduce --framework keras``: the digits experiment on the Keras adapter.

The experiment of :mod:`mbn_torch.reproduce` (its configuration, data, presets, records and
outputs are shared; this subpackage holds only the Keras side) with
:class:`mbn_tf.DynamicBatchNormalization` for BN, :class:`mbn_tf.MomentumBatchNormalization`
for MBN and the callback :class:`mbn_tf.MomentumScheduler` for their decays, on Keras 3's
TensorFlow backend:

- :mod:`~mbn_tf.reproduce.models`: the MLP, the CNN and the normalization layers in Keras;
- :mod:`~mbn_tf.reproduce.experiment`: one compiled training run, all runs.

It needs the ``reproduce`` and ``tensorflow`` extras (PyTorch too: the shared parts live in
:mod:`mbn_torch.reproduce`).

>>> from mbn_torch.reproduce import PRESETS
>>> from mbn_torch.reproduce.data import load_digits_split
>>> from mbn_tf.reproduce import run_experiment
>>> callable(run_experiment)
True
"""

from .experiment import run_experiment, train_one
from .models import make_model

__all__ = ["make_model", "run_experiment", "train_one"]
