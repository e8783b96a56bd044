"""`mmbalance compare` with per-method recipes, parallel jobs, both unimodal metrics and activity flags."""
from __future__ import annotations

import json
import os

import pytest

from mmbalance_llm.cli import main
from mmbalance_llm.compare import (markdown_table, method_recipes, same_as_baseline, stale_checkpoint_warnings,
                                   summarise)
from mmbalance_llm.config import RecipeError, read_yaml
from mmbalance_llm.eval.activity import active_at, first_active_epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes", "synthetic")


def test_first_active_epoch_reads_the_recipes():
    recipe = lambda m: read_yaml(os.path.join(RECIPES, f"{m}.yaml"))["balance"]  # noqa: E731
    assert first_active_epoch("ogm", recipe("ogm")) == 7  # warm-up epochs 0-5 (0-based), acts in the 7th
    assert first_active_epoch("relearning", recipe("relearning")) == 5  # reset after the 5th, before its eval
    assert first_active_epoch("relearning", {}) == 20  # the built-in default
    assert first_active_epoch("relearning", {}, epochs=15) is None
    assert first_active_epoch("unimodal_aux", recipe("unimodal_aux")) == 1
    assert first_active_epoch("ogm_ge", {"alpha": 0.0}) is None
    assert first_active_epoch("none", {}) is None
    assert active_at("ogm", recipe("ogm"), best_epoch=4) is False
    assert active_at("ogm", recipe("ogm"), best_epoch=9) is True
    assert active_at("none", {}, best_epoch=3) is None


def _final(method, seed, best_epoch, acc, balance=None, step=0.01):
    test = {"accuracy": acc, "macro_f1": acc, "imbalance": 0.5, "imbalance_probe": 0.2,
            "unimodal_accuracy": {"a": 0.8, "b": 0.3}, "unimodal_probe_accuracy": {"a": 0.8, "b": 0.6}}
    return {"method": method, "seed": seed, "best_epoch": best_epoch, "test": test, "epochs": 15,
            "balance": {"method": method, **(balance or {})}, "timing": {"mean_step_seconds": step}}


def test_table_flags_a_checkpoint_chosen_inside_the_warm_up_and_shows_no_spread_for_one_seed():
    results = {"none": [_final("none", 0, 5, 0.7)],
               "ogm": [_final("ogm", 0, 4, 0.7, {"modulation_starts": 6}, step=0.02)],
               "unimodal_aux": [_final("unimodal_aux", 0, 8, 0.75)]}
    results["unimodal_aux"][0]["test"]["unimodal_accuracy"] = {"a": 0.8, "b": 0.5}
    rows = summarise(results, ["a", "b"])
    assert rows["ogm"]["active_at_best"] == [False] and rows["unimodal_aux"]["active_at_best"] == [True]
    assert rows["ogm"]["step_time_ratio"] == pytest.approx(2.0)
    table = markdown_table(rows, ["a", "b"])
    assert "±" not in table
    for column in ("a unimodal acc", "b probe acc", "probe imbalance", "best epoch", "active at best", "step time ×"):
        assert column in table
    assert "0/1 (acts from 7)" in table
    warnings = stale_checkpoint_warnings(rows, [0])
    assert len(warnings) == 1 and "ogm" in warnings[0] and "(7)" in warnings[0]
    same = same_as_baseline(results)
    assert len(same) == 1 and "**ogm**" in same[0] and "seed(s) 0" in same[0]


def test_recipes_dir_must_hold_every_method():
    recipes = method_recipes(["none", "ogm"], RECIPES, {})
    assert recipes["none"]["balance"]["method"] == "none" and recipes["ogm"]["balance"]["modulation_starts"] == 6
    with pytest.raises(RecipeError, match="no nosuch.yaml"):
        method_recipes(["nosuch"], RECIPES, {})


def test_compare_cli_rejects_bad_arguments_in_one_line(capsys, tmp_path):
    assert main(["compare", "--recipes", str(tmp_path / "missing"), "--methods", "none", "--output-dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--recipes" in err and len(err.strip().splitlines()) == 1
    assert main(["compare", "--jobs", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compare_builds_each_method_from_its_recipe_in_parallel_processes(tiny_data, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--data", tiny_data(), "--recipes", RECIPES, "--methods", "none,relearning",
                 "--seeds", "0", "--jobs", "2", "--output-dir", str(out), "train.num_train_epochs=2",
                 "model.hidden_dim=32", "model.feature_dim=16", "train.plots=false"])
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["jobs"] == 2 and set(summary["rows"]) == {"none", "relearning"}
    used = read_yaml(str(out / "runs" / "relearning-seed0" / "config.yaml"))
    assert used["balance"]["reinit_epoch"] == 5  # the recipe's value, not the built-in 20
    table = (out / "compare.md").read_text()
    assert "probe acc" in table and "trained alone" in table and "±" not in table
    assert "**relearning**" in table  # 2 epochs never reach the recipe's first reset (epoch 5)
    for name in ("curves.png", "pareto.png"):
        assert (out / name).stat().st_size > 0

