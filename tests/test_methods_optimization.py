"""Optimization-stage balancers: ogm, agm, pmr, inforeg, reconboost, relearning.

One end-to-end table (every method on the 2-modality and the 3-modality preset), one mechanism test per
method on a constructed case, and zero-strength invariance tests (bit-identical to the reference run).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmbalance_llm.balance import get_method
from mmbalance_llm.balance.base import TrainContext
from mmbalance_llm.data.features import FeatureDataset, collate
from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

FAST = {"shapley": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread avoids OpenMP spin contention on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers ---------------------------------------------------------------------------------------
from conftest import OneProcess as _OneProcess  # noqa: E402


def tiny_model(modalities, dim=6, num_classes=4, seed=0):
    torch.manual_seed(seed)
    cfg = MultimodalClassifierConfig(modalities=modalities, input_shapes={m: [dim] for m in modalities},
                                     num_classes=num_classes, feature_dim=5, hidden_dim=8, num_layers=1)
    return MultimodalClassifier(cfg)


def tiny_dataset(modalities, n=48, dim=6, num_classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    return FeatureDataset({m: torch.randn(n, dim, generator=gen) for m in modalities}, labels)


def make_ctx(modalities, num_classes=4, loaders=None, epoch=0, recipe=None):
    loaders = loaders or {}
    train_dataset = loaders["train_eval"].dataset if "train_eval" in loaders else None
    return TrainContext(accelerator=_OneProcess(), modalities=list(modalities), num_classes=num_classes,
                        recipe=recipe, loaders=loaders, epoch=epoch, train_dataset=train_dataset, eval_batch_size=32)


def loader(ds, batch_size=16):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def assert_identical(run_a, run_b):
    (ta, fa), (tb, fb) = run_a, run_b
    own = ("method", "first_active_epoch", "active_at_best_epoch")  # the run's own method facts
    strip = lambda f: {k: v for k, v in f.items() if k not in own}  # noqa: E731
    assert strip(fa) == strip(fb)
    wa, wb = weights(ta), weights(tb)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- end-to-end table -------------------------------------------------------------------------------
def _check_ogm(trainer):
    assert trainer.balancer.config.modulation_starts == 0


def _check_agm(trainer):
    b = trainer.balancer
    assert b.steps == trainer.state["global_step"] and torch.isfinite(b.score_sum).all()


def _check_pmr(trainer):
    b = trainer.balancer
    assert set(b.prototypes) == set(trainer.data.modalities)
    assert all(p.shape == (trainer.data.num_classes, 16) for p in b.prototypes.values())


def _check_inforeg(trainer):
    assert all(len(t) == 2 and t[-1] > 0 for t in trainer.balancer.traces.values())


def _check_reconboost(trainer):
    t = trainer.balancer.config.t_epochs
    assert trainer.state["global_step"] == 2 * 2 * t * trainer.steps_per_epoch  # 2 t passes per epoch


def _check_relearning(trainer):
    assert trainer.balancer.resets_done == 1  # after 0-based epoch 1 only (the official `epoch > 0` rule)
    assert all(0 <= d["alpha"] < 1 for h in trainer.balancer.history for m, d in h.items() if m != "epoch")


TABLE = [
    ("ogm", {"modulation_starts": 0}, _check_ogm),
    ("agm", {}, _check_agm),
    ("pmr", {}, _check_pmr),
    ("inforeg", {}, _check_inforeg),
    ("reconboost", {"t_epochs": 1}, _check_reconboost),  # 1 + 1 passes per round keeps the run short
    ("relearning", {"reinit_epoch": 1}, _check_relearning),
]


@pytest.mark.parametrize("preset", ["av_imbalance", "tri_modal"])
@pytest.mark.parametrize("method,balance,check", TABLE, ids=[t[0] for t in TABLE])
def test_end_to_end(tiny_data, run_tiny, method, balance, check, preset):
    trainer, final = run_tiny(tiny_data(preset), method, balance=balance, train=FAST)
    assert final["method"] == method
    assert 0.0 <= final["test"]["accuracy"] <= 1.0
    assert all(torch.isfinite(w).all() for w in weights(trainer).values())
    check(trainer)


# -- zero strength = the reference run, bit for bit ---------------------------------------------------
_REFERENCE = {}


def _reference(tiny_data, run_tiny, method="none", balance=None):
    key = (method, tuple(sorted((balance or {}).items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = run_tiny(tiny_data("av_imbalance"), method, balance=balance, train=FAST)
    return _REFERENCE[key]


@pytest.mark.parametrize("method,balance", [
    ("ogm", {}),                                             # epochs 0-1 are the T-PAMI warm-up
    ("ogm", {"modulation": "OGM", "alpha": 0.0, "modulation_starts": 0}),
    ("agm", {"alpha": 0.0}),
    ("pmr", {"alpha": 0.0}),
    ("relearning", {"lam": 0.0, "reinit_epoch": 1}),
], ids=["ogm-warmup", "ogm-alpha0", "agm", "pmr", "relearning"])
def test_zero_strength_is_baseline(tiny_data, run_tiny, method, balance):
    run = run_tiny(tiny_data("av_imbalance"), method, balance=balance, train=FAST)
    assert_identical(run, _reference(tiny_data, run_tiny))


def test_inforeg_zero_beta_is_unimodal_aux(tiny_data, run_tiny):
    run = run_tiny(tiny_data("av_imbalance"), "inforeg", balance={"beta": 0.0, "beta_other": 0.0}, train=FAST)
    assert_identical(run, _reference(tiny_data, run_tiny, "unimodal_aux", {"weight": 1.0}))


# -- mechanisms on constructed cases -----------------------------------------------------------------
def test_ogm_is_ogm_ge_with_tpami_defaults():
    b = get_method("ogm")
    assert (b.config.alpha, b.config.modulation, b.config.modulation_starts, b.config.modulation_ends) == \
        (0.8, "OGM_GE", 6, 60)
    assert type(b).loss is type(get_method("ogm_ge")).loss


@pytest.mark.parametrize("modalities", [["a", "v"], ["a", "v", "t"]])
def test_agm_refused_subsets_equal_zero_padded_forwards(modalities):
    from mmbalance_llm.balance.agm import shapley_logits, subset_logits

    model, ds = tiny_model(modalities), tiny_dataset(modalities, n=8)
    batch = collate([ds[i] for i in range(8)])
    inputs = {m: batch[m] for m in modalities}
    with torch.no_grad():
        feats = model.encode(**inputs)
        zero = model.encode(**{m: torch.zeros_like(inputs[m][:1]) for m in modalities})
        values = subset_logits(model.fuse, feats, zero, modalities)
        for s, logits in values.items():  # the slow way: a full forward on zero-padded inputs
            padded = {m: inputs[m] if m in s else torch.zeros_like(inputs[m]) for m in modalities}
            torch.testing.assert_close(logits, model(**padded).logits, rtol=1e-5, atol=1e-6)
    phi = shapley_logits(values, modalities, 0.0)
    full = values[frozenset(modalities)]
    torch.testing.assert_close(sum(phi.values()), full, rtol=1e-5, atol=1e-5)  # efficiency, f(empty) = 0
    if len(modalities) == 2:  # the original code's form, empty-set term included
        f = lambda *ms: values[frozenset(ms)]  # noqa: E731
        torch.testing.assert_close(phi["a"], 0.5 * (f("a", "v") - f("v") + f("a")))


def test_agm_coefficients_slow_down_a_modality_that_pulls_ahead():
    from mmbalance_llm.balance.agm import agm_coefficients

    running = torch.tensor([1.0, 1.0], dtype=torch.float64)
    ahead = torch.tensor([0.5, 1.5], dtype=torch.float64)  # modality 0's loss fell below its usual level
    c = agm_coefficients(ahead, running, alpha=1.5)
    assert c[0] < 1 < c[1]
    assert torch.allclose(c, torch.exp(1.5 * (1 - torch.exp(torch.tensor([1.0, -1.0], dtype=torch.float64)))))
    assert torch.equal(agm_coefficients(ahead, running, alpha=0.0), torch.ones(2, dtype=torch.float64))


def test_pmr_prototypes_are_class_means_with_ema():
    mods = ["a", "v"]
    model, ds = tiny_model(mods), tiny_dataset(mods)
    b = get_method("pmr", proto_ratio=1.0, momentum=0.5)
    recipe = SimpleNamespace(train=SimpleNamespace(per_device_train_batch_size=16, per_device_eval_batch_size=32))
    b.setup(make_ctx(mods, loaders={"train_eval": loader(ds), "train": loader(ds)}, recipe=recipe), model)
    b.on_epoch_start(model, 0)
    with torch.no_grad():
        feats = model.encode(**{m: ds.tensors[m] for m in mods})
    for m in mods:
        means = torch.stack([feats[m][ds.labels == k].mean(0) for k in range(4)])
        torch.testing.assert_close(b.prototypes[m], means)
    old = {m: p.clone() for m, p in b.prototypes.items()}
    with torch.no_grad():
        for p in model.encoders["a"].parameters():
            p.mul_(1.5)
        new_a = model.encode(**{m: ds.tensors[m] for m in mods})["a"]
    means = torch.stack([new_a[ds.labels == k].mean(0) for k in range(4)])
    b.on_epoch_start(model, 1)  # the official applies no moving average to the prototypes of epochs 0 and 1
    torch.testing.assert_close(b.prototypes["a"], means)
    b.prototypes = old
    b.on_epoch_start(model, 2)
    torch.testing.assert_close(b.prototypes["a"], 0.5 * means + 0.5 * old["a"])
    # the prototype term goes to the modality with the lower prototype score only
    batch = collate([ds[i] for i in range(16)])
    out = model(**{m: batch[m] for m in mods})
    loss, logs = b.loss(model, batch, out)
    proto = {m: -torch.cdist(out.features[m], b.prototypes[m]) for m in mods}
    weak = min(mods, key=lambda m: logs[f"pmr_rho_{m}"])
    expected = F.cross_entropy(out.logits, batch["labels"]) + F.cross_entropy(proto[weak], batch["labels"])
    torch.testing.assert_close(loss, expected)


def test_inforeg_window_and_proximal_gradient():
    from mmbalance_llm.balance.inforeg import window_slope

    assert window_slope([], 10) == 1.0  # epoch 0: the window is open
    assert window_slope([1.0], 10) == 1.0  # zero-padded history: (1/10 - 0) / (1/10)
    assert window_slope([1.0, 2.0], 10) == pytest.approx(2 / 3)  # (3/10 - 1/10) / (3/10), open for ~10 epochs
    assert window_slope([4.0, 3.0, 2.0], 2) == pytest.approx((2.5 - 3.5) / 2.5)  # information falling: closed

    mods = ["a", "v"]
    model, ds = tiny_model(mods), tiny_dataset(mods, n=16)
    b = get_method("inforeg", beta=0.5, beta_other=0.5)
    b.setup(make_ctx(mods), model)
    b.on_epoch_start(model, 0)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.1)
    batch = collate([ds[i] for i in range(16)])
    out = model(**{m: batch[m] for m in mods})
    loss, logs = b.loss(model, batch, out)
    model.zero_grad()
    loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    b.after_backward(model, 0)
    lead = max(mods, key=lambda m: logs[f"inforeg_beta_{m}"])
    beta = logs[f"inforeg_beta_{lead}"]
    assert beta > 0.5 and logs[f"inforeg_beta_{[m for m in mods if m != lead][0]}"] == 0.0
    for n, p in model.named_parameters():
        expected = raw[n] + beta * (p.detach() - anchor[n]) if n.startswith(f"encoders.{lead}.") else raw[n]
        torch.testing.assert_close(p.grad, expected)
    b.on_epoch_end(model, 0)  # Fisher sum of the weight tensors' gradients *after* the proximal term
    trace = sum(p.grad.square().mean() for _, p in model.modality_parameters(lead) if p.dim() >= 2).item()
    assert b.traces[lead][-1] == pytest.approx(trace, rel=1e-5)


def test_reconboost_stage_one_moves_only_its_learner_and_reconciles():
    from mmbalance_llm.balance.reconboost import boosting_loss

    mods = ["a", "v", "t"]
    model, ds = tiny_model(mods), tiny_dataset(mods, n=16)
    cfg = get_method("reconboost").config
    batch = collate([ds[i] for i in range(16)])
    out = model(**{m: batch[m] for m in mods})
    loss = boosting_loss(out.unimodal_logits, "a", "t", batch["labels"], cfg)
    model.zero_grad()
    loss.backward()
    for m in mods:
        grads = [p.grad for _, p in model.modality_parameters(m)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads) if m == "a" else all(g is None for g in grads)
    # the boosting weight: (w1 - w2 q_y) on -log p_a[y], divided by C, plus the live reconcilement term
    z, y = {m: v.detach() for m, v in out.unimodal_logits.items()}, batch["labels"]
    q = torch.softmax(z["v"] + z["t"], -1).gather(1, y[:, None]).squeeze(1)
    nll = -torch.log_softmax(z["a"], -1).gather(1, y[:, None]).squeeze(1)
    recon = F.mse_loss(torch.softmax(z["a"], -1), torch.softmax(z["t"], -1))
    torch.testing.assert_close(loss.detach(), ((5 - q) * nll).mean() / 4 + 0.5 * recon)
    za = out.unimodal_logits["a"].detach().requires_grad_(True)
    term = F.mse_loss(torch.softmax(za, -1), torch.softmax(z["t"], -1))
    assert torch.autograd.grad(term, za)[0].abs().sum() > 0  # BalanceBenchmark's version has none


def test_reconboost_epoch_schedule_is_cyclic():
    b = get_method("reconboost", t_epochs=2)
    b.ctx = make_ctx(["a", "v", "t"])
    assert b.schedule(0) == [("boost", "a", None)] * 2 + [("ensemble", None, None)] * 2
    assert b.schedule(4)[0] == ("boost", "v", "a")


def test_relearning_resets_toward_init_by_the_diagnosed_strength():
    from mmbalance_llm.balance._kmeans import kmeans, minmax_scale, purity
    from mmbalance_llm.balance.relearning import reset_toward_init

    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    y = torch.arange(60) % 3
    x = centers[y] + 0.3 * torch.randn(60, 2, generator=gen)
    labels, _ = kmeans(minmax_scale(x), 3, seed=1)
    assert purity(labels, y) == 1.0
    assert torch.equal(labels, kmeans(minmax_scale(x), 3, seed=1)[0])  # same on every call (and rank)
    assert purity(torch.zeros(60, dtype=torch.long), y) == pytest.approx(1 / 3)

    mods = ["a", "v"]
    model, ds = tiny_model(mods), tiny_dataset(mods, n=32)
    b = get_method("relearning", reinit_epoch=1, lam=3.0)
    b.setup(make_ctx(mods, loaders={"train_eval": loader(ds), "validation": loader(tiny_dataset(mods, n=32, seed=1))}),
            model)
    init = {n: t.clone() for n, t in b.theta_init.items()}
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    diagnosis = b.diagnose(model)
    b.on_epoch_end(model, 0)  # the official never resets after epoch 0
    assert b.resets_done == 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    b.on_epoch_end(model, 1)
    for m in mods:
        d = diagnosis[m]
        assert d["alpha"] == pytest.approx(math.tanh(3.0 * abs(d["purity_train"] - d["purity_val"])))
        for n, p in model.modality_parameters(m):
            torch.testing.assert_close(p.detach(), d["alpha"] * init[n] + (1 - d["alpha"]) * before[n])
    assert torch.equal(model.fusion.classifier.weight, before["fusion.classifier.weight"])
    # theta_init survives a checkpoint round trip (resume resets toward the same point)
    fresh = get_method("relearning")
    fresh.load_state_dict(b.state_dict())
    assert fresh.resets_done == 1 and all(torch.equal(fresh.theta_init[n], init[n]) for n in init)


# -- resume: the balancer state (prototypes, anchors, Fisher sums, theta_init, pass offsets) round-trips ---
@pytest.mark.parametrize("method,balance,stop_at", [
    ("pmr", {}, 11),                          # mid-epoch 1: prototypes come from the checkpoint
    ("inforeg", {}, 11),                      # mid-epoch 1: anchor, Fisher sums and traces
    ("relearning", {"reinit_epoch": 1}, 19),  # epoch 2, after the first reset: theta_init and the reset count
    ("reconboost", {"t_epochs": 1}, 20),      # epoch 1, first pass, batch 4 of 8
], ids=["pmr", "inforeg", "relearning", "reconboost"])
def test_resume_reaches_the_same_result(tiny_data, tmp_path, method, balance, stop_at):
    import json

    from mmbalance_llm.config import recipe_from_dict
    from mmbalance_llm.train.trainer import Trainer
    from conftest import tiny_recipe

    train = {**FAST, "epochs": 3 if method == "relearning" else 2}
    full_raw = tiny_recipe(tiny_data(), str(tmp_path / "full"), method, train=train, balance={"method": method, **balance})
    full = Trainer(recipe_from_dict(full_raw)).fit()
    raw = tiny_recipe(tiny_data(), str(tmp_path / "part"), method, train={**train, "stop_after_steps": stop_at},
                      balance={"method": method, **balance})
    assert Trainer(recipe_from_dict(raw)).fit() is None
    raw["train"].update(stop_after_steps=None, resume_from="latest")
    assert json.dumps(Trainer(recipe_from_dict(raw)).fit()) == json.dumps(full)


@pytest.mark.parametrize("method,bad,field", [
    ("agm", {"empty_set": "none"}, "balance.empty_set"),
    ("pmr", {"proto_ratio": 0.0}, "balance.proto_ratio"),
    ("pmr", {"momentum": 1.0}, "balance.momentum"),
    ("inforeg", {"window": 0}, "balance.window"),
    ("reconboost", {"t_epochs": 0}, "balance.t_epochs"),
    ("relearning", {"reinit_epoch": 0}, "balance.reinit_epoch"),
    ("ogm", {"modulation": "GE"}, "balance.modulation"),
])
def test_bad_hyperparameters_name_the_field(method, bad, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        get_method(method, **bad)


def test_inforeg_rejects_unknown_modalities_in_beta_overrides():
    b = get_method("inforeg", beta_per_modality={"visaul": 0.1})
    with pytest.raises(ValueError, match="beta_per_modality.*visaul"):
        b.setup(make_ctx(["audio", "visual"]), tiny_model(["audio", "visual"]))
