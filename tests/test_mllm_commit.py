"""CoMMIT (balance/commit.py) on the tiny LLaVA twin with a trainable projector: zero strength is the plain run bit
for bit, kappa equals a hand computation, the learning-rate factors reach the optimizer's groups, a frozen
projector is refused in one line, a stopped run resumes exactly, and 2 processes see the 1-process kappa."""
import json
import math
import os

import pytest

torch = pytest.importorskip("torch")

from test_mllm_balance import _same, build_assets  # noqa: E402
from test_sft_loop import _adapter_weights, sft_recipe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(tmp_path, name, balance, **train):
    raw = sft_recipe(tmp_path, name, **train)
    raw["model"]["freeze"] = {"projector": False}  # the feature-side learner CoMMIT needs
    raw["balance"] = balance
    return raw


def _rows(path):
    return [r for r in (json.loads(x) for x in open(path / "metrics.jsonl")) if r["split"] == "train"]


def test_the_tiny_recipes_parse_and_unfreeze_the_projector():
    from mmbalance_llm.config import load_recipe

    for family in ("llava", "qwen2_audio"):
        for name in ("commit_tiny.yaml", "commit.yaml"):
            r = load_recipe(os.path.join(ROOT, "recipes", family, name))
            assert r.balance["method"] == "commit" and r.model.freeze["projector"] is False, (family, name)


def test_zero_strength_reproduces_the_plain_run_bit_for_bit(tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    raw = recipe(tmp_path, "none", {"method": "none"}, max_steps=3)
    build_assets(raw)
    plain = Trainer(raw).fit()
    zero = Trainer(recipe(tmp_path, "zero", {"method": "commit", "schedule_strength": 0.0, "aux_weight": 0.0},
                          max_steps=3)).fit()
    assert {**zero, "method": "none"} == plain
    assert _same(_adapter_weights(tmp_path / "zero" / "best"), _adapter_weights(tmp_path / "none" / "best"))
    assert all("kappa" not in r and "commit_aux" not in r for r in _rows(tmp_path / "zero"))


def test_the_learner_groups_change_no_number(tmp_path, monkeypatch):
    """make_optimizer splits an MLLM's groups into "llm" / "feature": the same weights as one group would give."""
    import mmbalance_llm.train.setup as setup
    from mmbalance_llm.train.trainer import Trainer

    raw = recipe(tmp_path, "split", {"method": "none"}, max_steps=2, weight_decay=0.01)
    build_assets(raw)
    assert Trainer(raw).fit() is not None
    monkeypatch.setattr(setup, "learner_groups", lambda model, groups: groups)
    trainer = Trainer(recipe(tmp_path, "one", {"method": "none"}, max_steps=2, weight_decay=0.01))
    assert all("learner" not in g for g in trainer.optimizer.param_groups)
    trainer.fit()
    assert _same(_adapter_weights(tmp_path / "split" / "best"), _adapter_weights(tmp_path / "one" / "best"))


def test_learning_rate_factors_follow_the_odds_ratio():
    from mmbalance_llm.balance.commit import balance_coefficient, kl_sum, lr_factors

    one = {"feature": 1.0, "llm": 1.0}
    f = lr_factors(0.8, 0.5, 1.0, 0.1, 10.0, one)  # odds 4 at equal rates: the feature side moves 4x the KL
    assert f == pytest.approx({"feature": 4 ** -0.25, "llm": 4 ** 0.25})  # step ratio 1/2: KL ratio 1/4 x 4 = 1
    # kappa measured under those factors, back at the target: the factors stay
    assert lr_factors(0.5, 0.5, 1.0, 0.1, 10.0, f) == pytest.approx(f)
    # measured 0.8 while the feature side already runs at half the LLM's rate: its odds at equal rates are 4 * 4^2
    assert lr_factors(0.8, 0.5, 1.0, 0.01, 100.0, {"feature": 0.5, "llm": 2.0}) == pytest.approx(
        {"feature": 64 ** -0.25, "llm": 64 ** 0.25})
    assert lr_factors(0.999, 0.5, 4.0, 0.1, 10.0, one) == {"feature": 0.1, "llm": 10.0}  # clamped
    assert lr_factors(0.8, 0.5, 0.0, 0.1, 10.0, one) == one
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.5, 0.25, 0.25]])
    hand = sum(a * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist()))
    assert kl_sum(p.log(), q.log()).item() == pytest.approx(hand, rel=1e-6)
    assert balance_coefficient(1.0, 4.0) == 0.25 and balance_coefficient(1.0, 0.0) is None


def test_kappa_equals_a_hand_computation_on_a_fixed_batch(tmp_path):
    """The balancer's three forwards against forwards with the parameters set by hand, in float64 KL."""
    from mmbalance_llm.train.trainer import Trainer

    raw = recipe(tmp_path, "hand", {"method": "commit"})
    build_assets(raw)
    trainer = Trainer(raw)
    b, net = trainer.balancer, trainer.accelerator.unwrap_model(trainer.model)
    batch = next(iter(trainer.train_loader))
    torch.manual_seed(0)
    cur = {n: p.detach().clone() for n, p in b._named()}
    b.prev = {n: v + 0.05 * torch.randn_like(v) for n, v in cur.items()}  # "before the update"
    net.train()
    old, feat, new = b._measure(net, batch)
    assert all(torch.equal(p, cur[n]) for n, p in b._named()) and net.training  # parameters and mode restored

    def dist(feature, llm):
        with torch.no_grad():
            for n, p in b.params["feature"]:
                p.copy_(feature[n])
            for n, p in b.params["llm"]:
                p.copy_(llm[n])
            net.eval()
            logits = net(**batch).logits.double()
        lab = batch["labels"][:, 1:]
        return torch.softmax(logits[:, :-1][lab != -100], -1)

    p_old, p_feat, p_new = dist(b.prev, b.prev), dist(cur, b.prev), dist(cur, cur)
    s = (p_feat * (p_feat / p_old).log()).sum().item()
    j = (p_new * (p_new / p_old).log()).sum().item()
    assert j > 0
    from mmbalance_llm.balance.commit import kl_sum

    assert kl_sum(feat, old).item() == pytest.approx(s, rel=1e-3)
    assert kl_sum(new, old).item() == pytest.approx(j, rel=1e-3)
    assert kl_sum(feat, old).item() / kl_sum(new, old).item() == pytest.approx(s / j, rel=1e-3)


def test_learning_rate_factors_reach_the_optimizer_groups(tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    for sched in ("constant", "linear"):
        raw = recipe(tmp_path, f"lr_{sched}", {"method": "commit", "lr_update_every": 1, "schedule_strength": 2.0},
                     max_steps=3, lr_scheduler_type=sched, warmup_steps=1 if sched == "linear" else 0)
        build_assets(raw)
        trainer = Trainer(raw)
        assert {g.get("learner") for g in trainer.optimizer.param_groups} == {"feature", "llm"}
        trainer.fit()
        last = [r for r in _rows(tmp_path / f"lr_{sched}") if "kappa" in r][-1]
        f = {"feature": last["lr_factor_feature"], "llm": last["lr_factor_llm"]}
        assert f["feature"] != 1.0 and f["llm"] == pytest.approx(1 / f["feature"])
        inner = getattr(trainer.scheduler, "scheduler", trainer.scheduler)
        for i, g in enumerate(trainer.optimizer.param_groups):
            scheduled = 1.0 if inner is None else inner.lr_lambdas[i](inner.last_epoch)
            assert g["lr"] == pytest.approx(5e-3 * f[g["learner"]] * scheduled, rel=1e-9), (sched, g["learner"])
        # the service replaces the factors, never compounds them
        trainer.set_lr_factors({"feature": 1.0, "llm": 1.0})
        assert {g["lr"] for g in trainer.optimizer.param_groups} == {trainer.optimizer.param_groups[0]["lr"]}


def test_a_frozen_projector_is_refused_in_one_line_before_anything_is_written(tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    raw = sft_recipe(tmp_path, "frozen")
    raw["balance"] = {"method": "commit"}
    build_assets(raw)
    with pytest.raises(ValueError) as err:
        Trainer(raw)
    assert "model.freeze.projector: false" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "frozen").exists()


def test_commit_resumes_exactly_with_the_pending_snapshot_and_the_factors(tmp_path):
    """Stopped at step 3: the snapshot of step 3's parameters, the kappa window and the factors are restored."""
    from mmbalance_llm.train.trainer import Trainer

    balance = {"method": "commit", "lr_update_every": 2}
    build_assets(recipe(tmp_path, "full", balance))
    full = Trainer(recipe(tmp_path, "full", balance)).fit()
    assert Trainer(recipe(tmp_path, "part", balance, stop_after_steps=3)).fit() is None
    resumed = Trainer(recipe(tmp_path, "part", balance, resume_from_checkpoint="latest")).fit()
    assert resumed == full
    assert _same(_adapter_weights(tmp_path / "full" / "best"), _adapter_weights(tmp_path / "part" / "best"))
    rows = _rows(tmp_path / "full")
    assert "kappa" not in rows[0] and all("kappa" in r and "commit_aux" in r for r in rows[1:])
    assert len({r["lr_factor_feature"] for r in rows[1:]}) > 1  # the factors moved


@pytest.mark.slow
def test_commit_under_two_processes_sums_the_statistics_over_ranks(tmp_path):
    """2 CPU processes x 2 samples measure the kappa and set the factors of 1 process x 4."""
    from test_sft_loop import train_two_processes

    from mmbalance_llm.train.trainer import Trainer

    balance = {"method": "commit", "lr_update_every": 1}
    build_assets(recipe(tmp_path, "one", balance, max_steps=3))
    Trainer(recipe(tmp_path, "one", balance, max_steps=3)).fit()
    train_two_processes(tmp_path, recipe(tmp_path, "two", balance, max_steps=3, per_device_train_batch_size=2))
    t1, t2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert "kappa" in t1[1] and "kappa" in t2[1]
    for key in ("kl_feature", "kl_joint", "kappa", "lr_factor_feature", "lr_factor_llm"):
        assert t2[1][key] == pytest.approx(t1[1][key], rel=1e-3), key  # same weights up to rounding, same 4 samples
