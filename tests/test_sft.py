"""SFT through the one training loop on tiny twins: a table of (family, adapter) cases, recipe errors, freezing."""
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

import mmbalance_llm  # noqa: E402,F401
from mmbalance_llm.cli import main as cli_main  # noqa: E402
from mmbalance_llm.config import RecipeError, load_recipe  # noqa: E402
from mmbalance_llm.train.trainer import Trainer  # noqa: E402


def load_sft_recipe(raw, overrides=None):
    return load_recipe(raw, overrides)


def run(recipe):
    return Trainer(recipe).fit()

CASES = [  # (family, adapter, media modality, answer accuracy by)
    ("llava", "moka", "image", "options"),
    ("llava", "lora", "image", "generate"),
    ("qwen2_vl", "moka", "image", "generate"),
    ("qwen2_audio", "moka", "audio", "options"),
]


def recipe(tmp, fam, adapter, mod, **over):
    data = tmp.parent / f"data_{mod}"  # shared between cases of the same modality
    r = {
        "task": "sft", "output_dir": str(tmp / "out"), "adapter": adapter,
        "adapter_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **({"init_lora_weights": True})},
        "model": {"name_or_path": str(tmp.parent / f"tiny_{fam}"), "build_tiny": fam},
        "data": {"train": str(data / "train.json"), "validation": str(data / "validation.json"),
                 "test": str(data / "test.json"), "max_length": 96, "cache_dir": str(tmp.parent / "cache"),
                 "generate": {"modalities": [mod], "n_train": 16, "n_validation": 6, "n_test": 6, "seed": 0}},
        "train": {"num_train_epochs": 1, "max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 5e-3,
                  "logging_steps": 1, "progress": False},
        "eval": {"accuracy": "options"},
    }
    for k, v in over.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) else v
    return r


@pytest.mark.parametrize("fam, adapter, mod, accuracy", CASES)
def test_sft_runs_and_saves_a_reloadable_adapter(tmp_path, fam, adapter, mod, accuracy):
    import peft
    from safetensors.torch import load_file

    cfg = load_sft_recipe(recipe(tmp_path, fam, adapter, mod, eval={"accuracy": accuracy, "max_new_tokens": 3}))
    final = run(cfg)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["split"] == "validation"
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert rows[-1]["split"] == "validation" and rows[-1]["step"] == 3
    saved = json.loads((out / "final_metrics.json").read_text())
    assert saved["test"]["n"] == 6 and 0 <= saved["test"]["accuracy"] <= 1
    assert "test_before_training" in saved and f"accuracy_{mod}" in saved["test"]
    acfg = json.loads((out / "best" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == adapter.upper()
    weights = load_file(out / "best" / "adapter_model.safetensors")
    assert all(".language_model." in k for k in weights)  # LLM only, never the tower
    if adapter == "moka":
        assert any(f"lora_moka_A_{mod}" in k for k in weights)
    # the base model reloads the best adapter with plain peft
    from mmbalance_llm.models.tiny import load_tiny

    base, _ = load_tiny(tmp_path.parent / f"tiny_{fam}")
    pm = peft.PeftModel.from_pretrained(base, out / "best")
    assert type(pm.base_model).__name__ == ("MokaModel" if adapter == "moka" else "LoraModel")
    assert final["trainable_params"] == sum(v.numel() for v in weights.values())


def test_unfrozen_projector_trains_and_is_saved_tower_stays(tmp_path):
    from safetensors.torch import load_file

    cfg = load_sft_recipe(recipe(tmp_path, "llava", "moka", "image",
                                 model={"freeze": {"tower": True, "projector": False, "language_model": True}},
                                 adapter_config={"r": 4, "init_lora_weights": False}))
    final = run(cfg)
    w = load_file(tmp_path / "out" / "best" / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in w) and not any("vision_tower" in k for k in w)
    assert "test_before_training" not in final  # the base changed, so "adapter disabled" is not "before"


def test_recipe_errors_are_clear(tmp_path):
    base = recipe(tmp_path, "llava", "moka", "image")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_sft_recipe(base, ["train.lrr=1e-3"])
    with pytest.raises(RecipeError, match=r"unknown recipe key 'modle' \(did you mean 'model'\?\)"):
        load_sft_recipe({**base, "modle": {}})
    with pytest.raises(RecipeError, match="recipe key 'adapter' is 'dora'; choose one of moka, imod, lora, none"):
        load_sft_recipe(base, ["adapter=dora"])
    with pytest.raises(RecipeError, match="not of the form dotted.key=value"):
        load_sft_recipe(base, ["train.lr"])
    with pytest.raises(RecipeError, match="recipe key 'train.num_train_epochs' must be an integer, got 'abc'"):
        load_sft_recipe(base, ["train.num_train_epochs=abc", "train.max_steps=1"])
    with pytest.raises(RecipeError, match="recipe key 'train.eval_batch_size' must be an integer"):  # alias named
        load_sft_recipe(base, ["train.eval_batch_size=abc"])
    with pytest.raises(RecipeError, match="'num_train_epochs'"):  # the HF spelling is the key here
        load_sft_recipe(base, ["train.num_train_epoch=2"])
    with pytest.raises(RecipeError, match="balance.method 'ogm_ge' supports task classify"):
        load_sft_recipe(base, ["balance.method=ogm_ge"])
    with pytest.raises(RecipeError, match="name the same setting"):  # both spellings in one recipe
        load_sft_recipe({**base, "train": {**base["train"], "lr": 0.1}})
    # an override replaces the setting whatever spelling the recipe used; the last override wins
    assert load_sft_recipe(base, ["train.lr=0.1", "train.learning_rate=0.2"]).train.learning_rate == 0.2
    cfg = load_sft_recipe(base, ["train.lr=0.5", "eval.accuracy=generate", "train.grad_accum=2", "eval.batch_size=4"])
    assert cfg.train.learning_rate == 0.5 and cfg.eval.accuracy == "generate"
    assert cfg.train.gradient_accumulation_steps == 2 and cfg.train.per_device_eval_batch_size == 4
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**base, "adapter_config": {"lora_alph": 4}}))
    with pytest.raises(RecipeError, match=r"adapter_config.lora_alph' for MokaConfig \(did you mean 'lora_alpha'\?\)"):
        load_sft_recipe(p)
    assert cli_main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_recipes_load(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    names = [os.path.join(d, f) for d in ("llava", "qwen2_vl", "qwen2_audio") for f in ("moka_sft.yaml", "moka_sft_tiny.yaml")]
    for n in names:
        cfg = load_sft_recipe(os.path.join(root, n), ["adapter=lora"])
        assert cfg.adapter == "lora" and cfg.task == "sft"
        assert "cross_attention_weight" not in cfg.adapter_config  # MokA-only keys dropped for LoRA


def test_media_cut_by_truncation_fails_before_training_naming_the_sample(tmp_path):
    from mmbalance_llm.data.chat import ChatDataError

    cfg = load_sft_recipe(recipe(tmp_path, "llava", "moka", "image", data={"max_length": 8}))
    with pytest.raises(ChatDataError, match=r"train\.json: sample 0 \(id=train_00000\): truncation to max_length=8 "
                                            r"would cut media tokens"):
        run(cfg)
    assert not (tmp_path / "out").exists()  # raised before anything was written
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_option_scoring_matches_prompt_only_next_token_logits(tmp_path):
    """Scoring an option with teacher forcing must give the prompt-only next-token log-prob: MokA's media rows
    may not see the option being scored (labels keep it out of the question keys)."""
    import peft

    from mmbalance_llm import MokaConfig
    from mmbalance_llm.data.chat import ChatCollator, load_conversations
    from mmbalance_llm.data.mm_synthetic import write_instruction_set
    from mmbalance_llm.models.tiny import tiny_model_and_processor

    paths = write_instruction_set(tmp_path / "d", ("image",), 4, 1, 1, seed=9)
    recs = load_conversations(paths["train"])[:2]
    model, proc = tiny_model_and_processor("llava")
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, MokaConfig(init_lora_weights=False)).eval()
    coll = ChatCollator(proc, model.config)
    with torch.no_grad():
        for r in recs:
            prompt = coll.pad([coll.encode(r, add_answer=False)])
            prompt.pop("labels")
            ref = torch.log_softmax(pm(**prompt).logits[0, -1], -1)
            n = prompt["input_ids"].shape[1]
            for opt in r["options"]:
                full = coll.pad([coll.encode(r, answer=opt)])
                first_tok = full["input_ids"][0, n]
                got = torch.log_softmax(pm(**full).logits[0, n - 1], -1)[first_tok]
                assert torch.allclose(got, ref[first_tok], atol=1e-5), opt
