"""RollingQ: rotation math, the balancer (zero strength, end to end, M > 2) and the HF wrapper."""
from __future__ import annotations

import math

import pytest
import torch

from mmbalance_llm.models.rolling_query import add_rolling_query, balanced_target, rotate_from_sums, rotation_to


# -- rotation math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["svd", "plane"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_maps_query_onto_target_and_is_orthogonal(method, seed):
    g = torch.Generator().manual_seed(seed)
    d = 3 + seed * 5
    q, t = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    r = rotation_to(q, t, method)
    assert torch.allclose(r @ (q / q.norm()), t / t.norm(), atol=1e-12)
    assert torch.allclose(r.T @ r, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.det(r) == pytest.approx(1.0, abs=1e-10)
    assert torch.allclose((r @ q).norm(), q.norm())  # a rotation keeps the query's norm
    if method == "plane":  # minimal: identity on the complement of span(q, t)
        basis = torch.linalg.qr(torch.stack([q, t], 1), mode="complete")[0][:, 2:]
        assert torch.allclose(r @ basis, basis, atol=1e-12)


def test_rotation_of_aligned_and_opposite_vectors():
    q = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert torch.allclose(rotation_to(q, 3 * q, "plane"), torch.eye(3, dtype=torch.float64))
    for method in ("svd", "plane"):
        r = rotation_to(q, -q, method)
        assert torch.allclose(r @ q, -q, atol=1e-12)


def test_balanced_target_weights_follow_the_paper():
    mu = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    t0 = balanced_target(mu, torch.tensor([0.9, 0.1]), sigma=0.0, norm=3.0)
    assert torch.allclose(t0, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2) * 3)
    sigma, a = 2.0, torch.tensor([0.7, 0.2])
    alpha = (1 + math.tanh(-sigma * float(a[0] - a[1]))) / 2  # the paper's weight of the preferred modality
    t = balanced_target(mu, a, sigma=sigma, norm=1.0)
    expected = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    assert torch.allclose(t, expected / expected.norm())


def test_rotate_from_sums_respects_beta_and_composes():
    L, H, M, dh = 1, 2, 2, 4
    g = torch.Generator().manual_seed(0)
    sums = {"n": torch.tensor([10.0], dtype=torch.float64),
            "cos": torch.tensor([[[6.0, 1.0], [3.0, 2.5]]], dtype=torch.float64),  # AIR 0.5 and 0.05
            "key_sum": torch.randn(L, H, M, dh, generator=g, dtype=torch.float64),
            "query_sum": torch.randn(L, H, dh, generator=g, dtype=torch.float64)}
    start = torch.linalg.qr(torch.randn(dh, dh, generator=g))[0]
    rotation = start.expand(L, H, dh, dh).clone()
    info = rotate_from_sums(sums, rotation, beta=0.1, sigma=0.0, method="svd")
    assert info["rotated"].tolist() == [[True, False]]
    assert torch.equal(rotation[0, 1], start)  # under beta: untouched
    q = sums["query_sum"][0, 0]
    t = balanced_target(sums["key_sum"][0, 0], sums["cos"][0, 0] / 10, 0.0, q.norm())
    new = rotation[0, 0].double() @ start.double().T  # R = R_new R_old
    assert torch.allclose(new @ (q / q.norm()), t / t.norm(), atol=1e-5)


# -- the balancer ------------------------------------------------------------------------------------
FT = {"architecture": "fusion_transformer", "fusion_heads": 2}


def _weights(trainer):
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()


def test_zero_strength_is_bit_identical_and_rotation_balances_attention(tiny_data, run_tiny):
    """r_time 0 reproduces `none` bit for bit. With the default (one rotation after epoch 1), the
    query's attention-share gap and AIR on validation are smaller than the baseline's at the same
    epoch (the benchmark checks 3 seeds); one shared baseline run keeps the test short."""
    path = tiny_data("tokens_capture")
    train = {"epochs": 1, "shapley": False}
    t0, base = run_tiny(path, "none", model=FT, train=train)
    t1, zero = run_tiny(path, "rollingq", balance={"r_time": 0}, model=FT, train=train)
    for split in ("validation", "test"):
        assert base[split] == zero[split]
    w0, w1 = _weights(t0), _weights(t1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    _, rq = run_tiny(path, "rollingq", model=FT, train=train)
    gap = lambda f: f["validation"]["attention"]["share_gap"]  # noqa: E731
    assert gap(rq) < gap(base)
    assert rq["validation"]["attention"]["air"] < base["validation"]["attention"]["air"]


def test_recipe_setting_rotates_after_every_epoch_on_tokens_starve(tiny_data, run_tiny):
    """The recipe's r_time = epochs: one rotation round after each epoch, composed into one buffer, and a
    smaller final attention-share gap than the baseline's.
    (The weak-probe rise that this setting gives is measured by the benchmark only: at test scale the
    visual probe stays near chance and the rise is not reliable, see docs/rollingq.md.)"""
    path = tiny_data("tokens_starve")
    train = {"epochs": 2, "shapley": False}
    _, base = run_tiny(path, "none", model=FT, train=train)
    trainer, final = run_tiny(path, "rollingq", balance={"r_time": 2}, model=FT, train=train)
    core = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.balancer.rotations == 2 and core.config.rotation_count == 2
    eye = torch.eye(core.query_rotation.shape[-1])
    for h in range(core.query_rotation.shape[1]):
        r = core.query_rotation[0, h].double()
        assert not torch.allclose(r, eye.double())
        assert torch.allclose(r @ r.T, eye.double(), atol=1e-5)  # a product of rotations stays orthogonal
    gap = lambda f: f["validation"]["attention"]["share_gap"]  # noqa: E731
    assert gap(final) < gap(base)  # measured 0.024 against 0.085


@pytest.mark.parametrize("preset,rotation", [("av_imbalance", "svd"), ("tri_modal", "plane")])
def test_end_to_end_rotates_once_and_saves_the_rotation(tiny_data, run_tiny, preset, rotation):
    import os

    from transformers import AutoModel

    path = tiny_data(preset)
    # architecture 'classifier' (the default): RollingQ builds the attention-fusion model itself
    trainer, final = run_tiny(path, "rollingq", balance={"rotation": rotation}, train={"epochs": 2, "shapley": False})
    core = trainer.accelerator.unwrap_model(trainer.model)
    assert core.config.rotation_count == 1 and trainer.balancer.rotations == 1
    eye = torch.eye(core.query_rotation.shape[-1])
    assert not torch.allclose(core.query_rotation[0, 0], eye)
    assert final["test"]["accuracy"] > 1.0 / 3  # learns something (4 classes)
    loaded = AutoModel.from_pretrained(os.path.join(trainer.output_dir, "best"))
    assert loaded.config.rotation_count == 1
    if final["best_epoch"] == 2:  # the best model was saved after the rotation
        assert torch.equal(loaded.query_rotation, core.query_rotation)
    assert trainer.balancer.state_dict() == {"rotations": 1}


def test_rejects_a_model_without_query_rotation(tiny_data, tmp_path):
    from mmbalance_llm.balance import get_method
    from mmbalance_llm.balance.base import TrainContext
    from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

    class Acc:
        num_processes = 1

        class distributed_type:
            name = "NO"

        def unwrap_model(self, m):
            return m

    model = MultimodalClassifier(MultimodalClassifierConfig(modalities=["a", "b"], input_shapes={"a": [2], "b": [2]}))
    ctx = TrainContext(accelerator=Acc(), modalities=["a", "b"], num_classes=2, recipe=None, loaders={})
    with pytest.raises(ValueError, match="fusion_transformer"):
        get_method("rollingq").setup(ctx, model)
    with pytest.raises(ValueError, match="balance.rotation"):
        get_method("rollingq", rotation="qr")


# -- the HF wrapper ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=4, projection_dim=32)
    tc = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=127, image_seq_length=16,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(1, 120, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 2:18] = 127  # 16 image tokens
    batch = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return model, batch


@torch.no_grad()
def test_hf_wrapper_changes_only_the_chosen_query_positions_and_is_removable(tiny_llava):
    model, batch = tiny_llava
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(**batch).logits
    handle = add_rolling_query(model, {"image": model.config.image_token_id}, query_positions=[-1])
    handle.recording = True
    assert torch.equal(model(**batch).logits, base)  # no rotation yet
    stats = handle.statistics()
    assert stats["cos"].shape == (2, 4, 2) and (handle.air() > 0).all()
    handle.recording = False
    info = handle.rotate(beta=0.0)
    assert info["rotated"].all() and handle.rotation_count == 1
    out = model(**batch).logits
    assert torch.equal(out[:, :-1], base[:, :-1])  # causal: only the rotated last query's output moves
    assert not torch.allclose(out[:, -1], base[:, -1])
    handle.remove()
    assert torch.equal(model(**batch).logits, base)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_hf_wrapper_middle_position_in_last_layer_and_explicit_ids(tiny_llava, tmp_path):
    model, batch = tiny_llava
    base = model(**batch).logits
    ids = (batch["input_ids"] == 127).long()  # explicit [B, T] ids: 0 text, 1 image
    handle = add_rolling_query(model, query_positions=[20], layers=[-1], modalities=["text", "image"])
    handle.set_modality_ids(ids)
    g = torch.Generator().manual_seed(3)
    handle.rotation.copy_(torch.linalg.qr(torch.randn(handle.rotation.shape, generator=g))[0])
    handle.rotation_count = 1
    out = model(**batch).logits
    changed = (out - base).abs().amax(-1) > 1e-6  # [B, T]
    assert changed[:, 20].all() and changed.sum() == 2  # last layer: only position 20's output moves
    handle.save(str(tmp_path / "rq.safetensors"))
    handle.remove()
    other = add_rolling_query(model, query_positions=[20], layers=[-1], modalities=["text", "image"])
    other.load(str(tmp_path / "rq.safetensors"))
    other.set_modality_ids(ids)
    assert torch.equal(model(**batch).logits, out)
    other.remove()


def test_hf_wrapper_reads_mm_token_type_ids_before_token_ids(tiny_llava):
    model, batch = tiny_llava
    handle = add_rolling_query(model, {"image": 127}, modalities=["text", "image", "audio"])
    ids = batch["input_ids"]
    handle._read_ids(model, (), {"input_ids": ids})
    assert torch.equal(handle._modality_ids, (ids == 127).long())
    tt = torch.zeros_like(ids)
    tt[:, 5:7] = 3  # audio by the transformers convention; wins over the image token ids
    handle._read_ids(model, (), {"input_ids": ids, "mm_token_type_ids": tt})
    expected = torch.zeros_like(ids)
    expected[:, 5:7] = 2
    assert torch.equal(handle._modality_ids, expected)
    handle.remove()


@pytest.mark.slow
def test_resume_after_the_rotation_matches_an_uninterrupted_run(tiny_data, tmp_path):
    import json
    import os

    from conftest import tiny_recipe

    from mmbalance_llm.config import recipe_from_dict
    from mmbalance_llm.train.trainer import Trainer

    path = tiny_data("tokens_capture")
    train = {"epochs": 2, "shapley": False, "save_total_limit": None}
    full = Trainer(recipe_from_dict(tiny_recipe(path, str(tmp_path / "full"), "rollingq", model=FT, train=train))).fit()
    raw = tiny_recipe(path, str(tmp_path / "part"), "rollingq", model=FT, train={**train, "stop_after_steps": 12})
    assert Trainer(recipe_from_dict(raw)).fit() is None  # stopped in epoch 2, after the rotation
    raw["train"].update(stop_after_steps=None, resume_from="latest")
    trainer = Trainer(recipe_from_dict(raw))
    resumed = trainer.fit()
    assert trainer.accelerator.unwrap_model(trainer.model).config.rotation_count == 1
    assert json.dumps(resumed) == json.dumps(full)
    assert os.path.isfile(os.path.join(str(tmp_path / "part"), "best", "model.safetensors"))
