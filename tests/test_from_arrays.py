"""`mmbalance make-data from-arrays`: npz / csv / parquet / DataFrame into the dataset contract."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmbalance_llm.cli import main
from mmbalance_llm.data.features import DataError, load_splits
from mmbalance_llm.data.from_arrays import from_arrays, from_frame, stratified_split


def _arrays(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(n, 4, 5)), y


def test_stratified_split_is_seeded_and_keeps_class_shares():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    a, b = stratified_split(y, 0.1, 0.2, seed=3), stratified_split(y, 0.1, 0.2, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], stratified_split(y, 0.1, 0.2, seed=4)["test"])
    assert np.bincount(y[a["test"]]).tolist() == [10, 6, 4]
    assert np.bincount(y[a["validation"]]).tolist() == [5, 3, 2]
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))
    with pytest.raises(DataError, match="label 1 has 2 rows"):
        stratified_split(np.array([0] * 10 + [1] * 2), 0.1, 0.2, 0)


def test_npz_cli_with_sliced_views_trains(tmp_path, run_tiny):
    flat, tokens, y = _arrays()
    np.savez(tmp_path / "v.npz", X=flat, tok=tokens, y=y)
    out = tmp_path / "ds"
    assert main(["make-data", "from-arrays", str(out), "--input", str(tmp_path / "v.npz"), "--label", "y",
                 "--view", "a=X[0:2]", "--view", "b=X[2:]", "--view", "seq=tok", "--seed", "1", "--standardize"]) == 0
    splits = load_splits(str(out), ["train", "validation", "test"])
    assert {s: len(d) for s, d in splits.items()} == {"train": 84, "validation": 12, "test": 24}
    assert splits["train"].column_names == ["a", "b", "seq", "label"]
    assert np.asarray(splits["test"][0]["seq"]).shape == (4, 5)
    card = json.loads((out / "card.json").read_text())
    assert card["views"] == {"a": [2], "b": [4], "seq": [4, 5]} and card["split"]["seed"] == 1
    train_a = np.asarray(splits["train"]["a"])
    assert card["standardized"] and np.allclose(train_a.mean(0), 0, atol=1e-5) and np.allclose(train_a.std(0), 1, atol=1e-4)
    _, final = run_tiny(str(out), train={"epochs": 1})
    assert set(final["test"]["unimodal_probe_accuracy"]) == {"a", "b", "seq"}


def test_csv_parquet_and_dataframe_with_string_labels(tmp_path):
    pd = pytest.importorskip("pandas")
    flat, _, y = _arrays()
    frame = pd.DataFrame({**{f"mfcc_{i}": flat[:, i] for i in range(3)}, **{f"px_{i}": flat[:, 3 + i] for i in range(3)},
                          "target": np.array(["cat", "dog", "emu"])[y]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        out = tmp_path / name.replace(".", "_")
        assert main(["make-data", "from-arrays", str(out), "--input", str(tmp_path / name), "--label", "target",
                     "--view", "audio=mfcc_*", "--view", "image=px_0,px_1,px_2"]) == 0
        card = json.loads((out / "card.json").read_text())
        assert card["label_names"] == ["cat", "dog", "emu"] and card["views"] == {"audio": [3], "image": [3]}
    from_frame(str(tmp_path / "py"), frame, {"audio": "mfcc_*", "image": ["px_0", "px_1"]}, label="target")
    assert load_splits(str(tmp_path / "py"), ["train"])["train"].column_names == ["audio", "image", "label"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    flat, _, y = _arrays()
    bad = flat.copy()
    bad[7, 1] = np.nan
    with pytest.raises(DataError, match="view 'a', row 7"):
        from_arrays(str(tmp_path / "nan"), {"a": bad}, y)
    with pytest.raises(DataError, match="has 119 rows"):
        from_arrays(str(tmp_path / "len"), {"a": flat[:-1]}, y)
    np.savez(tmp_path / "v.npz", X=flat, y=y)
    assert main(["make-data", "from-arrays", str(tmp_path / "o"), "--input", str(tmp_path / "v.npz"),
                 "--view", "a=Z"]) == 2
    err = capsys.readouterr().err
    assert "view 'a'" in err or "no array 'label'" in err
    assert len(err.strip().splitlines()) == 1
    assert not any(p.exists() for p in (tmp_path / "nan", tmp_path / "len", tmp_path / "o"))
