"""MultimodalClassifier: output contract, split logits, parameter groups, save/load round trip."""
import pytest
import torch

from mmbalance_llm import MultimodalClassifier, MultimodalClassifierConfig

SHAPES = {"audio": [12], "visual": [5, 6], "text": [7]}


def make(fusion="concat", modalities=("audio", "visual", "text"), **kw):
    torch.manual_seed(0)
    cfg = MultimodalClassifierConfig(modalities=list(modalities), input_shapes={m: SHAPES[m] for m in modalities},
                                     num_classes=3, feature_dim=8, hidden_dim=16, num_layers=1, num_heads=2,
                                     fusion=fusion, **kw)
    return MultimodalClassifier(cfg).eval()


def batch(modalities=("audio", "visual", "text"), n=4):
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(n, *SHAPES[m], generator=g) for m in modalities}


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_save_load_round_trip_is_exact(tmp_path, fusion):
    model = make(fusion)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = MultimodalClassifier.from_pretrained(tmp_path / "m").eval()
    x = batch()
    a, b = model(**x), loaded(**x)
    assert torch.equal(a.logits, b.logits)
    assert loaded.config.fusion == fusion and loaded.modalities == ["audio", "visual", "text"]


def test_auto_model_loads_a_saved_classifier(tmp_path):
    from transformers import AutoModel

    make().save_pretrained(tmp_path / "m")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "m"), MultimodalClassifier)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_split_logits_sum_to_fused_logits(fusion):
    out = make(fusion)(**batch(), labels=torch.tensor([0, 1, 2, 0]))
    total = sum(out.unimodal_logits.values())
    torch.testing.assert_close(total, out.logits, rtol=1e-5, atol=1e-5)
    assert out.loss is not None and set(out.features) == {"audio", "visual", "text"}


def test_concat_split_uses_each_modality_columns_only():
    model = make("concat")
    x = batch()
    out = model(**x)
    x2 = dict(x, visual=x["visual"] + 5.0)
    out2 = model(**x2)
    assert torch.equal(out.unimodal_logits["audio"], out2.unimodal_logits["audio"])
    assert not torch.equal(out.unimodal_logits["visual"], out2.unimodal_logits["visual"])


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_nonlinear_fusions_give_no_split_logits(fusion):
    model = make(fusion)
    assert model(**batch()).unimodal_logits is None and not model.has_unimodal_logits


def test_modality_parameters_partition_the_encoders():
    model = make()
    groups = {m: {n for n, _ in model.modality_parameters(m)} for m in model.modalities}
    assert all(groups.values())
    assert not (groups["audio"] & groups["visual"]) and not (groups["visual"] & groups["text"])
    head = {n for n, _ in model.named_parameters() if n.startswith("fusion.")}
    assert head and not head & set().union(*groups.values())
    assert set().union(*groups.values()) | head == {n for n, _ in model.named_parameters()}
    with pytest.raises(KeyError, match="unknown modality 'video'"):
        list(model.modality_parameters("video"))


def test_encoder_choice_follows_input_rank_and_overrides():
    model = make(encoders={"audio": {"encoder": "transformer", "num_layers": 2}})
    assert type(model.encoders["visual"]).__name__ == "TransformerEncoder"  # [T, D] -> transformer
    assert type(model.encoders["text"]).__name__ == "MLPEncoder"  # [D] -> MLP
    assert type(model.encoders["audio"]).__name__ == "TransformerEncoder"
    assert len(model.encoders["audio"].blocks.layers) == 2
    with pytest.raises(ValueError, match="model.encoders.audio: unknown key"):
        make(encoders={"audio": {"layers": 2}})


def test_hf_encoder_from_config_dict():
    hf = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 32, "vocab_size": 10, "max_position_embeddings": 16}
    model = make(modalities=("audio", "visual"), encoder="hf", hf_encoder=hf)
    assert type(model.encoders["visual"].model).__name__ == "BertModel"
    out = model(**batch(("audio", "visual")))
    assert out.logits.shape == (4, 3)


def test_input_errors_are_clear():
    model = make(modalities=("audio", "visual"))
    with pytest.raises(TypeError, match="missing input"):
        model(audio=torch.zeros(2, 12))
    with pytest.raises(TypeError, match="unexpected input"):
        model(audio=torch.zeros(2, 12), visual=torch.zeros(2, 5, 6), video=torch.zeros(2, 3))
