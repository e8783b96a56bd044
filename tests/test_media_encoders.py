"""Raw-media encoders (models/media_encoders.py): every listed HF family on its native input, pooling,
freezing, ResNet-18 on spectrograms and frames, per-modality learning rates, save/load round trip."""
from __future__ import annotations

import pytest
import torch

from mmbalance_llm.models.media_encoders import HFMediaEncoder, ResNet18Encoder, build_media_encoder

T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
FAMILIES = {
    "vit": ({"model_type": "vit", "image_size": 32, "patch_size": 8, **T}, [3, 32, 32], torch.randn),
    "dinov2": ({"model_type": "dinov2", "image_size": 32, "patch_size": 8, **T}, [3, 32, 32], torch.randn),
    "clip_vision": ({"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, **T}, [3, 32, 32],
                    torch.randn),
    "clip_dual": ({"model_type": "clip", "vision_config": {"image_size": 32, "patch_size": 8, **T},
                   "text_config": {"vocab_size": 50, **T}}, [3, 32, 32], torch.randn),
    "ast": ({"model_type": "audio-spectrogram-transformer", "num_mel_bins": 32, "max_length": 64, **T}, [64, 32],
            torch.randn),
    "wav2vec2": ({"model_type": "wav2vec2", "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2],
                  "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2, **T}, [1600], torch.randn),
    "hubert": ({"model_type": "hubert", "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2],
                "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2, **T}, [1600], torch.randn),
    "whisper": ({"model_type": "whisper", "d_model": 32, "encoder_layers": 2, "decoder_layers": 1,
                 "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                 "decoder_ffn_dim": 64, "num_mel_bins": 16, "max_source_positions": 20, "vocab_size": 60,
                 "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1},
                [16, 40], torch.randn),
    "bert": ({"model_type": "bert", "vocab_size": 50, **T}, [12], lambda *s: torch.randint(1, 50, s)),
    "roberta": ({"model_type": "roberta", "vocab_size": 50, "pad_token_id": 1, **T}, [12],
                lambda *s: torch.randint(2, 50, s)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_encodes_its_native_input_and_trains(family):
    cfg, shape, make = FAMILIES[family]
    torch.manual_seed(0)
    enc = HFMediaEncoder(shape, 16, cfg, pooling="mean")
    x = make(3, *shape)
    tokens, h = enc.tokens_and_summary(x)
    assert h.shape == (3, 16) and tokens.shape[0] == 3 and tokens.shape[-1] == 16
    h.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.backbone.parameters())
    unused = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused  # DDP refuses trainable parameters outside the graph


def test_poolings_differ_and_attention_pool_has_parameters():
    cfg, shape, make = FAMILIES["vit"]
    x = make(2, *shape)
    outs = {}
    for pooling in ("cls", "mean", "attention"):
        torch.manual_seed(0)
        outs[pooling] = HFMediaEncoder(shape, 8, cfg, pooling=pooling)(x)
    assert not torch.allclose(outs["cls"], outs["mean"])
    assert not torch.allclose(outs["mean"], outs["attention"])
    with pytest.raises(ValueError, match="pooling"):
        HFMediaEncoder(shape, 8, cfg, pooling="max")


def test_text_padding_is_masked_and_an_all_padding_row_still_encodes():
    cfg, shape, _ = FAMILIES["bert"]
    torch.manual_seed(0)
    enc = HFMediaEncoder(shape, 8, cfg, pooling="mean").eval()
    ids = torch.tensor([[5, 6, 7] + [0] * 9])
    longer = torch.tensor([[5, 6, 7] + [0] * 13])
    assert torch.allclose(enc(ids), HFMediaEncoder.__call__(enc, longer), atol=1e-5)  # padding does not count
    assert torch.isfinite(enc(torch.zeros(1, 12, dtype=torch.long))).all()  # a dropped text modality


def test_video_frames_run_the_image_backbone_per_frame():
    cfg = FAMILIES["vit"][0]
    enc = HFMediaEncoder([4, 3, 32, 32], 8, cfg)
    tokens, h = enc.tokens_and_summary(torch.randn(2, 4, 3, 32, 32))
    assert tokens.shape == (2, 4, 8) and torch.allclose(h, tokens.mean(1))


def test_train_layers_and_freeze():
    cfg, shape, _ = FAMILIES["vit"]
    enc = HFMediaEncoder(shape, 8, {**cfg, "num_hidden_layers": 3}, train_layers=1)
    trainable = {n for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(("layers.2." in n) or ("layer.2." in n) or "norm" in n or "pooler" in n for n in trainable)
    assert any("layers.2." in n or "layer.2." in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)
    frozen = HFMediaEncoder(shape, 8, cfg, freeze=True)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.out.parameters())
    with pytest.raises(ValueError, match="train_layers"):
        HFMediaEncoder(shape, 8, cfg, train_layers=9)


def test_resnet18_on_spectrograms_and_frames():
    audio = ResNet18Encoder([1, 65, 40], 512)
    assert isinstance(audio.out, torch.nn.Identity)  # 512 = ResNet-18's width: no projection
    n_params = sum(p.numel() for p in audio.backbone.parameters())
    assert 11.1e6 < n_params < 11.2e6  # torchvision's resnet18 without fc, 1-channel stem
    assert audio(torch.randn(2, 1, 65, 40)).shape == (2, 512)
    video = build_media_encoder("resnet18", [3, 3, 32, 32], {"feature_dim": 64})
    tokens, h = video.tokens_and_summary(torch.randn(2, 3, 3, 32, 32))
    assert h.shape == (2, 64) and tokens.shape[0] == 2
    with pytest.raises(ValueError, match="resnet18"):
        ResNet18Encoder([40], 8)


def _classifier(encoders: dict, shapes: dict, **model):
    from mmbalance_llm.config import ModelConfig
    from mmbalance_llm.models.registry import build_model

    cfg = ModelConfig(feature_dim=16, encoders=encoders, **model)
    return build_model(cfg, list(shapes), shapes, 3)


def test_per_modality_learning_rates_make_param_groups():
    from mmbalance_llm.config import TrainConfig
    from mmbalance_llm.train.setup import make_optimizer

    vit = FAMILIES["vit"][0]
    model = _classifier({"visual": {"encoder": "hf", "name_or_path": vit, "lr": 1e-5}, "audio": {"encoder": "mlp"}},
                        {"visual": [3, 32, 32], "audio": [8]})
    opt = make_optimizer(model, TrainConfig(learning_rate=1e-3))
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    visual = {id(p) for _, p in model.modality_parameters("visual")}
    assert by_lr[1e-5] == visual
    assert len(by_lr[1e-3]) == sum(1 for p in model.parameters()) - len(visual)
    with pytest.raises(ValueError, match="unknown key"):
        _classifier({"visual": {"encoder": "hf", "name_or_path": vit, "lrr": 1}}, {"visual": [3, 32, 32]})


@pytest.mark.parametrize("arch", ["classifier", "fusion_transformer"])
def test_hf_media_encoders_inside_models_round_trip(arch, tmp_path):
    from transformers import AutoModel

    import mmbalance_llm.models.fusion_transformer  # noqa: F401  (registers the Auto classes)

    vit, ast = FAMILIES["vit"][0], FAMILIES["ast"][0]
    shapes = {"visual": [2, 3, 32, 32], "audio": [64, 32]}
    extra = {"fusion": "attention"} if arch == "fusion_transformer" else {}
    model = _classifier({"visual": {"encoder": "hf", "name_or_path": vit},
                         "audio": {"encoder": "hf", "name_or_path": ast, "pooling": "attention"}},
                        shapes, architecture=arch, **extra).eval()
    names = [n for n, _ in model.modality_parameters("audio")]
    encoder_names = {n for n, _ in model.named_parameters() if n.startswith("encoders.audio.")}
    assert any("backbone" in n for n in names) and encoder_names <= set(names)  # balancers see the backbone
    inputs = {"visual": torch.randn(2, *shapes["visual"]), "audio": torch.randn(2, *shapes["audio"])}
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "model.safetensors"))) <= set(model.state_dict())  # live names on disk
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(model(**inputs).logits, again(**inputs).logits, atol=1e-5)


def test_local_pretrained_folders_load_and_saved_models_reload_their_fine_tuned_weights(tmp_path):
    """`name_or_path` a local folder (as a hub id would be): weights come from it at build time; inside
    `from_pretrained` of the saved classifier the backbone is built from its config and the saved, fine-tuned
    weights win. A pretrained RGB ResNet stem is channel-averaged for a 1-channel spectrogram."""
    from transformers import AutoModel, ResNetModel, ViTConfig, ViTModel

    from mmbalance_llm.models.media_encoders import resnet18_config

    vit = ViTModel(ViTConfig(**{k: v for k, v in FAMILIES["vit"][0].items() if k != "model_type"}))
    vit.save_pretrained(tmp_path / "vit")
    rgb = ResNetModel(resnet18_config(3))
    rgb.save_pretrained(tmp_path / "rn")
    model = _classifier({"visual": {"encoder": "hf", "name_or_path": str(tmp_path / "vit")},
                         "audio": {"encoder": "resnet18", "name_or_path": str(tmp_path / "rn")}},
                        {"visual": [3, 32, 32], "audio": [1, 32, 32]}).eval()
    loaded = model.encoders["visual"].backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vit.state_dict().items() if k in loaded)
    stem = model.encoders["audio"].backbone.embedder.embedder.convolution.weight
    assert stem.shape[1] == 1 and torch.allclose(stem[:, 0], rgb.embedder.embedder.convolution.weight.mean(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "fine-tuned": no longer the folders' weights
    model.save_pretrained(tmp_path / "run")
    again = AutoModel.from_pretrained(tmp_path / "run").eval()
    x = {"visual": torch.randn(2, 3, 32, 32), "audio": torch.randn(2, 1, 32, 32)}
    assert torch.allclose(model(**x).logits, again(**x).logits, atol=1e-5)
