"""`mmbalance make-data <dataset>` on miniature replicas of each raw layout, and end-to-end training from
raw media with tiny HF image / audio encoders under none, ogm_ge and mmpareto (the recipes' CPU twins)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmbalance_llm.cli import main as cli_main
from mmbalance_llm.config import load_recipe
from mmbalance_llm.data.raw_replica import REPLICAS, write_replica, write_tiny_tokenizer

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{dataset: contract folder}: every replica written and converted through the CLI once."""
    root = tmp_path_factory.mktemp("raw")
    out = {}
    for name in REPLICAS:
        write_replica(name, str(root / "raw" / name), per_class=3)
        assert cli_main(["make-data", name, str(root / "raw" / name), str(root / "data" / name)]) == 0
        out[name] = str(root / "data" / name)
    return out


def _lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_every_converter_writes_the_contract_with_three_splits(converted):
    expect = {"cremad": {"audio", "visual"}, "kinetics-sounds": {"audio", "visual"}, "ave": {"audio", "visual"},
              "vggsound": {"audio", "visual"}, "ucf101": {"visual", "flow"}, "food101": {"image", "text"}}
    for name, columns in expect.items():
        card = json.load(open(os.path.join(converted[name], "media.json")))
        assert set(card["columns"]) == columns and card["dataset"] == name
        for split in ("train", "validation", "test"):
            rows = _lines(os.path.join(converted[name], f"{split}.jsonl"))
            assert rows and set(rows[0]) == columns | {"label"}
            assert all(0 <= r["label"] < len(card["classes"]) for r in rows)
    cremad = _lines(os.path.join(converted["cremad"], "train.jsonl"))
    assert cremad[0]["audio"].endswith(".wav") and "/AudioWAV/" in cremad[0]["audio"]
    assert json.load(open(os.path.join(converted["cremad"], "media.json")))["classes"][:2] == ["NEU", "HAP"]
    food = _lines(os.path.join(converted["food101"], "train.jsonl"))
    assert "http" not in food[0]["text"]  # BalanceBenchmark's clean_text
    import datasets

    mosei = datasets.load_from_disk(converted["mosei"])
    assert set(mosei) == {"train", "validation", "test"}
    assert mosei["train"].column_names == ["audio", "visual", "text", "label"]


def test_converter_errors_name_the_missing_file(tmp_path, capsys):
    import re

    write_replica("cremad", str(tmp_path / "raw"), per_class=1)
    os.remove(next(str(p) for p in (tmp_path / "raw" / "VideoFlash").iterdir()))
    assert cli_main(["make-data", "cremad", str(tmp_path / "raw"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"mmbalance: error: CREMA-D clip '\w+' video: '.*VideoFlash/\w+\.flv' does not exist", err)
    assert not (tmp_path / "out").exists()
    assert cli_main(["make-data", "food101", str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2


def _recipe(name: str, data: str, out: str, method: str = "none", *overrides):
    return load_recipe(os.path.join(RECIPES, name), [f"data.path={data}", f"output_dir={out}",
                                                    f"balance.method={method}", *overrides])


TWINS = {"cremad": "cremad/vit_ast_tiny.yaml", "kinetics-sounds": "kinetics_sounds/vit_ast_tiny.yaml",
         "ave": "kinetics_sounds/vit_ast_tiny.yaml", "vggsound": "kinetics_sounds/vit_ast_tiny.yaml"}


@pytest.mark.parametrize("method", ["none", "ogm_ge", "mmpareto"])
@pytest.mark.parametrize("dataset", list(TWINS))
def test_audio_visual_replicas_train_with_tiny_vit_and_ast(converted, tmp_path, dataset, method):
    from mmbalance_llm.train.trainer import Trainer

    recipe = _recipe(TWINS[dataset], converted[dataset], str(tmp_path / "run"), method, "train.shapley=false")
    final = Trainer(recipe).fit()
    assert 0.0 <= final["test"]["accuracy"] <= 1.0
    assert set(final["test"]["unimodal_accuracy"]) == {"audio", "visual"}
    assert os.path.isfile(tmp_path / "run" / "best" / "model.safetensors")
    if dataset == "cremad" and method == "none":  # `mmbalance eval` preprocesses as the run did
        assert cli_main(["eval", str(tmp_path / "run" / "best"), "--data", converted[dataset]]) == 0


def test_kinetics_sounds_replica_trains_the_balancebenchmark_resnet18_twin(converted, tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    final = Trainer(_recipe("kinetics_sounds/balancebenchmark_resnet18_tiny.yaml", converted["kinetics-sounds"],
                            str(tmp_path / "run"), "ogm_ge")).fit()
    assert "imbalance" in final["test"]


def test_fusion_transformer_twin_on_ave_and_vggsound(converted, tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    for name in ("ave", "vggsound"):
        final = Trainer(_recipe("cremad/vit_ast_fusion_transformer_tiny.yaml", converted[name],
                                str(tmp_path / name), "none", "data.media.visual.num_frames=3")).fit()
        assert 0.0 <= final["test"]["accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["none", "ogm_ge", "mmpareto"])
def test_food101_image_text_ucf101_flow_and_mosei_features_train(converted, tmp_path, method):
    from mmbalance_llm.config import recipe_from_dict
    from mmbalance_llm.train.trainer import Trainer

    texts = [r["text"] for r in _lines(os.path.join(converted["food101"], "train.jsonl"))]
    tok = write_tiny_tokenizer(str(tmp_path / "tok"), texts)
    vit = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "image_size": 32, "patch_size": 8}
    bert = {"model_type": "bert", "vocab_size": 200, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}
    train = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "progress": False, "plots": False,
             "shapley": False}
    runs = {
        "food101": {"model": {"feature_dim": 16, "encoders": {
            "image": {"encoder": "hf", "name_or_path": vit},
            "text": {"encoder": "hf", "name_or_path": bert, "pooling": "mean", "lr": 1e-3}}},
            "data": {"media": {"image": {"processor": {"class": "ViTImageProcessor", "size": {"height": 32, "width": 32}}},
                               "text": {"processor": tok, "max_length": 12}}}},
        "ucf101": {"model": {"feature_dim": 16, "encoders": {"visual": {"encoder": "hf", "name_or_path": vit},
                                                             "flow": {"encoder": "resnet18"}}},
                   "data": {"media": {"visual": {"processor": {"class": "ViTImageProcessor",
                                                               "size": {"height": 32, "width": 32}}},
                                      "flow": {"size": 32}}}},
        "mosei": {"model": {"feature_dim": 16, "hidden_dim": 16, "num_layers": 1}, "data": {}},
    }
    for name, raw in runs.items():
        raw["data"]["path"] = converted[name]
        recipe = recipe_from_dict({**raw, "train": train, "balance": {"method": method},
                                   "output_dir": str(tmp_path / name)})
        final = Trainer(recipe).fit()
        assert 0.0 <= final["test"]["accuracy"] <= 1.0, name


@pytest.mark.slow
def test_two_process_ddp_trains_the_cremad_twin(converted, tmp_path):
    """2-process DDP on CPU: rank 0 writes the media cache, rank 1 reads it; the run finishes."""
    recipe = os.path.join(RECIPES, "cremad", "vit_ast_tiny.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/ddp_cpu_2proc.yaml",
           "-m", "mmbalance_llm", "train", recipe, f"data.path={converted['cremad']}",
           f"output_dir={tmp_path / 'run'}", "balance.method=ogm_ge", "train.shapley=false"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "run" / "final_metrics.json")


@pytest.mark.parametrize("path", sorted(f"{d}/{f}" for d in ("cremad", "kinetics_sounds")
                                        for f in os.listdir(os.path.join(RECIPES, d))))
def test_every_media_recipe_is_valid(path):
    from mmbalance_llm.data.media_columns import parse_spec

    recipe = load_recipe(os.path.join(RECIPES, path))
    assert set(recipe.data.media) == set(recipe.model.encoders)
    for column, spec in recipe.data.media.items():
        parse_spec(column, spec)
    if not path.endswith("_tiny.yaml"):  # the GPU recipes run the full schedule
        assert recipe.train.num_train_epochs >= 20
