"""MokA outside ``PeftModel``: transformers' adapter loading, peft's hotswap / mixed model / model card, weighted
combination, ``layers_to_transform``, LoRA conversion, and loading onto the wrong base (tiny LLaVA on disk)."""
import json
import os
import pickle
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import mmbalance_llm  # noqa: E402,F401  (registers MokA)
from mmbalance_llm import MokaConfig  # noqa: E402
from mmbalance_llm.adapters.moka import MokaLinear  # noqa: E402
from mmbalance_llm.adapters.moka.masks import MokaMaskContext, question_mask  # noqa: E402
from mmbalance_llm.data.chat import ChatCollator, load_conversations  # noqa: E402
from mmbalance_llm.data.mm_synthetic import write_instruction_set  # noqa: E402
from mmbalance_llm.models.modality_map import MODALITY_IDS  # noqa: E402
from mmbalance_llm.models.tiny import build_tiny, tiny_model_and_processor  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny LLaVA saved to disk, a batch with an image + question, and two saved MokA adapters."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("mokapeft")
    base_dir = build_tiny("llava", root / "base")
    write_instruction_set(root / "data", ("image",), 6, 2, 2, seed=1)
    proc = AutoProcessor.from_pretrained(base_dir)
    base = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
    recs = load_conversations(root / "data" / "train.json")
    batch = ChatCollator(proc, base.config)([recs[0], recs[4]])
    for name, seed in (("ad1", 1), ("ad2", 2)):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(LlavaForConditionalGeneration.from_pretrained(base_dir),
                                 MokaConfig(init_lora_weights=False))
        pm.save_pretrained(root / name)
    return {"root": root, "base_dir": base_dir, "proc": proc, "batch": batch,
            "base_logits": logits(base, batch)}


def load_base(env):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(env["base_dir"]).eval()


def logits(m, batch):
    with torch.no_grad():
        return m(**batch).logits


def peft_logits(env, name):
    return logits(peft.PeftModel.from_pretrained(load_base(env), env["root"] / name).eval(), env["batch"])


def test_peft_type_answers_like_a_peft_type_member(env):
    import yaml

    c = MokaConfig()
    assert c.peft_type == "MOKA" and c.peft_type.value == "MOKA" and c.peft_type.name == "MOKA"
    assert hash(c.peft_type) == hash("MOKA") and {"MOKA": 1}[c.peft_type] == 1
    d = c.to_dict()
    assert type(d["peft_type"]) is str and yaml.safe_load(yaml.safe_dump(d))["peft_type"] == "MOKA"
    assert pickle.loads(pickle.dumps(c)).peft_type.value == "MOKA"
    assert json.loads((env["root"] / "ad1" / "adapter_config.json").read_text())["peft_type"] == "MOKA"
    loaded = peft.PeftConfig.from_pretrained(env["root"] / "ad1")
    assert isinstance(loaded, MokaConfig) and loaded.peft_type.value == "MOKA"


def test_transformers_load_adapter_and_auto_class_match_peft_model(env):
    from transformers import AutoModelForImageTextToText

    ref = peft_logits(env, "ad1")
    assert not torch.allclose(ref, env["base_logits"])  # the adapter is not the identity: the test can fail
    m = load_base(env)
    m.load_adapter(str(env["root"] / "ad1"))
    assert torch.equal(logits(m, env["batch"]), ref)
    auto = AutoModelForImageTextToText.from_pretrained(env["root"] / "ad1").eval()
    assert sum(isinstance(x, MokaLinear) for x in auto.modules()) == 14
    assert torch.equal(logits(auto, env["batch"]), ref)


def test_hotswap_adapter_matches_peft_model_and_checks_moka_fields(env, tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    pm = peft.PeftModel.from_pretrained(load_base(env), env["root"] / "ad1").eval()
    hotswap_adapter(pm, str(env["root"] / "ad2"), adapter_name="default", torch_device="cpu")
    assert torch.equal(logits(pm, env["batch"]), peft_logits(env, "ad2"))
    other = peft.get_peft_model(load_base(env), MokaConfig(init_lora_weights=False, cross_attention_weight=0.5))
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cross_attention_weight"):
        hotswap_adapter(pm, str(tmp_path), adapter_name="default", torch_device="cpu")


def test_mixed_model_refuses_in_one_line_and_model_card_is_written(env):
    import yaml

    with pytest.raises(ValueError, match="MOKA is not supported for mixed models"):
        peft.PeftMixedModel.from_pretrained(load_base(env), env["root"] / "ad1")
    card = (env["root"] / "ad1" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == str(env["base_dir"])


@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_add_weighted_adapter_with_cross_attention_refused(env, how):
    pm = peft.PeftModel.from_pretrained(load_base(env), env["root"] / "ad1")
    pm.load_adapter(env["root"] / "ad2", adapter_name="two")
    with pytest.raises(ValueError, match="cannot be combined with add_weighted_adapter except"):
        pm.add_weighted_adapter(["default", "two"], [0.5, 0.5], "mix", combination_type=how)
    assert "mix" not in pm.peft_config


def test_add_weighted_adapter_cat_without_cross_attention_is_exact(env):
    torch.manual_seed(3)
    cfg = dict(init_lora_weights=False, cross_attention_weight=0.0, lora_dropout=0.0)
    pm = peft.get_peft_model(load_base(env), MokaConfig(r=4, lora_alpha=16, **cfg))
    pm.add_adapter("two", MokaConfig(r=2, lora_alpha=4, **cfg))
    pm.add_weighted_adapter(["default", "two"], [0.7, -0.2], "mix", combination_type="cat")
    pm.eval()
    layer = next(m for n, m in pm.named_modules() if isinstance(m, MokaLinear) and n.endswith("layers.1.mlp.up_proj"))
    seen = {}
    hook = layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach()))  # returns None
    with torch.no_grad():
        pm(**env["batch"])
    hook.remove()
    x = seen["x"]
    with torch.no_grad():
        mixed = layer.moka_delta(x, "mix")
        want = 0.7 * layer.moka_delta(x, "default") - 0.2 * layer.moka_delta(x, "two")
    assert mixed.abs().max() > 0 and torch.allclose(mixed, want, atol=1e-5)
    # the image rows use the combined per-modality A (not a fresh init), text rows the combined text A
    assert torch.equal(layer.lora_moka_A_image["mix"].weight[:4], layer.lora_moka_A_image["default"].weight)


def test_layers_to_transform_with_default_targets_saves_and_reloads(env, tmp_path):
    pm = peft.get_peft_model(load_base(env), MokaConfig(init_lora_weights=False, layers_to_transform=[1])).eval()
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, MokaLinear)]
    assert len(wrapped) == 7 and all(".layers.1." in n for n in wrapped)
    ref = logits(pm, env["batch"])
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] is None and ".(1)." in cfg["target_modules"].replace("\\", "")
    loaded = peft.PeftModel.from_pretrained(load_base(env), tmp_path).eval()
    assert torch.equal(logits(loaded, env["batch"]), ref)


def test_lora_conversion_reported_truthfully(env):
    from peft.tuners.lora.conversion import convert_to_lora

    pm = peft.PeftModel.from_pretrained(load_base(env), env["root"] / "ad1")
    assert pm.supports_lora_conversion() is False
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(pm, rank=4)


def test_loading_onto_a_base_with_other_modalities_or_token_ids_is_refused(env):
    audio, _ = tiny_model_and_processor("qwen2_audio")
    with pytest.raises(ValueError, match="an A for 'image', which model_type 'qwen2_audio' does not accept"):
        peft.PeftModel.from_pretrained(audio, env["root"] / "ad1")
    base = load_base(env)
    cfg = base.config
    cfg.image_token_id += 1
    shifted = type(base)(cfg)
    with pytest.raises(ValueError, match="modality_token_ids: the adapter's image token id is"):
        peft.PeftModel.from_pretrained(shifted, env["root"] / "ad1")
    saved = json.loads((env["root"] / "ad1" / "adapter_config.json").read_text())
    assert saved["modality_token_ids"] == {"image": cfg.image_token_id - 1}


def test_question_mask_with_answer_marker_when_labels_cover_the_prompt():
    # ids: 0 text, 1 image; marker [7, 8] opens the answer; labels supervise every token (TRL messages)
    input_ids = torch.tensor([[5, 9, 9, 3, 4, 7, 8, 6, 2]])
    mod = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 0]])
    labels = input_ids.clone()
    assert question_mask(mod, labels, None)[0].sum() == 0  # without a marker: no question tokens
    q = question_mask(mod, labels, None, input_ids=input_ids, answer_marker=[7, 8])
    assert q[0].nonzero().flatten().tolist() == [3, 4, 5, 6]  # after the media, through the header
    # a marker before the media does not count; prompt-masked labels ignore the marker
    assert question_mask(mod, labels, None, input_ids=torch.tensor([[7, 8, 9, 3, 4, 5, 5, 6, 2]]),
                         answer_marker=[7, 8])[0].sum() == 0
    masked = torch.full_like(labels, -100)
    masked[0, 7:] = labels[0, 7:]
    assert question_mask(mod, masked, None, input_ids=input_ids, answer_marker=[7, 8]).equal(
        question_mask(mod, masked, None))


def test_no_question_tokens_warn_once(env):
    b = env["batch"]
    full = {**b, "labels": torch.where(b["attention_mask"].bool(), b["input_ids"], -100)}
    ctx = MokaMaskContext(load_base(env).config)
    with pytest.warns(UserWarning, match=r"MokA: 2 of 2 samples with media tokens have no question tokens"):
        ctx.update(full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctx.update(full)  # once per model
        MokaMaskContext(ctx.model_config).update(b)  # prompt-masked labels: question found, no warning


def test_answer_marker_ids_from_the_chat_template(env):
    from mmbalance_llm.adapters.moka import answer_marker_ids

    tok = env["proc"].tokenizer
    ids = answer_marker_ids(env["proc"])
    assert tok.decode(ids).strip() == "ASSISTANT:"
    b = env["batch"]
    full = torch.where(b["attention_mask"].bool(), b["input_ids"], -100)
    mod = (b["input_ids"] == load_base(env).config.image_token_id).long() * MODALITY_IDS["image"]
    # on the project's own collation the marker rule finds exactly the prompt-masked question span
    assert question_mask(mod, full, b["attention_mask"], input_ids=b["input_ids"], answer_marker=ids)[0].equal(
        question_mask(mod, b["labels"], b["attention_mask"])[0])


def test_answer_marker_ids_on_a_qwen_template():
    from mmbalance_llm.adapters.moka import answer_marker_ids

    _, proc = tiny_model_and_processor("qwen2_audio")
    assert proc.tokenizer.decode(answer_marker_ids(proc)) == "<|im_start|>assistant\n"


def _trl_dataset(env):
    from datasets import Dataset
    from PIL import Image

    recs = load_conversations(env["root"] / "data" / "train.json")[:4]
    msgs = [[{"role": m["role"], "content": m["content"].replace("<image>", "")} for m in r["messages"]] for r in recs]
    return Dataset.from_dict({"messages": msgs, "images": [[Image.open(r["images"][0]).convert("RGB")] for r in recs]})


def _trl_trainer(env, tmp_path, config):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=None, learning_rate=1e-2, disable_tqdm=True,
                     bf16=False)  # no autocast wrapper left on forward, so outputs compare exactly
    tr = SFTTrainer(model=load_base(env), args=args, train_dataset=_trl_dataset(env), processing_class=env["proc"],
                    peft_config=config)
    seen = []
    ctx = tr.model.base_model.mask_context
    update = ctx.update

    def spy(batch):
        update(batch)
        seen.append((batch["input_ids"], ctx._cross.get(MODALITY_IDS["image"])))

    ctx.update = spy
    return tr, seen


def test_trl_sft_trainer_on_messages_finds_the_question_from_the_chat_template(env, tmp_path):
    pytest.importorskip("trl")
    from mmbalance_llm.adapters.moka import answer_marker_ids

    tr, seen = _trl_trainer(env, tmp_path, MokaConfig(answer_marker_ids=answer_marker_ids(env["proc"])))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="MokA:")
        tr.train()
    ids, ci = seen[0]
    q = ids[0, ci.q_idx[0][ci.q_valid[0]]]
    text = env["proc"].tokenizer.decode(q).strip()
    assert text.endswith("Answer with one word. ASSISTANT:") and "<image>" not in text
    tr.model.save_pretrained(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["answer_marker_ids"]
    dtypes = {p.dtype for p in tr.model.parameters()}
    loaded = peft.PeftModel.from_pretrained(load_base(env), tmp_path / "ad").eval()
    assert dtypes == {torch.float32}, dtypes
    out = logits(loaded, env["batch"])
    assert torch.equal(out, logits(tr.model.eval(), env["batch"])) and not torch.allclose(out, env["base_logits"])


def test_trl_sft_trainer_without_marker_warns_that_cross_attention_is_off(env, tmp_path):
    pytest.importorskip("trl")
    tr, seen = _trl_trainer(env, tmp_path, MokaConfig())
    with pytest.warns(UserWarning, match="have no question tokens"):
        tr.train()
    assert seen[0][1].q_valid.sum() == 0


@pytest.mark.slow
def test_peft_generic_harness_from_the_sdist():
    """peft's own ``PeftCommonTester`` (not in the wheel): runs when PEFT_SDIST names the sdist, else skips."""
    import importlib.util
    from pathlib import Path

    sdist = os.environ.get("PEFT_SDIST")
    if not sdist or not os.path.exists(sdist):
        pytest.skip(f"set PEFT_SDIST to peft-{peft.__version__}.tar.gz "
                    f"(pip download --no-binary :all: --no-deps peft=={peft.__version__})")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peft_harness_moka.py"
    spec = importlib.util.spec_from_file_location("peft_harness_moka", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(mod.harness_dir(sdist))
    failed = [r["check"] + ": " + r["why"] for r in rows if r["outcome"] == "fail"]
    assert not failed, failed
    assert sum(r["outcome"] == "pass" for r in rows) >= 30
