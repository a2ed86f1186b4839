"""``mbn-ref reproduce``: the paper's small-batch claim on data that ships with scikit-learn.

Batch normalization (BN) collapses at batch size 2 and momentum batch normalization (MBN,
Yong et al., ECCV 2020) does not. This subpackage trains small models on scikit-learn's
``load_digits`` with several normalizations and batch sizes and reports test accuracy, a
figure in the style of the paper's Fig. 4 (with ``lam(t)``, the inference decay, and the
batch statistics against the noise model, after Fig. 1) and a JSON file with every number.

- :mod:`~mbn_torch.reproduce.data`: the data set (stratified split, standardized);
- :mod:`~mbn_torch.reproduce.models`: the MLP, the CNN and the normalization layers;
- :mod:`~mbn_torch.reproduce.experiment`: the configuration, one training run, the presets;
- :mod:`~mbn_torch.reproduce.multiproc`: ``--nproc K``, one run over K gloo processes;
- :mod:`~mbn_torch.reproduce.output`: the table, the figure and the JSON report;
- :mod:`~mbn_torch.reproduce.cli`: the ``reproduce`` subcommand of ``mbn-ref``.

It needs the ``reproduce`` extra (scikit-learn, matplotlib, tqdm) beside PyTorch.

>>> from mbn_torch.reproduce import PRESETS
>>> sorted(PRESETS)
['default', 'full', 'quick']
"""

from .experiment import NORMS, PRESETS, Config, RunResult, run_experiment, train_one

__all__ = ["NORMS", "PRESETS", "Config", "RunResult", "run_experiment", "train_one"]
