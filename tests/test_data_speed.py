"""The vectorised column read and the batched fetch give exactly what the row-by-row paths gave."""
import json
import os

import datasets
import numpy as np
import pytest
import torch

from mmbalance_llm.config import DataConfig
from mmbalance_llm.data import features
from mmbalance_llm.data.features import FeatureDataset, collate, load_feature_data


def _row_by_row(ds, split, column):
    # the pre-arrow path: what `_column_array` returns when the fast read declines
    orig = features._fast_column_array
    features._fast_column_array = lambda ds, column: None
    try:
        return features._column_array(ds, split, column)
    finally:
        features._fast_column_array = orig


def _datasets(tmp_path):
    rng = np.random.default_rng(0)
    n = 23
    fixed = datasets.Dataset.from_dict(
        {"a": rng.normal(size=(n, 5)).astype(np.float32), "t": rng.normal(size=(n, 3, 4)).astype(np.float32),
         "label": rng.integers(0, 3, n)},
        features=datasets.Features({"a": datasets.Sequence(datasets.Value("float32"), length=5),
                                    "t": datasets.Array2D(shape=(3, 4), dtype="float32"),
                                    "label": datasets.ClassLabel(num_classes=3)}))
    rows = [{"a": [float(i), 0.5], "t": [[1, 2], [3, i]], "label": i % 2, "flag": bool(i % 3), "f": i * 0.5}
            for i in range(n)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lists = datasets.load_dataset("json", data_files=str(path), split="train")
    return {"fixed": fixed, "fixed_shuffled": fixed.shuffle(seed=1).select(range(3, 20)),
            "lists": lists, "lists_split": lists.train_test_split(test_size=0.3, seed=0)["train"]}


def test_vectorised_read_equals_row_by_row(tmp_path):
    for name, ds in _datasets(tmp_path).items():
        for column in ds.column_names:
            fast = features._fast_column_array(ds, column)
            assert fast is not None, (name, column)
            slow = _row_by_row(ds, "train", column)
            assert fast.dtype == slow.dtype and fast.shape == slow.shape, (name, column, fast.dtype, slow.dtype)
            np.testing.assert_array_equal(fast, slow)


def test_vectorised_read_declines_what_only_rows_can_explain(tmp_path):
    rows = [{"a": [0.1, 0.2], "s": "x", "label": 0}, {"a": [0.1, 0.2, 0.3], "s": "y", "label": 1},
            {"a": None, "s": "z", "label": 1}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    for column in ("a", "s"):
        assert features._fast_column_array(ds, column) is None
    assert features._fast_column_array(ds.select([]), "label") is None  # empty: the old path's message
    with pytest.raises(features.DataError, match=r"split 'train', column 'a', row 1: ragged array of shape \(3,\)"):
        features.column_tensor(ds, "train", "a")


def test_loaded_tensors_equal_row_by_row_loading(tmp_path, monkeypatch):
    folder = str(tmp_path / "data")
    os.makedirs(folder)
    rows = [{"audio": [0.1 * i, 0.2], "visual": [[1.0, 2.0], [3.0, float(i)]], "label": i % 3} for i in range(40)]
    for s in ("train", "test"):
        with open(os.path.join(folder, f"{s}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    fast = load_feature_data(DataConfig(path=folder), seed=2)  # validation carved from train: indices mapping
    monkeypatch.setattr(features, "_fast_column_array", lambda ds, column: None)
    slow = load_feature_data(DataConfig(path=folder), seed=2)
    for split in ("train", "validation", "test"):
        a, b = getattr(fast, split), getattr(slow, split)
        for m in a.tensors:
            assert a.tensors[m].dtype == b.tensors[m].dtype and torch.equal(a.tensors[m], b.tensors[m])
        assert torch.equal(a.labels, b.labels)


def _reference_loader(ds, **kw):
    # the old fetch: one __getitem__ per sample, then default_collate
    return torch.utils.data.DataLoader(ds, collate_fn=torch.utils.data.default_collate, **kw)


class _PerItem(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, idx):
        return self.ds[idx]


def _assert_same_batches(new, old):
    new, old = list(new), list(old)
    assert len(new) == len(old)
    for x, y in zip(new, old):
        assert list(x) == list(y)
        for key in x:
            assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape and torch.equal(x[key], y[key]), key


def test_batched_fetch_gives_identical_batches_and_order():
    gen = torch.Generator().manual_seed(0)
    ds = FeatureDataset({"audio": torch.randn(37, 4, generator=gen), "visual": torch.randn(37, 3, 5, generator=gen)},
                        torch.randint(0, 4, (37,), generator=gen))
    for shuffle in (False, True):
        new = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=shuffle, collate_fn=collate,
                                          generator=torch.Generator().manual_seed(5))
        old = _reference_loader(_PerItem(ds), batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(5))
        _assert_same_batches(new, old)
    subset = torch.utils.data.Subset(ds, [5, 3, 30, 1, 2, 8])
    _assert_same_batches(torch.utils.data.DataLoader(subset, batch_size=4, collate_fn=collate),
                         _reference_loader(_PerItem(subset), batch_size=4))
    # single-modality copies (valuation re-sampling): (i, keep) items zero the other modalities
    batches = [[0, (1, ("audio",)), 2], [(3, ("visual",)), (1, ("audio", "visual")), 36]]
    _assert_same_batches(torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate),
                         _reference_loader(_PerItem(ds), batch_sampler=batches))
    assert collate([ds[0], ds[1]])["index"].tolist() == [0, 1]
