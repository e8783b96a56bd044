"""IMoD (CVPR 2026) as a peft method on the tiny LLaVA / Qwen2-Audio twins: the partition and the two constraints
equal the paper's formulas (and autograd), only A receives the injected gradient, save / reload / merge reproduce
the logits, zero strength is LoRA bit for bit, bad values fail in one line, and a `task: sft` recipe trains
through the Trainer and resumes exactly."""
import copy
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import mmbalance_llm  # noqa: E402,F401  (registers IMoD)
from mmbalance_llm import ImodConfig  # noqa: E402
from mmbalance_llm.adapters.imod import ImodLinear  # noqa: E402
from mmbalance_llm.adapters.imod.constraints import (NON_TEXT, SHARED, TEXT, align, constraint_grads,  # noqa: E402
                                                      decouple, layer_shared_ratio, make_partition)
from mmbalance_llm.data.chat import ChatCollator, load_conversations  # noqa: E402
from mmbalance_llm.data.mm_synthetic import write_instruction_set  # noqa: E402
from mmbalance_llm.models.tiny import tiny_model_and_processor  # noqa: E402

F = torch.nn.functional


# -- the math on a tiny layer -------------------------------------------------------------------------------------
def _tiny_layer():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    text = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)
    other = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)  # sample 1, position 4: padding
    codes = make_partition(4, 6, 1 / 3, 0.5, seed=0, key="layers.0.q_proj")
    return A, x, text, other, codes


def _paper_msdc(A, codes, x, text, other):
    """Eq. MSDC as written: ||A_T X_t - A X_t||^2 with non-text columns of X zeroed (+ the mirror), token means."""
    m = {c: (codes == c).double() for c in (TEXT, NON_TEXT, SHARED)}
    xt, xo = x * text[..., None], x * other[..., None]
    l_ts = ((xt @ (A * (m[TEXT] + m[SHARED])).T - xt @ A.T) ** 2).sum() / text.sum()
    l_os = ((xo @ (A * (m[NON_TEXT] + m[SHARED])).T - xo @ A.T) ** 2).sum() / other.sum()
    return l_ts + l_os


def _paper_maac(A, codes, x, text, other):
    """Eq. 7: L_MA = 1 - (c_t + c_o) cos(mean s_t, mean s_o) on the shared block, mean over sequences."""
    ms = (codes == SHARED).double()
    out = []
    for b in range(x.shape[0]):
        st, so = x[b][text[b]] @ (A * ms).T, x[b][other[b]] @ (A * ms).T
        mt, mo = st.mean(0), so.mean(0)
        ct = F.cosine_similarity(st, mt[None], dim=-1).mean()
        co = F.cosine_similarity(so, mo[None], dim=-1).mean()
        out.append(1 - (ct + co) * F.cosine_similarity(mt, mo, dim=0))
    return torch.stack(out).mean()


def test_partition_is_interleaved_exact_in_its_ratios_and_reproducible():
    codes = make_partition(8, 30, 0.5, 0.25, seed=3, key="layers.1.v_proj")
    n = 8 * 30
    assert int((codes == SHARED).sum()) == n // 2 and int((codes == TEXT).sum()) == round(n / 2 * 0.25)
    assert int((codes == NON_TEXT).sum()) == n - n // 2 - round(n / 2 * 0.25)
    assert not all(len(set(row.tolist())) == 1 for row in codes)  # elements, not row blocks
    state = torch.random.get_rng_state()
    assert torch.equal(codes, make_partition(8, 30, 0.5, 0.25, seed=3, key="layers.1.v_proj"))
    assert torch.equal(state, torch.random.get_rng_state())  # LoRA's init draws are untouched
    assert not torch.equal(codes, make_partition(8, 30, 0.5, 0.25, seed=3, key="layers.2.v_proj"))
    assert layer_shared_ratio(1 / 3, 0.4, 0, 32) == pytest.approx(1 / 3)
    assert layer_shared_ratio(1 / 3, 0.4, 16, 32) == pytest.approx(1 / 3 + 0.2)


def test_constraints_equal_the_paper_formulas_and_their_autograd_gradients():
    A, x, text, other, codes = _tiny_layer()
    v, g = decouple(A, codes, x.flatten(0, 1), text.flatten(), other.flatten())
    Ar = A.clone().requires_grad_()
    ref = _paper_msdc(Ar, codes, x, text, other)
    assert v.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g, torch.autograd.grad(ref, Ar)[0], rtol=1e-10, atol=1e-12)
    v, g = align(A, codes, x, text, other)
    Ar = A.clone().requires_grad_()
    ref = _paper_maac(Ar, codes, x, text, other)
    assert v.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g, torch.autograd.grad(ref, Ar)[0], rtol=1e-9, atol=1e-12)
    # gradients stay inside their blocks: MSDC touches the exclusive elements, MAAC the shared ones
    assert torch.all(decouple(A, codes, x.flatten(0, 1), text.flatten(), other.flatten())[1][codes == SHARED] == 0)
    assert torch.all(g[codes != SHARED] == 0)
    # the fused form the layers use (two matmuls over the stacked blocks) equals the two references
    vd, gd = decouple(A, codes, x.flatten(0, 1), text.flatten(), other.flatten())
    va, ga = align(A, codes, x, text, other)
    for l1, l2 in ((1.0, 1e-4), (0.5, 0.0), (0.0, 2.0)):
        fd, fa, fg = constraint_grads(A, codes, x, text, other, l1, l2)
        assert fd.item() == pytest.approx(vd.item() if l1 else 0.0)
        assert fa.item() == pytest.approx(va.item() if l2 else 0.0)
        assert torch.allclose(fg, l1 * gd + l2 * ga, rtol=1e-10, atol=1e-14)
    # no sequence with both kinds of tokens, or no media at all: the terms vanish
    none = torch.zeros_like(other)
    assert align(A, codes, x, text, none)[0].item() == 0 and not align(A, codes, x, text, none)[1].any()
    assert decouple(A, codes, x.flatten(0, 1), text.flatten(), none.flatten())[1][codes == NON_TEXT].any()


# -- the peft method on the tiny twins ----------------------------------------------------------------------------
_CACHE = {}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imoddata")
    write_instruction_set(root / "image", ("image",), 6, 2, 2, seed=1)
    write_instruction_set(root / "audio", ("audio",), 6, 2, 2, seed=2)
    return root


def family(name, data_dirs):
    """(fresh model, batch with labels: a media question and a text-only sum) for a family; build cached."""
    if name not in _CACHE:
        model, proc = tiny_model_and_processor(name)
        recs = load_conversations(data_dirs / {"llava": "image", "qwen2_audio": "audio"}[name] / "train.json")
        _CACHE[name] = (model, ChatCollator(proc, model.config)([recs[0], recs[4]]), copy.deepcopy(model.state_dict()))
    model, batch, sd = _CACHE[name]
    fresh = type(model)(model.config)
    fresh.load_state_dict(sd)
    return fresh.eval(), batch


def logits(m, batch):
    with torch.no_grad():
        return m(**batch).logits


def _a_grads(pm):
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llava", "qwen2_audio"])
def test_only_A_receives_the_injected_constraint_gradient_exactly(name, data_dirs):
    model, batch = family(name, data_dirs)
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, ImodConfig(init_lora_weights=False, lora_dropout=0.0)).train()
    cfg = pm.peft_config["default"]
    assert cfg.num_layers == 2 and cfg.modality_token_ids
    layers = [m for m in pm.modules() if isinstance(m, ImodLinear)]
    seen = {}

    def keep_input(mod, args, out):
        seen[mod] = args[0].detach()

    hooks = [m.register_forward_hook(keep_input) for m in layers]
    out = pm(**batch)
    for h in hooks:
        h.remove()
    out.loss.backward(retain_graph=True)
    task = _a_grads(pm)
    pm.zero_grad()
    (out.loss + out.imod_loss).backward()
    both = _a_grads(pm)
    mm = pm.base_model.mask_context
    assert mm.other.any() and (mm.text & mm.other).sum() == 0
    total = 0.0
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # nothing reaches B
            assert torch.equal(both[n], task[n]), n
    for mod in layers:  # A: task gradient + l1 G_MSD + l2 G_MA, from the layer's own input
        A, codes, x = mod.lora_A["default"].weight.detach(), mod.lora_imod_partition["default"].weight, seen[mod]
        vd, gd = decouple(A, codes, x.flatten(0, 1), mm.text.flatten(), mm.other.flatten())
        va, ga = align(A, codes, x, mm.text, mm.other)
        total += (cfg.decouple_weight * vd + cfg.align_weight * va).item()
        name_a = next(n for n, p in pm.named_parameters() if p is mod.lora_A["default"].weight)
        want = task[name_a] + cfg.decouple_weight * gd + cfg.align_weight * ga
        assert torch.allclose(both[name_a], want, rtol=1e-5, atol=1e-7), name_a
    assert out.imod_loss.item() == pytest.approx(total, rel=1e-5)  # its value: the weighted constraints
    # eval mode, no labels or no_grad: no constraint work at all
    pm.eval()
    assert getattr(pm(**batch), "imod_loss", None) is None
    pm.train()
    with torch.no_grad():
        assert getattr(pm(**batch), "imod_loss", None) is None
    nolab = {k: v for k, v in batch.items() if k != "labels"}
    assert getattr(pm(**nolab), "imod_loss", None) is None


def test_get_peft_model_trains_and_gradient_checkpointing_gives_the_same_update(data_dirs):
    def run(checkpointing):
        model, batch = family("llava", data_dirs)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(0)
        pm = peft.get_peft_model(model, ImodConfig(lora_dropout=0.0)).train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
        losses = []
        for _ in range(6):
            out = pm(**batch)
            (out.loss + out.imod_loss).backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.item())
        return losses, {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}

    losses, w = run(False)
    assert losses[-1] < losses[0]
    losses_ck, w_ck = run(True)
    assert losses_ck == pytest.approx(losses, rel=1e-5)
    assert all(torch.allclose(w[k], w_ck[k], rtol=1e-4, atol=1e-6) for k in w)


def test_save_reload_equal_logits_and_merge(data_dirs, tmp_path):
    model, batch = family("llava", data_dirs)
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, ImodConfig(init_lora_weights=False)).eval()
    ref = logits(pm, batch)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IMOD" and saved["num_layers"] == 2 and saved["align_weight"] == 1e-4
    base, _ = family("llava", data_dirs)
    assert not torch.allclose(logits(base, batch), ref)  # the adapter is not the identity: the test can fail
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], ImodConfig)
    assert torch.equal(logits(loaded, batch), ref)
    parts = {n: b for n, b in pm.named_buffers() if "lora_imod_partition" in n}
    assert len(parts) == 14 and all(torch.equal(b, dict(loaded.named_buffers())[n]) for n, b in parts.items())
    plain, _ = family("llava", data_dirs)
    plain.load_adapter(str(tmp_path))  # transformers' adapter loading reaches the same layers and partition
    assert sum(isinstance(m, ImodLinear) for m in plain.modules()) == 14
    assert torch.equal(logits(plain.eval(), batch), ref)
    merged = loaded.merge_and_unload()  # the forward is LoRA's: it merges into W0
    assert not any(isinstance(m, ImodLinear) for m in merged.modules())
    assert torch.allclose(logits(merged, batch), ref, atol=1e-5)


def test_hotswap_matches_from_pretrained_and_checks_the_constraint_weights(data_dirs, tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    for name, seed, kw in (("a", 1, {}), ("b", 2, {"partition_seed": 5}), ("c", 3, {"align_weight": 0.5})):
        model, batch = family("llava", data_dirs)
        torch.manual_seed(seed)
        peft.get_peft_model(model, ImodConfig(init_lora_weights=False, **kw)).save_pretrained(tmp_path / name)
    base, batch = family("llava", data_dirs)
    want = logits(peft.PeftModel.from_pretrained(base, tmp_path / "b").eval(), batch)
    base, _ = family("llava", data_dirs)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    hotswap_adapter(pm, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
    assert torch.equal(logits(pm, batch), want)
    ref = peft.PeftModel.from_pretrained(family("llava", data_dirs)[0], tmp_path / "b")
    parts = {n: b for n, b in ref.named_buffers() if "lora_imod_partition" in n}
    assert all(torch.equal(b, dict(pm.named_buffers())[n]) for n, b in parts.items())  # the partition came too
    with pytest.raises(ValueError, match="align_weight"):
        hotswap_adapter(pm, str(tmp_path / "c"), adapter_name="default", torch_device="cpu")


def test_fresh_adapter_is_the_base_model_and_zero_strength_is_plain_lora(data_dirs):
    model, batch = family("llava", data_dirs)
    base = logits(model, batch)
    torch.manual_seed(2)
    pm = peft.get_peft_model(model, ImodConfig(decouple_weight=0.0, align_weight=0.0)).train()
    assert torch.equal(logits(pm.eval(), batch), base)  # B = 0
    lora_model, _ = family("llava", data_dirs)
    torch.manual_seed(2)
    lora = peft.get_peft_model(lora_model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                           target_modules=pm.peft_config["default"].target_modules))
    wi = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    wl = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert wi.keys() == wl.keys() and all(torch.equal(wi[k], wl[k]) for k in wi)  # same init draws
    pm.train()
    assert getattr(pm(**batch), "imod_loss", None) is None  # no constraint work at zero strength


@pytest.mark.parametrize("kw, msg", [
    ({"shared_ratio": 0.8}, r"ImodConfig.shared_ratio \+ shared_ratio_growth must be <= 1"),
    ({"align_weight": -1.0}, r"ImodConfig.align_weight must be >= 0, got -1.0"),
    ({"text_ratio": 1.5}, r"ImodConfig.text_ratio must be in \[0, 1\], got 1.5"),
    ({"use_dora": True}, r"ImodConfig: use_dora / target_parameters are LoRA variants IMoD does not support"),
])
def test_bad_values_are_refused_in_one_line(kw, msg, tmp_path):
    from mmbalance_llm.config import RecipeError, load_recipe

    with pytest.raises(ValueError, match=msg):
        ImodConfig(**kw)
    raw = {"task": "sft", "output_dir": str(tmp_path / "out"), "adapter": "imod", "adapter_config": kw,
           "model": {"name_or_path": str(tmp_path / "m")}, "data": {"train": "t.json", "validation": "v.json"}}
    with pytest.raises(RecipeError, match="adapter_config: " + msg) as e:
        load_recipe(raw)  # at recipe load, before any model or file
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match=r"unknown recipe key 'adapter_config.align_wieght' for ImodConfig"):
        load_recipe({**raw, "adapter_config": {"align_wieght": 1.0}})
    lora = load_recipe({**raw, "adapter": "lora", "adapter_config": {"align_weight": 1.0, "r": 4}})
    assert lora.adapter_config == {"r": 4}  # IMoD-only keys dropped, so one recipe switches with adapter=lora


# -- through the one training loop --------------------------------------------------------------------------------
def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_sft_recipe_trains_resumes_exactly_and_zero_strength_is_the_lora_run(tmp_path):
    from test_mllm_balance import build_assets
    from test_sft_loop import sft_recipe

    from mmbalance_llm.train.trainer import Trainer

    def recipe(out, **kw):
        r = sft_recipe(tmp_path, out, **kw)
        r["adapter"] = "imod"
        r["adapter_config"] = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
        return r

    build_assets(recipe("x"))
    full = Trainer(recipe("full")).fit()
    assert full["adapter"] == "imod"
    rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(r["aux_loss"] > 0 for r in train)  # the constraint term is in every step
    assert Trainer(recipe("part", stop_after_steps=6, save_steps=2)).fit() is None  # epoch 2, batch 2 of 4
    assert Trainer(recipe("part", resume_from_checkpoint="latest")).fit() == full
    a, b = _weights(tmp_path / "full" / "best"), _weights(tmp_path / "part" / "best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_imod_partition" in k for k in a)
    # zero strength: the LoRA run, bit for bit
    zero = recipe("zero", max_steps=3)
    zero["adapter_config"].update(decouple_weight=0.0, align_weight=0.0)
    lora = {**recipe("lora", max_steps=3), "adapter": "lora"}
    fz, fl = Trainer(zero).fit(), Trainer(lora).fit()
    assert {**fz, "adapter": "lora"} == fl
    wz, wl = _weights(tmp_path / "zero" / "best"), _weights(tmp_path / "lora" / "best")
    assert {k for k in wz if "partition" not in k} == wl.keys() and all(torch.equal(wz[k], wl[k]) for k in wl)


def test_shipped_imod_recipes_load_and_switch_to_lora():
    from mmbalance_llm.config import load_recipe

    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    for name in ("llava/imod.yaml", "llava/imod_tiny.yaml", "qwen2_audio/imod.yaml", "qwen2_audio/imod_tiny.yaml"):
        cfg = load_recipe(os.path.join(root, name))
        assert cfg.adapter == "imod" and cfg.adapter_config["align_weight"] == 1e-4
        lora = load_recipe(os.path.join(root, name), ["adapter=lora"])
        assert lora.adapter == "lora" and "decouple_weight" not in lora.adapter_config


@pytest.mark.slow
def test_imod_sft_under_two_cpu_processes(tmp_path):
    """2-process CPU DDP: the constraint term goes through the loss, so DDP averages its gradient like the task's;
    before training both process counts evaluate the same model."""
    from test_sft_loop import sft_recipe, train_two_processes

    from mmbalance_llm.train.trainer import Trainer

    def recipe(out, **kw):
        r = sft_recipe(tmp_path, out, max_steps=2, **kw)
        r.update(adapter="imod", adapter_config={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
        return r

    one = Trainer(recipe("one")).fit()
    train_two_processes(tmp_path, recipe("two", per_device_train_batch_size=2))
    two = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
    assert two["world_size"] == 2 and two["adapter"] == "imod"
    for key, v in one["validation_before_training"].items():
        assert two["validation_before_training"][key] == pytest.approx(v, abs=1e-6), key
    rows = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert all(r["aux_loss"] > 0 for r in rows if r["split"] == "train")
    assert any("lora_imod_partition" in k for k in _weights(tmp_path / "two" / "best"))
