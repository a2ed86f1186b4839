"""``mbn-ref reproduce``: the paper's small-batch claim, on the digits or on CIFAR-10.

Batch normalization (BN) collapses at batch size 2 and momentum batch normalization (MBN,
Yong et al., ECCV 2020) does not. This subpackage trains models with several normalizations
and batch sizes and reports test accuracy, a figure in the style of the paper's Fig. 4 (with
``lam(t)``, the inference decay, and the batch statistics against the noise model, after
Fig. 1) and a JSON file with every number: small models on scikit-learn's ``load_digits``
(no download), or the paper's ResNet-18 on CIFAR-10 read from its binary files.

- :mod:`~mbn_torch.reproduce.data`: the data sets' interface, the digits, loading by name;
- :mod:`~mbn_torch.reproduce.cifar`: CIFAR-10's binary reader (no pickle) and normalization;
- :mod:`~mbn_torch.reproduce.augment`: random crop and horizontal flip on tensors;
- :mod:`~mbn_torch.reproduce.models`: the MLP, the CNN and the normalization layers;
- :mod:`~mbn_torch.reproduce.resnet`: ResNet-18 for CIFAR;
- :mod:`~mbn_torch.reproduce.experiment`: the configuration, one training run, the presets;
- :mod:`~mbn_torch.reproduce.multiproc`: ``--nproc K``, one run over K gloo processes;
- :mod:`~mbn_torch.reproduce.output`: the table, the figure and the JSON report;
- :mod:`~mbn_torch.reproduce.cli`: the ``reproduce`` subcommand of ``mbn-ref``.

It needs the ``reproduce`` extra (scikit-learn, matplotlib, tqdm) beside PyTorch.

>>> from mbn_torch.reproduce import PRESETS, PRESETS_BY_DATA
>>> sorted(PRESETS), sorted(PRESETS_BY_DATA)
(['default', 'full', 'quick'], ['cifar10', 'digits'])
"""

from .experiment import (
    CIFAR10_PRESETS,
    NORMS,
    PRESETS,
    PRESETS_BY_DATA,
    Config,
    RunResult,
    run_experiment,
    train_one,
)

__all__ = [
    "CIFAR10_PRESETS",
    "NORMS",
    "PRESETS",
    "PRESETS_BY_DATA",
    "Config",
    "RunResult",
    "run_experiment",
    "train_one",
]
