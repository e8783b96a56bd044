"""Kill -9 at several moments, including inside a checkpoint write, then `resume_from_checkpoint=latest`:
the resumed run ends bit-identical to the uninterrupted one (final metrics and best weights), for both tasks,
and no torn checkpoint is ever picked."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import tiny_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def run(tmp_path, recipe: dict, kill: str = "none"):
    path = tmp_path / f"recipe-{abs(hash((recipe['output_dir'], kill)))}.json"
    path.write_text(json.dumps(recipe))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kill_worker.py"), str(path), kill],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def outcome(out_dir):
    from safetensors.torch import load_file

    final = json.loads(open(os.path.join(out_dir, "final_metrics.json")).read())
    best = os.path.join(out_dir, "best")
    weights = {}
    for f in sorted(os.listdir(best)):
        if f.endswith(".safetensors"):
            weights.update(load_file(os.path.join(best, f)))
    return final, weights


def assert_same(a, b):
    import torch

    (fa, wa), (fb, wb) = a, b
    assert fa == fb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_and_resume(tmp_path, recipe, kill):
    proc = run(tmp_path, recipe, kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = os.listdir(recipe["output_dir"])
    if kill.startswith("checkpoint"):  # the kill hit a write: only its partial folder is there, never renamed
        assert any(d.startswith(".partial-checkpoint-") for d in left), left
    resumed = {**recipe, "train": {**recipe["train"], "resume_from_checkpoint": "latest"}}
    proc = run(tmp_path, resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [d for d in os.listdir(recipe["output_dir"]) if d.startswith((".partial-", ".trash-"))]
    return outcome(recipe["output_dir"])


@pytest.mark.parametrize("kill", ["step:5", "checkpoint:2", "step:8"])
def test_classifier_killed_anywhere_resumes_bit_identical(tiny_data, tmp_path, kill):
    base = tiny_recipe(tiny_data(), str(tmp_path / "ref"), "ogm_ge", train={"epochs": 2, "save_steps": 3})
    ref = tmp_path / "ref"
    assert run(tmp_path, base).returncode == 0
    recipe = {**base, "output_dir": str(tmp_path / "killed")}
    assert_same(kill_and_resume(tmp_path, recipe, kill), outcome(ref))


def test_sft_killed_inside_a_checkpoint_write_resumes_bit_identical(tmp_path):
    from test_sft_loop import sft_recipe

    base = sft_recipe(tmp_path, "ref", save_steps=2)
    assert run(tmp_path, base).returncode == 0
    recipe = {**base, "output_dir": str(tmp_path / "killed")}
    assert_same(kill_and_resume(tmp_path, recipe, "checkpoint:2"), outcome(tmp_path / "ref"))
