"""The generated instruction set's text-dominance knob (`text_prior`, `test_prior`) and the per-cue accuracy
groups of the SFT evaluation."""
import hashlib
import json
from pathlib import Path

import pytest

from mmbalance_llm.data.mm_synthetic import write_instruction_set


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(folder: Path, split: str) -> list:
    return json.loads((folder / f"{split}.json").read_text())


def test_zero_prior_writes_the_set_as_before_and_a_prior_keeps_the_media(tmp_path):
    write_instruction_set(tmp_path / "a", n_train=40, n_validation=10, n_test=10)
    write_instruction_set(tmp_path / "b", n_train=40, n_validation=10, n_test=10, text_prior=0.0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert all("cue" not in r for r in _records(tmp_path / "a", "train"))
    write_instruction_set(tmp_path / "c", n_train=40, n_validation=10, n_test=10, text_prior=1.0)
    plain, prior = _records(tmp_path / "a", "train"), _records(tmp_path / "c", "train")
    # the same questions, kinds and text items; only media answers move to the prior
    assert [r["kind"] for r in plain] == [r["kind"] for r in prior]
    assert [r for r in plain if r["needs"] == "text"] == [r for r in prior if r["needs"] == "text"]


def test_prior_rates_and_test_modes(tmp_path):
    out = tmp_path / "d"
    write_instruction_set(out, modalities=("image", "audio"), n_train=400, n_validation=100, n_test=200,
                          text_prior=0.8, test_prior="misleading")
    train = [r for r in _records(out, "train") if r["needs"] != "text"]
    share = sum(r["answer"] == r["options"][0] for r in train) / len(train)
    # 0.8 forced + 0.2 drawn uniformly over 3-4 options
    assert 0.8 < share < 0.92
    assert all(r["cue"] == ("prior" if r["answer"] == r["options"][0] else "nonprior") for r in train)
    test = [r for r in _records(out, "test") if r["needs"] != "text"]
    assert test and all(r["answer"] != r["options"][0] and r["cue"] == "nonprior" for r in test)
    # the media carry the answer: the items file says which attribute was drawn
    items = [json.loads(x) for x in open(out / "items.jsonl")]
    for it in items:
        if it["kind"] == "colour":
            assert it["attributes"]["colour"] == it["answer"]
    write_instruction_set(tmp_path / "e", n_train=10, n_validation=10, n_test=300, text_prior=0.8)
    test = [r for r in _records(tmp_path / "e", "test") if r["needs"] != "text"]
    share = sum(r["answer"] == r["options"][0] for r in test) / len(test)
    assert share < 0.5  # absent: uniform answers
    with pytest.raises(ValueError, match="test_prior"):
        write_instruction_set(tmp_path / "f", test_prior="bogus")


def test_eval_groups_split_media_items_by_prior():
    from mmbalance_llm.train.tasks.sft_eval import eval_groups

    assert eval_groups({"needs": "image"}) == ["image"]
    assert eval_groups({"needs": "image", "cue": "nonprior"}) == ["image", "image_nonprior"]
    assert eval_groups({"needs": "text", "cue": "prior"}) == ["text"]
    assert eval_groups({}) == ["all"]


@pytest.mark.parametrize("gen,match", [({"text_prior": 1.5}, "data.generate.text_prior"),
                                       ({"text_prior": "high"}, "data.generate.text_prior"),
                                       ({"test_prior": "never"}, "data.generate.test_prior")])
def test_bad_generate_values_are_one_line_recipe_errors(tmp_path, gen, match):
    from mmbalance_llm.config import RecipeError, load_recipe

    raw = {"task": "sft", "output_dir": str(tmp_path / "o"), "adapter": "lora",
           "model": {"name_or_path": str(tmp_path / "m"), "build_tiny": "llava"},
           "data": {"train": str(tmp_path / "d/train.json"), "validation": str(tmp_path / "d/validation.json"),
                    "generate": {"modalities": ["image"], **gen}}}
    with pytest.raises(RecipeError, match=match):
        load_recipe(raw)


def test_reliance_diagnostic_of_a_model_trained_to_ignore_the_image_shows_no_gain(tmp_path):
    """With text_prior 1 every media answer is its question's prior answer: the image carries nothing the model
    needs, so a model trained on it answers the same with and without the image (multimodal gain ~ 0) while it
    answers well."""
    from mmbalance_llm.train.trainer import Trainer

    data = tmp_path / "data"
    raw = {"task": "sft", "output_dir": str(tmp_path / "run"), "adapter": "lora",
           "adapter_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
           "model": {"name_or_path": str(tmp_path / "tiny"), "build_tiny": "llava"},
           "data": {"train": str(data / "train.json"), "validation": str(data / "validation.json"),
                    "max_length": 96, "cache_dir": str(tmp_path / "cache"),
                    "generate": {"modalities": ["image"], "n_train": 64, "n_validation": 24, "n_test": 4,
                                 "seed": 0, "text_prior": 1.0, "test_prior": "same"}},
           "train": {"num_train_epochs": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                     "logging_steps": 100, "progress": False, "plots": False},
           "eval": {"diagnostics_max_samples": 24}}
    final = Trainer(raw).fit()
    val = final["validation"]
    assert val["accuracy_image"] >= 0.9  # it answers the image questions (option scoring) ...
    # ... and the answer's log-probability does not depend on the image: dropped or blanked, within 0.05 nats per
    # answer token (a model that reads the image, e.g. the benchmark's MokA runs, shows gains of ~0.5). The
    # teacher-forced exact-match gain is not asserted: dropping the placeholders shifts every position of a model
    # never trained without them, which flips argmaxes without a change of belief (here 0.58 -> 0.33 exact
    # match at a log-prob change of 0.003).
    assert abs(val["diagnostics/reliance/logp_gain"]) <= 0.05
    assert abs(val["diagnostics/reliance/image/logp_full"] - val["diagnostics/reliance/image/logp_blank"]) <= 0.05
