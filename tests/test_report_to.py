"""`train.report_to` through Accelerate's trackers: TensorBoard events stay in <output_dir>/tensorboard (a
rerun keeps no old event file, a resume purges the steps after its checkpoint), a custom GeneralTracker
given through the Python API sees the flattened recipe, every logged row and the test metrics, 'none'
starts no tracker, and an unknown or not-installed tracker is one line before anything is written.
Both tasks."""
import glob
import json
import os

import pytest
from accelerate.tracking import GeneralTracker

from mmbalance_llm.config import RecipeError, recipe_from_dict
from mmbalance_llm.train.trainer import Trainer

from conftest import tiny_recipe
from test_sft_loop import sft_recipe


class RecordingTracker(GeneralTracker):
    """An offline tracker: keeps what Accelerate hands it."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.rows, self.finished, self.started = None, [], False, False

    @property
    def tracker(self):
        return self

    def start(self):
        self.started = True

    def store_init_configuration(self, values):
        self.config = dict(values)

    def log(self, values, step=None, **kwargs):
        self.rows.append((step, dict(values)))

    def finish(self):
        self.finished = True


def event_scalars(folder):
    """tag -> [(step, value)] from every event file under `folder` (what TensorBoard shows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_and_a_custom_tracker_get_every_row_classify(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    rec = RecordingTracker()
    raw = tiny_recipe(tiny_data(), out, train={"report_to": "tensorboard", "logging_steps": 2})
    final = Trainer(recipe_from_dict(raw), trackers=[rec]).fit()
    assert rec.started and rec.finished
    assert rec.config["train.learning_rate"] == 3e-3 and rec.config["balance.method"] == "none"
    assert all(isinstance(v, (bool, int, float, str)) for v in rec.config.values())
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    logged = [(s, v) for s, v in rec.rows if not any(k.startswith("test/") for k in v)]
    assert len(logged) == len(rows)  # one tracker call per metrics.jsonl line
    val = [r for r in rows if r["split"] == "validation"]
    val_calls = [(s, v) for s, v in logged if "validation/accuracy" in v]
    assert [s for s, _ in val_calls] == [r["step"] for r in val]
    assert val_calls[-1][1]["validation/unimodal_accuracy/audio"] == val[-1]["unimodal_accuracy"]["audio"]
    test_calls = [v for _, v in rec.rows if "test/accuracy" in v]
    assert len(test_calls) == 1 and test_calls[0]["test/accuracy"] == final["test"]["accuracy"]
    # TensorBoard: events where they always were, same scalars
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    scalars = event_scalars(os.path.join(out, "tensorboard"))
    assert [s for s, _ in scalars["validation/accuracy"]] == [r["step"] for r in val]
    assert scalars["test/accuracy"][0][1] == pytest.approx(final["test"]["accuracy"])
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in rows if r["split"] == "train"]


def test_rerun_keeps_no_old_event_file_and_resume_purges_later_steps(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    raw = tiny_recipe(tiny_data(), out, train={"epochs": 2, "logging_steps": 1})
    Trainer(recipe_from_dict(raw)).fit()
    first = set(glob.glob(os.path.join(out, "tensorboard", "**", "events.out.tfevents.*"), recursive=True))
    Trainer(recipe_from_dict(raw)).fit()
    second = set(glob.glob(os.path.join(out, "tensorboard", "**", "events.out.tfevents.*"), recursive=True))
    assert first and not first & second
    steps = [s for s, _ in event_scalars(os.path.join(out, "tensorboard"))["train/loss"]]
    assert steps == sorted(set(steps))  # curves not doubled
    # stopped at step 11, resumed from the epoch-1 checkpoint (8 steps an epoch)
    part = str(tmp_path / "part")
    raw = tiny_recipe(tiny_data(), part, train={"epochs": 2, "logging_steps": 1, "stop_after_steps": 11})
    assert Trainer(recipe_from_dict(raw)).fit() is None
    raw["train"].update(stop_after_steps=None, resume_from=os.path.join(part, "checkpoint-8"))
    Trainer(recipe_from_dict(raw)).fit()
    steps = [s for s, _ in event_scalars(os.path.join(part, "tensorboard"))["train/loss"]]
    assert steps == list(range(1, 17))  # steps 9-11 of the interrupted run are purged, not doubled


def test_report_to_none_starts_no_tracker_but_keeps_metrics_jsonl(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    raw = tiny_recipe(tiny_data(), out, train={"epochs": 1, "report_to": "none"})
    trainer = Trainer(recipe_from_dict(raw))
    trainer.fit()
    assert not os.path.exists(os.path.join(out, "tensorboard")) and trainer.accelerator.trackers == []
    assert os.path.getsize(os.path.join(out, "metrics.jsonl")) > 0


@pytest.mark.parametrize("value, message", [
    ("bogus", "recipe key 'train.report_to' is 'bogus'; choose one of tensorboard, wandb"),
    (["tensorboard", "nope"], "recipe key 'train.report_to' is 'nope'"),
    (["none", "tensorboard"], "'none' cannot be combined"),
])
def test_bad_report_to_is_one_line_before_anything_is_written(tiny_data, tmp_path, value, message):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        Trainer(recipe_from_dict(tiny_recipe(tiny_data(), str(out), train={"report_to": value})))
    assert not out.exists()


def test_a_tracker_that_is_not_installed_is_refused_before_output_dir(tiny_data, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match="train.report_to 'wandb': the package wandb is not installed"):
        Trainer(recipe_from_dict(tiny_recipe(tiny_data(), str(out), train={"report_to": ["tensorboard", "wandb"]})))
    assert not out.exists()


def test_sft_logs_through_the_trackers(tmp_path):
    rec = RecordingTracker()
    raw = sft_recipe(tmp_path, num_train_epochs=1)
    final = Trainer(raw, trackers=[rec]).fit()
    out = raw["output_dir"]
    assert rec.config["task"] == "sft" and rec.config["adapter"] == "moka" and rec.finished
    tags = set().union(*(v for _, v in rec.rows))
    assert {"train/loss", "validation/accuracy", "test/accuracy"} <= tags
    assert [v["test/accuracy"] for _, v in rec.rows if "test/accuracy" in v] == [final["test"]["accuracy"]]
    assert "validation/accuracy" in event_scalars(os.path.join(out, "tensorboard"))
