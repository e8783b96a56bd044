"""Per-modality diagnostics of SFT runs (eval/mllm_diagnostics.py): the gradient shares match a hand
computation on a tiny LoRA layer and sum to 1, a model that cannot see the image shows no blank reliance,
the attention shares per layer sum to 1, and `eval.diagnostics_max_samples` logs them without changing the run."""
import json

import pytest

torch = pytest.importorskip("torch")

from test_mllm_balance import _same, _tiny_lora, build_assets  # noqa: E402
from test_sft_loop import _adapter_weights, sft_recipe  # noqa: E402


def test_gradient_shares_match_a_hand_computation_on_a_tiny_lora_layer():
    from mmbalance_llm.eval.mllm_diagnostics import GradientSplit

    net = _tiny_lora(d=5, r=3)
    x, c = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    text = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]]).bool()
    masks = {"text": text, "image": ~text}
    A = next(p for n, p in net.named_parameters() if "lora_A" in n)
    B = next(p for n, p in net.named_parameters() if "lora_B" in n)
    s = 2.0  # lora_alpha / r
    with GradientSplit(net, ["text", "image"]) as gs:
        gs.set_masks(masks)
        (net(x) * c).sum().backward()  # dL/dy_t = c_t
    # by hand: y_t = W x_t + s B A x_t, so dL/dA = sum_t s B^T c_t x_t^T and dL/dB = sum_t s c_t (A x_t)^T
    with torch.no_grad():
        gh = s * c @ B  # [2, 4, r]: gradient at A's output
        hand = {m: torch.einsum("btr,btd->rd", gh * masks[m][..., None], x) for m in masks}
        hand_b = {m: torch.einsum("bto,btr->or", s * c * masks[m][..., None], x @ A.T) for m in masks}
    for m in masks:
        got = next(G for n, G in gs.G[m].items() if "lora_A" in n)
        got_b = next(G for n, G in gs.G[m].items() if "lora_B" in n)
        assert torch.allclose(got, hand[m], atol=1e-5) and torch.allclose(got_b, hand_b[m], atol=1e-5)
    assert torch.allclose(hand["text"] + hand["image"], A.grad, atol=1e-5)  # the parts add up to A's gradient
    shares = gs.shares()
    na, ni = float(hand["text"].norm()), float(hand["image"].norm())
    assert shares["grad_share/text"] == pytest.approx(na / (na + ni), rel=1e-5)
    assert shares["grad_share_sq/image"] == pytest.approx(ni ** 2 / (na ** 2 + ni ** 2), rel=1e-5)
    for fam in ("grad_share", "grad_share_sq", "grad_share_B"):
        assert shares[f"{fam}/text"] + shares[f"{fam}/image"] == pytest.approx(1.0)


def _trainer_and_batches(tmp_path, adapter="moka"):
    from mmbalance_llm.train.tasks.sft_eval import to_device
    from mmbalance_llm.train.trainer import Trainer

    raw = sft_recipe(tmp_path, f"diag_{adapter}")
    raw["adapter"] = adapter
    build_assets(raw)
    trainer = Trainer(raw)
    c = trainer.task.collator
    recs = trainer.task.records["validation"]
    batches = [to_device(c.pad([c.encode(r) for r in recs[i:i + 3]]), torch.device("cpu"), torch.float32)
               for i in (0, 3)]
    return trainer, trainer.accelerator.unwrap_model(trainer.model), batches


def test_sft_diagnostics_on_the_tiny_llava(tmp_path):
    from mmbalance_llm.eval.mllm_diagnostics import sft_diagnostics

    trainer, net, batches = _trainer_and_batches(tmp_path)
    before = sft_diagnostics(net, batches)
    assert "grad_share/text" not in before  # B = 0: A has no gradient yet
    assert before["grad_share_B/text"] + before["grad_share_B/image"] == pytest.approx(1.0)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    net.train()
    out = sft_diagnostics(net, batches)
    assert net.training and all(p.grad is None for p in net.parameters())  # mode and gradients left alone
    for fam in ("grad_share", "grad_share_sq", "grad_share_B"):
        assert out[f"{fam}/text"] + out[f"{fam}/image"] == pytest.approx(1.0)
        assert 0 < out[f"{fam}/image"] < 1
    layers = net.get_base_model().config.text_config.num_hidden_layers
    for layer in range(layers):
        total = out[f"attention_share/text/layer{layer}"] + out[f"attention_share/image/layer{layer}"]
        assert total == pytest.approx(1.0, abs=1e-5)
    for key in ("accuracy_full", "accuracy_blank", "accuracy_drop", "logp_full", "logp_blank", "logp_drop",
                "delta_drop", "ratio_drop", "logp_gain"):
        assert f"reliance/image/{key}" in out
    assert -1 <= out["reliance/multimodal_gain"] <= 1
    # a model that cannot see the image (projector output zero): blanking changes nothing, exactly
    with torch.no_grad():
        for p in net.get_base_model().model.multi_modal_projector.parameters():
            p.zero_()
    blind = sft_diagnostics(net, batches, gradient=False, attention=False)
    assert blind["reliance/image/logp_blank"] == blind["reliance/image/logp_full"]
    assert blind["reliance/image/delta_blank"] == 0.0


def test_diagnostics_are_logged_at_every_validation_and_leave_the_run_unchanged(tmp_path):
    from mmbalance_llm.train.trainer import Trainer

    runs = {}
    for name, cap in (("plain", None), ("diag", 4)):
        raw = sft_recipe(tmp_path, name, max_steps=2, plots=name == "diag")
        raw["eval"] = {"diagnostics_max_samples": cap}
        build_assets(raw)
        runs[name] = Trainer(raw).fit()
    rows = [json.loads(x) for x in open(tmp_path / "diag" / "metrics.jsonl")]
    val = [r for r in rows if r["split"] == "validation"]
    assert len(val) == 2 and all("diagnostics/reliance/image/accuracy_full" in r for r in val)
    assert all("diagnostics/attention_share/image/mean" in r for r in val)
    assert "diagnostics/grad_share/text" in val[-1]  # after the first update A has a gradient
    assert _same(_adapter_weights(tmp_path / "plain" / "best"), _adapter_weights(tmp_path / "diag" / "best"))
    assert (tmp_path / "diag" / "diagnostics.png").stat().st_size > 0
    strip = {k: v for k, v in runs["diag"]["validation"].items() if not k.startswith("diagnostics/")}
    assert strip == runs["plain"]["validation"]


@pytest.mark.parametrize("family,modality,method", [("qwen2_vl", "image", "mllm_ogm"),
                                                    ("qwen2_audio", "audio", "mllm_contrast")])
def test_methods_and_diagnostics_run_on_the_other_tiny_twins(tmp_path, family, modality, method):
    """Qwen2-VL (positions from mm_token_type_ids) and Qwen2-Audio (log-mel input, feature mask)."""
    from mmbalance_llm.train.trainer import Trainer

    raw = sft_recipe(tmp_path, "run", max_steps=1)
    data = tmp_path.parent / f"sft_data_{modality}"
    raw["model"] = {"name_or_path": str(tmp_path.parent / f"tiny_{family}_loop"), "build_tiny": family}
    raw["data"].update(train=str(data / "train.json"), validation=str(data / "validation.json"),
                       test=str(data / "test.json"), max_length=160)
    raw["data"]["generate"] = {**raw["data"]["generate"], "modalities": [modality]}
    raw["balance"] = {"method": method}
    raw["eval"] = {"diagnostics_max_samples": 4}
    build_assets(raw)
    Trainer(raw).fit()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    train = next(r for r in rows if r["split"] == "train")
    assert (f"coeff_{modality}" if method == "mllm_ogm" else f"margin_{modality}") in train
    last = rows[-1]
    assert last["diagnostics/grad_share/text"] + last[f"diagnostics/grad_share/{modality}"] == pytest.approx(1.0)
    assert f"diagnostics/reliance/{modality}/logp_blank" in last
