"""`model.gradient_checkpointing` on the classify side: every HF encoder (raw-media ViT / AST / CLIP tower,
feature-input HF encoders) recomputes its blocks in backward (really: the blocks run twice), with the same
loss and gradients as without, to float tolerance; a run with it matches a run without; a model with no
HF encoder is refused in one line."""
import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from mmbalance_llm.config import RecipeError, recipe_from_dict
from mmbalance_llm.models.media_encoders import HFMediaEncoder, enable_gradient_checkpointing
from mmbalance_llm.train.trainer import Trainer

from conftest import tiny_recipe

T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
ENCODERS = {
    "vit": ({"model_type": "vit", "image_size": 32, "patch_size": 8, **T}, [3, 32, 32]),
    "ast": ({"model_type": "audio-spectrogram-transformer", "num_mel_bins": 32, "max_length": 64, **T}, [64, 32]),
    "clip_dual": ({"model_type": "clip", "vision_config": {"image_size": 32, "patch_size": 8, **T},
                   "text_config": {"vocab_size": 50, **T}}, [3, 32, 32]),
}


def loss_and_grads(enc, x):
    enc.zero_grad(set_to_none=True)
    loss = enc(x).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(ENCODERS))
def test_same_loss_and_gradients_and_the_blocks_are_recomputed(family):
    cfg, shape = ENCODERS[family]
    torch.manual_seed(0)
    plain = HFMediaEncoder(shape, 8, cfg, pooling="mean")
    ckpt = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(ckpt) == ["backbone"]
    x = torch.randn(3, *shape)
    for enc in (plain, ckpt):
        enc.train()
    block = next(m for n, m in ckpt.backbone.named_modules() if n.endswith("layers.0") or n.endswith("layer.0"))
    calls = []
    inner = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
    inner.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    loss_a, grads_a = loss_and_grads(plain, x)
    torch.manual_seed(1)
    loss_b, grads_b = loss_and_grads(ckpt, x)
    assert len(calls) == 2  # forward, then recomputed in backward
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    if hasattr(ckpt.backbone, "is_gradient_checkpointing"):
        assert ckpt.backbone.is_gradient_checkpointing


def test_a_run_with_checkpointing_matches_one_without(tiny_data, tmp_path):
    hf = {"model_type": "bert", "vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 32, "max_position_embeddings": 8}
    finals, trainers = [], []
    for on in (False, True):
        raw = tiny_recipe(tiny_data(), str(tmp_path / f"run{on}"), train={"epochs": 1},
                          model={"encoder": "hf", "hf_encoder": hf, "gradient_checkpointing": on})
        trainers.append(Trainer(recipe_from_dict(raw)))
        finals.append(trainers[-1].fit())
    net = trainers[1].accelerator.unwrap_model(trainers[1].model)
    assert all(enc.model.is_gradient_checkpointing for enc in net.encoders.values())
    assert finals[0]["validation"]["accuracy"] == finals[1]["validation"]["accuracy"]
    w = [load_file(os.path.join(t.output_dir, "best", "model.safetensors")) for t in trainers]
    assert w[0].keys() == w[1].keys()
    for k in w[0]:
        torch.testing.assert_close(w[1][k], w[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_checkpointing_without_an_hf_encoder_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match="'model.gradient_checkpointing' is true but the model has no Hugging Face"):
        Trainer(recipe_from_dict(tiny_recipe(tiny_data(), str(out), model={"gradient_checkpointing": True})))
    assert not out.exists()
