"""Per-modality probe accuracy: the probe itself, and its presence in every eval for every architecture."""
from __future__ import annotations

import json

import pytest
import torch

from mmbalance_llm.eval.probe import accuracy_imbalance, fit_probe, probe_metrics


def _blobs(n, d, num_classes, sep, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    centers = torch.randn(num_classes, d, generator=gen) * sep
    return centers[y] + torch.randn(n, d, generator=gen), y


def test_probe_separates_an_informative_view_and_not_noise():
    x, y = _blobs(400, 8, 4, sep=3.0, seed=0)
    noise = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    xt, yt = _blobs(200, 8, 4, sep=3.0, seed=0)  # same centers (same seed), fresh draws
    out = probe_metrics({"good": x, "noise": noise}, y, {"good": xt, "noise": torch.randn(200, 8)}, yt, num_classes=4)
    acc = out["unimodal_probe_accuracy"]
    assert acc["good"] > 0.9 and acc["noise"] < 0.45
    assert out["imbalance_probe"] > 0.8  # only one view is above chance


def test_probe_is_deterministic_and_handles_separable_and_subsampled_data():
    x, y = _blobs(300, 5, 3, sep=50.0, seed=2)  # separable: the L2 term keeps the weights finite
    a = fit_probe(x, y, 3, max_train=100, seed=0)(x)
    b = fit_probe(x, y, 3, max_train=100, seed=0)(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert (a.argmax(-1) == y).float().mean() > 0.95


def test_accuracy_imbalance_is_measured_above_chance():
    labels = torch.tensor([0, 0, 1, 1])  # chance (majority class) = 0.5
    assert accuracy_imbalance({"a": 0.9, "b": 0.9}, labels) == 0.0
    assert accuracy_imbalance({"a": 0.9, "b": 0.5}, labels) == 1.0


@pytest.mark.parametrize("method, model", [
    ("none", {}),
    ("mla", {}),  # shared head
    ("greedy", {}),  # MMTM blocks
    ("none", {"architecture": "fusion_transformer", "fusion_layers": 1, "fusion_heads": 1}),
])
def test_every_architecture_reports_both_unimodal_metrics(tiny_data, run_tiny, method, model):
    data = tiny_data("tokens") if model.get("architecture") == "fusion_transformer" else tiny_data()
    trainer, final = run_tiny(data, method, train={"epochs": 1}, model=model)
    for split in ("validation", "test"):
        metrics = final[split]
        probe = metrics["unimodal_probe_accuracy"]
        assert set(probe) == set(metrics["unimodal_accuracy"]) == set(trainer.data.modalities)
        assert all(0.0 <= v <= 1.0 for v in probe.values())
        assert 0.0 <= metrics["imbalance_probe"] <= 1.0 and 0.0 <= metrics["imbalance_unimodal"] <= 1.0
    saved = json.loads(open(f"{trainer.output_dir}/final_metrics.json").read())
    assert saved["test"]["unimodal_probe_accuracy"] == final["test"]["unimodal_probe_accuracy"]
    rows = [json.loads(line) for line in open(f"{trainer.output_dir}/metrics.jsonl")]
    assert any("unimodal_probe_accuracy" in r for r in rows if r.get("split") == "validation")


@pytest.mark.slow
def test_probe_under_two_processes_reads_the_whole_split_on_every_rank(tiny_data, tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=root, OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "accelerate_configs/ddp_cpu_2proc.yaml", "tests/probe_ddp_worker.py", tiny_data(),
                           str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["test"]["unimodal_probe_accuracy"] == ranks[1]["test"]["unimodal_probe_accuracy"]
    assert ranks[0]["test"]["num_samples"] == 128  # the gathered split, not one rank's shard
