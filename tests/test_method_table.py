"""One row per registered balancing method, in the style of peft's TEST_CASES: every method runs at M = 2 and
M = 3, a run stopped mid-epoch and resumed equals the uninterrupted run (weights and final metrics), the
method's state survives the checkpoint round trip, and zero strength equals the baseline or a named
equivalent. A registered method without a row fails the guard. (2-process DDP over every registered method:
tests/test_distributed.py; the official-math fidelity checks: tests/test_fidelity.py.)"""
import pytest
import torch

from mmbalance_llm.balance import available_methods

# method -> {"exercise": hyperparameters that make a 2-epoch tiny run reach the mechanism,
#            "zero": (hyperparameters, equivalent method, its hyperparameters) or a string saying why there
#                    is no zero-strength setting,
#            "model": recipe model overrides}
TEST_CASES = {
    "none": {"zero": "the baseline itself"},
    "unimodal_aux": {"zero": ({"weight": 0.0}, "none", {})},
    "mmpareto": {"zero": "no strength knob; without gradient conflicts it is unimodal_aux (test_methods_objective)"},
    "mmcosine": {"zero": "no strength knob: the cosine logits are the method"},
    "cml": {"zero": ({"modulation_starts": 1000}, "none", {})},  # lam 0 still averages the chain of CEs
    "mbsd": {"zero": "weight 0 is fused + unimodal CE, checked on one step in test_methods_objective"},
    "lfm": {"exercise": {"alpha_init": 0.5, "lr_alpha": 0.5},
            "zero": "no zero setting: the loss weights are the method"},
    "gblending": {"exercise": {"super_epoch": 1}, "zero": "no strength knob: the blending weights are the method"},
    "umt": {"zero": ({"sigma": 0.0}, "none", {})},
    "ume": {"zero": "no strength knob: the ensemble of unimodal heads is the method"},
    "ogm_ge": {"zero": ({"alpha": 0.0, "modulation": "OGM"}, "none", {})},
    "ogm": {"exercise": {"modulation_starts": 0},
            "zero": ({"alpha": 0.0, "modulation": "OGM", "modulation_starts": 0}, "none", {})},
    "agm": {"zero": ({"alpha": 0.0}, "none", {})},
    "pmr": {"zero": ({"alpha": 0.0}, "none", {})},
    "inforeg": {"zero": ({"beta": 0.0, "beta_other": 0.0}, "unimodal_aux", {"weight": 1.0})},
    "reconboost": {"exercise": {"t_epochs": 1}, "zero": "no strength knob: boosting passes are the method"},
    "relearning": {"exercise": {"reinit_epoch": 1}, "zero": ({"lam": 0.0, "reinit_epoch": 1}, "none", {})},
    "sample_valuation": {"exercise": {"warmup_epochs": 1},
                         "zero": ({"warmup_epochs": 1000}, "none", {})},  # never leaves its warm-up
    "modality_valuation": {"exercise": {"warmup_epochs": 1},
                           "zero": ({"alpha": 0.0, "warmup_epochs": 0}, "none", {})},
    "opm": {"zero": ({"q_base": 0.0}, "none", {})},
    "mla": {"zero": "its own shared-head architecture: no baseline twin"},
    "amco": {"zero": "no strength knob: the mask schedule is the method"},
    "greedy": {"zero": "its own MMTM architecture: no baseline twin"},
    "rollingq": {"zero": "its own attention-fusion architecture; r_time 0 is checked in test_rollingq"},
}

FAST = {"epochs": 2, "logging_steps": 4}
STOP_AT = 11  # inside epoch 2 (8 optimizer steps per epoch on the tiny data)


def test_every_registered_method_has_a_row():
    from mmbalance_llm.balance import method_class

    # methods for task sft only (mllm_*) run on the tiny MLLM twins: tests/test_mllm_balance.py
    assert set(TEST_CASES) == {m for m in available_methods() if "classify" in method_class(m).tasks}


def _params(trainer):
    net = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


_BASELINES = {}


def _run(tiny_data, tmp_path, name, method, balance, preset="av_imbalance", **train):
    from conftest import tiny_recipe

    from mmbalance_llm.config import recipe_from_dict
    from mmbalance_llm.train.trainer import Trainer

    raw = tiny_recipe(tiny_data(preset), str(tmp_path / name), method, train={**FAST, **train})
    raw["balance"].update(balance)
    trainer = Trainer(recipe_from_dict(raw))
    return trainer, trainer.fit()


@pytest.mark.parametrize("method", sorted(TEST_CASES))
def test_method_runs_at_three_modalities(tiny_data, tmp_path, method):
    trainer, final = _run(tiny_data, tmp_path, "m3", method, TEST_CASES[method].get("exercise", {}),
                          preset="tri_modal", epochs=1)
    assert len(trainer.task.modalities) == 3 and final["method"] == method
    assert set(final["test"]["unimodal_accuracy"]) == set(trainer.task.modalities)
    assert all(torch.isfinite(v).all() for v in _params(trainer).values() if v.is_floating_point())


@pytest.mark.parametrize("method", sorted(TEST_CASES))
def test_resume_equals_uninterrupted_and_state_round_trips(tiny_data, tmp_path, method):
    exercise = TEST_CASES[method].get("exercise", {})
    full_tr, full = _run(tiny_data, tmp_path, "full", method, exercise)
    part_tr, stopped = _run(tiny_data, tmp_path, "part", method, exercise, stop_after_steps=STOP_AT)
    assert stopped is None
    res_tr, resumed = _run(tiny_data, tmp_path, "part", method, exercise, resume_from="latest")
    assert resumed == full, method
    assert _same(_params(res_tr), _params(full_tr)), method
    assert _state_equal(res_tr.balancer.state_dict(), full_tr.balancer.state_dict()), method


@pytest.mark.parametrize("method", sorted(m for m, c in TEST_CASES.items() if not isinstance(c["zero"], str)))
def test_zero_strength_equals_the_baseline_or_its_named_equivalent(tiny_data, tmp_path, method):
    zero, ref_method, ref_params = TEST_CASES[method]["zero"]
    key = (ref_method, tuple(sorted(ref_params.items())))
    if key not in _BASELINES:
        ref_tr, ref = _run(tiny_data, tmp_path, "ref", ref_method, ref_params)
        _BASELINES[key] = (_params(ref_tr), ref)
    ref_params_t, ref = _BASELINES[key]
    trainer, final = _run(tiny_data, tmp_path, "zero", method, zero)
    for split in ("validation", "test"):
        assert final[split] == ref[split], method
    assert _same(_params(trainer), ref_params_t), method


def test_every_default_lies_in_its_declared_range_and_out_of_range_values_are_refused():
    from mmbalance_llm.balance import _make_config, method_class

    for name in available_methods():
        cls = method_class(name)
        hparams = cls.describe()["hyperparameters"]
        _make_config(cls, {k: v["default"] for k, v in hparams.items() if v["default"] is not None})
        for key, spec in hparams.items():
            if "min" in spec and isinstance(spec["default"], (int, float)) and not isinstance(spec["default"], bool):
                with pytest.raises(ValueError, match=f"'balance.{key}' of method '{name}' must be"):
                    _make_config(cls, {key: spec["min"] - 1})


# measured with tests/engine_parity_worker.py under accelerate_configs/deepspeed_zero{2,3}.yaml (README table)
REFUSED_UNDER_DEEPSPEED = {"greedy", "inforeg", "mla", "ogm", "ogm_ge", "relearning", "mmpareto", "reconboost"}
REFUSED_UNDER_ZERO3 = REFUSED_UNDER_DEEPSPEED | {"cml", "gblending", "lfm", "umt", "rollingq"}
# settings of refused methods that run (they need no parameter-gradient edit): measured equal to DDP
RUNS_UNDER_DEEPSPEED = [("ogm", {"modulation": "OGM"}), ("ogm_ge", {"modulation": "OGM"})]
REFUSED_SETTINGS = [("mmpareto", {"gradient_space": "feature"}), ("mla", {"projection": False})]


@pytest.mark.parametrize("stage", [2, 3])
def test_methods_refuse_a_deepspeed_stage_they_cannot_run_before_the_engine_is_built(stage):
    from types import SimpleNamespace

    from mmbalance_llm.balance import get_method, method_class

    acc = SimpleNamespace(distributed_type=SimpleNamespace(name="DEEPSPEED"),
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    refused = REFUSED_UNDER_DEEPSPEED if stage == 2 else REFUSED_UNDER_ZERO3
    for name in (m for m in available_methods() if "classify" in method_class(m).tasks):
        balancer = get_method(name)
        if name in refused:
            with pytest.raises(ValueError, match=f"balance.method '{name}'"):
                balancer.check_engine(acc)
        else:
            balancer.check_engine(acc)  # runs (README: the same parameters as DDP)
    for name, settings in RUNS_UNDER_DEEPSPEED + REFUSED_SETTINGS:
        balancer = get_method(name, **settings)
        if (name, settings) in REFUSED_SETTINGS:
            with pytest.raises(ValueError, match=f"balance.method '{name}' .*; it runs under DDP"):
                balancer.check_engine(acc)
        else:
            balancer.check_engine(acc)
