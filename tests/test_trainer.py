"""The training loop: outputs, invariance at zero strength, determinism, exact resume, honest evaluation."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmbalance_llm import MultimodalClassifier
from mmbalance_llm.config import recipe_from_dict
from mmbalance_llm.train.trainer import Trainer

from conftest import tiny_recipe


def weights(output_dir):
    return load_file(os.path.join(output_dir, "best", "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_writes_every_output_and_best_loads(tiny_data, run_tiny):
    trainer, final = run_tiny(tiny_data(), train={"plots": True})
    out = trainer.output_dir
    for name in ("config.yaml", "metrics.jsonl", "final_metrics.json", "curves.png", "timing.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "tensorboard"))
    assert set(final) >= {"best_epoch", "distributed_type", "test", "validation", "world_size"}
    test = final["test"]
    assert set(test) >= {"accuracy", "macro_f1", "unimodal_accuracy", "shapley", "imbalance"}
    assert set(test["unimodal_accuracy"]) == {"audio", "visual"} and 0 <= test["imbalance"] <= 1
    assert final["world_size"] == 1 and final["distributed_type"] == "NO"
    assert test["accuracy"] > 0.5  # 4 classes: the tiny run learns something
    model = MultimodalClassifier.from_pretrained(os.path.join(out, "best"))
    assert model.modalities == ["audio", "visual"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows if r["split"] == "validation"] == [1, 2]
    assert not any(r["split"] == "test" for r in rows)  # test is not logged during training


def test_test_split_is_read_once_at_the_end(tiny_data, monkeypatch, tmp_path):
    from mmbalance_llm.train.tasks.classify import ClassifyTask

    seen = []
    real = ClassifyTask.evaluate

    def spy(self, model, split):
        seen.append(split)
        return real(self, model, split)

    monkeypatch.setattr(ClassifyTask, "evaluate", spy)
    trainer = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), str(tmp_path / "run"), train={"epochs": 3})))
    trainer.fit()
    assert seen == ["validation", "validation", "validation", "test"]


@pytest.mark.parametrize("method, params", [("unimodal_aux", {"weight": 0.0}),
                                            ("ogm_ge", {"alpha": 0.0, "modulation": "OGM"})])
def test_zero_strength_balancer_reproduces_the_baseline_exactly(tiny_data, run_tiny, method, params):
    base_trainer, base = run_tiny(tiny_data())
    trainer, final = run_tiny(tiny_data(), method, balance=params)
    for key in ("validation", "test"):
        assert final[key] == base[key]
    assert same_weights(weights(base_trainer.output_dir), weights(trainer.output_dir))


def test_nonzero_strength_changes_training(tiny_data, run_tiny):
    base_trainer, _ = run_tiny(tiny_data())
    trainer, _ = run_tiny(tiny_data(), "ogm_ge", balance={"alpha": 0.8, "modulation": "OGM"})
    assert not same_weights(weights(base_trainer.output_dir), weights(trainer.output_dir))


def test_fixed_seed_gives_identical_final_metrics(tiny_data, tmp_path):
    texts = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, "ogm_ge"))).fit()
        texts.append(open(os.path.join(out, "final_metrics.json")).read())
    assert texts[0] == texts[1]


@pytest.mark.parametrize("resume_at", ["latest", "checkpoint-10"])
def test_resume_continues_to_the_same_final_metrics(tiny_data, tmp_path, resume_at):
    train = {"epochs": 3, "save_steps": 5, "save_total_limit": None}
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    full = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), full_dir, "ogm_ge", train=train))).fit()
    raw = tiny_recipe(tiny_data(), part_dir, "ogm_ge", train={**train, "stop_after_steps": 13})
    assert Trainer(recipe_from_dict(raw)).fit() is None  # interrupted mid-epoch 2: no test read, no report
    assert not os.path.exists(os.path.join(part_dir, "final_metrics.json"))
    raw["train"].update(stop_after_steps=None, resume_from=resume_at if resume_at == "latest"
                        else os.path.join(part_dir, resume_at))
    resumed = Trainer(recipe_from_dict(raw)).fit()
    assert json.dumps(resumed) == json.dumps(full)
    steps = [json.loads(line)["step"] for line in open(os.path.join(part_dir, "metrics.jsonl"))]
    assert steps == sorted(steps) and len(steps) == len(set((s, i) for i, s in enumerate(steps)))


def test_fresh_run_clears_an_older_runs_checkpoints(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 3}))).fit()
    os.makedirs(os.path.join(out, "checkpoint-999"))
    open(os.path.join(out, "checkpoint-999", "trainer_state.json"), "w").write("{}")
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 1}))).fit()
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-8"]


def test_bad_data_never_touches_an_existing_run(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out))).fit()
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("final_metrics.json", "config.yaml")}
    bad = str(tmp_path / "bad")
    shutil.copytree(tiny_data(), bad)
    from mmbalance_llm.data.features import DataError

    with pytest.raises(DataError, match="column 'video' is missing"):
        Trainer(recipe_from_dict(tiny_recipe(bad, out, data={"modalities": ["audio", "video"]})))
    after = {name: open(os.path.join(out, name), "rb").read() for name in before}
    assert before == after and os.path.isdir(os.path.join(out, "best"))


def test_three_modalities_grad_accumulation_and_probe(tiny_data, run_tiny):
    # ogm_ge needs split logits: a gated model must be refused with a clear message
    with pytest.raises(ValueError, match="needs split unimodal logits"):
        run_tiny(tiny_data("tri_modal"), "ogm_ge", model={"fusion": "gated"})
    _, final = run_tiny(tiny_data("tri_modal"), "none", model={"fusion": "gated"},
                        train={"gradient_accumulation_steps": 2})
    test = final["test"]
    assert test["unimodal_source"] == "linear_probe" and set(test["shapley"]) == {"text", "audio", "visual"}
    _, final = run_tiny(tiny_data("tri_modal"), "ogm_ge", balance={"modulation": "OGM"})
    assert final["test"]["unimodal_source"] == "split_head"


def test_token_sequences_train_with_transformer_encoders(tiny_data, run_tiny):
    trainer, final = run_tiny(tiny_data("tokens"), "unimodal_aux", train={"epochs": 1})
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert type(model.encoders["audio"]).__name__ == "TransformerEncoder"
    assert final["test"]["accuracy"] >= 0.0


from conftest import tree_digest as _tree_digest  # noqa: E402


@pytest.mark.parametrize("override, message", [
    ({"metric_for_best_model": "bogus"}, "'train.metric_for_best_model' is 'bogus'"),
    ({"logging_steps": 0}, "'train.logging_steps' must be >= 1"),
    ({"max_steps": 0}, "'train.max_steps' must be >= 1"),
    ({"grad_clip": -1}, "'train.grad_clip' must be > 0.0"),
    ({"save_steps": -1}, "'train.save_steps' must be >= 1"),
])
def test_bad_values_are_refused_before_an_earlier_run_is_touched(tiny_data, tmp_path, override, message):
    from mmbalance_llm.config import RecipeError

    out = str(tmp_path / "run")
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 1}))).fit()
    before = _tree_digest(out)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 1, **override})))
    assert _tree_digest(out) == before


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tiny_data, tmp_path):
    from mmbalance_llm.train.checkpoint import OutputLock

    out = str(tmp_path / "run")
    lock = OutputLock(out)
    try:
        with pytest.raises(RuntimeError, match=f"in use by another run \\(PID {os.getpid()}\\)"):
            Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 1})))
    finally:
        lock.release()
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 1}))).fit()  # free again
    assert not os.path.exists(os.path.join(out, ".mmbalance.lock"))


def test_a_torn_checkpoint_is_never_resumed_and_partial_folders_are_removed(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 2, "stop_after_steps": 8}))).fit()
    # a kill while checkpoint-12 was being written leaves only its partial folder; an older layout without
    # trainer_state.json is not a checkpoint either
    os.makedirs(os.path.join(out, ".partial-checkpoint-12"))
    open(os.path.join(out, ".partial-checkpoint-12", "optimizer.bin"), "wb").close()
    os.makedirs(os.path.join(out, "checkpoint-13"))
    trainer = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 2, "resume_from": "latest"})))
    assert trainer.resume_dir.endswith("checkpoint-8")
    assert not os.path.exists(os.path.join(out, ".partial-checkpoint-12"))
    trainer.fit()


def test_train_help_lists_the_keys_of_the_recipes_task(capsys):
    from mmbalance_llm.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert main(["train", os.path.join(root, "recipes/llava/moka_sft_tiny.yaml"), "--help"]) == 0
    text = capsys.readouterr().out
    assert "model.name_or_path" in text and "eval.accuracy" in text and "train.num_train_epochs = 3" in text
    assert main(["train", os.path.join(root, "recipes/synthetic/ogm_ge.yaml"), "--help"]) == 0
    text = capsys.readouterr().out
    assert "model.fusion" in text and "eval.accuracy" not in text


def test_early_stopping_finishes_the_run_and_every_run_gets_a_model_card(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={
        "epochs": 30, "early_stopping_patience": 2})))
    final = trainer.fit()
    assert final is not None and "test" in final  # a finished run: best model, test read once
    stopped = final["early_stopped_at_epoch"]
    assert stopped < 30 and stopped - final["best_epoch"] == 2
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert max(r["epoch"] for r in rows if r["split"] == "validation") == stopped
    card = open(os.path.join(out, "best", "README.md")).read()
    assert "task: `classify`" in card and "| test |" in card and f"epoch {final['best_epoch']}" in card
