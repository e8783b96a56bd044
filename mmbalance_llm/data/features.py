"""Feature datasets: the on-disk contract, its validation, and the torch Dataset the trainer reads.

Contract: a `datasets.DatasetDict` saved with `save_to_disk`, or a folder with one json / jsonl /
parquet file per split (`train.jsonl`, `validation.jsonl`, ...). One column per modality holding a
float array [D] or [T, D]; an integer label column. Every violation is reported in one line naming the
split, the column and the row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from mmbalance_llm.data.errors import DataError  # noqa: F401  (public here since the start)


_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_splits(path: str, splits: list[str]) -> dict:
    """Load the named splits (missing ones are simply absent from the result)."""
    import datasets

    if not path:
        raise DataError("recipe key 'data.path' is not set")
    if not os.path.exists(path):
        raise DataError(f"data.path '{path}' does not exist")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        dd = datasets.load_from_disk(path)
        return {s: dd[s] for s in splits if s in dd}
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise DataError(f"data.path '{path}' holds a single Dataset; save a DatasetDict with train/validation/test splits")
    found = {}
    for split in splits:
        for ext, fmt in _FILE_FORMATS.items():
            file = os.path.join(path, split + ext)
            if os.path.isfile(file):
                try:
                    found[split] = datasets.load_dataset(fmt, data_files={split: file}, split=split)
                except Exception as exc:  # datasets wraps parse errors in long chains
                    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise DataError(f"could not read '{file}': {msg}") from None
                break
    if not found:
        raise DataError(
            f"data.path '{path}' has no DatasetDict and no split files ({', '.join(s + '.jsonl|json|parquet' for s in splits)})"
        )
    return found


def infer_modalities(ds, label_column: str) -> list[str]:
    return [c for c in ds.column_names if c != label_column]


def _dense_arrow(arr) -> Optional[np.ndarray]:
    """A pyarrow array of numbers or of (nested) equal-length lists as one dense numpy array, or None
    when it is anything else (nulls, ragged lists, strings, ...): the caller then reads row by row,
    which is where every validation message comes from."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr.type, pa.ExtensionType):  # datasets' Array2D/3D: nested lists underneath
        arr = arr.storage
    if arr.null_count:
        return None
    kind = arr.type
    if pa.types.is_fixed_size_list(kind):
        size = kind.list_size
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        size = int(lengths[0])
        if (lengths != size).any():
            return None
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return arr.to_numpy(zero_copy_only=False)
    else:
        return None
    inner = _dense_arrow(arr.flatten())  # flatten honours slices and offsets
    return None if inner is None else inner.reshape(len(arr), size, *inner.shape[1:])


def _fast_column_array(ds, column: str) -> Optional[np.ndarray]:
    """One vectorised read of a column (indices mapping applied by datasets), or None."""
    if len(ds) == 0:
        return None
    try:
        table = ds.select_columns([column]).with_format("arrow")[:]
        arr = _dense_arrow(table.column(column).combine_chunks())
    except Exception:  # any surprise from an unusual column: the row-by-row path reports it precisely
        return None
    # datasets' numpy formatter casts array rows (not scalar rows) to float32 / int64: so do we
    if arr is not None and arr.ndim > 1:
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32, copy=False)
        elif np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int64, copy=False)
    if arr is not None and not arr.flags.writeable:  # a zero-copy view of arrow's (memory-mapped) buffer
        arr = arr.copy()
    return arr


def _column_array(ds, split: str, column: str) -> np.ndarray:
    if column not in ds.column_names:
        raise DataError(f"split '{split}': column '{column}' is missing (columns: {', '.join(ds.column_names)})")
    # datasets >= 4 returns a lazy Column for `ds[col]`, so a numpy read of the whole column goes through
    # arrow; rows are only visited one by one when that fails, to name the bad row.
    arr = _fast_column_array(ds, column)
    if arr is not None:
        return arr
    values = ds.with_format("numpy")[column]
    arr = values if isinstance(values, np.ndarray) and values.dtype != object else None
    if arr is None:
        rows = [np.asarray(v) for v in (values if not isinstance(values, np.ndarray) else list(values))]
        first = rows[0].shape if rows else ()
        for i, row in enumerate(rows):
            if row.shape != first or row.dtype == object:
                raise DataError(
                    f"split '{split}', column '{column}', row {i}: ragged array of shape {row.shape}, row 0 has {first}"
                )
        arr = np.stack(rows) if rows else np.zeros((0,))
    return arr


def column_tensor(ds, split: str, column: str) -> torch.Tensor:
    arr = _column_array(ds, split, column)
    if arr.ndim not in (2, 3):
        raise DataError(
            f"split '{split}', column '{column}': expected a float array [D] or [T, D] per row, got shape {arr.shape[1:]}"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"split '{split}', column '{column}': values must be numbers, got {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"split '{split}', column '{column}', row {row}: contains NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(arr))


def label_tensor(ds, split: str, column: str, num_classes: Optional[int]) -> torch.Tensor:
    arr = _column_array(ds, split, column)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"split '{split}', column '{column}': labels must be one integer per row")
    if not np.issubdtype(arr.dtype, np.integer):
        frac = arr != np.round(arr)
        if frac.any():
            raise DataError(f"split '{split}', column '{column}', row {int(np.argmax(frac))}: label {arr[np.argmax(frac)]} is not an integer")
        arr = arr.astype(np.int64)
    if num_classes is not None:
        bad = (arr < 0) | (arr >= num_classes)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"split '{split}', column '{column}', row {row}: label {int(arr[row])} is outside [0, {num_classes})"
            )
    return torch.from_numpy(arr.astype(np.int64))


class FeatureDataset(torch.utils.data.Dataset):
    """In-memory tensors, one per modality, validated against the contract.

    An item is `{modality: tensor, ..., "labels": int, "index": int}`. Indexing with a pair
    `(i, keep)` where `keep` is a tuple of modality names returns sample i with every other modality
    zeroed: data-stage balancers (valuation re-sampling) use it to add single-modality copies.

    A DataLoader fetches a whole batch at once through `__getitems__` (one index_select per tensor
    instead of one `__getitem__` per sample and a stack): the result is already the collated batch,
    equal to `default_collate` of the items, which `collate` passes through. Use `collate` as the
    loader's collate_fn.
    """

    def __init__(self, tensors: dict, labels: torch.Tensor, split: str = "train"):
        self.tensors = tensors
        self.labels = labels
        self.split = split
        self.modalities = list(tensors)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx):
        keep = None
        if isinstance(idx, (tuple, list)):
            idx, keep = idx
        idx = int(idx)
        item = {}
        for m, t in self.tensors.items():
            x = t[idx]
            item[m] = x if keep is None or m in keep else torch.zeros_like(x)
        item["labels"] = self.labels[idx]
        item["index"] = idx
        return item

    def __getitems__(self, indices) -> dict:
        rows, keeps = [], []
        for idx in indices:
            keep = None
            if isinstance(idx, (tuple, list)):
                idx, keep = idx
            rows.append(int(idx))
            keeps.append(keep)
        index = torch.tensor(rows, dtype=torch.int64)
        batch = {}
        for m, t in self.tensors.items():
            x = t.index_select(0, index)
            drop = [j for j, keep in enumerate(keeps) if keep is not None and m not in keep]
            if drop:
                x[drop] = 0
            batch[m] = x
        batch["labels"] = self.labels.index_select(0, index)
        batch["index"] = index
        return batch

    def input_shapes(self) -> dict:
        return {m: list(t.shape[1:]) for m, t in self.tensors.items()}


@dataclass
class LoadedData:
    train: FeatureDataset
    validation: FeatureDataset
    test: Optional[FeatureDataset]
    modalities: list
    num_classes: int
    input_shapes: dict
    notes: list


def load_feature_data(cfg, num_classes: Optional[int] = None, seed: int = 0, datasets=None) -> LoadedData:
    """Load and validate the recipe's `data` section (or `datasets`, a `datasets.DatasetDict` / dict of
    `Dataset`s given from Python instead of `data.path`). A missing validation split is carved (10%) from
    train with `seed` so that checkpoint choice never reads test."""
    wanted = [cfg.train_split, cfg.validation_split, cfg.test_split]
    if datasets is not None:
        if not hasattr(datasets, "keys"):
            raise DataError(f"datasets must be a DatasetDict or a dict of Dataset splits, got {type(datasets).__name__}")
        raw = {s: datasets[s] for s in wanted if s in datasets}
    else:
        raw = load_splits(cfg.path, wanted)
    notes = []
    if cfg.train_split not in raw:
        where = f"data.path '{cfg.path}'" if datasets is None else "datasets"
        raise DataError(f"{where}: split '{cfg.train_split}' not found (found: {', '.join(raw) or 'none'})")
    if cfg.validation_split not in raw:
        parts = raw[cfg.train_split].train_test_split(test_size=0.1, seed=seed)
        raw[cfg.train_split], raw[cfg.validation_split] = parts["train"], parts["test"]
        notes.append(f"no '{cfg.validation_split}' split: held out 10% of '{cfg.train_split}' (seed {seed}) for validation")
    train_ds = raw[cfg.train_split]
    modalities = list(cfg.modalities) if cfg.modalities else infer_modalities(train_ds, cfg.label_column)
    if not modalities:
        raise DataError(f"split '{cfg.train_split}': no modality columns besides '{cfg.label_column}'")
    if cfg.label_column not in train_ds.column_names:
        raise DataError(f"split '{cfg.train_split}': column '{cfg.label_column}' is missing (columns: {', '.join(train_ds.column_names)})")
    if num_classes is None:
        train_labels = label_tensor(train_ds, cfg.train_split, cfg.label_column, None)
        if (train_labels < 0).any():
            row = int(torch.nonzero(train_labels < 0)[0])
            raise DataError(f"split '{cfg.train_split}', column '{cfg.label_column}', row {row}: negative label")
        num_classes = int(train_labels.max()) + 1

    from mmbalance_llm.data.media_columns import build_media_dataset, media_specs

    media = media_specs(cfg, modalities)  # {} for float-array data

    def build(split: str) -> FeatureDataset:
        ds = raw[split]
        if media:  # raw media: preprocessed once through datasets.map, cached (data/media_columns.py)
            labels = label_tensor(ds, split, cfg.label_column, num_classes)
            return build_media_dataset(cfg, ds, split, modalities, media, labels, split == cfg.train_split)
        tensors = {m: column_tensor(ds, split, m) for m in modalities}
        labels = label_tensor(ds, split, cfg.label_column, num_classes)
        return FeatureDataset(tensors, labels, split)

    train = build(cfg.train_split)
    validation = build(cfg.validation_split)
    test = build(cfg.test_split) if cfg.test_split in raw else None
    if test is None:
        notes.append(f"no '{cfg.test_split}' split: final_metrics.json will have no test section")
    shapes = train.input_shapes()
    for ds in (validation, test):
        if ds is None:
            continue
        for m, shape in ds.input_shapes().items():
            if m in shapes and shape != shapes[m]:
                raise DataError(f"split '{ds.split}', column '{m}': rows have shape {shape}, train has {shapes[m]}")
    notes += data_warnings(train)
    return LoadedData(train, validation, test, modalities, num_classes, shapes, notes)


LARGE_FEATURE = 1e6


def data_warnings(split) -> list:
    """One line each for data a user would want to know about before training on it: a training split
    with a single class, feature magnitudes beyond 1e6, and modality columns that are constant (NaN-free,
    but carrying no signal)."""
    out = []
    if not isinstance(split, FeatureDataset):  # media splits are checked when they are decoded
        return out
    classes = torch.unique(split.labels)
    if len(classes) < 2:
        out.append(f"warning: split '{split.split}' has a single class ({int(classes[0]) if len(classes) else '-'}): "
                   "accuracy and every balance metric are trivial")
    for m, t in split.tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = float(t.abs().max())
        if peak > LARGE_FEATURE:
            out.append(f"warning: split '{split.split}', column '{m}': values up to {peak:.3g} (beyond {LARGE_FEATURE:.0e}); "
                       "standardise the features (make-data from-arrays --standardize) or training may diverge")
        if len(t) > 1 and bool((t == t[0]).all()):
            out.append(f"warning: split '{split.split}', column '{m}' is constant: the modality carries no signal")
    return out


def collate(items) -> dict:
    """A list of items -> one batch; a batch already built by `FeatureDataset.__getitems__` passes through."""
    if isinstance(items, dict):
        return items
    return torch.utils.data.default_collate(items)
