"""The synthetic generator and the dataset contract (one-line errors naming split, column, row)."""
import json
import os

import datasets
import numpy as np
import pytest

from mmbalance_llm.config import DataConfig
from mmbalance_llm.data.features import DataError, load_feature_data
from mmbalance_llm.data.synthetic import PRESETS, SyntheticSpec, generate, preset_spec, spec_from_args, write_synthetic


def test_generator_card_and_shapes(tmp_path):
    spec = preset_spec("tokens", train_size=20, validation_size=10, test_size=10)
    path = write_synthetic(str(tmp_path / "d"), spec)
    card = json.load(open(os.path.join(path, "card.json")))
    assert card["preset"] == "tokens" and card["columns"] == ["audio", "visual", "label"]
    data = load_feature_data(DataConfig(path=path))
    assert data.input_shapes == {"audio": [16, 16], "visual": [16, 16]}
    assert len(data.train) == 20 and len(data.validation) == 10 and len(data.test) == 10


def test_generator_is_seeded_and_informative_fraction_holds():
    spec = SyntheticSpec(modalities=[{"name": "a", "dim": 8, "snr": 5.0, "informative": 0.0},
                                     {"name": "b", "dim": 8, "snr": 5.0, "encoding": "mixture"}],
                         train_size=400, validation_size=10, test_size=10, num_classes=2)
    one, two = generate(spec), generate(spec)
    assert np.array_equal(one["train"]["b"], two["train"]["b"])
    # modality 'a' never carries signal: its class means coincide with the noise mean
    a, y = one["train"]["a"], one["train"]["label"]
    assert np.abs(a[y == 0].mean(0) - a[y == 1].mean(0)).max() < 0.5
    # the mixture cancels its class means too (needs a nonlinearity), but the second moment differs
    b = one["train"]["b"]
    assert np.abs(b[y == 0].mean(0)).max() < 0.7


def test_presets_have_2_to_4_modalities_and_cli_specs():
    for name in PRESETS:
        assert 2 <= len(preset_spec(name).modalities) <= 4
    spec = spec_from_args(None, ["x:dim=4,snr=1.5,encoding=mixture", "y:dim=6"], num_classes=3)
    assert [m.dim for m in spec.modalities] == [4, 6] and spec.modalities[0].snr == 1.5 and spec.num_classes == 3
    with pytest.raises(ValueError, match="unknown field 'snrr'"):
        spec_from_args(None, ["x:snrr=2"])
    with pytest.raises(ValueError, match="encoding must be one of"):
        spec_from_args(None, ["x:encoding=cubic"])


def _write_jsonl(folder, split, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def _good_rows(n=6):
    return [{"audio": [0.1 * i, 0.2], "visual": [[1.0, 2.0], [3.0, 4.0]], "label": i % 2} for i in range(n)]


@pytest.mark.parametrize(
    "split, mutate, message",
    [
        ("train", lambda r: r[3].pop("visual"), None),  # a missing key in one row -> null -> ragged/None
        ("validation", lambda r: r[2].__setitem__("audio", [0.1, 0.2, 0.3]),
         "split 'validation', column 'audio', row 2: ragged array of shape (3,), row 0 has (2,)"),
        ("test", lambda r: r[4].__setitem__("audio", [float("nan"), 1.0]),
         "split 'test', column 'audio', row 4: contains NaN or inf"),
        ("validation", lambda r: r[1].__setitem__("label", 7),
         "split 'validation', column 'label', row 1: label 7 is outside [0, 2)"),
        ("train", lambda r: r[5].__setitem__("label", -1), "split 'train', column 'label', row 5: negative label"),
    ],
)
def test_contract_errors_name_split_column_and_row(tmp_path, split, mutate, message):
    folder = str(tmp_path / "data")
    for s in ("train", "validation", "test"):
        rows = _good_rows()
        if s == split:
            mutate(rows)
        _write_jsonl(folder, s, rows)
    with pytest.raises(DataError) as err:
        load_feature_data(DataConfig(path=folder))
    text = str(err.value)
    assert "\n" not in text
    if message:
        assert message in text
    else:
        assert "split 'train', column 'visual', row 3" in text


def test_missing_column_and_missing_split(tmp_path):
    folder = str(tmp_path / "data")
    for s in ("train", "validation"):
        _write_jsonl(folder, s, _good_rows())
    with pytest.raises(DataError, match="split 'train': column 'video' is missing"):
        load_feature_data(DataConfig(path=folder, modalities=["audio", "video"]))
    data = load_feature_data(DataConfig(path=folder))  # no test split: allowed, noted
    assert data.test is None and any("no 'test' split" in n for n in data.notes)
    with pytest.raises(DataError, match="does not exist"):
        load_feature_data(DataConfig(path=str(tmp_path / "nowhere")))


def test_validation_is_carved_from_train_when_absent(tmp_path):
    folder = str(tmp_path / "data")
    _write_jsonl(folder, "train", _good_rows(40))
    data = load_feature_data(DataConfig(path=folder), seed=3)
    assert len(data.train) == 36 and len(data.validation) == 4
    assert any("held out 10%" in n for n in data.notes)


def test_parquet_and_save_to_disk_and_keep_indexing(tmp_path):
    rows = _good_rows()
    ds = datasets.Dataset.from_list(rows)
    folder = tmp_path / "pq"
    folder.mkdir()
    for s in ("train", "validation", "test"):
        ds.to_parquet(str(folder / f"{s}.parquet"))
    data = load_feature_data(DataConfig(path=str(folder), modalities=["visual", "audio"]))
    assert data.modalities == ["visual", "audio"] and data.num_classes == 2
    item = data.train[(2, ("audio",))]
    assert float(item["visual"].abs().sum()) == 0.0 and float(item["audio"].abs().sum()) > 0
    assert item["index"] == 2


def test_warnings_for_a_single_class_huge_values_and_a_constant_column(tmp_path, capsys):
    import datasets

    from mmbalance_llm.config import recipe_from_dict
    from mmbalance_llm.train.trainer import Trainer

    n = 40
    rows = {"audio": [[1e7 * (i % 3), 1.0] for i in range(n)], "visual": [[0.5, 0.5] for _ in range(n)],
            "label": [0] * n}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ("train", "validation")})
    raw = {"data": {}, "model": {"feature_dim": 8, "hidden_dim": 8, "num_layers": 1, "num_classes": 2},
           "train": {"epochs": 1, "batch_size": 8, "progress": False, "plots": False, "shapley": False},
           "output_dir": str(tmp_path / "run")}
    trainer = Trainer(recipe_from_dict(raw), datasets=dd)
    notes = "\n".join(trainer.task.notes)
    assert "split 'train' has a single class (0)" in notes
    assert "column 'audio': values up to 2e+07" in notes
    assert "column 'visual' is constant" in notes
    trainer.fit()
    assert "single class" in capsys.readouterr().out  # printed once by the loop, one line each
