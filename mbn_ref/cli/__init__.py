"""The ``mbn-ref`` command line.

Subcommands:

- ``mbn-ref schedule`` (:mod:`.schedule`): the paper's Eq. 11 training decay ``lam`` per
  epoch and Eq. 12 inference decay ``tau`` for a batch size, as a table (and optionally
  JSON); ``--plot`` draws the running statistics of one simulated channel under a static
  decay and under MBN's schedule (:mod:`.trajectories`).
- ``mbn-ref noise`` (:mod:`.noise`): BN's and MBN's statistics noise and MBN's effective
  batch size for a batch size and training decays (:mod:`mbn_ref.noise`).
- ``mbn-ref bench`` (:mod:`.bench`): runs the repository's benchmark scripts, prints one
  ratio table against the native batch norms with the targets, writes JSON, Markdown and a
  plot (:mod:`.bench_report`).
- subcommands from **plugins**: each entry point of the group ``mbn_ref.commands`` (like
  pytest's ``pytest11``) adds the subcommand named after it. Its object is a function
  ``register(subparsers)`` that adds a parser of that name to an ``add_subparsers()`` object
  and sets the default ``run``, a function ``run(args) -> int`` (the exit status). mbn-ref
  itself declares ``conformance = "mbn_conformance.cli:register"`` and
  ``reproduce = "mbn_torch.reproduce.cli:register"``, so the core never imports them. A
  plugin is loaded only when its subcommand is used (or ``mbn-ref --help`` lists it); one
  that fails to load is reported on one line (exit status 2) when its subcommand is used,
  and the other subcommands keep working.

The conventions every subcommand follows (options, help epilogs, one-line errors, exit
statuses) are in :mod:`mbn_ref.cli._common`; a plugin can use :func:`epilog` for its
``--help``. Exit status: 0 success; 1 a finding or failure the command reports
(``mbn-ref conformance``: the implementation does not conform; ``mbn-ref bench``: a suite
failed) or a reader that stopped early (``mbn-ref schedule ... | head``); 2 a usage or input
error, an output path that cannot be written included (one line on stderr, no traceback;
outputs are checked before anything is printed or written).

>>> main(["schedule", "--batch-size", "2", "--epochs", "3"])
# mbn-ref schedule: Momentum BN (Yong et al., ECCV 2020), Eq. 11 and Eq. 12
# m = 2 (batch size), m0 = 32 (ideal batch size), T = 3 epochs, tau0 = 0.85
# lam and tau are decays (weight on history): s <- d*s + (1-d)*batch.
# PyTorch's BatchNorm momentum is the update rate 1 - d.
# Epochs are 1-indexed as in the paper: t = 1..T (t = completed epochs + 1).
<BLANKLINE>
epoch t  lam (Eq. 11)  torch momentum (1 - lam)
      1      0.000000                  1.000000
      2      0.187500                  0.812500
      3      0.937500                  0.062500
<BLANKLINE>
tau (Eq. 12, inference) = 0.989894   torch momentum (1 - tau) = 0.010106
<BLANKLINE>
At t = T, lam = 0.937500: batch size 2 has the statistics noise of BN with batch size
62.0 in the mean and 123.0 in the variance, not m0 = 32 as the paper's misprinted
Eq. 10 suggests (docs/errata.md, erratum 3).
0
"""

from __future__ import annotations

from ._common import EXIT_STATUS, UsageError, epilog, positive_int
from ._main import COMMAND_GROUP, main

__all__ = ["COMMAND_GROUP", "EXIT_STATUS", "UsageError", "epilog", "main", "positive_int"]
