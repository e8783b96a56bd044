"""Fork-Merge Decoding on the tiny Qwen2.5-Omni thinker twin (image + audio): fork masks seen through eager
attention weights, fork_layers=0 == plain, cached == uncached generation, bit-identical after removal, CLI."""
from __future__ import annotations

import pytest
import torch

from mmbalance_llm.decoding import fork_merge
from mmbalance_llm.models.modality_map import MODALITY_IDS


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    from mmbalance_llm.data.diagnostic import write_diagnostic
    from mmbalance_llm.eval.benchmark_formats import load_benchmark
    from mmbalance_llm.eval.reliance import MLLMScorer
    from mmbalance_llm.models.tiny import tiny_model_and_processor

    model, proc = tiny_model_and_processor("qwen2_5_omni_thinker")
    model.config._attn_implementation = "eager"  # attention weights are returned
    d = tmp_path_factory.mktemp("fmd-bench")
    info = write_diagnostic(d, n=8)
    _, items = load_benchmark(info["avqa"], "auto", None)
    sc = MLLMScorer(model, proc)
    encs = [sc.collator.encode(sc.record(it, ("image", "audio")), add_answer=False) for it in items[:2]]
    batch = sc.collator.pad(encs, padding_side="left")
    batch.pop("labels")
    return model, proc, batch, info, d


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw)


def test_fork_masks_keep_each_fork_free_of_the_other_modality(omni):
    model, _, batch, _, _ = omni
    ids = batch["input_ids"]
    cfg = model.config
    audio, visual = ids == cfg.audio_token_id, ids == cfg.image_token_id
    assert audio.any() and visual.any()
    plain = _logits(model, batch, output_attentions=True).attentions[0]
    assert float((plain.sum(1) * visual[:, None, :]).sum()) > 0  # plain attention does reach image tokens
    with fork_merge(model, fork_layers=1) as fmd:
        att = _logits(model, batch, output_attentions=True).attentions
    B, T = ids.shape
    assert att[0].shape[0] == 2 * B and att[1].shape[0] == B  # fork layer batched twice, merged after it
    off_diag = ~torch.eye(T, dtype=torch.bool)
    audio_pass, visual_pass = att[0][:B], att[0][B:]
    # the audio-only pass puts no weight on image keys (except a token's own key), and vice versa
    assert float((audio_pass * (visual[:, None, None, :] & off_diag)).abs().max()) == 0.0
    assert float((visual_pass * (audio[:, None, None, :] & off_diag)).abs().max()) == 0.0
    assert float((audio_pass * audio[:, None, None, :]).sum()) > 0
    assert float((visual_pass * visual[:, None, None, :]).sum()) > 0
    w = fmd.last_merge_weights
    assert torch.all(w[audio] == 1) and torch.all(w[visual] == 0)  # media tokens keep their own fork
    assert torch.all((w >= 0) & (w <= 1))


def test_fork_layers_zero_equals_plain_decoding(omni):
    model, _, batch, _, _ = omni
    ref = _logits(model, batch).logits
    with torch.no_grad():
        g_ref = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with fork_merge(model, fork_layers=0):
            out = model(**batch).logits
            g = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(ref, out) and torch.equal(g_ref, g)


def test_fmd_changes_prefill_and_merge_rules_differ(omni):
    model, _, batch, _, _ = omni
    ref = _logits(model, batch).logits
    outs = {}
    for rule in ("attention", "average", 1.0):
        with fork_merge(model, fork_layers=1, merge=rule):
            outs[rule] = _logits(model, batch).logits
    assert not torch.allclose(ref[:, -1], outs["attention"][:, -1], atol=1e-4)
    assert not torch.allclose(outs["attention"][:, -1], outs["average"][:, -1], atol=1e-6)
    text_only = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(
        (batch["input_ids"] == model.config.audio_token_id) | (batch["input_ids"] == model.config.image_token_id), 0)
    plain = _logits(model, text_only).logits
    with fork_merge(model, fork_layers=1):
        assert torch.equal(_logits(model, text_only).logits, plain)  # no media: FMD is plain decoding


def test_generation_with_and_without_kv_cache_agrees(omni):
    model, _, batch, _, _ = omni
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), fork_merge(model, fork_layers=1):
        cached = model.generate(**batch, **kw)
        uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_removing_the_wrapper_is_bit_identical(omni):
    model, _, batch, _, _ = omni
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model, batch).logits
    lm = model.model.language_model
    with fork_merge(model, fork_layers=1):
        assert "forward" in lm.__dict__
        _logits(model, batch)
    assert "forward" not in lm.__dict__ and "generate" not in model.__dict__ and "forward" not in model.__dict__
    assert all("forward" not in layer.__dict__ for layer in lm.layers)
    assert not model._forward_pre_hooks
    assert torch.equal(_logits(model, batch).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_scoring_under_fmd_matches_the_first_generated_step(omni):
    """A teacher-forced forward (labels mark the answer) forks the prompt only: its logits at the last prompt
    position equal generate's first-step scores under FMD, and option scoring differs from plain."""
    from mmbalance_llm.eval.benchmark_formats import load_benchmark
    from mmbalance_llm.eval.reliance import MLLMScorer

    model, proc, _, info, _ = omni
    _, items = load_benchmark(info["avqa"], "auto", None)
    it = items[0]
    sc = MLLMScorer(model, proc, decoding="fmd", fmd={"fork_layers": 1})
    rec = sc.record(it, ("image", "audio"))
    scored = sc.collator.pad([sc.collator.encode(rec, answer=it.options[0])])
    P = int((scored["labels"][0] != -100).nonzero()[0])
    prompt = sc.collator.pad([sc.collator.encode(rec, add_answer=False)])
    prompt.pop("labels")
    assert torch.equal(prompt["input_ids"][0], scored["input_ids"][0, :P])
    with torch.no_grad(), fork_merge(model, fork_layers=1):
        teacher = model(**scored).logits[0, P - 1]
        g = model.generate(**prompt, max_new_tokens=1, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    torch.testing.assert_close(teacher, g.scores[0][0], atol=1e-5, rtol=1e-5)
    fmd_lp = sc.option_logprobs([it], ("image", "audio"))[0]
    plain_lp = MLLMScorer(model, proc).option_logprobs([it], ("image", "audio"))[0]
    assert len(fmd_lp) == len(it.options) and fmd_lp != plain_lp


def test_bad_settings_fail_with_one_line(omni):
    model = omni[0]
    with pytest.raises(ValueError, match="fork_layers"):
        fork_merge(model, fork_layers=2)
    with pytest.raises(ValueError, match="merge"):
        fork_merge(model, merge="median")
    from mmbalance_llm.models.tiny import tiny_model_and_processor

    batch = omni[2]
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -1], labels[1, -2:] = 5, 5
    with fork_merge(model, fork_layers=1), pytest.raises(ValueError, match="start their answers at one position"):
        model(**batch, labels=labels)
    with pytest.raises(ValueError, match="two non-text modalities"):
        fork_merge(tiny_model_and_processor("qwen2_audio")[0])
    with pytest.raises(ValueError, match="text_layers"):
        tiny_model_and_processor("qwen2_audio", text_layers=4)


def test_reliance_cli_compares_plain_and_fmd_on_the_same_items(omni, tmp_path, capsys):
    from mmbalance_llm.eval.reliance_cli import reliance_main
    from mmbalance_llm.models.tiny import build_tiny

    _, _, _, info, _ = omni
    mdir = build_tiny("qwen2_5_omni_thinker", tmp_path / "omni")
    out = tmp_path / "rel"
    rc = reliance_main(["--model", str(mdir), "--benchmark", info["avqa"], "--decoding", "plain,fmd",
                        "--fork-layers", "1", "--out", str(out), "--limit", "4", "--no-blank"])
    assert rc == 0
    import json

    comp = json.loads((out / "comparison.json").read_text())
    assert set(comp["acc,full"]) == {"plain", "fmd"}
    fmd_cfg = json.loads((out / "fmd" / "results.json").read_text())["configs"]["diagnostic_avqa"]
    assert fmd_cfg["decoding"] == "fmd" and fmd_cfg["fmd"]["fork_layers"] == 1
    assert "fmd − plain" in (out / "comparison.md").read_text()
    assert reliance_main(["--model", str(mdir), "--benchmark", info["avqa"], "--decoding", "greedy"]) == 2
    assert "--decoding" in capsys.readouterr().err
    assert reliance_main(["--model", str(mdir), "--benchmark", info["avqa"], "--decoding", "fmd",
                          "--fork-layers", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "fork_layers" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_attribute_cli_under_fmd_differs_from_plain(omni, tmp_path):
    import json

    from mmbalance_llm.attribution.cli import attribute_main
    from mmbalance_llm.models.tiny import build_tiny

    _, _, _, info, _ = omni
    mdir = build_tiny("qwen2_5_omni_thinker", tmp_path / "omni")
    shares = {}
    for dec in ("plain", "fmd"):
        out = tmp_path / f"attr-{dec}"
        rc = attribute_main(["--model", str(mdir), "--data", info["avqa"], "--methods", "grad_x_input,ablation",
                             "--limit", "2", "--batch-size", "1", "--decoding", dec, "--fork-layers", "1",
                             "--out", str(out)])
        assert rc == 0
        summary = json.loads((out / "attribution.json").read_text())
        assert summary["decoding"] == dec and not summary["skipped"]
        shares[dec] = summary["methods"]["grad_x_input"]["mean_share"]
    assert shares["plain"] != shares["fmd"]  # the direct decoder passes of attribution run under FMD too
    assert attribute_main(["--model", str(mdir), "--data", info["avqa"], "--decoding", "plain,fmd"]) == 2


def test_qwen2_vl_forks_image_against_video():
    """A family with two visual modalities: FMD forks image vs video (default groups), hand-built video input."""
    from mmbalance_llm.models.tiny import tiny_model_and_processor

    model, proc = tiny_model_and_processor("qwen2_vl")
    model.config._attn_implementation = "eager"
    tok = proc.tokenizer if hasattr(proc, "tokenizer") else proc
    c = model.config
    text = tok("What is shown?", add_special_tokens=False)["input_ids"]
    ids = ([c.vision_start_token_id] + [c.image_token_id] * 16 + [c.vision_end_token_id]
           + [c.vision_start_token_id] + [c.video_token_id] * 16 + [c.vision_end_token_id] + text)
    types = [0] + [1] * 16 + [0, 0] + [2] * 16 + [0] + [0] * len(text)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "mm_token_type_ids": torch.tensor([types]),
             "pixel_values": torch.randn(64, 3 * 2 * 4 * 4, generator=g), "image_grid_thw": torch.tensor([[1, 8, 8]]),
             "pixel_values_videos": torch.randn(64, 3 * 2 * 4 * 4, generator=g),
             "video_grid_thw": torch.tensor([[1, 8, 8]])}
    plain = _logits(model, batch).logits
    with fork_merge(model, fork_layers=1) as fmd:
        assert fmd.groups == (("image",), ("video",))
        out = _logits(model, batch, output_attentions=True)
        kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            a, b = model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw)
    image, video = batch["mm_token_type_ids"] == 1, batch["mm_token_type_ids"] == 2
    off = ~torch.eye(len(ids), dtype=torch.bool)
    att = out.attentions[0]
    assert float((att[:1] * (video[:, None, None, :] & off)).abs().max()) == 0.0
    assert float((att[1:] * (image[:, None, None, :] & off)).abs().max()) == 0.0
    assert not torch.allclose(plain[:, -1], out.logits[:, -1], atol=1e-5)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores), atol=1e-5, rtol=1e-5)


def test_fmd_reaches_a_peft_wrapped_model(omni):
    """peft tuners call ``model.forward`` directly (no hooks): FMD must still see the batch."""
    import peft

    model, _, batch, _, _ = omni
    from mmbalance_llm.models.modality_map import get_modality_map

    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=get_modality_map(model).target_modules_regex()))
    try:
        plain = _logits(lora, batch).logits
        with fork_merge(lora, fork_layers=1) as fmd:
            out = _logits(lora, batch).logits
        assert fmd.last_merge_weights is not None and not torch.allclose(plain, out, atol=1e-5)
        assert torch.equal(_logits(lora, batch).logits, plain)
    finally:
        lora.unload()


def test_zero_mode_zeroes_the_other_modality_instead_of_masking_it(omni):
    model, _, batch, _, _ = omni
    visual = batch["input_ids"] == model.config.image_token_id
    with fork_merge(model, fork_layers=1, mask="zero"):
        out = _logits(model, batch, output_attentions=True)
        kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            a, b = model.generate(**batch, **kw), model.generate(**batch, use_cache=False, **kw)
    B = batch["input_ids"].shape[0]
    assert float((out.attentions[0][:B] * visual[:, None, None, :]).sum()) > 0  # zeroed, still attended
    with fork_merge(model, fork_layers=1):
        masked = _logits(model, batch).logits
    assert not torch.allclose(out.logits[:, -1], masked[:, -1], atol=1e-5)
    assert torch.equal(a.sequences, b.sequences)
    with pytest.raises(ValueError, match="mask"):
        fork_merge(model, mask="drop")
    from mmbalance_llm.decoding import FMDConfig, ForkMerge

    fm = ForkMerge.from_config(model, FMDConfig(fork_layers=1, merge="average", mask="zero"))
    assert (fm.fork_layers, fm.merge, fm.mask) == (1, "average", "zero")


def test_existing_instance_forwards_are_wrapped_and_restored(omni):
    """accelerate's device-map hooks put a ``forward`` on each module instance: FMD wraps it and puts it back."""
    model, _, batch, _, _ = omni
    layer = model.model.language_model.layers[0]
    calls = []
    orig = layer.forward

    def hooked(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    layer.forward = hooked
    try:
        ref = _logits(model, batch).logits
        with fork_merge(model, fork_layers=1):
            out = _logits(model, batch).logits
            with pytest.raises(RuntimeError, match="already patched"):
                fork_merge(model, fork_layers=1).__enter__()
        assert layer.__dict__["forward"] is hooked and len(calls) == 2
        assert not torch.allclose(ref, out, atol=1e-5)
        assert torch.equal(_logits(model, batch).logits, ref)
    finally:
        del layer.forward
