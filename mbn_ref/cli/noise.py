"""``mbn-ref noise``: BN's and MBN's statistics noise and MBN's effective batch sizes.

Every number comes from :mod:`mbn_ref.noise` (docs/spec.md §6, the corrected Eq. 10).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mbn_ref import noise

from ._common import PROG, UsageError, atomic_output, check_writable_file, dump_json, epilog
from ._common import float_list as _float_list
from ._common import positive_int as _positive_int

__all__ = ["register"]

NAME = "noise"
DEFAULT_LAMS = (0.0, 0.5, 0.9, 0.99)

EPILOG = epilog(
    [
        ("mbn-ref noise --batch-size 2", f"lam = {','.join(map(str, DEFAULT_LAMS))}"),
        ("mbn-ref noise --batch-size 2 --lam 0,0.5,0.9,0.9375 --json -", "the rows as JSON"),
        ("mbn-ref noise --batch-size 4 --lam 0.75 --json noise.json", "table and JSON file"),
    ],
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``noise`` subcommand to an ``add_subparsers()`` object."""
    cmd: argparse.ArgumentParser = subparsers.add_parser(
        NAME,
        help="BN's and MBN's statistics noise and MBN's effective batch size",
        description=(
            "For batch size m and each training decay lam: the variance of the mean noise "
            "xi_mu for BN (1/m) and MBN (the corrected Eq. 10, (1-lam)/((1+lam) m)), of the "
            "variance noise xi_sigma (Gaussian data), and the batch size at which BN is as "
            "noisy as MBN in each (mbn_ref.noise)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--batch-size", type=_positive_int, required=True, help="batch size m")
    cmd.add_argument(
        "--lam",
        type=_float_list,
        nargs="+",
        default=None,
        metavar="LIST",
        help="training decays (weight on history) in [0, 1], comma-separated (space-separated "
        f"also works) (default: {','.join(map(str, DEFAULT_LAMS))})",
    )
    cmd.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write the rows as JSON to PATH ('-': JSON on stdout instead of the table)",
    )
    cmd.set_defaults(run=run)
    return cmd


def _noise_rows(m: int, lams: Sequence[float]) -> list[dict[str, float | None]]:
    """One row per decay: the noise variances and effective batch sizes of docs/spec.md §6."""
    rows: list[dict[str, float | None]] = []
    for lam in lams:
        sigma_ok = m >= 2  # the variance noise needs two values
        rows.append(
            {
                "lam": float(lam),
                "bn_var_xi_mu": float(noise.bn_xi_mu_var(m)),
                "mbn_var_xi_mu": float(noise.mbn_xi_mu_var(m, lam)),
                "bn_var_xi_sigma": float(noise.bn_xi_sigma_var(m)) if sigma_ok else None,
                "mbn_var_xi_sigma": float(noise.mbn_xi_sigma_var(m, lam)) if sigma_ok else None,
                "effective_batch_size_mean": float(noise.effective_batch_size(m, lam)),
                "effective_batch_size_variance": (
                    float(noise.effective_batch_size_sigma(m, lam)) if sigma_ok else None
                ),
            }
        )
    return rows


def _finite_or_none(v: float | None) -> float | None:
    """``None`` (JSON null) for an infinite value (``lam = 1``), else the value."""
    return None if v is None or math.isinf(v) else v


def _number(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def run(args: argparse.Namespace) -> int:
    """Run ``mbn-ref noise`` for parsed ``args``; returns the exit status."""
    lams = [v for group in args.lam for v in group] if args.lam else list(DEFAULT_LAMS)
    try:
        rows = _noise_rows(args.batch_size, lams)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{PROG} {NAME}: error: {exc}") from None
    report = {
        "batch_size": args.batch_size,
        "conventions": "lam is a decay (weight on history); variances are of the noise of "
        "standardized data (Gaussian for xi_sigma)",
        "rows": [{k: _finite_or_none(v) for k, v in row.items()} for row in rows],
    }
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    if args.json is not None:
        check_writable_file(NAME, Path(args.json), "--json")
    header = (
        "lam",
        "Var xi_mu BN",
        "Var xi_mu MBN",
        "Var xi_sigma BN",
        "Var xi_sigma MBN",
        "BN-equivalent m (mean)",
        "(variance)",
    )
    print(
        f"# mbn-ref noise: batch size m = {args.batch_size}; MBN's stationary noise "
        "(corrected Eq. 10) against BN's"
    )
    print("  ".join(f"{h:>{max(len(h), 10)}}" for h in header))
    for row in rows:
        cells = [_number(v) for v in row.values()]
        print("  ".join(f"{c:>{max(len(h), 10)}}" for c, h in zip(cells, header, strict=True)))
    if args.json is not None:
        with atomic_output(Path(args.json)) as f:
            dump_json(report, f)
    return 0
