"""Data validation with Great Expectations (1.x API), the validator of record for `prepare`.

Two pandas tables are built from the split dataset's statistics (before
quantisation): one row per image, unreadable files included, with its
statistics; and one row per declared class with its image counts. The
statistics are computed chunk by chunk while `prepare` decodes
(`chunk_stats`, data/chunks.py), so the pixels are never held whole: the
tables are a few numbers per image, and the suite runs once on them. Named
checks, each one or more GX expectations, run on them; a failed check names
the images (or classes) that broke it, so the message says what to fix.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from diffrep.config import DataConfig
from diffrep.data.split import Split

MAX_EXAMPLES = 10  # failing ids kept per check
SOURCE_CHANNELS = {"mnist5k": 1, "digits": 1, "shapes": 3}
_STAT_CHUNK = 4096  # rows per numpy pass: bounds the temporaries for large datasets


class DataValidationError(ValueError):
    """The data failed its expectations; the message (`format_failures`) names the images and what to do."""


@dataclass
class CheckResult:
    name: str
    unit: str  # what `failing` names: "images" or "classes"
    success: bool
    n_failed: int
    failing: list[str]  # up to MAX_EXAMPLES ids
    hint: str  # what to do when it fails
    expectations: list[dict[str, Any]] = field(default_factory=list)  # GX type, kwargs, success, observed


@dataclass
class ValidationReport:
    success: bool
    results: list[CheckResult]
    counts: dict[str, int]
    reasons: dict[str, str]  # id -> why (unreadable file, duplicate partner, empty class folder)
    seconds: float

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success]

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "n_expectations": sum(len(r.expectations) for r in self.results),
            "counts": self.counts,
            "checks": [asdict(r) for r in self.results],
        }  # no timings: the report is a DVC output and should be reproducible byte for byte


# ---------------------------------------------------------------- per-chunk statistics
@dataclass
class ImageStats:
    """What validation needs of a dataset, built chunk by chunk: a few numbers per image, no pixels.

    Rows are the readable images in source order; `unreadable` lists the rest (id, why).
    """

    source: str
    shape: tuple[int, int, int]  # (C, H, W) every decoded image has
    ids: list[str]
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    mins: np.ndarray  # float64 (N,); NaN for an image without a finite pixel
    maxs: np.ndarray
    nonfinite: np.ndarray  # int64 (N,) NaN/Inf pixels
    digests: np.ndarray  # uint8 (N, 32): sha256 of each image's float32 pixels
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


def chunk_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float (n, C, H, W) -> per image min, max (finite pixels), non-finite count, sha256 digest (n, 32)."""
    n = len(x)
    mins, maxs = np.full(n, np.nan), np.full(n, np.nan)
    nonfinite = np.zeros(n, dtype=np.int64)
    flat = x.reshape(n, -1)  # (n, C*H*W)
    for s in range(0, n, _STAT_CHUNK):
        c = flat[s : s + _STAT_CHUNK]
        finite = np.isfinite(c)
        nonfinite[s : s + _STAT_CHUNK] = (~finite).sum(1)
        if c.shape[1]:
            lo, hi = np.where(finite, c, np.inf).min(1), np.where(finite, c, -np.inf).max(1)
            ok = finite.any(1)  # an all-NaN image has no min/max: NaN, reported by the non-finite check
            mins[s : s + _STAT_CHUNK] = np.where(ok, lo, np.nan)
            maxs[s : s + _STAT_CHUNK] = np.where(ok, hi, np.nan)
    digests = np.frombuffer(b"".join(hashlib.sha256(np.ascontiguousarray(x[i]).tobytes()).digest()
                                     for i in range(n)), dtype=np.uint8).reshape(n, 32)
    return mins, maxs, nonfinite, digests


def cross_split_duplicates(digests: np.ndarray, split: Split, ids: list[str]) -> tuple[np.ndarray, dict[str, str]]:
    """Which images have the exact pixels of an image in another split, and a note naming that partner.

    The partner is the first image (in source order) of the first other split (train, val, test) holding them.
    """
    n = len(digests)
    parts = split.parts()
    side = np.full(n, -1, dtype=np.int64)
    for k, idx in enumerate(parts.values()):
        side[idx] = k
    dup, reasons = np.zeros(n, dtype=bool), {}
    if n == 0:
        return dup, reasons
    _, group = np.unique(np.ascontiguousarray(digests).view(np.dtype((np.void, 32))).ravel(), return_inverse=True)
    group = group.ravel()
    first = np.full((len(parts), group.max() + 1), n, dtype=np.int64)  # [side, group] -> first row, n: none
    for k in range(len(parts)):
        rows = np.flatnonzero(side == k)
        np.minimum.at(first[k], group[rows], rows)
    names = list(parts)
    for k in range(len(parts)):
        rows = np.flatnonzero(side == k)
        others = np.delete(first[:, group[rows]], k, axis=0)  # (sides - 1, rows)
        for i in rows[(others < n).any(0)]:
            o = next(j for j in range(len(parts)) if j != k and first[j, group[i]] < n)
            dup[i] = True
            reasons[ids[i]] = f"same pixels as {ids[first[o, group[i]]]} in {names[o]}"
    return dup, reasons


# ---------------------------------------------------------------- tables (pure numpy/pandas)
def image_table(st: ImageStats, split: Split) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per image (readable or not) with its statistics; and id -> reason notes."""
    n = len(st.labels)
    side = np.full(n, "none", dtype=object)
    for name, idx in split.parts().items():
        side[idx] = name
    dup, reasons = cross_split_duplicates(st.digests, split, st.ids)
    c, h, w = st.shape
    readable = pd.DataFrame({
        "id": st.ids,
        "split": side,
        "readable": True,
        "reason": "",
        "channels": float(c),
        "height": float(h),
        "width": float(w),
        "min": st.mins,
        "max": st.maxs,
        "n_nonfinite": st.nonfinite.astype(float),
        "label": st.labels.astype(float),
        "duplicate_across_splits": dup,
    })
    unreadable = pd.DataFrame({
        "id": [p for p, _ in st.unreadable],
        "split": "none",
        "readable": False,
        "reason": [r for _, r in st.unreadable],
        "duplicate_across_splits": False,
    })
    reasons.update(dict(st.unreadable))
    table = pd.concat([readable, unreadable], ignore_index=True) if len(unreadable) else readable
    table["readable"] = table["readable"].astype(bool)
    table["duplicate_across_splits"] = table["duplicate_across_splits"].astype(bool)
    return table, reasons


def class_table(st: ImageStats, split: Split) -> pd.DataFrame:
    """One row per declared class: images in train, test and in all (out-of-set labels excluded)."""
    k = len(st.class_names)

    def count(idx: np.ndarray) -> np.ndarray:
        y = st.labels[idx]
        return np.bincount(y[(y >= 0) & (y < k)], minlength=k)

    n = {name: count(idx) for name, idx in split.parts().items()}
    return pd.DataFrame({
        "class_name": list(st.class_names),
        **{f"n_{name}": c.astype(np.int64) for name, c in n.items()},
        "n_images": sum(n.values()).astype(np.int64),
    })


# ---------------------------------------------------------------- GX
def _gx_checks(cfg: DataConfig, shape: tuple[int, int, int], num_classes: int):
    """(name, unit, table, hint, [expectations]) for every check."""
    import great_expectations as gx

    E = gx.expectations
    c, h, w = shape
    return [
        ("image readable", "images", "images", "fix or delete these files (PNG or JPEG images only)",
         [E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True])]),
        (f"image shape is {c}x{h}x{w}", "images", "images", "the source returned images of another shape: a loader bug",
         [E.ExpectColumnValuesToBeInSet(column="channels", value_set=[c]),
          E.ExpectColumnValuesToBeInSet(column="height", value_set=[h]),
          E.ExpectColumnValuesToBeInSet(column="width", value_set=[w])]),
        ("pixel values within [0, 1]", "images", "images", "the source must scale pixels to [0, 1]",
         [E.ExpectColumnValuesToBeBetween(column="min", min_value=0.0),
          E.ExpectColumnValuesToBeBetween(column="max", max_value=1.0)]),
        ("no NaN or Inf pixels", "images", "images", "remove or repair these images",
         [E.ExpectColumnValuesToBeBetween(column="n_nonfinite", min_value=0, max_value=0)]),
        (f"label in the {num_classes} declared classes", "images", "images",
         "labels must index the declared class list",
         [E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(num_classes)))]),
        ("no image in two splits (train, val, test)", "images", "images",
         "remove the duplicate files (exact same pixels) so that val and test images are unseen",
         [E.ExpectColumnValuesToBeInSet(column="duplicate_across_splits", value_set=[False])]),
        (f"at least {cfg.min_per_class} images per class", "classes", "classes",
         "add images to these classes, delete their folders, or lower data.min_per_class",
         [E.ExpectColumnValuesToBeBetween(column="n_images", min_value=cfg.min_per_class)]),
        (f"at least {cfg.min_rows} images in all", "dataset", "classes", "add images or lower data.min_rows",
         [E.ExpectColumnSumToBeBetween(column="n_images", min_value=cfg.min_rows)]),
    ]


def _run_gx(tables: dict[str, pd.DataFrame], cfg: DataConfig, shape, num_classes: int) -> list[CheckResult]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("prepare")
    checks = _gx_checks(cfg, shape, num_classes)
    key_column = {"images": "id", "classes": "class_name"}

    outcomes: dict[int, list] = {}  # check index -> GX results
    for table_name, df in tables.items():
        suite = gx.ExpectationSuite(name=f"prepare_{table_name}")
        for i, (_, _, table, _, exps) in enumerate(checks):
            if table == table_name:
                for e in exps:
                    e.meta = {"check": i}
                    suite.add_expectation(e)
        batch = (
            source.add_dataframe_asset(table_name)
            .add_batch_definition_whole_dataframe("all")
            .get_batch(batch_parameters={"dataframe": df})
        )
        # COMPLETE: every failing row's key, so a check made of several expectations can count distinct failures
        fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": [key_column[table_name]]}
        res = batch.validate(suite, result_format=fmt)
        for r in res.results:
            outcomes.setdefault(int(r.expectation_config.meta["check"]), []).append((r, key_column[table_name]))

    results = []
    for i, (name, unit, _, hint, _) in enumerate(checks):
        failing: dict[str, None] = {}  # ordered union over the check's expectations
        exps = []
        for r, key in outcomes.get(i, []):
            res = r.result or {}
            for row in res.get("unexpected_index_list") or []:
                failing[str(row[key])] = None
            exc = r.exception_info
            exps.append({
                "type": r.expectation_config.type,
                "kwargs": {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
                "success": bool(r.success),
                "observed": _observed(res, exc),
            })
        ok = all(e["success"] for e in exps) and bool(exps)
        results.append(CheckResult(name, unit, ok, len(failing), list(failing)[:MAX_EXAMPLES], hint, exps))
    return results


def _exception_message(exc: Any) -> str | None:
    """GX reports errors as one ExceptionInfo or as {metric id: {..., ExceptionInfo}}: find the first."""
    if not isinstance(exc, dict):
        return None
    if exc.get("raised_exception"):
        return str(exc.get("exception_message"))
    for v in exc.values():
        msg = _exception_message(v)
        if msg:
            return msg
    return None


def _observed(res: dict, exc: Any) -> dict[str, Any]:
    error = _exception_message(exc)
    if error:
        return {"error": error}
    if "observed_value" in res:
        return {"observed_value": _plain(res["observed_value"])}
    keep = ("element_count", "unexpected_count", "missing_count")
    out = {k: _plain(res[k]) for k in keep if k in res}
    out["partial_unexpected_list"] = [_plain(v) for v in (res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.floating):
        return None if np.isnan(v) else float(v)
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


# ---------------------------------------------------------------- entry points
def declared_shape(source: str, channels: int, image_size: int) -> tuple[int, int, int]:
    """The (C, H, W) every image must have: fixed per embedded source, 1 or 3 for user data."""
    return SOURCE_CHANNELS.get(source, channels if channels in (1, 3) else 3), image_size, image_size


def validate_dataset(st: ImageStats, split: Split, cfg: DataConfig) -> ValidationReport:
    """The GX suite, once, on the small per-image and per-class tables (the pixels were summarised per chunk)."""
    t0 = time.perf_counter()
    images, reasons = image_table(st, split)
    classes = class_table(st, split)
    for name in st.empty_classes:
        reasons[name] = "class folder has no images"
    shape = declared_shape(st.source, st.shape[0], cfg.image_size)
    results = _run_gx({"images": images, "classes": classes}, cfg, shape, len(st.class_names))
    counts = {
        "images": int(len(st.labels)),
        "unreadable": len(st.unreadable),
        **{name: int(len(idx)) for name, idx in split.parts().items()},
        "classes": len(st.class_names),
    }
    return ValidationReport(all(r.success for r in results), results, counts, reasons, time.perf_counter() - t0)


def format_failures(report: ValidationReport) -> str:
    """One paragraph per failed check: which images (or classes) broke it, and what to do."""
    failed = report.failed
    lines = [f"data validation failed: {len(failed)} of {len(report.results)} checks"]
    for r in failed:
        if r.unit == "dataset":
            obs = next((e["observed"].get("observed_value") for e in r.expectations if "observed" in e), None)
            lines.append(f"expectation '{r.name}' failed: found {obs}; {r.hint}")
            continue
        noun = r.unit if r.n_failed != 1 else {"images": "image", "classes": "class"}[r.unit]
        shown = [f"{i} ({report.reasons[i]})" if i in report.reasons else i for i in r.failing]
        more = f", and {r.n_failed - len(r.failing)} more" if r.n_failed > len(r.failing) else ""
        errors = [e["observed"]["error"] for e in r.expectations if "error" in e["observed"]]
        if errors:
            lines.append(f"expectation '{r.name}' could not be evaluated: {errors[0]}")
            continue
        lines.append(f"expectation '{r.name}' failed on {r.n_failed} {noun}: {', '.join(shown)}{more}; {r.hint}")
    return "\n".join(lines)
