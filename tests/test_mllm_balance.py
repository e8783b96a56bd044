"""MLLM balancers on the tiny LLaVA twin (task sft): zero strength is the plain run bit for bit, the contrast
term and the OGM coefficients act, and the token-masked gradient scaling is exact (LoRA and MokA's A_m)."""
import json
import math

import pytest

torch = pytest.importorskip("torch")

from test_sft_loop import _adapter_weights, sft_recipe  # noqa: E402


def build_assets(raw):
    """Build the tiny twin and its data before the runs under comparison: building them inside a Trainer draws
    from the global RNG after the run's seed is set, so a cold first run starts from other adapter weights."""
    from mmbalance_llm.config import load_recipe
    from mmbalance_llm.train.tasks import make_task

    make_task(load_recipe(raw)).prepare_assets()


def _run(tmp_path, name, balance, **kw):
    from mmbalance_llm.train.trainer import Trainer

    raw = sft_recipe(tmp_path, name, max_steps=3)
    build_assets(raw)
    raw["balance"] = balance
    raw.update(kw)
    final = Trainer(raw).fit()
    rows = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
    return final, _adapter_weights(tmp_path / name / "best"), [r for r in rows if r["split"] == "train"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_strength_reproduces_the_plain_run_bit_for_bit(tmp_path):
    plain, w_plain, _ = _run(tmp_path, "none", {"method": "none"})
    for name, balance in (("contrast0", {"method": "mllm_contrast", "weight": 0.0}),
                          ("ogm0", {"method": "mllm_ogm", "alpha": 0.0})):
        final, w, rows = _run(tmp_path, name, balance)
        assert _same(w, w_plain), name
        assert {**final, "method": "none"} == plain, name
        assert all("coeff_text" not in r and "contrast_loss" not in r for r in rows)


def test_contrast_adds_the_margin_hinge_and_changes_the_update(tmp_path):
    _, w_plain, plain_rows = _run(tmp_path, "none", {"method": "none"})
    _, w, rows = _run(tmp_path, "contrast", {"method": "mllm_contrast", "weight": 1.0, "target_margin": 1.0})
    assert not _same(w, w_plain)
    first = rows[0]
    # step 1 starts from the same weights: the logged loss is the plain LM loss plus weight * hinge
    assert first["contrast_loss"] == pytest.approx(max(0.0, 1.0 - first["margin_image"]), abs=1e-5)
    assert first["loss"] == pytest.approx(plain_rows[0]["loss"] + first["contrast_loss"], abs=1e-4)
    _, _, drop_rows = _run(tmp_path, "contrast_drop", {"method": "mllm_contrast", "removal": "drop"})
    assert "margin_image" in drop_rows[0]


def test_ogm_coefficients_follow_the_official_rule():
    from mmbalance_llm.balance.mllm_ogm import contribution_coefficients

    k = contribution_coefficients(torch.tensor([2.0, 1.0]), 0.8)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.8 * 2.0), 1.0])
    # contributions that are both <= 0 are clamped equal: nobody dominates
    assert contribution_coefficients(torch.tensor([-0.3, -0.1]), 0.8).tolist() == [1.0, 1.0]
    assert contribution_coefficients(torch.tensor([2.0, 1.0]), 0.0).tolist() == [1.0, 1.0]


def test_ogm_logs_contributions_and_coefficients_and_refuses_bad_settings(tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    _, w_plain, _ = _run(tmp_path, "none", {"method": "none"}, adapter="lora")
    _, w, rows = _run(tmp_path, "ogm", {"method": "mllm_ogm", "alpha": 0.8}, adapter="lora")
    assert all({"contrib_text", "contrib_image", "coeff_text", "coeff_image"} <= set(r) for r in rows)
    assert any(min(r["coeff_text"], r["coeff_image"]) < 1 for r in rows)
    assert not _same(w, w_plain)
    for r in rows:  # at most the dominant modality is slowed down
        assert max(r["coeff_text"], r["coeff_image"]) == 1.0
    bad = sft_recipe(tmp_path, "bad")
    bad["balance"] = {"method": "mllm_ogm", "removal": "cut"}
    with pytest.raises(ValueError, match="balance.removal"):
        Trainer(bad)
    bad["balance"] = {"method": "mllm_ogm"}
    bad["adapter"] = "none"
    with pytest.raises(ValueError, match="no trainable parameter"):  # every part frozen, no adapter
        Trainer(bad)
    bad["model"] = {**bad["model"], "freeze": {"language_model": False}}
    with pytest.raises(ValueError, match="no adapter"):
        Trainer(bad)
    from mmbalance_llm.balance import method_class

    assert method_class("mllm_ogm").tasks == method_class("mllm_contrast").tasks == ("sft",)


def _tiny_lora(d=5, r=3, seed=0):
    import peft

    torch.manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d, d)

        def forward(self, x):
            return self.lin(x)

    return peft.get_peft_model(Tiny(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"],
                                                        init_lora_weights=False))


def test_token_masked_scaling_scales_exactly_the_positions_gradient():
    from mmbalance_llm.balance._mllm import AdapterGradScale
    from mmbalance_llm.eval.mllm_diagnostics import GradientSplit

    net = _tiny_lora()
    x, c = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    masks = {"text": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]]).bool()}
    masks["image"] = ~masks["text"]
    A = next(p for n, p in net.named_parameters() if "lora_A" in n)
    B = next(p for n, p in net.named_parameters() if "lora_B" in n)
    with GradientSplit(net, ["text", "image"]) as gs:  # unscaled per-modality parts of A's gradient
        gs.set_masks(masks)
        (net(x) * c).sum().backward()
    parts = {m: next(G for n, G in gs.G[m].items() if "lora_A" in n) for m in gs.G}
    parts_b = {m: next(G for n, G in gs.G[m].items() if "lora_B" in n) for m in gs.G}
    net.zero_grad()
    scaler = AdapterGradScale(net)
    scaler.arm(masks)
    out = net(x)
    scaler.set_coeffs({"image": 0.25, "text": 1.0})  # set after the forward: read at backward time
    (out * c).sum().backward()
    assert torch.allclose(A.grad, parts["text"] + 0.25 * parts["image"], atol=1e-6)
    assert torch.allclose(B.grad, parts_b["text"] + 0.25 * parts_b["image"], atol=1e-6)
    scaler.remove()


def test_mllm_ogm_scales_mokas_per_modality_a_by_exactly_the_coefficient(tmp_path):
    from mmbalance_llm.balance._mllm import AdapterGradScale
    from mmbalance_llm.models.modality_map import modality_masks
    from mmbalance_llm.train.trainer import Trainer

    raw = sft_recipe(tmp_path, "moka")
    build_assets(raw)
    trainer = Trainer(raw)
    net = trainer.accelerator.unwrap_model(trainer.model)
    for n, p in net.named_parameters():
        if "lora_B" in n:  # B at zero gives A no gradient at all
            torch.nn.init.normal_(p, std=0.1)
    batch = next(iter(trainer.train_loader))
    masks = modality_masks(batch, net)

    def a_image_grads(k):
        net.zero_grad(set_to_none=True)
        scaler = AdapterGradScale(net)
        scaler.arm(masks)
        scaler.set_coeffs({"image": k})
        net(**batch).loss.backward()
        scaler.remove()
        return [p.grad.clone() for n, p in net.named_parameters() if "lora_moka_A_image" in n]

    full, half = a_image_grads(1.0), a_image_grads(0.5)
    assert full and sum(bool(g.abs().sum() > 0) for g in full) >= len(full) // 2
    assert all(torch.allclose(h, 0.5 * f, rtol=1e-5, atol=1e-8) for f, h in zip(full, half))


@pytest.mark.slow
@pytest.mark.parametrize("balance,keys", [
    ({"method": "mllm_ogm", "alpha": 0.8}, ("contrib_text", "contrib_image", "coeff_text", "coeff_image")),
    ({"method": "mllm_contrast", "weight": 1.0}, ("margin_image", "contrast_loss"))])
def test_mllm_methods_under_two_processes_match_one(tmp_path, balance, keys):
    """2 CPU processes x 2 samples see the same statistics (OGM: contributions and coefficients summed over ranks;
    contrast: the logged margins and hinge, summed over ranks) and diagnostics as 1 process x 4."""
    from test_sft_loop import train_two_processes

    from mmbalance_llm.train.trainer import Trainer

    def recipe(name, **train):
        raw = sft_recipe(tmp_path, name, max_steps=2, **train)
        raw["balance"] = dict(balance)
        raw["eval"] = {"diagnostics_max_samples": 4}
        return raw

    build_assets(recipe("one"))
    Trainer(recipe("one")).fit()
    train_two_processes(tmp_path, recipe("two", per_device_train_batch_size=2))
    one, two = ([json.loads(x) for x in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two"))
    t1, t2 = ([r for r in rows if r["split"] == "train"] for rows in (one, two))
    for key in keys:
        assert t2[0][key] == pytest.approx(t1[0][key], abs=1e-4), key  # same weights, same 4 samples
    v1, v2 = one[0], two[0]  # before training: the diagnostics cannot depend on the process count
    for key in v1:
        if key.startswith("diagnostics/"):
            assert v2[key] == pytest.approx(v1[key], abs=1e-4), key


@pytest.mark.parametrize("balance,key", [({"method": "mllm_ogm", "alpha": 0.8, "every_n_steps": 2}, "coeff_text"),
                                         ({"method": "mllm_contrast", "weight": 1.0, "every_n_steps": 2},
                                          "contrast_loss")])
def test_mllm_methods_with_sparse_measurements_resume_exactly(tmp_path, balance, key):
    """every_n_steps 2: a run stopped at an odd step resumes exactly (OGM: with the checkpointed coefficients)."""
    from mmbalance_llm.train.trainer import Trainer

    def recipe(name, **train):
        raw = sft_recipe(tmp_path, name, **train)
        raw["balance"] = dict(balance)
        return raw

    build_assets(recipe("full"))
    full = Trainer(recipe("full")).fit()
    assert Trainer(recipe("part", stop_after_steps=3)).fit() is None
    resumed = Trainer(recipe("part", resume_from_checkpoint="latest")).fit()
    assert resumed == full
    assert _same(_adapter_weights(tmp_path / "full" / "best"), _adapter_weights(tmp_path / "part" / "best"))
    rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl") if '"train"' in x]
    assert [key in r for r in rows] == [s % 2 == 1 for s in range(1, len(rows) + 1)]
