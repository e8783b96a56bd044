"""Media columns in the dataset contract (data/media_columns.py): decoding every accepted form, the datasets.map
cache (written once, reused, invalidated by a spec change), augmentation kept out of the cache, and
one-line errors naming split, column, row and file before training."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mmbalance_llm.config import DataConfig
from mmbalance_llm.data import media_columns as media
from mmbalance_llm.data.features import DataError, load_feature_data
from mmbalance_llm.data.raw_replica import frame, tone, write_jpg, write_video, write_wav


@pytest.fixture
def folder(tmp_path):
    """A jsonl dataset: image paths, wav paths, frame folders, one row with bytes / arrays."""
    rng = np.random.default_rng(0)
    rows = {"train": [], "validation": [], "test": []}
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        for i in range(n):
            label = i % 2
            img = f"img/{split}{i}.jpg"
            write_jpg(str(tmp_path / img), frame(label, i, rng))
            wav = f"wav/{split}{i}.wav"
            write_wav(str(tmp_path / wav), tone(label, 0.5, rng))
            clip = f"frames/{split}{i}"
            for k in range(5):
                write_jpg(str(tmp_path / clip / f"frame_{k + 1:05d}.jpg"), frame(label, k, rng))
            rows[split].append({"image": img, "audio": wav, "visual": clip, "label": label})
    for split, items in rows.items():
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in items)
    media.write_media_card(str(tmp_path), {"image": {"kind": "image", "size": 16},
                                           "audio": {"kind": "audio", "sampling_rate": 8000, "max_seconds": 1.0,
                                                     "n_fft": 64, "hop_length": 32},
                                           "visual": {"kind": "video", "num_frames": 3, "size": 16}})
    return tmp_path


def test_media_columns_load_as_fixed_shape_tensors(folder):
    data = load_feature_data(DataConfig(path=str(folder)))
    assert data.modalities == ["image", "audio", "visual"]
    assert data.input_shapes == {"image": [3, 16, 16], "audio": [1, 33, 251], "visual": [3, 3, 16, 16]}
    item = data.validation[0]
    assert item["visual"].dtype == torch.float32 and int(item["labels"]) == 0
    dropped = data.validation[(0, ("audio",))]
    assert dropped["image"].abs().sum() == 0 and dropped["audio"].abs().sum() > 0
    assert os.path.isdir(folder / ".media_cache")


def test_cache_is_written_once_reused_and_invalidated_by_a_spec_change(folder, monkeypatch):
    calls = {"n": 0}
    real = media.process_value

    def counting(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(media, "process_value", counting)
    load_feature_data(DataConfig(path=str(folder)))
    first = calls["n"]
    assert first == (10 + 3) * 3  # every row and media column of the 3 splits once, + row 0 per split for the types
    load_feature_data(DataConfig(path=str(folder)))
    assert calls["n"] == first  # read back from the fingerprinted cache
    load_feature_data(DataConfig(path=str(folder), media={"image": {"size": 8}}))
    assert calls["n"] == 2 * first  # a different spec is a different fingerprint


def test_augmentation_only_on_train_and_outside_the_cache(folder):
    data = load_feature_data(DataConfig(path=str(folder)))
    torch.manual_seed(0)
    a, b = data.train[0]["image"], data.train[0]["image"]
    assert not torch.equal(a, b)
    assert torch.equal(data.validation[0]["image"], data.validation[0]["image"])
    assert torch.equal(data.train[0]["audio"], data.train[0]["audio"])  # audio is never augmented
    off = load_feature_data(DataConfig(path=str(folder), media={"image": {"augment": False}}))
    assert torch.equal(off.train[0]["image"], off.train[0]["image"])


def test_every_accepted_value_form(tmp_path):
    rng = np.random.default_rng(0)
    write_jpg(str(tmp_path / "a.jpg"), frame(1, 0, rng))
    raw = (tmp_path / "a.jpg").read_bytes()
    spec = media.MediaSpec(kind="image", size=8)
    from_path = media.process_value("a.jpg", spec, "imagenet", str(tmp_path))
    for value in (raw, {"bytes": raw, "path": None}, {"bytes": None, "path": str(tmp_path / "a.jpg")}):
        assert np.allclose(media.process_value(value, spec, "imagenet", ""), from_path)
    aspec = media.MediaSpec(kind="audio", sampling_rate=8000, max_seconds=0.5)
    wave = tone(0, 0.25, rng, sr=16000)
    out = media.process_value({"array": wave.tolist(), "sampling_rate": 16000}, aspec, "waveform", "")
    assert out.shape == (4000,)  # resampled 16 kHz -> 8 kHz and tiled from 0.25 s to 0.5 s
    import soundfile as sf

    for ext in ("flac", "ogg"):
        sf.write(str(tmp_path / f"t.{ext}"), wave, 16000)
        assert media.process_value(f"t.{ext}", aspec, "waveform", str(tmp_path)).shape == (4000,)
    write_video(str(tmp_path / "clip.mp4"), 2, rng, frames=6)
    vspec = media.MediaSpec(kind="video", num_frames=4, size=8)
    assert media.process_value("clip.mp4", vspec, "imagenet", str(tmp_path)).shape == (4, 3, 8, 8)
    assert media.process_value("clip.mp4", aspec, "spectrogram", str(tmp_path)).shape[0] == 1  # its sound track
    assert media.process_value(["a.jpg", "a.jpg"], vspec, "imagenet", str(tmp_path)).shape == (4, 3, 8, 8)
    assert media.pick_indices(10, 3) == [1, 5, 8] and media.pick_indices(2, 4) == [0, 0, 1, 1]


def test_hf_processors_from_config_dicts(folder):
    cfg = DataConfig(path=str(folder), media={
        "image": {"processor": {"class": "ViTImageProcessor", "size": {"height": 24, "width": 24}}},
        "audio": {"processor": {"class": "ASTFeatureExtractor", "num_mel_bins": 16, "max_length": 32},
                  "sampling_rate": 16000},
        "visual": {"processor": {"class": "ViTImageProcessor", "size": {"height": 24, "width": 24}}}})
    data = load_feature_data(cfg)
    assert data.input_shapes == {"image": [3, 24, 24], "audio": [32, 16], "visual": [3, 3, 24, 24]}


def test_text_column_through_a_tokenizer(tmp_path):
    from mmbalance_llm.data.raw_replica import write_tiny_tokenizer

    tok = write_tiny_tokenizer(str(tmp_path / "tok"), ["red apple pie", "green sushi"])
    for split in ("train", "validation", "test"):
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            fh.write(json.dumps({"text": "Red apple pie", "label": 0}) + "\n")
            fh.write(json.dumps({"text": "green sushi", "label": 1}) + "\n")
    data = load_feature_data(DataConfig(path=str(tmp_path), media={"text": {"kind": "text", "processor": tok,
                                                                            "max_length": 6}}))
    ids = data.train[0]["text"]
    assert ids.dtype == torch.int64 and ids.tolist()[:3] != [1, 1, 1] and ids.tolist()[-1] == 0
    with pytest.raises(DataError, match="tokenizer"):
        load_feature_data(DataConfig(path=str(tmp_path), media={"text": {"kind": "text"}}))


def test_bad_media_fail_in_one_line_naming_row_and_file(folder):
    rows = [json.loads(line) for line in open(folder / "train.jsonl")]
    rows[3]["audio"] = "wav/missing.wav"
    with open(folder / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(DataError) as err:
        load_feature_data(DataConfig(path=str(folder)))
    msg = str(err.value)
    assert "\n" not in msg and "column 'audio', row 3" in msg and "wav/missing.wav" in msg
    rows[3]["audio"] = "wav/broken.wav"
    (folder / "wav" / "broken.wav").write_bytes(b"RIFF not really a wav")
    with open(folder / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(DataError, match=r"split 'train', column 'audio', row 3: cannot read 'wav/broken.wav' as audio"):
        load_feature_data(DataConfig(path=str(folder)))


def test_bad_specs_name_the_key(folder):
    with pytest.raises(DataError, match="unknown key 'data.media.image.sise'"):
        load_feature_data(DataConfig(path=str(folder), media={"image": {"sise": 3}}))
    with pytest.raises(DataError, match="data.media.image.kind"):
        load_feature_data(DataConfig(path=str(folder), media={"image": {"kind": "picture"}}))
    with pytest.raises(DataError, match="not modalities"):
        load_feature_data(DataConfig(path=str(folder), media={"depth": {"kind": "image"}}))


def test_cli_reports_bad_media_as_one_line_exit_2(folder, tmp_path, capsys):
    from mmbalance_llm.cli import main as cli_main

    (folder / "img" / "train2.jpg").write_bytes(b"not a jpeg")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{path: {folder}}}\ntrain: {{num_train_epochs: 1, progress: false}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert cli_main(["train", str(recipe)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mmbalance: error: split 'train', column 'image', row 2: cannot read 'img/train2.jpg'")
    assert not (tmp_path / "run").exists()  # nothing written before the data is valid


def test_memory_mapped_and_in_memory_splits_give_the_same_batches(folder):
    from torch.utils.data import DataLoader

    from mmbalance_llm.data.features import collate

    held = load_feature_data(DataConfig(path=str(folder), media={"image": {"augment": False},
                                                                 "visual": {"augment": False}}))
    mapped = load_feature_data(DataConfig(path=str(folder), media_in_memory_gb=None,
                                          media={"image": {"augment": False}, "visual": {"augment": False}}))
    assert held.train.from_arrow == set() and mapped.train.from_arrow == {"image", "audio", "visual"}
    assert held.input_shapes == mapped.input_shapes
    for a, b in zip(DataLoader(held.train, batch_size=4, collate_fn=collate),
                    DataLoader(mapped.train, batch_size=4, collate_fn=collate)):  # __getitems__: one read
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(mapped.train[(1, ("audio",))]["image"], torch.zeros(3, 16, 16))


def test_processor_defaults_to_the_encoders_checkpoint(tmp_path):
    from mmbalance_llm.config import ModelConfig

    data = DataConfig(path=str(tmp_path), media={"visual": {"kind": "video"}, "audio": {"processor": "waveform"}})
    model = ModelConfig(encoders={"visual": {"encoder": "hf", "name_or_path": "google/vit-base-patch16-224"},
                                  "audio": {"encoder": "hf", "name_or_path": "facebook/wav2vec2-base"},
                                  "text": {"encoder": "hf", "name_or_path": {"model_type": "bert"}}})
    filled = media.processors_from_encoders(data, model)
    assert filled.media["visual"] == {"kind": "video", "processor": "google/vit-base-patch16-224"}
    assert filled.media["audio"] == {"processor": "waveform"}  # an explicit processor wins
    assert "text" not in filled.media  # a config dict has no processor to load
    assert data.media["visual"] == {"kind": "video"}  # the recipe itself is not changed


def test_float_columns_next_to_media_columns(folder):
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in open(folder / f"{split}.jsonl")]
        with open(folder / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps({**r, "pose": [float(r["label"])] * 4}) + "\n" for r in rows)
    data = load_feature_data(DataConfig(path=str(folder), modalities=["image", "pose"]))
    assert data.input_shapes == {"image": [3, 16, 16], "pose": [4]}
    item = data.train[1]
    assert torch.equal(item["pose"], torch.ones(4)) and item["image"].shape == (3, 16, 16)
