"""Step-level evaluation (`train.eval_strategy: steps`, `train.eval_steps`): validation every N optimizer steps
inside the epochs and when training ends, the best model chosen over those evaluations, early stopping
counting them (also part-way through an epoch), a run stopped mid-epoch and resumed equal to the
uninterrupted one; `eval_strategy: no` evaluates once at the end; `save_strategy`. Both tasks."""
import json
import os

import pytest

from mmbalance_llm.config import RecipeError, recipe_from_dict
from mmbalance_llm.train.trainer import Trainer

from conftest import tiny_recipe
from test_sft_loop import sft_recipe

# tiny_data: 256 training rows, batch 32 -> 8 optimizer steps an epoch


def rows(out, split="validation"):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["split"] == split]


def test_evaluation_every_n_steps_chooses_the_best_over_them(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    final = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={
        "epochs": 2, "eval_strategy": "steps", "eval_steps": 3}))).fit()
    val = rows(out)
    assert [r["step"] for r in val] == [3, 6, 9, 12, 15, 16]  # and once more when training ends
    assert [r["epoch"] for r in val] == [1, 1, 2, 2, 2, 2]  # the epoch in progress
    best = max(val, key=lambda r: r["accuracy"])  # first of equals: a later tie is not better
    assert final["best_step"] == best["step"] and final["validation"]["accuracy"] == best["accuracy"]
    state = json.load(open(os.path.join(out, "checkpoint-16", "trainer_state.json")))
    assert state["best_step"] == best["step"]


def test_eval_steps_default_to_logging_steps_and_count_optimizer_steps(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={
        "epochs": 1, "eval_strategy": "steps", "logging_steps": 2, "grad_accum": 2}))).fit()
    assert [r["step"] for r in rows(out)] == [2, 4]  # 8 micro-batches = 4 optimizer steps


def test_early_stopping_counts_step_evaluations_and_stops_mid_epoch(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    final = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={
        "epochs": 30, "eval_strategy": "steps", "eval_steps": 3, "early_stopping_patience": 2}))).fit()
    steps = [r["step"] for r in rows(out)]
    assert final["early_stopped_at_step"] == steps[-1] == final["best_step"] + 2 * 3
    assert final["early_stopped_at_step"] < 30 * 8 and "test" in final
    assert rows(out, "train")[-1]["step"] <= steps[-1]  # no training after the stop
    if final["early_stopped_at_step"] % 8:
        assert final["early_stopped_at_epoch"] == final["early_stopped_at_step"] // 8 + 1  # part-way through


@pytest.mark.parametrize("stop, resume_at", [(12, "latest"), (12, "checkpoint-10"), (13, "latest")])
def test_resume_mid_epoch_with_step_evaluations_is_exact(tiny_data, tmp_path, stop, resume_at):
    train = {"epochs": 3, "eval_strategy": "steps", "eval_steps": 3, "save_steps": 5, "save_total_limit": None}
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    full = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), full_dir, "ogm_ge", train=train))).fit()
    raw = tiny_recipe(tiny_data(), part_dir, "ogm_ge", train={**train, "stop_after_steps": stop})
    assert Trainer(recipe_from_dict(raw)).fit() is None
    raw["train"].update(stop_after_steps=None, resume_from=resume_at if resume_at == "latest"
                        else os.path.join(part_dir, resume_at))
    resumed = Trainer(recipe_from_dict(raw)).fit()
    assert json.dumps(resumed) == json.dumps(full)
    assert rows(part_dir) == rows(full_dir)  # the same evaluations, none twice


def test_eval_strategy_no_evaluates_once_at_the_end(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    final = Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={"epochs": 2, "eval_strategy": "no"}))).fit()
    assert [r["step"] for r in rows(out)] == [16] and final["best_step"] == 16 and "test" in final


@pytest.mark.parametrize("strategy, expected", [("no", []), ("steps", [5, 10, 15]), ("epoch", [5, 8, 10, 15, 16])])
def test_save_strategy(tiny_data, tmp_path, strategy, expected):
    out = str(tmp_path / "run")
    Trainer(recipe_from_dict(tiny_recipe(tiny_data(), out, train={
        "epochs": 2, "save_strategy": strategy, "save_steps": 5, "save_total_limit": None}))).fit()
    assert sorted(int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-")) == expected
    assert os.path.isfile(os.path.join(out, "final_metrics.json"))


@pytest.mark.parametrize("train, message", [
    ({"eval_strategy": "no", "early_stopping_patience": 2}, "'train.early_stopping_patience' needs evaluations"),
    ({"save_strategy": "steps"}, "'train.save_strategy' is 'steps' but train.save_steps is not set"),
])
def test_inconsistent_settings_are_refused_before_anything_is_written(tiny_data, tmp_path, train, message):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=message):
        Trainer(recipe_from_dict(tiny_recipe(tiny_data(), str(out), train=train)))
    assert not out.exists()


def test_sft_evaluates_every_n_steps(tmp_path):
    raw = sft_recipe(tmp_path, num_train_epochs=1, eval_strategy="steps", eval_steps=2)
    final = Trainer(raw).fit()  # 16 records, batch 4: 4 steps
    val = rows(raw["output_dir"])
    assert [r["step"] for r in val] == [0, 2, 4]  # the before-training row, then every 2 steps
    assert final["best_step"] in (0, 2, 4) and "test" in final


def test_a_bare_yaml_no_reads_as_the_choice_no(tiny_data, tmp_path):
    from mmbalance_llm.config import load_recipe

    raw = tiny_recipe(tiny_data(), str(tmp_path / "run"))
    recipe = load_recipe(raw, ["train.eval_strategy=no", "train.save_strategy=no", "train.mixed_precision=no"])
    assert (recipe.train.eval_strategy, recipe.train.save_strategy, recipe.train.mixed_precision) == ("no",) * 3
