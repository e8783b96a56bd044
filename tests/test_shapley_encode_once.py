"""Encode-once subset predictions give exactly the Shapley values of one full pass per subset."""
import pytest
import torch
from accelerate import Accelerator

from mmbalance_llm.config import ModelConfig
from mmbalance_llm.data.features import FeatureDataset, collate
from mmbalance_llm.eval import evaluator, subset_pass
from mmbalance_llm.eval.evaluator import collect, evaluate
from mmbalance_llm.eval.metrics import subsets
from mmbalance_llm.models.registry import build_model


def _setup(modalities, fusion, encoder, n=45, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {m: ([5, 6] if encoder == "transformer" else [7]) for m in modalities}
    tensors = {m: torch.randn(n, *s, generator=gen) for m, s in shapes.items()}
    torch.manual_seed(seed)
    model = build_model(ModelConfig(encoder=encoder, fusion=fusion, feature_dim=8, hidden_dim=16, num_layers=1,
                                    num_heads=2), modalities, shapes, 3)
    ds = FeatureDataset(tensors, torch.randint(0, 3, (n,), generator=gen))
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate)  # last batch: 13 rows
    return model, loader


def _plain(monkeypatch):
    monkeypatch.setattr(subset_pass, "encode_once_supported", lambda core, acc: False)


@pytest.mark.parametrize("fusion, encoder, m", [("concat", "mlp", 2), ("sum", "mlp", 3), ("film", "mlp", 3),
                                                ("gated", "mlp", 4), ("concat", "transformer", 2)])
def test_identical_subset_predictions_and_shapley(monkeypatch, fusion, encoder, m):
    modalities = ["audio", "visual", "text", "depth"][:m]
    model, loader = _setup(modalities, fusion, encoder)
    acc = Accelerator(cpu=True)
    keep = [s for s in subsets(modalities) if len(s) < m]
    assert subset_pass.encode_once_supported(model, acc)
    fast = collect(model, loader, acc, modalities, keep)
    fast_metrics = evaluate(model, loader, acc, modalities, 3, unimodal="auto", probe_loader=loader)
    with monkeypatch.context() as mp:
        _plain(mp)
        slow = collect(model, loader, acc, modalities, keep)
        slow_metrics = evaluate(model, loader, acc, modalities, 3, unimodal="auto", probe_loader=loader)
    for s in keep:
        assert torch.equal(fast["subset_preds"][s], slow["subset_preds"][s]), s
    assert fast_metrics == slow_metrics
    assert set(fast_metrics["shapley"]) == set(modalities)


def test_encoders_run_once_per_batch_plus_once_per_batch_shape():
    modalities = ["audio", "visual", "text"]
    model, loader = _setup(modalities, "concat", "mlp")
    calls = []
    model.encoders["audio"].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    collect(model, loader, Accelerator(cpu=True), modalities, [s for s in subsets(modalities) if len(s) < 3])
    # batches of 16, 16 and 13 rows, plus one all-zero pass for each batch size (16, then 13)
    assert calls == [16, 16, 16, 13, 13]


def test_models_that_mix_modalities_take_the_plain_way():
    acc = Accelerator(cpu=True)
    model, _ = _setup(["audio", "visual"], "concat", "mlp")
    model.register_forward_hook(lambda *a: None)
    assert not subset_pass.encode_once_supported(model, acc)

    class CrossModal(type(model)):
        def encode(self, **inputs):
            return super().encode(**inputs)

    assert not subset_pass.encode_once_supported(CrossModal(model.config), acc)
    assert not subset_pass.encode_once_supported(torch.nn.Linear(2, 2), acc)
    assert evaluator.SubsetPredictor is subset_pass.SubsetPredictor
