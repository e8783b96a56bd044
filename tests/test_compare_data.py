"""`mmbalance compare` reads each feature dataset once (per process): every method, seed and single-modality
run shares one `load_feature_data`, and a shared run equals the same recipe trained on its own."""
import json

from mmbalance_llm import compare
from mmbalance_llm.config import read_yaml, recipe_from_dict
from mmbalance_llm.data import features
from mmbalance_llm.train.trainer import Trainer


def test_compare_reads_the_data_once_and_shared_runs_equal_standalone_ones(tiny_data, tmp_path, monkeypatch):
    calls = []
    real = features.load_feature_data

    def counting(cfg, *args, **kwargs):
        calls.append((cfg.path, kwargs.get("datasets") is None))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(features, "load_feature_data", counting)
    out = tmp_path / "cmp"
    small = ["train.num_train_epochs=1", "model.hidden_dim=16", "model.feature_dim=8", "model.num_layers=1",
             "train.plots=false", "train.progress=false"]
    summary = compare.run_compare(str(out), methods=("none", "ogm_ge"), seeds=(0, 1), data_path=tiny_data(),
                                  overrides=small, echo=lambda *_: None)
    assert len(calls) == 1  # 4 method runs + 4 single-modality runs, one read
    assert not compare._LOADED  # nothing kept after the compare
    # a shared run (here: audio alone, a column subset) equals the same recipe run on its own
    used = read_yaml(str(out / "runs" / "alone-audio-seed1" / "config.yaml"))
    used["output_dir"] = str(tmp_path / "alone")
    alone = Trainer(recipe_from_dict(used)).fit()
    shared = json.load(open(out / "runs" / "alone-audio-seed1" / "final_metrics.json"))
    assert alone["test"] == shared["test"] and alone["validation"] == shared["validation"]
    assert summary["alone"]["audio"]["accuracy"] is not None
