"""The SFT task in the one loop: hub ids reach from_pretrained unchanged (no library code sets the offline
variables), a run stopped mid-epoch and resumed equals the uninterrupted run, preprocessing is cached, best/
is self-contained, and under 2 real CPU processes evaluation covers the whole split and the launch pitfall is
refused."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")


def sft_recipe(tmp, out="out", **train):
    data = tmp.parent / "sft_data_image"
    return {
        "task": "sft", "output_dir": str(tmp / out), "adapter": "moka",
        "adapter_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "model": {"name_or_path": str(tmp.parent / "tiny_llava_loop"), "build_tiny": "llava"},
        "data": {"train": str(data / "train.json"), "validation": str(data / "validation.json"),
                 "test": str(data / "test.json"), "max_length": 96, "cache_dir": str(tmp.parent / "sft_cache"),
                 "generate": {"modalities": ["image"], "n_train": 16, "n_validation": 6, "n_test": 6, "seed": 0}},
        "train": {"num_train_epochs": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                  "logging_steps": 1, "progress": False, "plots": False, **train},
    }


def test_a_hub_id_reaches_from_pretrained_unchanged(tmp_path, monkeypatch):
    import transformers

    from mmbalance_llm.cli import main
    from mmbalance_llm.train.trainer import Trainer

    for key in OFFLINE:
        monkeypatch.delenv(key, raising=False)
    seen = []

    class Reached(Exception):
        pass

    def fake_from_pretrained(name, *args, **kwargs):
        seen.append((name, {k: os.environ.get(k) for k in OFFLINE}))
        raise Reached()

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    raw = sft_recipe(tmp_path)
    raw["model"] = {"name_or_path": "llava-hf/llava-1.5-7b-hf"}
    raw["data"].pop("generate")
    with pytest.raises(Reached):
        Trainer(raw)
    assert seen == [("llava-hf/llava-1.5-7b-hf", {k: None for k in OFFLINE})]
    assert main(["train", os.path.join(ROOT, "recipes/llava/moka_sft.yaml"), "--help"]) == 0
    assert all(k not in os.environ for k in OFFLINE)  # nothing in the library set them
    assert not (tmp_path / "out").exists()


def test_a_local_looking_path_that_does_not_exist_is_one_clear_error(tmp_path):
    from mmbalance_llm.config import RecipeError
    from mmbalance_llm.train.trainer import Trainer

    raw = sft_recipe(tmp_path)
    raw["model"] = {"name_or_path": str(tmp_path / "no" / "such" / "model")}
    with pytest.raises(RecipeError, match="is not a folder"):
        Trainer(raw)


def _adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_sft_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    full = Trainer(sft_recipe(tmp_path, "full")).fit()
    stopped = Trainer(sft_recipe(tmp_path, "part", stop_after_steps=6, save_steps=2)).fit()  # epoch 2, batch 2 of 4
    assert stopped is None
    resumed = Trainer(sft_recipe(tmp_path, "part", resume_from_checkpoint="latest")).fit()
    assert resumed == full
    a, b = _adapter_weights(tmp_path / "full" / "best"), _adapter_weights(tmp_path / "part" / "best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in open(tmp_path / "part" / "metrics.jsonl")]
    full_rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [r["step"] for r in full_rows]  # no duplicated or missing log rows
    # best/ alone is loadable: adapter + processor
    best = tmp_path / "full" / "best"
    assert (best / "adapter_config.json").is_file() and any(best.glob("tokenizer*"))
    final = json.loads((tmp_path / "full" / "final_metrics.json").read_text())
    assert final["task"] == "sft" and final["validation_before_training"]["n"] == 6
    assert "test_before_training" in final


def test_preprocessing_runs_once_and_is_cached(tmp_path, monkeypatch):
    from mmbalance_llm.data.chat import ChatCollator
    from mmbalance_llm.train.trainer import Trainer

    Trainer(sft_recipe(tmp_path, "first", max_steps=1)).fit()  # fills the cache
    calls = []
    real = ChatCollator.encode

    def counting(self, rec, *args, **kwargs):
        calls.append(1)
        return real(self, rec, *args, **kwargs)

    monkeypatch.setattr(ChatCollator, "encode", counting)
    counts = {}
    for epochs in (1, 3):
        calls.clear()
        trainer = Trainer(sft_recipe(tmp_path, f"epochs{epochs}", num_train_epochs=epochs))
        assert not calls  # every split came from the cache
        trainer.fit()
        counts[epochs] = len(calls)
    # training batches are only padded; evaluation encodes each split once, however many epochs run
    assert counts[1] == counts[3] > 0


def launch(args, env_extra=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU",)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_two_processes(tmp_path, raw: dict, name: str = "two.yaml") -> None:
    """`mmbalance train` on `raw` under 2 CPU DDP processes (accelerate_configs/ddp_cpu_2proc.yaml)."""
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    proc = launch(["--config_file", "accelerate_configs/ddp_cpu_2proc.yaml", "-m", "mmbalance_llm", "train", str(path)],
                  {"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_sft_under_two_processes_evaluates_the_whole_split_and_refuses_the_pitfall(tmp_path):
    import yaml

    from mmbalance_llm.train.trainer import Trainer

    one = Trainer(sft_recipe(tmp_path, "one", max_steps=2)).fit()
    raw = sft_recipe(tmp_path, "two", max_steps=2, per_device_train_batch_size=2)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = ["--config_file", "accelerate_configs/ddp_cpu_2proc.yaml", "-m", "mmbalance_llm", "train", str(path)]
    proc = launch(args, {"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
    assert two["world_size"] == 2 and two["distributed_type"] == "MULTI_CPU"
    # the model before training is the same in both runs: its evaluation must not depend on the process count
    before1, before2 = one["validation_before_training"], two["validation_before_training"]
    assert before2["n"] == before1["n"] == 6
    for key in before1:
        assert before2[key] == pytest.approx(before1[key], abs=1e-6), key
    rows = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert len([r for r in rows if r["split"] == "validation"]) == len(set(r["step"] for r in rows
                                                                          if r["split"] == "validation"))
    # --multi_gpu without ACCELERATE_USE_CPU: two processes that would each train alone; refused before writing
    raw["output_dir"] = str(tmp_path / "bad")
    path.write_text(yaml.safe_dump(raw))
    proc = launch(args, {"ACCELERATE_USE_CPU": "false"})
    assert proc.returncode != 0 and "each would train alone" in proc.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="no deepspeed extra")
def test_sft_under_deepspeed_zero2_matches_ddp(tmp_path):
    import yaml

    results = {}
    for name, config, env in (("ddp", "ddp_cpu_2proc.yaml", {"ACCELERATE_USE_CPU": "true"}),
                              ("zero2", "deepspeed_zero2.yaml", {})):
        raw = sft_recipe(tmp_path, name, max_steps=2, per_device_train_batch_size=2)
        raw["adapter"] = "lora"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        proc = launch(["--config_file", f"accelerate_configs/{config}", "-m", "mmbalance_llm", "train", str(path)], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "final_metrics.json").read_text())
    assert results["zero2"]["distributed_type"] == "DEEPSPEED" and results["zero2"]["world_size"] == 2
    assert results["zero2"]["validation"]["loss"] == pytest.approx(results["ddp"]["validation"]["loss"], abs=1e-5)


@pytest.mark.parametrize("family, modality", [("llava", "image"), ("qwen2_audio", "audio"), ("qwen2_vl", "image")])
def test_fast_padding_of_preprocessed_rows_equals_the_collator(tmp_path, family, modality):
    from mmbalance_llm.data.chat import ChatCollator, load_conversations
    from mmbalance_llm.data.mm_synthetic import write_instruction_set
    from mmbalance_llm.models.modality_map import get_modality_map
    from mmbalance_llm.models.tiny import tiny_model_and_processor
    from mmbalance_llm.train.tasks.sft_data import pad_rows, preprocess_split

    paths = write_instruction_set(tmp_path / "d", (modality,), 6, 1, 1, seed=3)
    recs = load_conversations(paths["train"])
    model, proc = tiny_model_and_processor(family)
    coll = ChatCollator(proc, model.config, max_length=96)
    split, keys = preprocess_split(coll, recs, "train", "train.json", {"t": family}, str(tmp_path / "cache"))
    rows = split.__getitems__(list(range(len(recs))))
    fast = pad_rows(rows, keys, coll.tok.pad_token_id or 0, get_modality_map(model).uses_mm_token_type_ids)
    direct = coll.pad([coll.encode(r) for r in recs])  # the cache holds what the collator makes
    assert fast.keys() == direct.keys()
    for k in direct:
        assert torch.equal(fast[k], direct[k]), k


def test_full_fine_tuning_best_is_self_contained_for_reliance(tmp_path):
    from mmbalance_llm.eval.reliance import load_mllm
    from mmbalance_llm.train.trainer import Trainer

    raw = sft_recipe(tmp_path, "full", max_steps=1)
    raw["adapter"] = "none"
    raw["model"]["freeze"] = {"language_model": False}
    final = Trainer(raw).fit()
    assert final["adapter"] == "none" and "test_before_training" not in final
    model, processor = load_mllm(str(tmp_path / "full" / "best"))  # what `mmbalance reliance --model` loads
    assert processor is not None and type(model).__name__ == "LlavaForConditionalGeneration"
