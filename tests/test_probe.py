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
