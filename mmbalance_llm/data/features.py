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


class DataError(ValueError):
    """The data breaks the dataset contract; the message names split, column and row."""


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


def _column_array(ds, split: str, column: str) -> np.ndarray:
    if column not in ds.column_names:
        raise DataError(f"split '{split}': column '{column}' is missing (columns: {', '.join(ds.column_names)})")
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
    return LoadedData(train, validation, test, modalities, num_classes, shapes, notes)


def collate(items: list) -> dict:
    return torch.utils.data.default_collate(items)
