"""MokA as a peft method on tiny LLaVA / Qwen2-VL / Qwen2.5-VL / Qwen2-Audio twins (real HF classes, real peft)."""
import copy
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import mmbalance_llm  # noqa: E402,F401  (registers MokA)
from mmbalance_llm import MokaConfig  # noqa: E402
from mmbalance_llm.adapters.moka import MokaLinear, check_peft_version  # noqa: E402
from mmbalance_llm.adapters.moka.masks import question_mask  # noqa: E402
from mmbalance_llm.data.chat import ChatCollator, load_conversations  # noqa: E402
from mmbalance_llm.data.mm_synthetic import write_instruction_set  # noqa: E402
from mmbalance_llm.models.modality_map import MODALITY_IDS  # noqa: E402
from mmbalance_llm.models.tiny import tiny_model_and_processor  # noqa: E402

FAMILIES = {"llava": "image", "qwen2_vl": "image", "qwen2_5_vl": "image", "qwen2_audio": "audio"}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdata")
    write_instruction_set(root / "image", ("image",), 6, 2, 2, seed=1)
    write_instruction_set(root / "audio", ("audio",), 6, 2, 2, seed=2)
    return root


_CACHE = {}


def family(name, data_dirs):
    """(fresh model, processor, batch with labels, base state dict) for a family; the build is cached."""
    if name not in _CACHE:
        model, proc = tiny_model_and_processor(name)
        recs = load_conversations(data_dirs / FAMILIES[name] / "train.json")
        # samples 0 (media question) and 4 (text-only sum): distinct lengths, so padding is exercised
        batch = ChatCollator(proc, model.config)([recs[0], recs[4]])
        _CACHE[name] = (model, proc, batch, copy.deepcopy(model.state_dict()))
    model, proc, batch, sd = _CACHE[name]
    fresh = type(model)(model.config)
    fresh.load_state_dict(sd)
    return fresh.eval(), proc, batch


def logits(m, batch):
    with torch.no_grad():
        return m(**batch).logits


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "qwen2_audio"])
def test_round_trip_plain_peft_from_pretrained(name, data_dirs, tmp_path):
    model, _, batch = family(name, data_dirs)
    pm = peft.get_peft_model(model, MokaConfig(init_lora_weights=False)).eval()
    out = logits(pm, batch)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MOKA" and cfg["modalities"] == [FAMILIES[name]] + (["video"] if "vl" in name else [])
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(f"lora_moka_A_{FAMILIES[name]}" in k for k in keys)
    base, _, _ = family(name, data_dirs)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert isinstance(loaded.base_model, mmbalance_llm.MokaModel)
    assert torch.equal(logits(loaded, batch), out)


def test_from_pretrained_in_fresh_process_after_plain_import(data_dirs, tmp_path):
    """`import mmbalance_llm` then `import peft` (registration by the post-import hook) loads MOKA exactly."""
    model, _, batch = family("llava", data_dirs)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    pm = peft.get_peft_model(model, MokaConfig(init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "ad")
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    torch.save(logits(pm, batch), tmp_path / "ref.pt")
    code = f"""
import mmbalance_llm, sys, torch
assert 'peft' not in sys.modules
from peft import PeftModel
from transformers import LlavaForConditionalGeneration
base = LlavaForConditionalGeneration.from_pretrained({str(base_dir)!r})
pm = PeftModel.from_pretrained(base, {str(tmp_path / 'ad')!r}).eval()
b = torch.load({str(tmp_path / 'batch.pt')!r})
with torch.no_grad():
    print('MAXDIFF', (pm(**b).logits - torch.load({str(tmp_path / 'ref.pt')!r})).abs().max().item())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "MAXDIFF 0.0" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_config_zero_B_equals_base_and_targets_only_lm(name, data_dirs):
    model, _, batch = family(name, data_dirs)
    ref = logits(model, batch)
    pm = peft.get_peft_model(model, MokaConfig()).eval()
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, MokaLinear)]
    n_layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == 7 * n_layers and all(".language_model." in n for n in wrapped)
    assert torch.equal(logits(pm, batch), ref)  # B starts at zero -> exactly the base model


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_parameter_count_matches_formula(name, data_dirs):
    model, _, _ = family(name, data_dirs)
    r = 4
    pm = peft.get_peft_model(model, MokaConfig(r=r))
    n_mod = len(pm.peft_config["default"].modalities)
    expected = 0
    for m in pm.modules():
        if isinstance(m, MokaLinear):
            expected += (1 + n_mod) * r * m.in_features + r * m.out_features
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == expected
    lora = peft.get_peft_model(family(name, data_dirs)[0], peft.LoraConfig(
        r=r, target_modules=pm.peft_config["default"].target_modules))
    lora_n = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable - lora_n == n_mod * r * sum(m.in_features for m in pm.modules() if isinstance(m, MokaLinear))


def _layer_and_input(pm, batch):
    """A MokA q_proj in layer 0 and the hidden states it received in a forward."""
    layer = next(m for n, m in pm.named_modules() if isinstance(m, MokaLinear) and n.endswith("layers.0.self_attn.q_proj"))
    seen = {}
    h = layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach()))  # None: output kept
    with torch.no_grad():
        pm(**batch)
    h.remove()
    return layer, seen["x"]


@pytest.mark.parametrize("name", ["llava", "qwen2_audio"])
def test_each_A_gets_gradient_only_from_its_own_modality(name, data_dirs):
    model, _, batch = family(name, data_dirs)
    mod = FAMILIES[name]
    pm = peft.get_peft_model(model, MokaConfig(init_lora_weights=False, cross_attention_weight=0.0, lora_dropout=0.0))
    layer, x = _layer_and_input(pm, batch)
    ids = pm.base_model.mask_context.mod_ids
    is_m = (ids == MODALITY_IDS[mod]) & batch["attention_mask"].bool()
    is_t = (ids == 0) & batch["attention_mask"].bool()
    A_t, A_m = layer.lora_A["default"].weight, getattr(layer, f"lora_moka_A_{mod}")["default"].weight

    def grads(rows):
        pm.zero_grad(set_to_none=True)
        (layer(x)[rows]).pow(2).sum().backward()
        return [g if g is not None else torch.zeros_like(w) for g, w in ((A_t.grad, A_t), (A_m.grad, A_m))]

    g_t, g_m = grads(is_t)
    assert g_t.abs().sum() > 0 and g_m.abs().sum() == 0
    g_t, g_m = grads(is_m)
    assert g_m.abs().sum() > 0 and g_t.abs().sum() == 0
    # with the loss on every row, A_m's gradient still depends on the modality's rows only
    pm.zero_grad(set_to_none=True)
    layer(x).pow(2).sum().backward()
    ref = A_m.grad.clone()
    pm.zero_grad(set_to_none=True)
    layer(torch.where(is_m[..., None], x, torch.randn_like(x))).pow(2).sum().backward()
    assert ref.abs().sum() > 0 and torch.allclose(A_m.grad, ref, atol=1e-6)


def test_cross_attention_never_sees_answer_tokens(data_dirs):
    model, _, batch = family("llava", data_dirs)
    pm = peft.get_peft_model(model, MokaConfig(init_lora_weights=False, cross_attention_weight=1.0)).eval()
    ref = logits(pm, batch)
    ans = batch["labels"] != -100
    first = torch.where(ans, torch.arange(ans.shape[1]), 10**6).min(1).values
    pre = torch.arange(ans.shape[1])[None] < first[:, None]
    changed = dict(batch)
    changed["input_ids"] = torch.where(ans, (batch["input_ids"] + 7) % 300 + 20, batch["input_ids"])
    # nothing before the first answer token may change when the answer changes
    assert torch.equal(logits(pm, changed)[pre], ref[pre])
    # ... while the question (after the image) does flow back into the image rows: the test can fail
    ids = pm.base_model.mask_context.mod_ids
    q = question_mask(ids, batch["labels"], batch["attention_mask"])
    img = ids == MODALITY_IDS["image"]
    changed = dict(batch)
    changed["input_ids"] = torch.where(q, (batch["input_ids"] + 7) % 300 + 20, batch["input_ids"])
    assert not torch.allclose(logits(pm, changed)[img], ref[img])


def test_question_mask_excludes_answers_media_and_padding():
    T = 10
    ids = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    labels = torch.full((1, T), -100)
    labels[0, 6:8] = 5
    am = torch.ones(1, T, dtype=torch.long)
    am[0, 9] = 0
    assert question_mask(ids, labels, am)[0].nonzero().flatten().tolist() == [3, 4, 5]
    assert question_mask(ids, None, am)[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8]
    assert question_mask(ids, labels, am, after_media=False)[0].nonzero().flatten().tolist() == [0, 3, 4, 5]


def test_gradient_checkpointing_gives_same_gradients(data_dirs):
    grads = []
    for ckpt in (False, True):
        model, _, batch = family("llava", data_dirs)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        pm = peft.get_peft_model(model, MokaConfig(init_lora_weights=False, lora_dropout=0.0))
        pm.train()
        torch.manual_seed(0)
        pm(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "moka_A_image" in n)


def test_generate_decode_steps_are_text_and_merge_is_refused(data_dirs):
    model, proc, _ = family("llava", data_dirs)
    recs = load_conversations(data_dirs / "image" / "train.json")
    coll = ChatCollator(proc, model.config, padding_side="left")
    enc = coll.pad([coll.encode(r, add_answer=False) for r in recs[:2]])
    enc.pop("labels")
    pm = peft.get_peft_model(model, MokaConfig(init_lora_weights=False)).eval()
    steps = []
    orig = pm.base_model.mask_context.update
    pm.base_model.mask_context.update = lambda b: (orig(b), steps.append(pm.base_model.mask_context.decode))
    out = pm.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    assert steps[0] is False and all(steps[1:]) and len(steps) == 3
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()


def test_config_validation_and_peft_pin():
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        MokaConfig(modalities=["smell"])
    with pytest.raises(ImportError, match=r"peft>=0.21,<0.22"):
        check_peft_version("0.16.0")
    check_peft_version("0.21.2")
    c = MokaConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.cross_attention_weight) == (4, 16, 0.05, 1.0)
    assert c.to_dict()["peft_type"] == "MOKA"
