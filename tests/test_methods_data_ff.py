"""Data-stage and feed-forward balancers: sample_valuation, modality_valuation, opm, mla, amco, greedy.

Mechanism tests on constructed cases, zero-strength invariance where a method has a strength, and an
end-to-end table on the tiny synthetic presets (2 and 3 modalities)."""
from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch

from mmbalance_llm.balance import available_methods, get_method
from mmbalance_llm.balance.base import TrainContext

SIX = ["sample_valuation", "modality_valuation", "opm", "mla", "amco", "greedy"]


def small_model(arch="classifier", mods=("audio", "visual"), dim=6, classes=4, **kw):
    from mmbalance_llm.config import ModelConfig
    from mmbalance_llm.models.registry import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(architecture=arch, feature_dim=8, hidden_dim=12, num_layers=1, **kw)
    return build_model(cfg, list(mods), {m: [dim] for m in mods}, classes)


def fake_ctx(mods=("audio", "visual"), step=0, epoch=0):
    from accelerate import Accelerator

    return TrainContext(accelerator=Accelerator(cpu=True), modalities=list(mods), num_classes=4, recipe=None,
                        loaders={}, seed=0, epoch=epoch, global_step=step)


def test_registered_with_stage_and_many_modalities():
    names = available_methods()
    for name in SIX:
        assert name in names
    stages = {n: get_method(n).stage for n in SIX}
    assert stages == {"sample_valuation": "data", "modality_valuation": "data", "opm": "feed-forward",
                      "mla": "feed-forward", "amco": "feed-forward", "greedy": "feed-forward"}
    assert all(get_method(n).supports_many_modalities for n in SIX)
    with pytest.raises(ValueError, match="balance.q_base"):
        get_method("opm", q_base=1.5)


# -- valuation ------------------------------------------------------------------------------------
def test_shapley_matches_exact_formula_and_efficiency():
    from mmbalance_llm.balance._valuation import shapley_from_correct
    from mmbalance_llm.eval.metrics import shapley_values, subsets

    mods = ["a", "b", "c"]
    gen = torch.Generator().manual_seed(1)
    correct = {s: torch.rand(20, generator=gen) > 0.5 for s in subsets(mods)}
    phi = shapley_from_correct(correct, mods)
    for i in range(20):
        value = {s: float(correct[s][i]) for s in correct}
        ref = shapley_values(value, mods)
        assert torch.allclose(phi[i], torch.tensor([ref[m] for m in mods]), atol=1e-6)
    assert torch.allclose(phi.sum(1), correct[frozenset(mods)].float() - correct[frozenset()].float(), atol=1e-6)


def test_valuation_gives_a_signal_free_modality_zero_and_resamples_it():
    from accelerate import Accelerator

    from mmbalance_llm.balance._valuation import resampling_score, sample_shapley
    from mmbalance_llm.balance.sample_valuation import copies_for
    from mmbalance_llm.data.features import FeatureDataset, collate

    model = small_model()
    with torch.no_grad():  # the head ignores visual (no signal for any sample) and reads audio strongly
        model.fusion.classifier.weight[:, model.fusion.column_slice("visual")] = 0
        model.fusion.classifier.weight[:, model.fusion.column_slice("audio")] *= 30
    gen = torch.Generator().manual_seed(0)
    x = {m: torch.randn(40, 6, generator=gen) for m in ("audio", "visual")}
    with torch.no_grad():
        labels = model(**x).logits.argmax(-1)
    assert len(labels.unique()) > 2
    labels[:10] = (labels[:10] + 1) % 4  # some samples wrong
    ds = FeatureDataset(x, labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate)
    phi, full = sample_shapley(model, loader, Accelerator(cpu=True), ["audio", "visual"], len(ds))
    assert torch.all(phi[:, 1].abs() < 1e-6), "a modality with no signal must get phi = 0"
    assert phi[10:, 0].mean() > 0.5 and phi[:10, 0].mean() <= 0
    copies = copies_for(resampling_score(phi, full), ["audio", "visual"], 0.9, 0.4, -0.1)
    audio_idx = {i for i, keep in copies if keep == ("audio",)}
    assert set(range(10)) <= audio_idx < set(range(40)), "audio is re-sampled where it did not help"
    assert audio_idx == set(torch.nonzero(phi[:, 0] < 0.4).flatten().tolist())
    # every correct sample's visual copy count is 1 (score 0.5), every wrong one's 2 (score 0)
    vis = Counter(i for i, keep in copies if keep == ("visual",))
    assert all(vis[i] == (2 if i < 10 else 1) for i in range(40))


def test_resample_sampler_shards_every_copy_once_and_is_seeded():
    from accelerate.data_loader import BatchSamplerShard

    from mmbalance_llm.balance._valuation import ResampleBatchSampler

    copies = [(i % 37, ("visual",)) for i in range(23)] + [(3, ("audio",))]
    expected = Counter(list(range(37)) + [(i, k) for i, k in copies])
    for world in (1, 2, 3):
        sampler = ResampleBatchSampler(37, copies, batch_size=8, num_processes=world, seed=5)
        sampler.set_epoch(2)
        shards = [list(BatchSamplerShard(sampler, num_processes=world, process_index=r)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1, "every rank must take the same number of steps"
        union = Counter(item for shard in shards for batch in shard for item in batch)
        assert union == expected
        assert all(len(b) <= 8 for shard in shards for b in shard)
    a, b = ResampleBatchSampler(37, copies, 8, 2, seed=5), ResampleBatchSampler(37, copies, 8, 2, seed=5)
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_modality_level_copies_keep_the_low_contribution_modality():
    from mmbalance_llm.balance.modality_valuation import modality_copies

    gen = torch.Generator().manual_seed(0)
    copies, d = modality_copies(torch.tensor([0.9, 0.3]), ["audio", "visual"], 300, 1.0, gen)
    assert d == pytest.approx(2 / 3 * 0.6)
    assert len(copies) == int(d * 300) and {k for _, k in copies} == {("visual",)}
    assert modality_copies(torch.tensor([0.9, 0.3]), ["a", "v"], 300, 0.0, gen)[0] == []
    copies, _ = modality_copies(torch.tensor([0.9, 0.2, 0.5]), ["t", "a", "v"], 300, 1.0, gen)
    kept = Counter(k[0] for _, k in copies)
    assert kept["t"] == 0 and kept["a"] > kept["v"] > 0


# -- OPM --------------------------------------------------------------------------------------------
def test_opm_drops_only_the_dominant_modality():
    from mmbalance_llm.balance.opm import opm_drop_rates

    q = opm_drop_rates(torch.tensor([30.0, 10.0]), 0.5, 0.5)
    assert q[1] == 0 and 0.5 < q[0] <= 1
    q3 = opm_drop_rates(torch.tensor([30.0, 10.0, 12.0]), 0.5, 0.5)
    assert q3[0] > 0 and q3[1] == 0 and q3[2] == 0

    model = small_model()
    x = {m: torch.randn(32, 6) for m in ("audio", "visual")}
    with torch.no_grad():
        out = model(**x)
    labels = out.unimodal_logits["audio"].argmax(-1)  # audio is right on every sample: dominant
    bal = get_method("opm", q_base=0.5, p_exe=1.0)
    bal.ctx = fake_ctx(epoch=5)  # the official warm-up: epochs 0-5 drop nothing
    bal.forward(model, {**x, "labels": labels})
    assert bal.last_drop_rates is None and bal._kept is None
    bal.ctx = fake_ctx(epoch=6)
    for step in range(8):
        bal.ctx.global_step = step
        res = bal.forward(model, {**x, "labels": labels})
        assert bal.last_drop_rates["visual"] == 0 and bal.last_drop_rates["audio"] > 0
        with torch.no_grad():
            h = model.encode(**x)
            scale = 1 / (1 - bal.last_drop_rates["audio"] / 2)  # theta = d_a q_a / (d_a + d_v)
            cand = {(ka, kv): model.fuse({"audio": h["audio"] * scale * ka, "visual": h["visual"] * scale * kv}).logits
                    for ka in (0, 1) for kv in (0, 1)}
        match = {k: (res.logits - z).abs().amax(-1) < 1e-5 for k, z in cand.items()}
        assert torch.all(match[(1, 1)] | match[(0, 1)]), "every row keeps visual, with or without audio"
        assert not torch.any(match[(1, 0)] | match[(0, 0)])
        assert 0 < match[(0, 1)].sum() < 32
    with torch.no_grad():  # outside the balancer the model is untouched
        assert torch.equal(model(**x).logits, out.logits)


# -- AMCo -------------------------------------------------------------------------------------------
def test_amco_schedule_dependence_and_masks():
    from mmbalance_llm.balance.amco import class_masks, dependent_modalities, mask_ratio

    assert mask_ratio(0.0, 0.3) == 0 and mask_ratio(0.3, 0.3) == pytest.approx(1) and mask_ratio(0.9, 0.3) == 1
    assert mask_ratio(0.15, 0.3) == pytest.approx(math.sin(math.pi / 4))
    uni = {"a": torch.tensor([[8.0, 0, 0, 0], [0, 0, 0, 0]]), "v": torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 9]])}
    dep = dependent_modalities(uni, 0.5)
    assert dep.tolist() == [[True, False], [False, True]]
    masks = class_masks(dep, 4, 0.6, torch.Generator().manual_seed(0))
    assert (masks[0, 0] == 0).sum() == 2 and (masks[1, 1] == 0).sum() == 2
    assert masks[0, 1].eq(1).all() and masks[1, 0].eq(1).all()


# -- MLA --------------------------------------------------------------------------------------------
def test_mla_projection_protects_other_modality_and_gates_by_entropy():
    from mmbalance_llm.balance.mla import owm_update
    from mmbalance_llm.models.shared_head import SharedHeadClassifier, entropy_gates

    r = torch.randn(16)
    q = owm_update(torch.eye(16), r, 1e-4)
    assert (q @ r).norm() < 1e-3 * r.norm()
    ortho = torch.randn(16)
    ortho -= (ortho @ r) / (r @ r) * r
    assert torch.allclose(q @ ortho, ortho, atol=1e-4)

    w = entropy_gates([torch.tensor([[9.0, 0, 0, 0]]), torch.zeros(1, 4)])
    assert w[0, 0] == pytest.approx(1 / (1 + 0.25), abs=1e-3) and torch.allclose(w.sum(1), torch.ones(1))

    model = small_model(arch="shared_head")
    assert isinstance(model, SharedHeadClassifier)
    x = {m: torch.randn(5, 6) for m in ("audio", "visual")}
    out = model(**x)
    assert torch.allclose(sum(out.unimodal_logits.values()), out.logits, atol=1e-6)
    uni = model(modality="visual", visual=x["visual"])
    assert torch.allclose(uni.logits, model.head(model.encoders["visual"](x["visual"])))

    # after_backward: modality a's head gradient loses its component along v's mean feature
    bal = get_method("mla")
    bal.ctx = fake_ctx()
    bal.projectors = {"audio": owm_update(torch.eye(8), r[:8], 1e-4), "visual": torch.eye(8)}
    bal.current, bal._feature_sum = "audio", (torch.randn(8), torch.tensor(1.0))
    model.head.weight.grad = torch.randn_like(model.head.weight)
    bal.after_backward(model, 0)
    assert (model.head.weight.grad @ r[:8]).abs().max() < 1e-3 * model.head.weight.grad.norm() * r[:8].norm()
    assert not torch.allclose(bal.projectors["visual"], torch.eye(8))  # visual now protects audio


# -- Greedy -----------------------------------------------------------------------------------------
def test_mmtm_curation_cuts_per_sample_cross_modal_input_at_any_batch_size():
    from mmbalance_llm.models.mmtm import MMTMClassifier

    model = small_model(arch="mmtm")
    assert isinstance(model, MMTMClassifier)
    model.eval()
    for batch in (1, 5, 7):
        x = {m: torch.randn(batch, 6) for m in ("audio", "visual")}
        y = {"audio": x["audio"], "visual": x["visual"] + 3.0}
        plain_x, plain_y = model.encode(**x), model.encode(**y)
        assert not torch.allclose(plain_x["audio"], plain_y["audio"])  # MMTM couples the branches
        cur_x, cur_y = model.encode(curate="audio", **x), model.encode(curate="audio", **y)
        assert torch.allclose(cur_x["audio"], cur_y["audio"], atol=1e-6)
    with pytest.raises(ValueError, match="num_layers"):
        small_model(arch="mmtm", encoders={"visual": {"num_layers": 2}})


def test_greedy_opens_a_rebalancing_window_for_the_caring_modality():
    bal = get_method("greedy", alpha=0.001, window_size=3)
    model = small_model(arch="mmtm")
    bal.ctx = fake_ctx(epoch=1)
    bal._reset()
    for _, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.01)
    for _, p in model.bypass_parameters("visual"):
        p.grad = p.detach() * 10  # visual learns far faster through the cross-modal path
    bal.after_backward(model, 0)  # epoch 1: inside the official 2-epoch warm-up, speeds accumulate only
    assert bal.curating is None and bal.main["visual"] > 0
    bal.ctx = fake_ctx(epoch=2)
    bal.after_backward(model, 0)
    assert bal.curating == "visual" and bal.window_left == 3
    assert bal.last_bdr["visual"] > bal.last_bdr["audio"]
    speeds = dict(bal.main)
    for _ in range(3):
        bal.after_backward(model, 0)  # re-balancing steps are not measured
    assert bal.curating is None and bal.main == speeds  # the speeds accumulate over training (official)


# -- invariance and end to end ----------------------------------------------------------------------
def _weights(trainer):
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_zero_strength_is_bit_identical_to_none(tiny_data, run_tiny):
    data = tiny_data("av_imbalance")
    base_tr, base = run_tiny(data, "none", train={"epochs": 1})
    ref = _weights(base_tr)
    for method, hp in (("opm", {"q_base": 0.0}), ("modality_valuation", {"alpha": 0.0, "warmup_epochs": 0})):
        tr, final = run_tiny(data, method, balance=hp, train={"epochs": 1})
        own = ("method", "first_active_epoch", "active_at_best_epoch")  # the run's own method facts
        assert {k: v for k, v in final.items() if k not in own} == {k: v for k, v in base.items() if k not in own}
        w = _weights(tr)
        assert all(torch.equal(w[k], ref[k]) for k in ref), method


@pytest.mark.slow
def test_resume_inside_a_resampled_epoch_matches_the_uninterrupted_run(tiny_data, tmp_path):
    from mmbalance_llm.config import recipe_from_dict
    from mmbalance_llm.train.trainer import Trainer

    from conftest import tiny_recipe

    def run(out, **train):
        raw = tiny_recipe(tiny_data(), str(tmp_path / out), "sample_valuation", train=train)
        raw["balance"].update(warmup_epochs=1)
        return Trainer(recipe_from_dict(raw)).fit()

    full = run("full")
    assert run("cut", stop_after_steps=12) is None  # stops inside epoch 2, which is longer than 8 steps
    assert run("cut", resume_from="latest") == full


E2E = {  # valuation from epoch 0 (so a 1-epoch run re-samples); 1-copy thresholds keep the run short
    "sample_valuation": {"warmup_epochs": 0, "high": 0.45, "low1": -0.2, "low2": -0.6},
    "modality_valuation": {"warmup_epochs": 0, "part_ratio": 0.5},
    "opm": {"modulation_starts": 0},  # past the 6-epoch warm-up in a 1-epoch run
    "mla": {},
    "amco": {},
    "greedy": {"starting_epoch": 0},  # no 2-epoch warm-up, so a 1-epoch run can re-balance
}
TRAIN_LOG_KEY = {"opm": "opm_q_", "amco": "amco_mask_ratio", "greedy": "greedy_rebalancing", "mla": "loss_"}


@pytest.mark.parametrize("preset", ["av_imbalance", pytest.param("tri_modal", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", SIX)
def test_end_to_end(tiny_data, run_tiny, method, preset):
    from transformers import AutoModel

    trainer, final = run_tiny(tiny_data(preset), method, balance=E2E[method],
                               train={"epochs": 1, "log_every_steps": 1})
    test = final["test"]
    mods = trainer.data.modalities
    assert final["method"] == method and 0 < test["accuracy"] <= 1
    assert set(test["shapley"]) == set(mods) and set(test["unimodal_accuracy"]) == set(mods)
    out = trainer.recipe.output_dir
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    if method.endswith("valuation"):
        val = [r for r in rows if r.get("split") == "valuation"]
        assert val and val[-1]["resampled"] > 0
        steps = [r["step"] for r in rows if r.get("split") == "validation"]
        assert steps[0] > trainer.steps_per_epoch, "the re-sampled epoch must be longer"
    else:
        prefix = TRAIN_LOG_KEY[method]
        assert any(k.startswith(prefix) for r in rows if r.get("split") == "train" for k in r)
    if method in ("mla", "greedy"):
        loaded = AutoModel.from_pretrained(os.path.join(out, "best"))
        net = trainer.accelerator.unwrap_model(trainer.model)
        assert type(loaded) is type(net) and type(net).__name__ in ("SharedHeadClassifier", "MMTMClassifier")
        batch = {m: t[:4] for m, t in trainer.data.test.tensors.items()}
        net.eval(), loaded.eval()
        with torch.no_grad():
            assert torch.allclose(loaded(**batch).logits, net(**batch).logits, atol=1e-5)
        from mmbalance_llm.eval.saved import evaluate_saved

        again = evaluate_saved(os.path.join(out, "best"), tiny_data(preset))
        assert again["accuracy"] == pytest.approx(test["accuracy"])
