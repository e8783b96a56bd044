"""Modality reliance: metric maths, evaluate modules, ground truth on the diagnostic benchmark, CLI end to end."""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbalance_llm.eval.reliance import (evaluate_reliance, gain_leakage, markdown_table, mme_scores, pope_metrics,
                                         reliance_scores)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def diag(tmp_path_factory):
    from mmbalance_llm.data.diagnostic import write_diagnostic

    return write_diagnostic(tmp_path_factory.mktemp("diag"), n=60, seed=1)


def test_pope_metrics_on_a_constructed_case():
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.6) and m["acc"] == pytest.approx(0.6)
    assert pope_metrics(["no"] * 3, ["yes"] * 3)["f1"] == 0.0


def test_mme_acc_plus_counts_images_with_every_question_right():
    preds = ["yes", "no", "yes", "yes", "no", "no"]
    refs = ["yes", "no", "yes", "no", "no", "no"]
    s = mme_scores(preds, refs, ["a"] * 4 + ["b"] * 2, ["1", "1", "2", "2", "3", "3"])
    assert s["a"]["acc"] == pytest.approx(0.75) and s["a"]["acc_plus"] == pytest.approx(0.5)
    assert s["a"]["score"] == pytest.approx(125.0) and s["b"]["score"] == pytest.approx(200.0)
    assert s["total"] == pytest.approx(325.0)


def test_mmstar_gain_leakage_and_reliance():
    assert gain_leakage(0.7, 0.4, 0.3) == pytest.approx({"mg": 0.3, "ml": 0.1})
    assert gain_leakage(0.7, 0.2, 0.3)["ml"] == 0.0  # leakage is clipped at zero
    assert gain_leakage(0.7, 0.2)["ml"] is None
    r = reliance_scores({"full": 0.8, "blank_image": 0.4, "drop_audio": 0.8})
    assert r["blank_image"] == pytest.approx({"delta": 0.4, "ratio": 0.5}) and r["drop_audio"]["delta"] == 0.0


def test_evaluate_modules_match_the_toolkit_maths(tmp_path, monkeypatch):
    import evaluate

    from mmbalance_llm.eval.metrics import imbalance
    from mmbalance_llm.metrics import metric_path

    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    preds = [rng.choice(["yes", "no"]) for _ in range(40)]
    refs = [rng.choice(["yes", "no"]) for _ in range(40)]
    pope = evaluate.load(metric_path("pope")).compute(predictions=preds, references=refs)
    mine = pope_metrics(preds, refs)
    assert all(pope[k] == pytest.approx(mine[k]) for k in ("precision", "recall", "f1", "yes_ratio"))
    cats, groups = ["c"] * 40, [str(i // 2) for i in range(40)]
    mme = evaluate.load(str(Path(metric_path("mme")).parent)).compute(
        predictions=preds, references=refs, categories=cats, groups=groups)
    assert mme["total"] == pytest.approx(mme_scores(preds, refs, cats, groups)["total"])
    conds = ["full"] * 20 + ["no_media"] * 10 + ["base_llm"] * 10
    rel = evaluate.load(metric_path("modality_reliance")).compute(predictions=preds, references=refs, conditions=conds)
    acc = {c: np.mean([p == r for p, r, k in zip(preds, refs, conds) if k == c]) for c in set(conds)}
    assert rel["mg"] == pytest.approx(acc["full"] - acc["no_media"])
    assert rel["ml"] == pytest.approx(max(0.0, acc["no_media"] - acc["base_llm"]))
    phi = {"a": 0.5, "b": 0.1, "c": -0.05}
    imb = evaluate.load(metric_path("modality_imbalance")).compute(
        modalities=list(phi) * 2, scores=list(phi.values()) * 2)
    assert imb["imbalance"] == pytest.approx(imbalance(phi)) and imb["dominant"] == "a"
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("bleu")


class OracleScorer:
    """Knows each item's answer exactly when every non-text modality in its `needs` is present and not blanked;
    otherwise guesses (deterministically per item and condition). Stands in for a perfectly balanced model."""

    accepts = ["image", "audio"]

    def option_logprobs(self, items, keep, blank=()):
        avail = set(keep) - set(blank)
        out = []
        for it in items:
            needed = {m for m in it.meta["needs"].split("+") if m != "text"}
            if needed <= avail:
                pick = it.options.index(it.answer)
            else:
                pick = zlib.crc32(f"{it.id}{sorted(avail)}".encode()) % len(it.options)
            out.append([0.0 if k == pick else -5.0 for k in range(len(it.options))])
        return out


def test_reliance_recovers_the_known_truth_on_the_diagnostic_benchmark(diag):
    from mmbalance_llm.eval.benchmark_formats import load_benchmark

    fmt, items = load_benchmark(diag["avqa"])
    ev = evaluate_reliance(OracleScorer(), items, fmt)
    r = ev["results"]
    assert ev["conditions"] == ["full", "blank_image", "drop_image", "blank_audio", "drop_audio", "no_media"]
    assert r["acc,full"] == 1.0
    for mode in ("blank", "drop"):
        assert r[f"acc_needs/image,{mode}_audio"] == 1.0 and r[f"acc_needs/audio,{mode}_image"] == 1.0
        assert r[f"acc_needs/image,{mode}_image"] < 0.75 and r[f"acc_needs/audio,{mode}_audio"] < 0.75
        assert r[f"acc_needs/image+audio,{mode}_image"] < 1.0
        assert r[f"reliance_delta,{mode}_image"] > 0 and r[f"flip_rate,{mode}_image"] > 0
    assert r["acc_needs/text,no_media"] == 1.0  # text-only items survive losing every medium
    assert r["mmstar_mg"] == pytest.approx(1.0 - r["acc,no_media"]) and r["mmstar_ml"] is None
    md = markdown_table("diag", r, ev["conditions"])
    assert "| drop_image |" in md and "| image+audio |" in md


def test_reliance_cli_end_to_end_on_a_tiny_llava(diag, tmp_path):
    from mmbalance_llm.eval.reliance_cli import reliance_main
    from mmbalance_llm.models.tiny import build_tiny

    model_dir = build_tiny("llava", tmp_path / "llava")
    out = tmp_path / "rel"
    assert reliance_main(["--model", str(model_dir), "--benchmark", diag["avqa"], "--out", str(out), "--limit", "6",
                          "--base-llm", str(model_dir)]) == 0
    doc = json.loads((out / "results.json").read_text())
    task = Path(diag["avqa"]).stem
    res = doc["results"][task]
    assert set(doc) >= {"results", "configs", "n-samples", "versions"}
    assert doc["configs"][task]["ignored_media"] == ["audio"]  # LLaVA takes no audio
    assert doc["configs"][task]["conditions"] == ["full", "blank_image", "drop_image", "no_media", "base_llm"]
    assert res["mmstar_ml"] is not None and 0.0 <= res["acc,full"] <= 1.0
    # the same weights with all media dropped are the base LLM: identical answers
    assert res["acc,base_llm"] == res["acc,no_media"]
    lines = (out / f"samples_{task}.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])["conditions"]) == set(doc["configs"][task]["conditions"])
    assert "| blank_image |" in (out / "results.md").read_text()
    # POPE and MME files: their own metrics
    assert reliance_main(["--model", str(model_dir), "--benchmark", diag["mme"], "--out", str(tmp_path / "mme"),
                          "--limit", "4", "--no-blank"]) == 0
    res = json.loads((tmp_path / "mme" / "results.json").read_text())["results"]["diagnostic_mme"]
    assert "mme_acc_plus/colour,full" in res and "pope_f1,full" in res and "acc,blank_image" not in res


def test_reliance_cli_reports_a_malformed_file(tmp_path, capsys):
    from mmbalance_llm.eval.reliance_cli import reliance_main

    p = tmp_path / "bad.jsonl"
    p.write_text('{"image": "a.png", "text": "Is there a cat?", "label": "maybe"}\n')
    assert reliance_main(["--model", str(tmp_path), "--benchmark", str(p)]) == 2
    assert f"{p}:1: field 'label' must be yes/no" in capsys.readouterr().err


def test_reliance_on_a_moka_adapter_folder(diag, tmp_path):
    import peft

    from mmbalance_llm import MokaConfig
    from mmbalance_llm.eval.reliance import load_mllm
    from mmbalance_llm.eval.reliance_cli import reliance_main
    from mmbalance_llm.models.modality_map import get_modality_map
    from mmbalance_llm.models.tiny import build_tiny, load_tiny

    base_dir = build_tiny("llava", tmp_path / "llava")
    base, _ = load_tiny(base_dir)
    pm = peft.get_peft_model(base, MokaConfig(r=2, lora_alpha=4,
                                              target_modules=get_modality_map(base).target_modules_regex()))
    pm.save_pretrained(tmp_path / "adapter")
    model, proc = load_mllm(str(tmp_path / "adapter"))
    assert type(model).__name__ == "PeftModel" and proc is not None
    assert reliance_main(["--model", str(tmp_path / "adapter"), "--benchmark", diag["pope"], "--out",
                          str(tmp_path / "rel"), "--limit", "3"]) == 0
