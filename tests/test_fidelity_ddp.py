"""1 process at batch 2B and 2 processes at batch B train alike: the methods whose statistics are per
batch (pmr prototypes, cml hinge, greedy MMTM buffers, valuation re-sampling) reduce them over the global
batch. A real 2-process CPU launch, so it is marked slow."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
METHODS = "pmr,sample_valuation,cml,greedy"


def run(args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               **(env_extra or {}))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_one_and_two_processes_match_at_the_same_global_batch(tiny_data, tmp_path):
    worker = os.path.join(ROOT, "tests", "equal_batch_worker.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([worker, tiny_data(), str(tmp_path / "r1"), str(one), METHODS, "32"])
    run(["-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/ddp_cpu_2proc.yaml", worker,
         tiny_data(), str(tmp_path / "r2"), str(two), METHODS, "16"], {"ACCELERATE_USE_CPU": "true"})
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    for method in METHODS.split(","):
        diff = (torch.tensor(a[method]["params"]) - torch.tensor(b[method]["params"])).abs().max().item()
        assert diff < 1e-5, f"{method}: 1 vs 2 processes differ by {diff}"
        assert abs(a[method]["accuracy"] - b[method]["accuracy"]) < 0.01, method
