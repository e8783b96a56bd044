"""Objective-stage balancers (issue 3): mmpareto, mmcosine, cml, mbsd, lfm, gblending, umt, ume.

Mechanism tests run on constructed cases without training; one parametrized table trains each method end
to end on the tiny synthetic data (2 and 3 modalities); UMT has the zero-strength invariance test.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmbalance_llm.balance import available_methods, get_method
from mmbalance_llm.balance.base import TrainContext
from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

OBJECTIVE = ["mmpareto", "mmcosine", "cml", "mbsd", "lfm", "gblending", "umt", "ume"]


def tiny_model(mods=("a", "b"), classes=3, seed=0, fusion="concat", feature_dim=4):
    torch.manual_seed(seed)
    cfg = MultimodalClassifierConfig(modalities=list(mods), input_shapes={m: [6] for m in mods}, num_classes=classes,
                                     feature_dim=feature_dim, hidden_dim=8, num_layers=1, fusion=fusion)
    return MultimodalClassifier(cfg)


def stub_ctx(model, loaders=None, recipe=None):
    acc = SimpleNamespace(num_processes=1, unwrap_model=lambda m: m, device=torch.device("cpu"),
                          distributed_type=SimpleNamespace(name="NO"))
    return TrainContext(accelerator=acc, modalities=list(model.modalities), num_classes=model.config.num_classes,
                        recipe=recipe, loaders=loaders or {}, seed=0)


def batch_for(model, n=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(n, 6, generator=gen) for m in model.modalities}
    batch["labels"] = torch.randint(0, model.config.num_classes, (n,), generator=gen)
    return batch


def inputs(batch, model):
    return {m: batch[m] for m in model.modalities}


def test_registered():
    assert set(OBJECTIVE) <= set(available_methods())
    for name in OBJECTIVE:
        cls = type(get_method(name))
        assert cls.stage == "objective" and cls.supports_many_modalities


# -- MMPareto ---------------------------------------------------------------------------------------
def test_mmpareto_rule_on_conflicting_gradients():
    from mmbalance_llm.balance.mmpareto import integrate

    g_mm, g_u = [torch.tensor([1.0, 0.2])], [torch.tensor([-0.6, 1.0])]  # cos < 0
    new, conflict, (w1, w2) = integrate(g_mm, g_u, gamma=1.0)
    assert conflict and abs(w1 + w2 - 1) < 1e-9
    assert float(new[0] @ g_mm[0]) >= 0 and float(new[0] @ g_u[0]) >= 0
    # rescaled to the summed-loss gradient's norm (the min-norm point is shorter)
    assert torch.isclose(new[0].norm(), (g_mm[0] + g_u[0]).norm())
    g_mm, g_u = [torch.tensor([1.0, 0.2])], [torch.tensor([0.5, 1.0])]  # cos > 0: gamma * (g_mm + g_u)
    new, conflict, _ = integrate(g_mm, g_u, gamma=1.5)
    assert not conflict and torch.allclose(new[0], 1.5 * (g_mm[0] + g_u[0]))


def reference_mmpareto(model, batch, gamma, per_tensor=False):
    """The original algorithm: per-loss backward passes, then the rule per encoder (written independently)."""
    out = model(**inputs(batch, model))
    y = batch["labels"]
    l_mm = F.cross_entropy(out.logits, y)
    l_u = {m: F.cross_entropy(z, y) for m, z in out.unimodal_logits.items()}
    params = list(model.parameters())
    total = torch.autograd.grad(l_mm + sum(l_u.values()), params, retain_graph=True)
    ref = {id(p): g for p, g in zip(params, total)}
    conflicts = {}
    for m in model.modalities:
        ps = [p for _, p in model.modality_parameters(m)]
        gm = torch.autograd.grad(l_mm, ps, retain_graph=True)
        gu = torch.autograd.grad(l_u[m], ps, retain_graph=True)
        a, b = torch.cat([g.flatten() for g in gm]), torch.cat([g.flatten() for g in gu])
        conflicts[m] = bool(F.cosine_similarity(a, b, dim=0) <= 0)
        if not conflicts[m]:
            w = 0.5
        else:  # argmin_w |w a + (1 - w) b|
            w = float(((b - a) @ b) / ((a - b) @ (a - b))).__float__()
            w = min(1.0, max(0.0, w))
        new = [2 * (w * x + (1 - w) * z) for x, z in zip(gm, gu)]
        whole = (a + b).norm() / torch.cat([n.flatten() for n in new]).norm()
        for p, x, z, n in zip(ps, gm, gu, new):
            ratio = (x + z).norm() / n.norm() if per_tensor else whole
            ref[id(p)] = gamma * (n * ratio if ratio > 1 else n)
    return ref, conflicts


def conflicting_model(tilt=0.5):
    """Modality b makes the fused head confidently predict class 1, a's own head predicts class 2, the label
    is 0: at h_a the fused cotangent is W_a^T(e1 - e0) = v and a's own is W_a^T(e2 - e0) = -v + tilt u (cos < 0)."""
    model = tiny_model(classes=3, feature_dim=2)
    with torch.no_grad():
        for m, bias in (("a", [-3.0, 0.0]), ("b", [3.0, 0.0])):
            last = model.encoders[m].net[-1]
            last.weight.mul_(0.05)
            last.bias.copy_(torch.tensor(bias))
        w = torch.zeros(3, 4)
        w[1, 0], w[2, 0], w[2, 1] = 1.0, -1.0, tilt  # a's block: class 1 = v, class 2 = -v + tilt u
        w[1, 2] = 5.0  # b's block pushes class 1
        model.fusion.classifier.weight.copy_(w)
        model.fusion.classifier.bias.zero_()
    return model


@pytest.mark.parametrize("case,rescale", [("conflict", "encoder"), ("random", "encoder"), ("conflict", "tensor")])
def test_mmpareto_matches_the_three_backward_reference(case, rescale):
    model = conflicting_model(0.5 if rescale == "encoder" else 0.0) if case == "conflict" else tiny_model(seed=3)
    batch = batch_for(model)
    if case == "conflict":
        batch["labels"].zero_()
    ref, conflicts = reference_mmpareto(model, batch, gamma=1.5, per_tensor=rescale == "tensor")
    assert conflicts["a"] == (case == "conflict")
    bal = get_method("mmpareto", rescale=rescale)
    bal.setup(stub_ctx(model), model)
    model.zero_grad()
    loss, logs = bal.loss(model, batch, model(**inputs(batch, model)))
    loss.backward()
    assert logs["pareto_conflict_a"] == float(case == "conflict")
    for name, p in model.named_parameters():
        # the conflict case nearly cancels g_mm + g_a, so float32 rounding shows at ~1e-5
        torch.testing.assert_close(p.grad, ref[id(p)], rtol=1e-3, atol=1e-4, msg=name)
    if case == "conflict":
        # With one rescale per encoder the update does not increase either loss to first order; the original
        # code's per-tensor rescale bends the direction and here conflicts with one of them again.
        ps = [p for _, p in model.modality_parameters("a")]
        out = model(**inputs(batch, model))
        dots = []
        for lo in (F.cross_entropy(out.logits, batch["labels"]), F.cross_entropy(out.unimodal_logits["a"], batch["labels"])):
            g = torch.autograd.grad(lo, ps, retain_graph=True)
            dots.append(sum(float((x * p.grad).sum()) for x, p in zip(g, ps)))
        if rescale == "encoder":
            assert min(dots) > 0
        else:
            assert min(dots) < -1e-3


def test_mmpareto_feature_space_flags_the_same_conflict():
    model = conflicting_model()
    batch = batch_for(model)
    batch["labels"].zero_()
    bal = get_method("mmpareto", gradient_space="feature")
    bal.setup(stub_ctx(model), model)
    loss, logs = bal.loss(model, batch, model(**inputs(batch, model)))
    loss.backward()
    assert logs["pareto_conflict_a"] == 1.0 and logs["pareto_conflict_b"] == 0.0
    with pytest.raises(ValueError, match="gradient_space"):
        get_method("mmpareto", gradient_space="params")


# -- MMCosine ---------------------------------------------------------------------------------------
def test_mmcosine_logits_are_scaled_cosines():
    from mmbalance_llm.balance.mmcosine import apply_cosine_head

    model = apply_cosine_head(tiny_model(mods=("a", "b", "c"), classes=4), scale=10.0)
    batch = batch_for(model)
    out = model(**inputs(batch, model))
    w = model.fusion.classifier.weight
    for i, m in enumerate(model.modalities):
        h = out.features[m]
        expect = 10.0 * F.cosine_similarity(h[:, None, :], w[None, :, 4 * i:4 * (i + 1)], dim=-1)
        torch.testing.assert_close(out.unimodal_logits[m], expect)
    torch.testing.assert_close(out.logits, sum(out.unimodal_logits.values()))
    assert out.logits.abs().max() <= 30.0 + 1e-4
    # invariant to each modality's feature norm (the dominance MMCosine removes)
    feats = {m: h * (7.0 if m == "a" else 1.0) for m, h in out.features.items()}
    torch.testing.assert_close(model.fuse(feats).logits, out.logits)
    assert not model.fusion.classifier.bias.requires_grad and model.fusion.classifier.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="concat"):
        apply_cosine_head(tiny_model(fusion="sum"), 10.0)


# -- CML ----------------------------------------------------------------------------------------------
def test_cml_removal_chain_and_confidence_hinge():
    from mmbalance_llm.balance.cml import cml_loss, removal_chain

    model = tiny_model(mods=("a", "b", "c"), classes=4)
    batch = batch_for(model)
    out = model(**inputs(batch, model))
    bias = model.fusion.classifier.bias
    chain = removal_chain(out.logits, out.unimodal_logits, ["b", "a", "c"], bias)
    assert len(chain) == 2  # M - 1 removals
    u = out.unimodal_logits
    torch.testing.assert_close(chain[0], u["a"] + u["c"] + bias * (1 / 3))  # b removed, full bias kept
    torch.testing.assert_close(chain[1], u["c"] + bias * (2 / 3))
    # hinge: zero when fewer modalities are less confident, positive otherwise
    y = torch.zeros(2, dtype=torch.long)
    z = torch.tensor([[4.0, 0, 0], [4.0, 0, 0]])
    sharp = {"a": torch.tensor([[9.0, 0, 0], [9.0, 0, 0]]), "b": z - torch.tensor([[9.0, 0, 0], [9.0, 0, 0]])}
    flat = {"a": z / 2, "b": z / 2}
    zero_bias = torch.zeros(3)
    _, _, h_flat = cml_loss(z, flat, ["a", "b"], zero_bias, y, lam=0.1)  # removing a leaves z/2: less confident
    _, _, h_sharp = cml_loss(z, sharp, ["b", "a"], zero_bias, y, lam=0.1)  # removing b leaves 9: more confident
    assert h_flat == 0 and h_sharp > 0


# -- MBSD ---------------------------------------------------------------------------------------------
def test_mbsd_pair_weights_and_true_kl():
    from mmbalance_llm.balance.mbsd import pair_terms

    y = torch.tensor([0, 0])
    za = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)  # sample 0 right, sample 1 wrong
    zb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)  # sample 0 right, sample 1 wrong
    rs, kl = pair_terms(za, zb, y)
    pa, pb = torch.softmax(za, -1).detach(), torch.softmax(zb, -1).detach()
    w0 = float(pa[0, 0] - pb[0, 0])  # only sample 0 has a correct prediction, a is its strong side
    expect_kl = w0 * float((pa[0] * (pa[0].log() - pb[0].log())).sum()) / 2
    assert abs(float(kl.detach()) - expect_kl) < 1e-6
    assert abs(float(rs.detach()) - w0 * float(((za - zb)[0] ** 2).sum().detach()) / 3 / 2) < 1e-6
    za.grad = None
    kl.backward()  # default (BalanceBenchmark): the pair weight w carries gradient into both sides
    assert za.grad[0].abs().sum() > 0 and zb.grad[0].abs().sum() > 0
    za.grad, zb.grad = None, None
    pair_terms(za, zb, y, detach_weight=True)[1].backward()
    assert za.grad.abs().sum() == 0 and zb.grad[0].abs().sum() > 0  # with w constant the strong side is a teacher


def test_mbsd_zero_weight_is_fused_plus_unimodal_ce():
    model = tiny_model(mods=("a", "b", "c"))
    batch = batch_for(model)
    out = model(**inputs(batch, model))
    ctx = stub_ctx(model)
    mbsd, aux = get_method("mbsd", weight=0.0), get_method("unimodal_aux")
    mbsd.setup(ctx, model)
    aux.setup(ctx, model)
    assert torch.equal(mbsd.loss(model, batch, out)[0], aux.loss(model, batch, out)[0])
    full = get_method("mbsd")
    full.setup(ctx, model)
    assert full.loss(model, batch, out)[0] > aux.loss(model, batch, out)[0]


# -- LFM ----------------------------------------------------------------------------------------------
def test_lfm_js_and_hypergradient_match_finite_differences():
    from mmbalance_llm.balance.lfm import alignment, js_divergence

    za, zb = torch.randn(5, 4), torch.randn(5, 4)
    assert float(js_divergence(za, za)) < 1e-7 and abs(float(js_divergence(za, zb) - js_divergence(zb, za))) < 1e-7
    assert float(js_divergence(za, zb)) <= torch.log(torch.tensor(2.0)) + 1e-6

    model = tiny_model(seed=5)
    val, train = batch_for(model, n=16, seed=7), batch_for(model, n=8, seed=8)
    bal = get_method("lfm", val_samples=8, train_samples=8, lr_alpha=1.0, alignment="js")
    rows = lambda b: [{k: v[i] for k, v in b.items()} for i in range(len(b["labels"]))]  # noqa: E731
    loaders = {"validation": SimpleNamespace(dataset=rows(val)), "train_eval": SimpleNamespace(dataset=rows(train))}
    bal.setup(stub_ctx(model, loaders=loaders), model)
    h = bal.hypergradient(model)
    # <g_val, g_JS - g_CE> is the directional derivative of L_val along grad(JS - CE)
    params = list(model.parameters())
    out = model(**inputs(train, model))
    d = torch.autograd.grad(alignment(out.unimodal_logits) - F.cross_entropy(out.logits, train["labels"]), params)

    def l_val(eps):
        with torch.no_grad():
            for p, g in zip(params, d):
                p.add_(eps * g)
            v = F.cross_entropy(model(**{m: val[m][:8] for m in model.modalities}).logits, val["labels"][:8])
            for p, g in zip(params, d):
                p.sub_(eps * g)
        return float(v)

    numeric = (l_val(1e-3) - l_val(-1e-3)) / 2e-3
    assert abs(h - numeric) < 1e-3 * max(1.0, abs(numeric))
    bal.on_epoch_start(model, 0)  # one step of alpha_1, clipped
    assert abs(bal.alpha1 - min(0.95, max(0.05, 0.95 + h))) < 1e-9  # starts at the official 0.95


# -- GBlending ---------------------------------------------------------------------------------------
def test_gblending_weights_favour_the_better_generalising_model():
    from mmbalance_llm.balance.gblending import blend_weights

    stats = {"__fused__": (1.0, 1.2, 0.2, 1.1),   # fits train, barely generalises: O large, G small
             "audio": (1.0, 1.2, 0.8, 0.9),       # generalises: G = -0.3, O = -0.1
             "visual": (1.0, 1.2, 1.0, 1.2)}      # learns nothing: G = 0
    w = blend_weights(stats)
    assert abs(sum(w.values()) - 1) < 1e-12
    assert w["audio"] > w["__fused__"] > w["visual"] == 0
    raw = {k: abs((lv1 - lv0) / max(((lv1 - lt1) - (lv0 - lt0)) ** 2, 1e-12)) for k, (lt0, lv0, lt1, lv1) in stats.items()}
    assert abs(w["audio"] - raw["audio"] / sum(raw.values())) < 1e-12
    with pytest.raises(ValueError, match="balance.mode"):
        get_method("gblending", mode="sometimes")


# -- UME ------------------------------------------------------------------------------------------------
def test_ume_has_no_cross_modal_gradient():
    model = tiny_model(mods=("a", "b", "c"))
    bal = get_method("ume")
    bal.setup(stub_ctx(model), model)
    batch = batch_for(model)

    def grads_of_a(b_input):
        model.zero_grad()
        x = dict(batch, b=b_input)
        out = model(**inputs(x, model))
        torch.testing.assert_close(out.logits, sum(out.unimodal_logits.values()))  # prediction = ensemble
        bal.loss(model, x, out)[0].backward()
        return [p.grad.clone() for _, p in model.modality_parameters("a")]

    for g1, g2 in zip(grads_of_a(batch["b"]), grads_of_a(10 * torch.randn_like(batch["b"]))):
        torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="concat"):
        bal.build_model(SimpleNamespace(fusion="sum"), ["a"], {"a": [6]}, 3)


# -- UMT ------------------------------------------------------------------------------------------------
def test_umt_distils_teacher_features(tmp_path):
    model = tiny_model()
    for m in model.modalities:  # a teacher identical to the student: the distillation term is exactly 0
        model.save_pretrained(str(tmp_path / m))
    bal = get_method("umt", teacher_paths={m: str(tmp_path / m) for m in model.modalities})
    bal.setup(stub_ctx(model), model)
    batch = batch_for(model)
    out = model(**inputs(batch, model))
    loss, logs = bal.loss(model, batch, out)
    assert logs["umt_mse_a"] == 0 and torch.isclose(loss, F.cross_entropy(out.logits, batch["labels"]))
    with torch.no_grad():
        model.encoders["a"].net[-1].bias.add_(1.0)  # student moves away: MSE of exactly 1 per coordinate
    out = model(**inputs(batch, model))
    loss, logs = bal.loss(model, batch, out)
    assert abs(logs["umt_mse_a"] - 1.0) < 1e-5 and logs["umt_mse_b"] == 0
    with pytest.raises(ValueError, match="teacher_paths"):
        get_method("umt", teacher_paths={"depth": "x"}).setup(stub_ctx(model), model)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_umt_zero_strength_is_the_baseline(tiny_data, run_tiny):
    data = tiny_data("av_imbalance")
    t0, base = run_tiny(data, "none", train={"epochs": 1})
    t1, umt = run_tiny(data, "umt", balance={"sigma": 0.0}, train={"epochs": 1})
    assert not os.path.exists(os.path.join(t1.output_dir, "teachers"))
    for key in ("validation", "test"):
        assert base[key] == umt[key]
    w0, w1 = _weights(t0), _weights(t1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


# -- end to end -----------------------------------------------------------------------------------------
E2E = [  # every method on 2 modalities or 3 (M > 2), one epoch each; tiny data keeps the file fast
    ("mmpareto", "av_imbalance", {}, "pareto_conflict_audio"),
    ("mmpareto", "tri_modal", {"gradient_space": "feature"}, "pareto_w_mm_text"),
    ("mmcosine", "av_imbalance", {}, None),
    ("cml", "tri_modal", {}, "cml_hinge"),
    ("mbsd", "av_imbalance", {}, "mbsd_kl"),
    ("lfm", "av_imbalance", {"alpha_init": 0.5, "lr_alpha": 0.5}, "lfm_alpha1"),
    ("gblending", "tri_modal", {"super_epoch": 1, "mode": "offline"}, "gb_w_visual"),
    ("umt", "av_imbalance", {}, "umt_mse_visual"),
    ("ume", "av_imbalance", {}, "loss_visual"),
]


@pytest.mark.parametrize("method,preset,balance,log_key", E2E, ids=[f"{m}-{p}" for m, p, _, _ in E2E])
def test_end_to_end(tiny_data, run_tiny, method, preset, balance, log_key):
    trainer, final = run_tiny(tiny_data(preset), method, balance=balance, train={"epochs": 1, "log_every_steps": 2})
    assert final["method"] == method
    assert set(final["test"]["unimodal_accuracy"]) == set(trainer.data.modalities)
    if preset == "av_imbalance":  # learns within one epoch; tri_modal needs longer than this budget
        assert final["test"]["accuracy"] > 1 / trainer.data.num_classes
    lines = [json.loads(x) for x in open(os.path.join(trainer.output_dir, "metrics.jsonl"))]
    train_logs = [x for x in lines if x.get("split") == "train"]
    losses = [x["loss"] for x in train_logs]
    assert len(losses) >= 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the method's objective goes down
    if log_key:
        assert log_key in train_logs[-1]
    if method == "umt":
        for m in trainer.data.modalities:
            teacher = os.path.join(trainer.output_dir, "teachers", m)
            assert os.path.isfile(os.path.join(teacher, "best", "model.safetensors"))
            with open(os.path.join(teacher, "final_metrics.json")) as fh:
                assert json.load(fh)["method"] == "none"
    if method == "lfm":
        assert trainer.balancer.alpha1 != 0.5  # the validation hypergradient moved alpha_1
    if method == "gblending":
        assert abs(sum(trainer.balancer.weights.values()) - 1) < 1e-9
