"""Recipes: loading, overrides, unknown keys with suggestions, shipped recipes stay valid."""
import glob
import os

import pytest
import yaml

from mmbalance_llm.config import RecipeError, apply_overrides, load_recipe, parse_override, recipe_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"epochz": 3}}, "unknown recipe key 'train.epochz' (did you mean 'epochs'?)"),
        ({"modle": {}}, "unknown recipe key 'modle' (did you mean 'model'?)"),
        ({"model": {"fusion": "concatt"}}, "recipe key 'model.fusion' is 'concatt'"),
        ({"train": {"epochs": "three"}}, "recipe key 'train.epochs' must be an integer"),
        ({"train": {"lr": "fast"}}, "recipe key 'train.lr' must be a number"),
        ({"train": {"batch_size": 0}}, "recipe key 'train.batch_size' must be >= 1"),
        ({"balance": {"method": "ogm_gee"}}, "unknown balance.method 'ogm_gee' (did you mean 'ogm_ge'?)"),
        ({"balance": {"method": "ogm_ge", "alpah": 1}}, "unknown hyperparameter 'balance.alpah' for method 'ogm_ge' (did you mean 'alpha'?)"),
        ({"balance": {"method": "none", "weight": 1}}, "unknown hyperparameter 'balance.weight' for method 'none'"),
        ({"data": []}, "recipe section 'data' must be a mapping"),
    ],
)
def test_recipe_errors_name_the_key(raw, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_yaml_values_and_create_sections():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("data.modalities=[audio, visual]") == (["data", "modalities"], ["audio", "visual"])
    raw = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=5", "balance.method=ogm_ge", "balance.alpha=0.1"])
    recipe = recipe_from_dict(raw)
    assert recipe.train.num_train_epochs == 5 and recipe.balance == {"method": "ogm_ge", "alpha": 0.1}
    with pytest.raises(RecipeError, match="not of the form"):
        parse_override("train.lr")
    with pytest.raises(RecipeError, match="'epochs' is not a section"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=1"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(str(bad))


def test_yaml_loading_is_safe(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("output_dir: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(evil))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "synthetic", "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_synthetic_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.data.path and recipe.output_dir


def test_compare_default_matches_baseline_recipe():
    from mmbalance_llm.compare import DEFAULT_RECIPE

    with open(os.path.join(ROOT, "recipes", "synthetic", "baseline.yaml")) as fh:
        baseline = yaml.safe_load(fh)
    for key, value in DEFAULT_RECIPE["model"].items():
        assert baseline["model"][key] == value, key
    ours, theirs = recipe_from_dict(baseline).train, recipe_from_dict(DEFAULT_RECIPE).train  # any spelling
    for key in ("num_train_epochs", "per_device_train_batch_size", "learning_rate", "weight_decay", "optimizer"):
        assert getattr(ours, key) == getattr(theirs, key), key
