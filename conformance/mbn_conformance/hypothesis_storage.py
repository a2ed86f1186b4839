"""Keep hypothesis from writing into the user's working directory while the suite runs.

The properties run with ``database=None``, so hypothesis keeps no example database. It still
writes one thing on its own: the cache of the constants it collects from the source of
every *local* module (not under ``site-packages``: the user's adapter, an editable install)
to mix into its draws, ``.hypothesis/constants/<hash>`` in the current directory
(``hypothesis.internal.constants_ast.constants_from_module``, hypothesis 6.1xx). There is
no setting to turn it off, but every write goes through
``hypothesis.configuration.storage_directory`` and a failed write is ignored (the constants
are then computed from the source, as on a first run). :func:`no_hypothesis_storage`
points that directory, for the duration of a check only, at a path that cannot exist: a
child of this very source file. Nothing is written anywhere, and the caller's own
hypothesis tests in the same process keep their storage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

UNWRITABLE = Path(__file__).resolve() / "no-hypothesis-storage"
"""A path under a regular file: no directory can be created there, on any system."""


@contextlib.contextmanager
def no_hypothesis_storage() -> Iterator[None]:
    """Within the block, hypothesis' storage directory cannot be created (nothing is written).

    The previous directory (``HYPOTHESIS_STORAGE_DIRECTORY``, a pytest option, or the
    default ``.hypothesis`` of the current directory) is restored afterwards. Without
    hypothesis installed this does nothing.
    """
    try:
        from hypothesis import configuration
    except ImportError:
        yield
        return
    previous = configuration.storage_directory(intent_to_write=False).home_directory
    configuration.set_hypothesis_home_dir(UNWRITABLE)
    try:
        yield
    finally:
        configuration.set_hypothesis_home_dir(previous)
