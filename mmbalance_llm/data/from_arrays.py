"""`mmbalance make-data from-arrays`: your own arrays or table into the dataset contract.

Inputs: a `.npz` (one array per view, [N, D] or [N, T, D], and a label array), a `.csv` / `.parquet`
table (each view is a list of columns), or, from Python, a dict of arrays or a pandas DataFrame
(`from_arrays`, `from_frame`). Output: a `datasets.DatasetDict` saved with `save_to_disk` with a
seeded stratified train / validation / test split (every class keeps its share in every split), one
float32 column per view, an integer `label` column, and `card.json` (source, views, sizes, label names).

    mmbalance make-data from-arrays OUT --input views.npz --label y                 (every other key a view)
    mmbalance make-data from-arrays OUT --input views.npz --view audio=X[0:20] --view image=X[20:84]
    mmbalance make-data from-arrays OUT --input table.csv --label target --view audio='mfcc_*' --view text=t1,t2

Bad input (a missing key or column, NaN, a ragged view, a class too small to split) is reported in one
line before anything is written.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re

import numpy as np

from mmbalance_llm.data.features import DataError

_SLICE = re.compile(r"^(?P<key>[^\[\]]+)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


def stratified_split(labels: np.ndarray, validation: float, test: float, seed: int) -> dict:
    """{split: sorted row indices}; per class, a seeded shuffle, then round(n * fraction) rows to test and
    to validation (at least one each when the fraction is > 0), the rest to train."""
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise DataError(f"split fractions validation={validation}, test={test} must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    parts = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        n_test = max(1, round(len(rows) * test)) if test > 0 else 0
        n_val = max(1, round(len(rows) * validation)) if validation > 0 else 0
        if len(rows) - n_test - n_val < 1:
            raise DataError(f"label {c.item()} has {len(rows)} rows: too few for a train / validation / test split")
        parts["test"] += rows[:n_test].tolist()
        parts["validation"] += rows[n_test:n_test + n_val].tolist()
        parts["train"] += rows[n_test + n_val:].tolist()
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in parts.items() if v}


def encode_labels(raw) -> tuple:
    """Integer labels 0..C-1 and the label names (None when the labels already are 0..C-1 integers)."""
    raw = np.asarray(raw)
    if raw.ndim != 1:
        raise DataError(f"labels must be one value per row, got shape {raw.shape}")
    if raw.dtype.kind == "f":
        bad = ~np.isfinite(raw)
        if bad.any():
            raise DataError(f"label row {int(np.argmax(bad))} is NaN or inf")
        if (raw == np.round(raw)).all():
            raw = raw.astype(np.int64)
    if raw.dtype.kind in "iu" and raw.min() >= 0 and set(np.unique(raw)) == set(range(int(raw.max()) + 1)):
        return raw.astype(np.int64), None
    names, codes = np.unique(raw.astype(str) if raw.dtype.kind not in "iu" else raw, return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def check_view(name: str, arr) -> np.ndarray:
    try:
        arr = np.asarray(arr, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"view '{name}': values must be numbers") from None
    if arr.ndim not in (2, 3):
        raise DataError(f"view '{name}': expected [N, D] or [N, T, D], got shape {arr.shape}")
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"view '{name}', row {int(np.argmax(bad))}: contains NaN or inf")
    return arr


def from_arrays(out_dir: str, views: dict, labels, *, validation: float = 0.1, test: float = 0.2, seed: int = 0,
                standardize: bool = False, source: str = "arrays") -> str:
    """Write views {name: array [N, D] or [N, T, D]} and `labels` [N] as a split DatasetDict in `out_dir`.
    With `standardize`, every feature is shifted and scaled by the *train* split's mean and std."""
    import datasets

    if not views:
        raise DataError("no views given")
    if "label" in views:
        raise DataError("a view may not be called 'label' (the label column's name)")
    y, names = encode_labels(labels)
    arrays = {m: check_view(m, a) for m, a in views.items()}
    for m, a in arrays.items():
        if len(a) != len(y):
            raise DataError(f"view '{m}' has {len(a)} rows, the labels have {len(y)}")
    split = stratified_split(y, validation, test, seed)
    if standardize:  # statistics of the train split only, so nothing of validation / test leaks into training
        for m, a in arrays.items():
            train = a[split["train"]]
            arrays[m] = (a - train.mean(0)) / np.maximum(train.std(0), 1e-6)
    num_classes = int(y.max()) + 1
    features = {m: (datasets.Array2D(shape=a.shape[1:], dtype="float32") if a.ndim == 3
                    else datasets.Sequence(datasets.Value("float32"), length=a.shape[1])) for m, a in arrays.items()}
    features["label"] = datasets.ClassLabel(num_classes=num_classes, names=names)
    feats = datasets.Features(features)
    dd = datasets.DatasetDict({
        s: datasets.Dataset.from_dict({**{m: a[rows] for m, a in arrays.items()}, "label": y[rows]}, features=feats)
        for s, rows in split.items()})
    os.makedirs(out_dir, exist_ok=True)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dd.save_to_disk(out_dir)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    card = {"source": source, "views": {m: list(a.shape[1:]) for m, a in arrays.items()}, "num_classes": num_classes,
            "label_names": names, "split_sizes": {s: int(len(r)) for s, r in split.items()},
            "split": {"validation": validation, "test": test, "seed": seed, "stratified": True},
            "standardized": bool(standardize),
            "columns": list(arrays) + ["label"]}
    with open(os.path.join(out_dir, "card.json"), "w", encoding="utf-8") as fh:
        json.dump(card, fh, indent=2)
    return out_dir


def _columns(frame_columns: list, spec: str, view: str) -> list:
    cols = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        hits = [c for c in frame_columns if fnmatch.fnmatchcase(str(c), part)]
        if not hits:
            raise DataError(f"view '{view}': no column matches '{part}'")
        cols += [c for c in hits if c not in cols]
    return cols


def from_frame(out_dir: str, frame, views: dict, label: str = "label", **kw) -> str:
    """A pandas DataFrame: `views` {name: "col1,col2" | "prefix_*" | [columns]}; `label` names the label column."""
    if label not in frame.columns:
        raise DataError(f"label column '{label}' is missing (columns: {', '.join(map(str, frame.columns[:20]))})")
    if not views:
        raise DataError("name the views: --view NAME=COLUMNS (comma-separated names or globs such as 'mfcc_*')")
    arrays = {}
    for name, spec in views.items():
        cols = _columns(list(frame.columns), spec if isinstance(spec, str) else ",".join(spec), name)
        if label in cols:
            raise DataError(f"view '{name}' includes the label column '{label}'")
        block = frame[cols]
        bad = [c for c in cols if not np.issubdtype(block[c].dtype, np.number)]
        if bad:
            raise DataError(f"view '{name}': column '{bad[0]}' is not numeric ({block[bad[0]].dtype})")
        arrays[name] = block.to_numpy(dtype=np.float32)
    if frame[label].isna().any():
        raise DataError(f"label column '{label}', row {int(np.argmax(frame[label].isna().to_numpy()))}: missing label")
    return from_arrays(out_dir, arrays, frame[label].to_numpy(), source=kw.pop("source", "dataframe"), **kw)


def from_npz(out_dir: str, path: str, views: dict | None = None, label: str = "label", **kw) -> str:
    """An .npz: `views` {name: "KEY" | "KEY[start:stop]"} (a slice of the last axis); default every key but `label`."""
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    if label not in data:
        raise DataError(f"'{path}' has no array '{label}' for the labels (arrays: {', '.join(data)})")
    views = views or {k: k for k in data if k != label}
    arrays = {}
    for name, spec in views.items():
        m = _SLICE.match(spec.strip())
        if not m or m["key"] not in data:
            raise DataError(f"view '{name}': '{spec}' is not an array of '{path}' (arrays: {', '.join(data)})")
        arr = data[m["key"]]
        if m["start"] is not None or m["stop"] is not None:
            start = int(m["start"]) if m["start"] else None
            stop = int(m["stop"]) if m["stop"] else None
            arr = arr[..., start:stop]
            if arr.shape[-1] == 0:
                raise DataError(f"view '{name}': slice '{spec}' selects no columns")
        arrays[name] = arr
    return from_arrays(out_dir, arrays, data[label], source=os.path.basename(path), **kw)


def convert_file(out_dir: str, path: str, views: dict | None = None, label: str = "label", **kw) -> str:
    if not os.path.isfile(path):
        raise DataError(f"--input '{path}' does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return from_npz(out_dir, path, views, label, **kw)
    import pandas as pd

    if ext == ".csv":
        frame = pd.read_csv(path)
    elif ext == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise DataError(f"--input '{path}': expected .npz, .csv or .parquet")
    return from_frame(out_dir, frame, views or {}, label, source=os.path.basename(path), **kw)


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="mmbalance make-data from-arrays", description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--input", required=True, help=".npz, .csv or .parquet file")
    p.add_argument("--label", default="label", help="label array (npz) or column (table)")
    p.add_argument("--view", action="append", default=[], metavar="NAME=SPEC",
                   help="npz: KEY or KEY[start:stop]; table: comma-separated columns or globs. Repeat per view.")
    p.add_argument("--validation", type=float, default=0.1, help="fraction of every class for validation")
    p.add_argument("--test", type=float, default=0.2, help="fraction of every class for test")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--standardize", action="store_true", help="scale every feature by the train split's mean and std")
    args = p.parse_args(argv)
    views = {}
    for text in args.view:
        name, sep, spec = text.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise DataError(f"--view '{text}': expected NAME=SPEC")
        views[name.strip()] = spec.strip()
    out = convert_file(args.out_dir, args.input, views or None, args.label, validation=args.validation,
                       test=args.test, seed=args.seed, standardize=args.standardize)
    with open(os.path.join(out, "card.json"), encoding="utf-8") as fh:
        card = json.load(fh)
    print(f"[mmbalance] wrote {out} ({', '.join(f'{m} {s}' for m, s in card['views'].items())}; "
          f"{'/'.join(str(v) for v in card['split_sizes'].values())} train/validation/test rows, card.json)")
    return 0
