"""The golden-vector file format: versioned, schema-checked, NumPy-only, no pickle.

A vector file is a zip of ``.npy`` members (``numpy.load`` reads it, ``allow_pickle=False``)
written with fixed timestamps, so that regenerating it gives the same bytes. Members:

``manifest``
    a 0-d unicode array holding JSON: ``{"format": "mbn-conformance-vectors", "version": 1,
    "generator": {...}, "cases": [CASE, ...]}``.
``<case id>/<name>``
    per-case arrays. ``params`` ``(2, C)``: gamma and beta (affine cases only); ``init``
    ``(F, C)`` float64 and ``init_count`` ``()`` int64: the initial state, whose F float
    fields are ``running_mean, running_var`` (BN) followed by ``moving_mean, moving_var``
    (MBN); and stacked over the case's S steps: inputs ``x`` and ``dy`` (``x<s>``, ``dy<s>``
    per shard ``s`` in sync cases), expected ``y`` and ``dx`` (``y<s>``, ``dx<s>``),
    ``dparams`` ``(S, 2, C)`` (dgamma, dbeta), ``state`` ``(S, F, C)`` and ``count`` ``(S,)``
    (the state after each step). Gradient rows of evaluation steps are zeros and carry no
    meaning.

A CASE is ``{"id", "algorithm", "layout", "shape", "axis", "dtype", "eps", "estimator",
"affine", "shards" (list of shard sizes along N, or null), "tags", "steps": [{"training",
"decay", "lam", "tau"}, ...]}``. Inputs are stored in the case's dtype; expected values are
float64 (the spec precision), computed by :mod:`mbn_ref` from the stored inputs.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "mbn-conformance-vectors"
VERSION = 1
FLOAT_FIELDS = {
    "bn": ("running_mean", "running_var"),
    "mbn": ("running_mean", "running_var", "moving_mean", "moving_var"),
}
COUNT_FIELD = "num_batches_tracked"
DEFAULT_PATH = Path(__file__).with_name("data") / "golden_v1.npz"

_CASE_KEYS = {
    "id": str,
    "algorithm": str,
    "layout": str,
    "shape": list,
    "axis": int,
    "dtype": str,
    "eps": float,
    "estimator": str,
    "affine": bool,
    "shards": (list, type(None)),
    "tags": list,
    "steps": list,
}
_STEP_KEYS = {
    "training": bool,
    "decay": (float, type(None)),
    "lam": float,
    "tau": (float, type(None)),
}


class VectorFormatError(ValueError):
    """A vector file that does not follow the format (names the offending key)."""


@dataclass(frozen=True)
class Case:
    """One golden case: its metadata and its arrays, with accessors by meaning."""

    meta: dict[str, Any]
    arrays: Mapping[str, np.ndarray]

    @property
    def id(self) -> str:
        """The case id, e.g. ``"bn/NC/N2/float64/eps1e-05/biased"``; ``--cases`` globs match it."""
        return str(self.meta["id"])

    @property
    def kind(self) -> str:
        """``"bn"`` or ``"mbn"``: which normalization the case exercises."""
        return kind_of(self.meta["algorithm"])

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The steps' settings: ``{"training", "decay", "lam", "tau"}`` each, in order."""
        return list(self.meta["steps"])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the (whole, unsharded) input ``x`` of each step."""
        return tuple(self.meta["shape"])

    @property
    def channels(self) -> int:
        """The number of channels C: the input's size along the case's axis."""
        return int(self.shape[self.meta["axis"] % len(self.shape)])

    @property
    def num_shards(self) -> int | None:
        """The number of shards of a sync case, ``None`` for a single-device case."""
        shards = self.meta["shards"]
        return None if shards is None else len(shards)

    def get(self, name: str) -> np.ndarray:
        """The stored array ``name``; :class:`VectorFormatError` when the case lacks it."""
        try:
            return self.arrays[name]
        except KeyError:
            raise VectorFormatError(f"case {self.id!r} has no array {name!r}") from None

    def params(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(gamma, beta)`` in the case's dtype, or ``(None, None)``."""
        if not self.meta["affine"]:
            return None, None
        p = self.get("params")
        return p[0], p[1]

    def _state(self, floats: np.ndarray, count: np.ndarray) -> dict[str, np.ndarray]:
        out = dict(zip(FLOAT_FIELDS[self.kind], floats, strict=True))
        out[COUNT_FIELD] = np.asarray(count, dtype=np.int64)
        return out

    def init_state(self) -> dict[str, np.ndarray]:
        """The initial state under canonical keys (float64, count int64)."""
        return self._state(self.get("init"), self.get("init_count"))

    def expected_state(self, k: int) -> dict[str, np.ndarray]:
        """The state after step ``k``."""
        return self._state(self.get("state")[k], self.get("count")[k])

    def array(self, name: str, k: int, shard: int | None = None) -> np.ndarray:
        """Step ``k``'s ``x``, ``dy``, ``y`` or ``dx`` (of shard ``shard`` in sync cases)."""
        return np.asarray(self.get(name if shard is None else f"{name}{shard}")[k])

    def dparams(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Expected ``(dgamma, dbeta)`` of step ``k``."""
        d = self.get("dparams")[k]
        return d[0], d[1]


def kind_of(algorithm: str) -> str:
    """``"mbn"`` for ``mbn`` and ``sync_mbn``, else ``"bn"``."""
    return "mbn" if algorithm in ("mbn", "sync_mbn") else "bn"


def pack(arrays: Mapping[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """Pack per-field arrays into the stored layout.

    The per-field arrays are ``init/<field>``, ``state/<field>``, ``gamma``, ``beta``,
    ``dgamma`` and ``dbeta``; other arrays pass through.
    """
    fields = FLOAT_FIELDS[kind]
    out = {
        k: v
        for k, v in arrays.items()
        if not k.startswith(("init/", "state/")) and k not in ("gamma", "beta", "dgamma", "dbeta")
    }
    out["init"] = np.stack([arrays[f"init/{f}"] for f in fields])
    out["init_count"] = np.asarray(arrays[f"init/{COUNT_FIELD}"], dtype=np.int64)
    out["state"] = np.stack([arrays[f"state/{f}"] for f in fields], axis=1)
    out["count"] = np.asarray(arrays[f"state/{COUNT_FIELD}"], dtype=np.int64)
    out["dparams"] = np.stack([arrays["dgamma"], arrays["dbeta"]], axis=1)
    if "gamma" in arrays:
        out["params"] = np.stack([arrays["gamma"], arrays["beta"]])
    return out


def write(path: str | Path, manifest: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write a vector file deterministically (sorted members, fixed timestamps)."""
    validate_manifest(manifest)
    members: dict[str, np.ndarray] = {
        "manifest": np.asarray(json.dumps(manifest, sort_keys=True, indent=1))
    }
    members.update(arrays)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(members):
            arr = np.asarray(members[key], order="C")
            if arr.dtype.hasobject:
                raise VectorFormatError(f"array {key!r} has an object dtype")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def read(path: str | Path = DEFAULT_PATH) -> list[Case]:
    """Load and validate a vector file: every case with its arrays."""
    with np.load(path, allow_pickle=False) as npz:
        if "manifest" not in npz.files:
            raise VectorFormatError(f"{path}: no 'manifest' member")
        manifest = json.loads(npz["manifest"].item())
        validate_manifest(manifest)
        arrays = {k: npz[k] for k in npz.files if k != "manifest"}
    cases = []
    for meta in manifest["cases"]:
        prefix = meta["id"] + "/"
        own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        case = Case(meta, own)
        validate_case_arrays(case)
        cases.append(case)
    return cases


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """``VectorFormatError`` naming the first key that breaks the schema."""
    if manifest.get("format") != FORMAT:
        raise VectorFormatError(f"'format' must be {FORMAT!r}, got {manifest.get('format')!r}")
    if manifest.get("version") != VERSION:
        raise VectorFormatError(
            f"'version' {manifest.get('version')!r} is not supported (this reader: {VERSION})"
        )
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not cases:
        raise VectorFormatError("'cases' must be a non-empty list")
    seen: set[str] = set()
    for i, case in enumerate(cases):
        _check_keys(case, _CASE_KEYS, f"cases[{i}]")
        if case["id"] in seen:
            raise VectorFormatError(f"cases[{i}]: duplicate id {case['id']!r}")
        seen.add(case["id"])
        if not case["steps"]:
            raise VectorFormatError(f"cases[{i}] ({case['id']}): 'steps' is empty")
        for k, step in enumerate(case["steps"]):
            _check_keys(step, _STEP_KEYS, f"cases[{i}].steps[{k}]")


def _check_keys(obj: Any, schema: Mapping[str, Any], where: str) -> None:
    if not isinstance(obj, dict):
        raise VectorFormatError(f"{where} must be an object")
    missing = set(schema) - set(obj)
    extra = set(obj) - set(schema)
    if missing or extra:
        raise VectorFormatError(
            f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(extra)}"
        )
    for key, typ in schema.items():
        value = obj[key]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float or (isinstance(typ, tuple) and float in typ):
            ok = ok or (isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise VectorFormatError(f"{where}.{key} has type {type(value).__name__}")


def expected_arrays(meta: Mapping[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes every case must hold, for validation."""
    shape = tuple(meta["shape"])
    c = shape[meta["axis"] % len(shape)]
    steps = len(meta["steps"])
    f = len(FLOAT_FIELDS[kind_of(meta["algorithm"])])
    shards = meta["shards"]
    parts = (
        [("", shape)]
        if shards is None
        else [(str(s), (n, *shape[1:])) for s, n in enumerate(shards)]
    )
    for suffix, pshape in parts:
        for name in ("x", "dy", "y", "dx"):
            yield f"{name}{suffix}", (steps, *pshape)
    yield "dparams", (steps, 2, c)
    yield "init", (f, c)
    yield "init_count", ()
    yield "state", (steps, f, c)
    yield "count", (steps,)
    if meta["affine"]:
        yield "params", (2, c)


def validate_case_arrays(case: Case) -> None:
    """Check that ``case`` has every array its metadata calls for, in the expected shape.

    Raises :class:`VectorFormatError` naming the case and the missing or misshapen array.
    """
    for name, shape in expected_arrays(case.meta):
        arr = case.get(name)
        if tuple(arr.shape) != shape:
            raise VectorFormatError(
                f"case {case.id!r}: array {name!r} has shape {tuple(arr.shape)}, expected {shape}"
            )
