"""FusionTransformer: output contract, probes, rotation semantics, save/load, diagnostics."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from mmbalance_llm.models.fusion_transformer import FusionTransformer, FusionTransformerConfig


def make_model(modalities=("audio", "visual"), shapes=None, layers=1, heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    shapes = shapes or {m: [5, 6] for m in modalities}
    cfg = FusionTransformerConfig(modalities=list(modalities), input_shapes=shapes, num_classes=3, feature_dim=8,
                                  hidden_dim=8, num_layers=1, num_heads=2, fusion_layers=layers, fusion_heads=heads, **kw)
    return FusionTransformer(cfg).eval()


def inputs(model, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, *model.config.input_shapes[m], generator=g) for m in model.modalities}


def random_rotation(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(model.query_rotation.shape, generator=g))[0]
    model.query_rotation.copy_(rot)
    model.config.rotation_count = 1


def test_output_contract_and_detached_probes():
    model = make_model().train()
    x = inputs(model)
    labels = torch.tensor([0, 1, 2, 0])
    out = model(labels=labels, **x)
    assert out.logits.shape == (4, 3)
    assert set(out.features) == set(out.unimodal_logits) == {"audio", "visual"}
    assert out.features["audio"].shape == (4, 8)
    probe_ce = sum(F.cross_entropy(z, labels) for z in out.unimodal_logits.values())
    assert torch.allclose(out.aux_loss, probe_ce)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels) + probe_ce)
    assert model.unimodal_logits_are_split is False and model.has_unimodal_logits is False
    # The probes train only themselves: their loss sends no gradient into the encoders or the fusion.
    out.aux_loss.backward()
    assert all(p.grad is None for _, p in model.modality_parameters("audio"))
    assert model.query.grad is None
    assert model.probes["visual"].weight.grad.abs().sum() > 0
    names = {n for n, _ in model.modality_parameters("visual")}
    assert "type_embed.visual" in names and not any(n.startswith(("probes", "layers", "head")) for n in names)


def test_identity_rotation_equals_no_rotation_and_rotation_only_moves_the_query():
    model = make_model(layers=2)
    x = inputs(model)
    with torch.no_grad():
        plain = model(**x).logits
        model.config.rotation_count = 1  # applies the identity buffer
        ident = model(**x).logits
        random_rotation(model)
        rotated = model(**x)
    assert torch.equal(plain, ident)
    assert not torch.allclose(plain, rotated.logits)
    # The query is the only thing rotated: the modality features (encoder outputs) do not move.
    with torch.no_grad():
        model.config.rotation_count = 0
        again = model(**x)
    for m in model.modalities:
        assert torch.equal(again.features[m], rotated.features[m])


def test_save_load_keeps_rotation(tmp_path):
    from transformers import AutoModel

    model = make_model(layers=2, heads=2)
    with torch.no_grad():
        random_rotation(model)
    x = inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, FusionTransformer) and loaded.config.rotation_count == 1
    assert torch.equal(loaded.query_rotation, model.query_rotation)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, ref)


def test_diagnostics_match_a_direct_computation():
    model = make_model(heads=1)
    x = inputs(model, b=6)
    model.reset_diagnostics()
    model.recording_diagnostics = True
    captured = {}
    layer = model.layers[0]
    hook = layer.register_forward_hook(lambda mod, args, out: captured.update(out=out[1]))
    with torch.no_grad():
        model(**x)
    hook.remove()
    model.recording_diagnostics = False
    q0, k, attn0 = captured["out"]
    summary = model.summarize_diagnostics(model.diagnostic_sums())["attention"]
    spans = {"audio": (1, 7), "visual": (7, 13)}  # 5 tokens + the encoder's [CLS] each
    for m, (a, b) in spans.items():
        assert summary["share"][m] == pytest.approx(float(attn0[:, 0, a:b].sum(-1).mean()), abs=1e-6)
    cos = {m: F.cosine_similarity(q0[:, 0], k[:, 0, a:b].mean(1), dim=-1).mean() for m, (a, b) in spans.items()}
    assert summary["air_signed"] == pytest.approx(float(cos["audio"] - cos["visual"]), abs=1e-6)
    assert summary["air"] == pytest.approx(abs(summary["air_signed"]), abs=1e-9)
    total = summary["self_share"] + sum(summary["share"].values())
    assert total == pytest.approx(1.0, abs=1e-6)


def test_three_modalities_and_vector_inputs():
    shapes = {"text": [4], "audio": [4], "visual": [3, 4]}
    model = make_model(modalities=tuple(shapes), shapes=shapes, layers=1, heads=2)
    model.recording_diagnostics = True
    with torch.no_grad():
        out = model(**inputs(model))
    model.recording_diagnostics = False
    assert out.logits.shape == (4, 3) and set(out.unimodal_logits) == set(shapes)
    summary = model.summarize_diagnostics(model.diagnostic_sums())["attention"]
    assert set(summary["share"]) == set(shapes) and "air_signed" not in summary


def test_hf_token_encoder_from_a_config_dict():
    hf = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 32, "vocab_size": 10, "max_position_embeddings": 16}
    model = make_model(encoder="hf", hf_encoder=hf)
    x = inputs(model)
    with torch.no_grad():
        out = model(**x)
    assert out.logits.shape == (4, 3) and out.features["audio"].shape == (4, 8)
    model.reset_diagnostics()
    model.recording_diagnostics = True
    with torch.no_grad():
        model(**x)
    assert model.diagnostic_sums()["tokens"].tolist() == [20.0, 20.0]  # 5 tokens per modality, no [CLS]


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="fusion_heads"):
        make_model(heads=3)  # 8 is not divisible by 3


def test_trains_with_the_trainer_and_logs_attention(tiny_data, run_tiny):
    from transformers import AutoModel

    path = tiny_data("tokens_capture")
    trainer, final = run_tiny(path, "none", model={"architecture": "fusion_transformer", "fusion_heads": 2},
                              train={"epochs": 1, "shapley": False, "log_every_steps": 1, "plots": True})
    assert os.path.isfile(os.path.join(trainer.output_dir, "attention.png"))
    att = final["test"]["attention"]
    assert set(att["share"]) == {"audio", "visual"} and 0 <= att["air"] <= 2
    assert final["test"]["unimodal_source"] == "split_head"  # the probes' logits
    rows = [json.loads(line) for line in open(os.path.join(trainer.output_dir, "metrics.jsonl"))]
    assert any("attention" in r for r in rows if r["split"] == "validation")
    assert any("aux_loss" in r for r in rows if r["split"] == "train")
    loaded = AutoModel.from_pretrained(os.path.join(trainer.output_dir, "best"))
    assert isinstance(loaded, FusionTransformer)
