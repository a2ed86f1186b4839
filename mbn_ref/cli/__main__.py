"""``python -m mbn_ref.cli``: the ``mbn-ref`` command."""

from mbn_ref.cli import main

raise SystemExit(main())
