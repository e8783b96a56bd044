"""`rollingq` in a `task: sft` run: the answer queries of the tiny LLaVA twin's decoder are rotated at epoch
ends, the rotation is in the checkpoint (exact resume) and in best/ (the test read uses it), r_time 0 is the
plain run bit for bit, and 2 processes rotate like 1."""
import json

import pytest

torch = pytest.importorskip("torch")

from test_mllm_balance import _same, build_assets  # noqa: E402
from test_sft_loop import _adapter_weights, sft_recipe  # noqa: E402


def test_answer_query_mask_marks_the_positions_that_predict_the_answer():
    from mmbalance_llm.models.rolling_query import answer_query_mask

    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, -100]])
    m = answer_query_mask(labels, None, 5, 2, "cpu")
    assert m.tolist() == [[False, True, True, False, False], [False, False, True, False, False]]
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # generation, right padded: the last attended position
    assert answer_query_mask(None, am, 4, 2, "cpu").nonzero().tolist() == [[0, 2], [1, 3]]
    assert answer_query_mask(None, torch.ones(2, 9), 1, 2, "cpu").all()  # cached decoding: the new token


def _recipe(tmp_path, name, **balance):
    raw = sft_recipe(tmp_path, name)
    raw["balance"] = {"method": "rollingq", **balance}
    return raw


def test_rotation_at_epoch_end_changes_the_answer_queries_and_reaches_best(tmp_path):
    from safetensors.torch import load_file

    from mmbalance_llm.train.trainer import Trainer

    build_assets(_recipe(tmp_path, "plain"))
    plain = Trainer({**sft_recipe(tmp_path, "plain")}).fit()
    zero = Trainer(_recipe(tmp_path, "r0", r_time=0)).fit()
    assert {**zero, "method": "none"} == plain  # no rotation: the plain run bit for bit
    assert _same(_adapter_weights(tmp_path / "r0" / "best"), _adapter_weights(tmp_path / "plain" / "best"))

    final = Trainer(_recipe(tmp_path, "rq", r_time=2, layers=[-1])).fit()
    rows = [json.loads(x) for x in open(tmp_path / "rq" / "metrics.jsonl")]
    rq = [r for r in rows if r["split"] == "rollingq"]
    assert [r["rotations"] for r in rq] == [1, 2] and all(r["rotated_heads"] > 0 for r in rq)
    assert all(0 < r["air"] for r in rq) and all(r["rotation_angle_deg"] > 0 for r in rq)
    saved = load_file(tmp_path / "rq" / "best" / "rolling_query.safetensors")
    n_heads = 4  # the tiny twin's decoder
    assert saved["rotation"].shape[:2] == (1, n_heads) and int(saved["rotation_count"]) >= 1
    eye = torch.eye(saved["rotation"].shape[-1]).expand_as(saved["rotation"])
    assert not torch.allclose(saved["rotation"], eye)
    r = saved["rotation"][0, 0].double()
    assert torch.allclose(r @ r.T, torch.eye(r.shape[0], dtype=torch.float64), atol=1e-5)  # orthogonal
    # the rotation changes the model's answers: validation after the first rotation differs from the plain run
    val = [r for r in rows if r["split"] == "validation"]
    plain_val = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl") if '"validation"' in x]
    assert val[0] == plain_val[0] and val[1]["loss"] != plain_val[1]["loss"]
    assert final["method"] == "rollingq"


def test_rollingq_sft_resumes_exactly(tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    build_assets(_recipe(tmp_path, "full"))
    full = Trainer(_recipe(tmp_path, "full", r_time=2)).fit()
    # stop after the first epoch's rotation (4 steps per epoch), resume in the second epoch
    part = _recipe(tmp_path, "part", r_time=2)
    part["train"]["stop_after_steps"] = 6
    assert Trainer(part).fit() is None
    part["train"].pop("stop_after_steps")
    part["train"]["resume_from_checkpoint"] = "latest"
    assert Trainer(part).fit() == full
    assert _same(_adapter_weights(tmp_path / "full" / "best"), _adapter_weights(tmp_path / "part" / "best"))


def test_bad_layers_are_refused_in_one_line():
    from mmbalance_llm.balance import method_config

    with pytest.raises(ValueError, match="balance.layers"):
        method_config({"method": "rollingq", "layers": "last"})


@pytest.mark.slow
def test_rollingq_sft_under_two_processes_rotates_like_one(tmp_path):
    from test_sft_loop import train_two_processes

    from mmbalance_llm.train.trainer import Trainer

    def recipe(name, **train):
        raw = _recipe(tmp_path, name, r_time=1)
        raw["train"].update(num_train_epochs=1, **train)
        return raw

    build_assets(recipe("one"))
    Trainer(recipe("one")).fit()
    train_two_processes(tmp_path, recipe("two", per_device_train_batch_size=2))
    rq = [[json.loads(x) for x in open(tmp_path / n / "metrics.jsonl") if '"rollingq"' in x] for n in ("one", "two")]
    # the estimation pass sums over the whole training split on both: the same statistic (float tolerance:
    # the weights after one epoch differ in the last bits between 1 x 4 and 2 x 2 samples per step)
    assert rq[0][0]["air"] == pytest.approx(rq[1][0]["air"], rel=1e-3)
    assert rq[0][0]["rotated_heads"] == rq[1][0]["rotated_heads"]


@pytest.mark.parametrize("setting", [{"layers": [0]}, {"estimate_max_batches": 2}])
def test_sft_only_settings_are_refused_for_the_classifier(tmp_path, tiny_data, setting):
    from conftest import tiny_recipe

    from mmbalance_llm.train.trainer import Trainer

    raw = tiny_recipe(tiny_data(), str(tmp_path / "out"), "rollingq", balance=setting)
    with pytest.raises(ValueError, match=f"balance.{next(iter(setting))} applies to task sft"):
        Trainer(raw)
    assert not (tmp_path / "out").exists()
