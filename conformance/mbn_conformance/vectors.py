"""The golden-vector file format (version 2): versioned, schema-checked, NumPy-only, no pickle.

A vector file is a zip of ``.npy`` members (``numpy.load`` reads it, ``allow_pickle=False``)
written with fixed timestamps, so that regenerating it gives the same bytes. Members:

``manifest``
    a 0-d unicode array holding JSON: ``{"format": "mbn-conformance-vectors", "version": 2,
    "generator": {...}, "cases": [CASE, ...]}``.
``<case id>/<name>``
    per-case arrays, listed below.

A CASE is ``{"id", "algorithm", "layout", "shape", "axis", "dtype", "eps", "estimators",
"affine", "shards", "tags", "draws", "steps"}``:

- ``algorithm``: ``bn``, ``dynamic_bn``, ``cumulative``, ``mbn``, ``sync`` (synchronized BN)
  or ``sync_mbn``; ``layout`` one of ``NC, NCL, NCHW, NCDHW, NHWC``; ``shape`` the whole
  batch's input shape and ``axis`` its channel axis; ``dtype`` the inputs' dtype; ``eps``.
- ``estimators``: the running-variance estimators the case carries expectations for, always
  ``["biased", "unbiased"]`` except where the unbiased estimator is undefined (a training
  batch of one value per channel, which docs/spec.md §9 refuses): ``["biased"]``.
- ``shards``: the shard sizes along the first axis of a synchronized case, or ``null``.
- ``tags``: what else the case exercises (``normal``/``offset``/``zero_var_channel`` data,
  ``default``/``random`` initial state, ``draws``).
- ``draws``: the indices of the steps that are **independent draws** of the same scenario,
  ``[]`` for most cases. The float32 offset cases (single-device and synchronized; tag
  ``draws``) list their 5 training steps: each step draws its ``x`` and ``dy`` anew from the
  same distribution (per-channel mean ``1e4`` plus ``U(-2, 2)``, unit spread) and starts from
  a state already at the data's scale, so a step's ``y``, ``dx``, ``dgamma`` and ``dbeta``
  are one draw of the float32-offset verdict, and a runner may judge those quantities by a
  stated criterion over the draws rather than by every draw. The state is a trajectory (each
  step's state depends on the previous ones) and is not part of the draws.
- ``steps``: ``[{"training", "decay", "lam", "tau"}, ...]``: 5 training steps then one
  evaluation step; every momentum is a decay, ``null`` the cumulative average.

The arrays of a case with S steps, C channels and F float state fields (``running_mean,
running_var`` for BN, followed by ``moving_mean, moving_var`` for MBN):

========================  ==================  ================================================
name                      shape               meaning
========================  ==================  ================================================
``params``                ``(2, C)``          gamma and beta, in ``dtype`` (affine cases only)
``init``                  ``(F, C)``          the initial state, float64
``init_count``            ``()``              its ``num_batches_tracked``, int64
``x``, ``dy``             ``(S, *shape)``     inputs, in ``dtype`` (``dy`` is 0 at evaluation)
``y``, ``dx``             ``(S, *shape)``     expected outputs, float64 (biased estimator)
``dparams``               ``(S, 2, C)``       expected dgamma, dbeta, float64
``state``                 ``(S, F, C)``       the state after each step (biased estimator)
``count``                 ``(S,)``            its ``num_batches_tracked``, int64
``running_var@unbiased``  ``(S, C)``          ``running_var`` after each step, unbiased
``y@unbiased``            ``(E, *shape)``     the E evaluation steps' ``y``, unbiased
========================  ==================  ================================================

In synchronized cases ``x``, ``dy``, ``y``, ``dx`` and ``y@unbiased`` are stored per shard
``s`` as ``x<s>``, ``dy<s>``, ``y<s>``, ``dx<s>``, ``y<s>@unbiased``, each with the shard's
shape ``(n_s, *shape[1:])``. The ``@unbiased`` arrays exist when ``estimators`` holds
``"unbiased"``. Only ``running_var`` and evaluation-step ``y`` depend on the estimator
(training outputs, gradients and the other state fields never do; the generator asserts it),
so the other quantities are stored once. Gradient rows of evaluation steps are zeros and
carry no meaning. Inputs are stored in the case's dtype; expected values are float64 (the
spec precision), computed by :mod:`mbn_ref` from the stored inputs
(:mod:`mbn_conformance.cases`).

Read a case by meaning through :class:`Case`.
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

from .protocol import DTYPES, ESTIMATORS, LAYOUTS, Kind, Setup, Step

FORMAT = "mbn-conformance-vectors"
VERSION = 2
FLOAT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "bn": ("running_mean", "running_var"),
    "mbn": ("running_mean", "running_var", "moving_mean", "moving_var"),
}
COUNT_FIELD = "num_batches_tracked"
DEFAULT_PATH = Path(__file__).with_name("data") / "golden_v2.npz"
CASE_ALGORITHMS: tuple[str, ...] = ("bn", "dynamic_bn", "cumulative", "mbn", "sync", "sync_mbn")
"""The ``algorithm`` of a case (``sync_mbn``: synchronized MBN)."""
ALTERNATE = "unbiased"
"""The estimator stored as ``@unbiased`` arrays beside the biased expectations."""
INPUTS: tuple[str, ...] = ("x", "dy")
"""The per-step input arrays (:meth:`Case.array`)."""
OUTPUTS: tuple[str, ...] = ("y", "dx")
"""The per-step expected arrays (:meth:`Case.expected`)."""

_CASE_KEYS = {
    "id": str,
    "algorithm": str,
    "layout": str,
    "shape": list,
    "axis": int,
    "dtype": str,
    "eps": float,
    "estimators": list,
    "affine": bool,
    "shards": (list, type(None)),
    "tags": list,
    "draws": list,
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
    """One golden case: its metadata and its arrays, with accessors by meaning.

    Attributes
    ----------
    meta : dict
        The case's manifest entry (see the module docstring).
    arrays : mapping of str to ndarray
        The case's arrays by name, without the ``<case id>/`` prefix.

    Examples
    --------
    >>> case = next(c for c in read() if c.id == "bn/NC/N2/float64/eps1e-05")
    >>> case.kind, case.shape, case.channels, case.num_shards, len(case.steps)
    ('bn', (2, 4), 4, None, 6)
    >>> step = case.step(0, "unbiased")
    >>> step.training, step.decay, step.estimator
    (True, 0.9, 'unbiased')
    >>> case.array("x", 0).dtype.name, case.expected("y", 0, estimator="biased").dtype.name
    ('float64', 'float64')
    >>> bool((case.expected("y", 0, estimator="biased")
    ...       == case.expected("y", 0, estimator="unbiased")).all())   # training: the same
    True
    """

    meta: dict[str, Any]
    arrays: Mapping[str, np.ndarray]

    @property
    def id(self) -> str:
        """The case id, e.g. ``"bn/NC/N2/float64/eps1e-05"``; ``--cases`` globs match it."""
        return str(self.meta["id"])

    @property
    def kind(self) -> Kind:
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

    @property
    def estimators(self) -> tuple[str, ...]:
        """The running-variance estimators the case has expectations for.

        Both, except where the unbiased one is undefined (one value per channel).
        """
        return tuple(self.meta["estimators"])

    @property
    def draws(self) -> tuple[int, ...]:
        """The steps that are independent draws of one scenario (module docstring); often ``()``."""
        return tuple(int(k) for k in self.meta["draws"])

    @property
    def setup(self) -> Setup:
        """The layer an adapter builds its state for (:class:`~mbn_conformance.protocol.Setup`)."""
        return Setup(
            kind=self.kind,
            layout=str(self.meta["layout"]),
            shape=self.shape,
            axis=int(self.meta["axis"]),
            num_features=self.channels,
            dtype=str(self.meta["dtype"]),
            affine=bool(self.meta["affine"]),
        )

    def step(self, k: int, estimator: str) -> Step:
        """Step ``k`` as the adapter receives it, for an adapter storing ``estimator``.

        Parameters
        ----------
        k : int
            The 0-indexed step.
        estimator : {"biased", "unbiased"}
            The running-variance estimator the adapter declared.

        Returns
        -------
        Step
            The step's decays, ``eps``, axis, training flag and ``estimator``.
        """
        _check_estimator(estimator)
        s = self.meta["steps"][k]
        return Step(
            kind=self.kind,
            index=k,
            training=bool(s["training"]),
            eps=float(self.meta["eps"]),
            axis=int(self.meta["axis"]),
            estimator=estimator,
            decay=s["decay"],
            lam=float(s["lam"]),
            tau=s["tau"],
        )

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
        out = {f: np.asarray(v) for f, v in zip(FLOAT_FIELDS[self.kind], floats, strict=True)}
        out[COUNT_FIELD] = np.asarray(count, dtype=np.int64)
        return out

    def init_state(self) -> dict[str, np.ndarray]:
        """The initial state under canonical keys (float64, count int64), for any estimator."""
        return self._state(self.get("init"), self.get("init_count"))

    def _member(self, name: str, allowed: tuple[str, ...], shard: int | None) -> str:
        if name not in allowed:
            raise ValueError(f"expected one of {allowed}, got {name!r}")
        n = self.num_shards
        if n is None and shard is not None:
            raise ValueError(f"case {self.id!r} is not synchronized: shard must be None")
        if n is not None and (shard is None or not 0 <= shard < n):
            raise ValueError(
                f"case {self.id!r} has {n} shards: give shard in [0, {n}), got {shard}"
            )
        return name if shard is None else f"{name}{shard}"

    def _require(self, estimator: str) -> None:
        _check_estimator(estimator)
        if estimator not in self.estimators:
            raise ValueError(
                f"case {self.id!r} has no expectations under the {estimator} running-variance "
                f"estimator (it has {list(self.estimators)}): it is undefined with one value "
                "per channel (docs/spec.md §9); check Case.estimators first"
            )

    def array(self, name: str, k: int, shard: int | None = None) -> np.ndarray:
        """Step ``k``'s input ``x`` or ``dy`` in the case's dtype (of ``shard`` in sync cases)."""
        return np.asarray(self.get(self._member(name, INPUTS, shard))[k])

    def expected(
        self, name: str, k: int, shard: int | None = None, *, estimator: str
    ) -> np.ndarray:
        """Step ``k``'s expected ``y`` or ``dx`` (of ``shard`` in sync cases), float64.

        Parameters
        ----------
        name : {"y", "dx"}
            The output or the input gradient.
        k : int
            The 0-indexed step.
        shard : int, optional
            The shard, in synchronized cases (required there, refused elsewhere).
        estimator : {"biased", "unbiased"}
            The running-variance estimator the implementation stores: evaluation steps
            normalize with it.

        Returns
        -------
        ndarray
            The expected array, float64 (``dx`` of an evaluation step is zeros: unused).

        Raises
        ------
        ValueError
            An unknown name, shard or estimator, or an estimator the case has no
            expectations for (see :attr:`estimators`).
        """
        member = self._member(name, OUTPUTS, shard)
        self._require(estimator)
        if estimator == ALTERNATE and name == "y" and not self.meta["steps"][k]["training"]:
            row = self._evaluation_steps().index(k)
            return np.asarray(self.get(f"{member}@{ALTERNATE}")[row])
        return np.asarray(self.get(member)[k])

    def _evaluation_steps(self) -> list[int]:
        return [k for k, s in enumerate(self.meta["steps"]) if not s["training"]]

    def expected_state(self, k: int, *, estimator: str) -> dict[str, np.ndarray]:
        """The expected state after step ``k`` (canonical keys), ``running_var`` per ``estimator``.

        Raises :class:`ValueError` for an estimator the case has no expectations for.
        """
        self._require(estimator)
        out = self._state(self.get("state")[k], self.get("count")[k])
        if estimator == ALTERNATE:
            out["running_var"] = np.asarray(self.get(f"running_var@{ALTERNATE}")[k])
        return out

    def dparams(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Expected ``(dgamma, dbeta)`` of step ``k``, float64.

        Zeros at evaluation steps and in affine-free cases (not compared there).
        """
        d = self.get("dparams")[k]
        return d[0], d[1]


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def kind_of(algorithm: str) -> Kind:
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
    """Load and validate a vector file: every case with its arrays.

    Raises
    ------
    VectorFormatError
        The file is not a golden-vector archive (not a zip of ``.npy`` members with a
        manifest, or a member that needs pickle), or it breaks the schema; the message names
        the file and the offending key.
    """
    if not zipfile.is_zipfile(path):
        raise VectorFormatError(
            f"{path} is not a golden-vector archive (a zip of .npy members with a manifest, "
            "like mbn_conformance/data/golden_v2.npz)"
        )
    with np.load(path, allow_pickle=False) as npz:
        if "manifest" not in npz.files:
            raise VectorFormatError(f"{path}: no 'manifest' member")
        try:
            manifest = json.loads(_member(npz, "manifest", path).item())
        except (ValueError, TypeError) as exc:
            raise VectorFormatError(f"{path}: the manifest is not JSON text: {exc}") from exc
        validate_manifest(manifest)
        arrays = {k: _member(npz, k, path) for k in npz.files if k != "manifest"}
    by_case: dict[str, dict[str, np.ndarray]] = {m["id"]: {} for m in manifest["cases"]}
    for key, value in arrays.items():
        case_id, _, name = key.rpartition("/")
        if case_id not in by_case:
            raise VectorFormatError(f"{path}: member {key!r} belongs to no case of the manifest")
        by_case[case_id][name] = value
    cases = []
    for meta in manifest["cases"]:
        case = Case(meta, by_case[meta["id"]])
        validate_case_arrays(case)
        cases.append(case)
    return cases


def _member(npz: Any, key: str, path: str | Path) -> np.ndarray:
    """The member ``key`` of an open archive; :class:`VectorFormatError` if it is unreadable."""
    try:
        return np.asarray(npz[key])
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise VectorFormatError(
            f"{path}: member {key!r} is not a plain .npy array (pickle is refused): {exc}"
        ) from exc


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
        where = f"cases[{i}]"
        _check_keys(case, _CASE_KEYS, where)
        if case["id"] in seen:
            raise VectorFormatError(f"{where}: duplicate id {case['id']!r}")
        seen.add(case["id"])
        _check_case_values(case, f"{where} ({case['id']})")
        for k, step in enumerate(case["steps"]):
            _check_keys(step, _STEP_KEYS, f"{where}.steps[{k}]")


def _check_case_values(case: Mapping[str, Any], where: str) -> None:
    """The values of a case's keys (their types are checked already)."""

    def bad(key: str, why: str) -> VectorFormatError:
        return VectorFormatError(f"{where}: {key!r} {why}, got {case[key]!r}")

    for key, allowed in (
        ("algorithm", CASE_ALGORITHMS),
        ("layout", LAYOUTS),
        ("dtype", DTYPES),
    ):
        if case[key] not in allowed:
            raise bad(key, f"must be one of {allowed}")
    shape = case["shape"]
    if len(shape) < 2 or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise bad("shape", "must be a list of at least 2 non-negative integers")
    if not -len(shape) <= case["axis"] < len(shape):
        raise bad("axis", f"must index the shape {shape}")
    estimators = case["estimators"]
    if "biased" not in estimators or not set(estimators) <= set(ESTIMATORS):
        raise bad("estimators", f"must hold 'biased' and only names from {ESTIMATORS}")
    shards = case["shards"]
    if shards is not None and (
        not all(isinstance(n, int) and n >= 0 for n in shards) or sum(shards) != shape[0]
    ):
        raise bad("shards", f"must be non-negative sizes adding up to N = {shape[0]}")
    steps = case["steps"]
    if not steps:
        raise bad("steps", "must not be empty")
    training = [k for k, s in enumerate(steps) if isinstance(s, dict) and s.get("training")]
    draws = case["draws"]
    if not all(isinstance(k, int) and k in training for k in draws):
        raise bad("draws", f"must list training steps (here {training})")
    if bool(draws) != ("draws" in case["tags"]):
        raise bad("draws", "must be non-empty exactly when the tags hold 'draws'")


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
    evaluations = sum(not s["training"] for s in meta["steps"])
    f = len(FLOAT_FIELDS[kind_of(meta["algorithm"])])
    shards = meta["shards"]
    alternate = ALTERNATE in meta["estimators"]
    parts = (
        [("", shape)]
        if shards is None
        else [(str(s), (n, *shape[1:])) for s, n in enumerate(shards)]
    )
    for suffix, pshape in parts:
        for name in (*INPUTS, *OUTPUTS):
            yield f"{name}{suffix}", (steps, *pshape)
        if alternate:
            yield f"y{suffix}@{ALTERNATE}", (evaluations, *pshape)
    yield "dparams", (steps, 2, c)
    yield "init", (f, c)
    yield "init_count", ()
    yield "state", (steps, f, c)
    yield "count", (steps,)
    if alternate:
        yield f"running_var@{ALTERNATE}", (steps, c)
    if meta["affine"]:
        yield "params", (2, c)


def validate_case_arrays(case: Case) -> None:
    """Check that ``case`` has every array its metadata calls for, in the expected shape.

    Raises :class:`VectorFormatError` naming the case and the missing, misshapen or unknown
    array, or an input whose dtype is not the case's.
    """
    wanted = dict(expected_arrays(case.meta))
    for name, shape in wanted.items():
        arr = case.get(name)
        if tuple(arr.shape) != shape:
            raise VectorFormatError(
                f"case {case.id!r}: array {name!r} has shape {tuple(arr.shape)}, expected {shape}"
            )
    unknown = sorted(set(case.arrays) - set(wanted))
    if unknown:
        raise VectorFormatError(f"case {case.id!r}: unknown arrays {unknown}")
    dtype = np.dtype(case.meta["dtype"])
    for name in wanted:
        if name.rstrip("0123456789") in INPUTS and case.get(name).dtype != dtype:
            raise VectorFormatError(
                f"case {case.id!r}: input {name!r} has dtype {case.get(name).dtype}, "
                f"expected {dtype}"
            )
