"""One-time preprocessing of chat data for SFT: chat template, tokenisation and media processing run once per
split through `datasets.map` (fingerprinted by the records, the media files, the processor and the settings;
cached on disk; `num_proc` honoured), never per epoch. Training batches are then only padded.

A row of the preprocessed split holds `input_ids`, `labels`, `mm_token_type_ids` and, per media tensor the
processor returns (`pixel_values`, `image_grid_thw`, `input_features`, ...), the flat values of each media
item with its shape: `<key>` and `<key>__shape`."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

CACHE_VERSION = "sft-preprocess-1"  # bump when the encoding changes, so old caches are not reused
_INT_KEYS = ("image_grid_thw", "video_grid_thw", "feature_attention_mask")


def _media_stat(path: str) -> list:
    try:
        st = os.stat(path)
        return [path, st.st_size, int(st.st_mtime_ns)]
    except OSError:
        return [path, None, None]


def fingerprint(records: list, settings: dict) -> str:
    """A stable hash of what the preprocessing output depends on."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
        videos = [p for v in r.get("videos") or [] for p in ([v] if isinstance(v, str) else v)]
        for p in list(r.get("images") or []) + list(r.get("audios") or []) + videos:
            h.update(json.dumps(_media_stat(p)).encode())
    return h.hexdigest()[:32]


def processor_identity(name_or_path: str) -> list:
    """What identifies a processor: its folder's config files (size and mtime), or the hub id."""
    if os.path.isdir(name_or_path):
        names = sorted(f for f in os.listdir(name_or_path) if f.endswith((".json", ".jinja", ".model", ".txt")))
        return [_media_stat(os.path.join(name_or_path, f)) for f in names]
    return [name_or_path]


def media_keys(collator, records: list, where: str) -> dict:
    """{tensor key: is_integer} of every media tensor this processor produces for these records (probed on
    the first record of each media kind)."""
    keys = {}
    for kind in ("images", "audios", "videos"):
        rec = next((r for r in records if r.get(kind)), None)
        if rec is None:
            continue
        media = collator._media_tokens(rec, f"{where} (id={rec.get('id')})")
        for items in media.values():
            for _, tensors in items:
                for k, v in tensors.items():
                    keys[k] = not v.is_floating_point()
    return keys


def encoding_to_row(enc: dict, keys: dict) -> dict:
    row = {"input_ids": enc["input_ids"].tolist(), "labels": enc["labels"].tolist(),
           "mm_token_type_ids": enc["mm_token_type_ids"].tolist()}
    for k in keys:
        row[k], row[f"{k}__shape"] = [], []
    for mod in sorted(enc["media"]):
        for _, tensors in enc["media"][mod]:
            for k, v in tensors.items():
                row[k].append(v.detach().float().reshape(-1).numpy())
                row[f"{k}__shape"].append(list(v.shape))
    return row


def features_for(keys: dict):
    import datasets

    feats = {"input_ids": datasets.Sequence(datasets.Value("int64")),
             "labels": datasets.Sequence(datasets.Value("int64")),
             "mm_token_type_ids": datasets.Sequence(datasets.Value("int8"))}
    for k in keys:
        feats[k] = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
        feats[f"{k}__shape"] = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
    return datasets.Features(feats)


def _split_lists(col):
    """A pyarrow list column -> (offsets, values as numpy)."""
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    return col.offsets.to_numpy(), col.values


def rows_from_table(table, keys: dict) -> list:
    """Rows of a pyarrow batch as dicts of numpy arrays, column by column (no per-element formatting)."""
    n = table.num_rows
    rows = [{} for _ in range(n)]
    for name in ("input_ids", "labels", "mm_token_type_ids"):
        off, values = _split_lists(table.column(name))
        flat = values.to_numpy(zero_copy_only=False)
        for i in range(n):
            rows[i][name] = flat[off[i]:off[i + 1]]
    for k in keys:
        for name in (k, f"{k}__shape"):
            outer, inner = _split_lists(table.column(name))
            inner_off, flat = inner.offsets.to_numpy(), inner.values.to_numpy(zero_copy_only=False)
            for i in range(n):
                rows[i][name] = [flat[inner_off[j]:inner_off[j + 1]] for j in range(outer[i], outer[i + 1])]
    return rows


def pad_rows(rows: list, keys: dict, pad_id: int, uses_mm_token_type_ids: bool, dtype=None) -> dict:
    """A training batch from preprocessed rows, padded on the right: the same tensors as
    `ChatCollator.pad` of the records' encodings (tested), built with one numpy fill per field."""
    import torch

    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    fields = {"input_ids": pad_id, "labels": -100, "mm_token_type_ids": 0}
    arrays = {k: np.full((B, T), fill, dtype=np.int64) for k, fill in fields.items()}
    mask = np.zeros((B, T), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        for k in fields:
            arrays[k][i, :n] = r[k]
        mask[i, :n] = 1
    out = {k: torch.from_numpy(v) for k, v in arrays.items()}
    out["attention_mask"] = torch.from_numpy(mask)
    if not uses_mm_token_type_ids:
        out.pop("mm_token_type_ids")
    for k, is_int in keys.items():
        parts = [np.asarray(v, dtype=np.float32).reshape([int(d) for d in shape])
                 for r in rows for v, shape in zip(r[k], r[f"{k}__shape"])]
        if parts:
            t = torch.from_numpy(np.concatenate(parts))
            out[k] = t.long() if is_int else (t.to(dtype) if dtype is not None else t)
    return out


class PreprocessedSplit:
    """A preprocessed split for the DataLoader: a batch of indices is read from Arrow in one query and
    converted column by column (`__getitems__`, which torch's DataLoader calls with the whole batch)."""

    def __init__(self, dataset, keys: dict):
        self.dataset, self.keys = dataset.with_format("arrow"), keys

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        return rows_from_table(self.dataset[list(indices)], self.keys)


def preprocess_split(collator, records: list, name: str, where: str, settings: dict, cache_dir: str,
                     num_proc=None, keys: dict | None = None):
    """The preprocessed `datasets.Dataset` of one split (from the cache when nothing changed)."""
    import datasets

    keys = keys if keys is not None else media_keys(collator, records, where)
    fp = fingerprint(records, {**settings, "split": name, "keys": sorted(keys)})
    os.makedirs(cache_dir, exist_ok=True)
    cache_file = os.path.join(cache_dir, f"{name}-{fp}.arrow")
    ds = datasets.Dataset.from_list([{"record": json.dumps(r)} for r in records])

    def encode(example, idx):
        rec = json.loads(example["record"])
        return encoding_to_row(collator.encode(rec, where=f"{where}: sample {idx} (id={rec.get('id')})"), keys)

    mapped = ds.map(encode, with_indices=True, remove_columns=["record"], features=features_for(keys),
                    cache_file_name=cache_file, load_from_cache_file=True, new_fingerprint=fp,
                    num_proc=num_proc if num_proc and num_proc > 1 and len(records) > 1 else None,
                    desc=f"preprocessing {name}")
    return PreprocessedSplit(mapped, keys), keys
