"""Attribution: ground truth on classifiers, Shapley efficiency, MM-SHAP convergence, tiny MLLMs end to end."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmbalance_llm.attribution import METHOD_NAMES, attribute, make_adapter
from mmbalance_llm.attribution.methods import frozen



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core machine: two intra-op threads contend and run ~40x slower than one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GRADIENT_AND_REMOVAL = ("grad_x_input", "integrated_gradients", "shapley_modality", "shapley_tokens", "ablation")


@pytest.fixture(scope="module")
def visual_only():
    """Label carried by 'visual' only; 'audio' is pure noise (informative = 0). Arrays, no disk."""
    from mmbalance_llm.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(modalities=[dict(name="audio", dim=16, snr=4.0, informative=0.0),
                                     dict(name="visual", dim=16, snr=4.0, informative=1.0)],
                         num_classes=4, train_size=1024, validation_size=16, test_size=128, seed=3)
    splits = generate(spec)
    return {s: ({m: torch.from_numpy(d[m]) for m in ("audio", "visual")}, torch.from_numpy(d["label"]))
            for s, d in splits.items()}


def _fit(model, data, steps=300, lr=3e-3):
    x, y = data["train"]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(0, len(y), (64,))
        loss = nn.functional.cross_entropy(model(**{m: v[i] for m, v in x.items()}).logits, y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = data["test"]
    with torch.no_grad():
        return float((model(**xt).logits.argmax(-1) == yt).float().mean())


def _test_batch(data, n=48):
    return {m: v[:n] for m, v in data["test"][0].items()}


def test_every_method_finds_the_only_informative_modality(visual_only):
    from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

    torch.manual_seed(0)
    model = MultimodalClassifier(MultimodalClassifierConfig(
        modalities=["audio", "visual"], input_shapes={"audio": [16], "visual": [16]}, num_classes=4,
        feature_dim=16, hidden_dim=32, num_layers=1))
    assert _fit(model, visual_only) > 0.8  # the model did learn the visual signal
    model.eval()
    batch = _test_batch(visual_only)
    ad = make_adapter(model, batch)
    for method in GRADIENT_AND_REMOVAL:
        res = attribute(model, batch, method, adapter=ad, n_groups=1, n_permutations=8)
        total = sum(res.modality_share.values())
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5), method
        share = res.mean_share()
        assert share["visual"] >= 0.8, (method, share)


class JointAttentionClassifier(nn.Module):
    """Single-stream (ViLT-like): a shared token projection plus modality type embeddings, one attention layer
    from [CLS] over [CLS, audio, visual]; follows the attention contract of attribution/classifier.py."""

    def __init__(self, modalities, dim=16, d=16, classes=4):
        super().__init__()
        self.modalities = list(modalities)
        self.proj = nn.Linear(dim, d)
        self.type_emb = nn.Parameter(torch.randn(len(self.modalities), d) * 0.1)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, output_attentions=False, **x):
        toks = torch.stack([self.proj(x[m]) + self.type_emb[i] for i, m in enumerate(self.modalities)], 1)
        h = torch.cat([self.cls.expand(len(toks), -1, -1), toks], 1)
        out, w = self.attn(h[:, :1], h, h, need_weights=True, average_attn_weights=False)
        res = SimpleNamespace(logits=self.head(out[:, 0]))
        if output_attentions:
            res.attentions = (w,)  # [B, H, 1, K]
            res.attention_modalities = torch.tensor([-1] + list(range(len(self.modalities))))
            res.attention_query = 0
        return res


def test_attention_share_on_a_joint_attention_classifier(visual_only):
    torch.manual_seed(0)
    model = JointAttentionClassifier(["audio", "visual"])
    assert _fit(model, visual_only, steps=600, lr=3e-3) > 0.8
    res = attribute(model, _test_batch(visual_only), "attention")
    assert res.mean_share()["visual"] >= 0.8, res.mean_share()
    raw = res.details["per_layer"]["raw"]
    assert raw["visual"].shape == (48, 1)  # [B, L]
    # without the sink, the raw shares of the two modality keys cover all the attention
    no_sink = res.details["per_layer"]["raw_no_sink"]
    assert torch.allclose(no_sink["audio"] + no_sink["visual"], torch.ones(48, 1), atol=1e-5)


def test_fusion_transformer_every_method_including_attention(visual_only):
    from mmbalance_llm.models.fusion_transformer import FusionTransformer, FusionTransformerConfig

    torch.manual_seed(0)
    model = FusionTransformer(FusionTransformerConfig(
        modalities=["audio", "visual"], input_shapes={"audio": [16], "visual": [16]}, num_classes=4, feature_dim=16,
        hidden_dim=32, num_layers=1, fusion="attention", fusion_layers=2, fusion_heads=2))
    assert _fit(model, visual_only, steps=400, lr=1e-2) > 0.8
    model.eval()
    batch = _test_batch(visual_only)
    ad = make_adapter(model, batch)
    shares = {}
    for method in METHOD_NAMES:
        res = attribute(model, batch, method, adapter=ad, n_groups=1, n_permutations=8)
        shares[method] = res.mean_share()["visual"]
        if method == "attention":  # read from the fusion layers' (x, (q0, k, attn0)) outputs
            assert res.details["per_head"]["raw"]["visual"].shape == (48, 2, 2)
    # the removal methods and IG see the ground truth clearly; attention and grad x input sit near 0.8 here
    assert min(shares[m] for m in ("integrated_gradients", "shapley_modality", "shapley_tokens", "ablation")) >= 0.8
    assert min(shares.values()) >= 0.7, shares


def test_attention_needs_a_joint_attention_model():
    from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

    model = MultimodalClassifier(MultimodalClassifierConfig(modalities=["a", "b"], input_shapes={"a": [4], "b": [4]}))
    with pytest.raises(ValueError, match="attends over all modality tokens"):
        attribute(model, {"a": torch.randn(2, 4), "b": torch.randn(2, 4)}, "attention")


def _tri_model():
    from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

    torch.manual_seed(1)
    cfg = MultimodalClassifierConfig(modalities=["text", "audio", "visual"],
                                     input_shapes={"text": [8], "audio": [6, 4], "visual": [5]},
                                     num_classes=3, feature_dim=8, hidden_dim=16, num_layers=1)
    model = MultimodalClassifier(cfg)
    batch = {"text": torch.randn(5, 8), "audio": torch.randn(5, 6, 4), "visual": torch.randn(5, 5)}
    return model, batch


def test_exact_modality_shapley_is_efficient_for_three_modalities():
    model, batch = _tri_model()
    res = attribute(model, batch, "shapley_modality")
    phi = res.details["phi"]
    total = sum(phi.values())
    assert torch.allclose(total, res.details["v_full"] - res.details["v_empty"], atol=1e-5)
    assert res.details["passes"] == 8
    assert res.scores.shape == (5, 1 + 6 + 1)


def test_mm_shap_converges_to_exact_token_group_shapley():
    model, batch = _tri_model()
    ad = make_adapter(model, {k: v[:2] for k, v in batch.items()})
    exact = attribute(model, None, "shapley_tokens", adapter=ad, n_groups=3, exact=True)
    phi_exact = exact.details["per_sample"][0]["phi"]
    assert exact.details["per_sample"][0]["players"] == 5  # text 1 + audio 3 + visual 1
    errs = []
    for n in (2, 8, 64):
        est = attribute(model, None, "shapley_tokens", adapter=ad, n_groups=3, n_permutations=n, seed=5)
        info = est.details["per_sample"][0]
        errs.append(float((info["phi"] - phi_exact).abs().max()))
        if n == 64:
            assert errs[-1] <= 4 * info["max_stderr"] + 1e-6  # the convergence estimate covers the error
    assert errs[2] < errs[0] and errs[2] < 0.1 * float(phi_exact.abs().max()) + 1e-6, errs
    shares = exact.mean_share()
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-5)


def test_integrated_gradients_completeness_and_token_layout():
    model, batch = _tri_model()
    res = attribute(model, batch, "integrated_gradients", steps=64)
    span = (res.details["f_input"] - res.details["f_baseline"]).abs().max()
    assert res.details["completeness_gap"].abs().max() <= 0.02 * span + 1e-4
    assert res.token_modality[0].tolist() == [0] + [1] * 6 + [2]


def test_ablation_keeps_blank_and_drop_separate():
    model, batch = _tri_model()
    res = attribute(model, batch, "ablation", target=0)
    blank, drop = res.details["delta_logp_blank"], res.details["delta_logp_drop"]
    assert set(blank) == set(drop) == {"text", "audio", "visual"}
    assert not torch.allclose(blank["audio"], drop["audio"])  # encoder(0) != 0: two different removals
    assert "blank" in res.baseline and "drop" in res.baseline


def test_bad_target_is_a_clear_error():
    model, batch = _tri_model()
    with pytest.raises(ValueError, match="target"):
        attribute(model, batch, "grad_x_input", target=[0, 1])
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute(model, batch, "lime")


@pytest.fixture(scope="module")
def mllm_batches(tmp_path_factory):
    from mmbalance_llm.data.chat import ChatCollator, normalize_record
    from mmbalance_llm.data.mm_synthetic import generate_items, to_sharegpt
    from mmbalance_llm.models.tiny import tiny_model_and_processor

    out = {}
    for fam, mods in (("llava", ("image",)), ("qwen2_vl", ("image",)), ("qwen2_audio", ("audio",))):
        d = tmp_path_factory.mktemp(fam)
        model, proc = tiny_model_and_processor(fam)
        items = generate_items(2, d, mods, seed=1, text_fraction=0.0)
        recs = [normalize_record(to_sharegpt(it), str(d / "x.json"), i) for i, it in enumerate(items)]
        out[fam] = (model, ChatCollator(proc, model.config)(recs), mods[0])
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_audio"])
def test_tiny_mllm_runs_every_method(mllm_batches, family):
    from mmbalance_llm.attribution.hf import answer_logprob

    model, batch, media = mllm_batches[family]
    flags = [p.requires_grad for p in model.parameters()]
    attn_impl = model.config._attn_implementation
    ad = make_adapter(model, batch)
    assert ad.modalities == ["text", media]
    with torch.no_grad():  # the decoder-only re-scoring path equals the full model's answer log-prob
        assert torch.allclose(ad.score(ad.leaves())[0], answer_logprob(model, batch)[0], atol=1e-4)
    n_media = int((ad.token_modality == 1).sum(1)[0])
    assert n_media == {"llava": 16, "qwen2_vl": 16, "qwen2_audio": 25}[family]
    for method in METHOD_NAMES:
        res = attribute(model, batch, method, adapter=ad, n_groups=3, n_permutations=4, steps=4)
        assert res.scores.shape == batch["input_ids"].shape
        assert torch.isfinite(res.scores).all(), method
        assert (res.scores[ad.token_modality < 0] == 0).all(), method  # answer tokens / padding not scored
        total = res.modality_share["text"] + res.modality_share[media]
        assert torch.allclose(total, torch.ones(2), atol=1e-5), method
        if method == "shapley_modality":
            assert torch.allclose(sum(res.details["phi"].values()), res.details["v_full"] - res.details["v_empty"],
                                  atol=1e-4)
        if method == "attention":
            assert res.details["per_head"]["raw"]["text"].shape == (2, 2, 4)  # [B, L, H]
        if method == "ablation":
            assert res.details["delta_logp_drop"]["text"] is None
            assert res.details["delta_logp_drop"][media] is not None
    # attribution leaves the model as it was: trainable parameters, original attention implementation
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == attn_impl


def test_mllm_explicit_answer_target(mllm_batches):
    model, batch, _ = mllm_batches["llava"]
    prompt_only = {k: v for k, v in batch.items() if k != "labels"}
    keep = batch["labels"] == -100
    prompt_only["input_ids"] = torch.where(keep, batch["input_ids"], 0)
    prompt_only["attention_mask"] = batch["attention_mask"] * keep
    answer = batch["input_ids"][0][~keep[0]].tolist()
    with frozen(model):
        res = attribute(model, prompt_only, "grad_x_input", target=answer)
    assert "given answer" in res.target
    assert (res.token_modality >= 0).sum() == keep.logical_and(batch["attention_mask"].bool()).sum()


def test_attribute_cli_writes_json_html_and_pngs_for_an_mllm(tmp_path):
    from mmbalance_llm.attribution.cli import attribute_main
    from mmbalance_llm.data.mm_synthetic import write_instruction_set
    from mmbalance_llm.models.tiny import build_tiny

    model_dir = build_tiny("llava", tmp_path / "llava")
    data = write_instruction_set(tmp_path / "data", ("image",), n_train=1, n_validation=1, n_test=3)["test"]
    out = tmp_path / "rep"
    assert attribute_main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--limit", "3",
                           "--batch-size", "2", "--steps", "4", "--n-groups", "2", "--n-permutations", "2"]) == 0
    doc = json.loads((out / "attribution.json").read_text())
    assert set(doc["methods"]) == set(METHOD_NAMES) and doc["n_samples"] == 3
    assert len(doc["attention_per_layer"]["image"]) == 2  # one value per decoder layer
    s = doc["samples"][0]
    assert len(s["tokens"]) == len(s["token_modality"]) == len(s["scores"]["grad_x_input"])
    assert s["token_modality"].count(1) == 16  # the image span
    html = (out / "report.html").read_text()
    assert "Dataset summary" in html and "data:image/png;base64," in html and "image ×16" in html
    assert all((out / f).stat().st_size > 1000 for f in ("modality_shares.png", "attention_layers.png",
                                                         "token_heatmap.png"))


def test_attribute_cli_on_a_saved_classifier_skips_attention_with_the_reason(tmp_path, tiny_data, capsys):
    from mmbalance_llm.attribution.cli import attribute_main
    from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

    data = tiny_data("av_imbalance")
    MultimodalClassifier(MultimodalClassifierConfig(modalities=["audio", "visual"],
                                                    input_shapes={"audio": [32], "visual": [32]}, num_classes=8,
                                                    feature_dim=8, hidden_dim=16, num_layers=1)
                         ).save_pretrained(tmp_path / "clf")
    out = tmp_path / "rep"
    assert attribute_main(["--model", str(tmp_path / "clf"), "--data", data, "--out", str(out), "--limit", "6",
                           "--target", "label", "--n-permutations", "2"]) == 0
    doc = json.loads((out / "attribution.json").read_text())
    assert "attention" in doc["skipped"] and "attention" not in doc["methods"]
    assert doc["modalities"] == ["audio", "visual"] and doc["samples"][0]["tokens"] == ["audio", "visual"]
    assert "skipped attention" in capsys.readouterr().out
    assert attribute_main(["--model", str(tmp_path / "clf"), "--data", data, "--methods", "lime"]) == 2


def test_mllm_with_moka_adapter_rescores_re_indexed_rows_with_the_right_masks(mllm_batches):
    import peft

    from mmbalance_llm import MokaConfig
    from mmbalance_llm.attribution.hf import answer_logprob
    from mmbalance_llm.models.modality_map import get_modality_map

    base, batch, _ = mllm_batches["llava"]
    import copy

    pm = peft.get_peft_model(copy.deepcopy(base), MokaConfig(r=4, lora_alpha=8,
                                                             target_modules=get_modality_map(base).target_modules_regex()))
    pm.eval()
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # B = 0 at init would make MokA an identity
            nn.init.normal_(p, std=0.5)
    with frozen(pm):
        ad = make_adapter(pm, batch)
        with torch.no_grad():
            full = answer_logprob(pm, batch)[0]
            idx = torch.tensor([1, 0, 1])  # N != B rows: the modality masks must follow the rows
            rows = ad.score({"embeds": ad.E[idx]}, idx)[0]
    assert torch.allclose(rows, full[idx], atol=1e-4)
    res = attribute(pm, batch, "shapley_tokens", n_groups=2, n_permutations=2)
    assert torch.isfinite(res.scores).all()
