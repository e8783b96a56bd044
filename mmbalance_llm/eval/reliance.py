"""Modality reliance of an MLLM on VLM benchmarks: every item with all modalities, with each non-text modality
blanked or dropped, with all media dropped, and optionally on the base LLM alone.

Each item is multiple choice: every option is scored by its summed answer-token log-probability (teacher
forcing, the lm-eval-harness ``acc`` rule) and the prediction is the best option. Conditions:

* ``full``: all media the model accepts;
* ``blank_<m>``: modality m's media input zeroed (normalised pixels / log-mel), placeholders kept;
* ``drop_<m>``: m's placeholder and media removed from the prompt;
* ``no_media``: every media input dropped (MMStar's S_wv: the LVLM without the image);
* ``base_llm``: a separate text-only model (MMStar's S_t), when given.

Metrics (docs/attribution.md): accuracy per condition; MMStar multimodal gain ``MG = S_v - S_wv`` and
leakage ``ML = max(0, S_wv - S_t)``; per modality and mode the reliance ``delta = acc_full - acc_without_m`` and
``ratio = delta / acc_full`` (the fraction of accuracy that needs m), the mean ``delta logp`` of the correct
answer and the flip rate; POPE precision / recall / F1 / yes-ratio, overall and per split; MME acc, acc+ and
score per category, perception and cognition; MMStar accuracy per category and l2-category and the macro mean
over l2-categories; accuracy per ``needs`` group when items carry one (the diagnostic benchmark). Where the peers
define a metric differently, docs/attribution.md says how.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------- metric maths


def accuracy(preds, refs) -> float:
    preds, refs = list(preds), list(refs)
    return float(np.mean([p == r for p, r in zip(preds, refs)])) if refs else 0.0


def pope_metrics(preds, refs) -> dict:
    """POPE: 'yes' is the positive class; yes_ratio is the share of 'yes' predictions."""
    p = np.array([str(x).lower() == "yes" for x in preds])
    r = np.array([str(x).lower() == "yes" for x in refs])
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"acc": float((p == r).mean()) if len(r) else 0.0, "precision": prec, "recall": rec, "f1": f1,
            "yes_ratio": float(p.mean()) if len(p) else 0.0}


def mme_scores(preds, refs, categories, groups) -> dict:
    """MME: per category acc (per question) and acc+ (share of images whose questions are all right);
    score = 100 * (acc + acc+); ``total`` is the sum of the category scores."""
    out, total = {}, 0.0
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        ok = {i: preds[i] == refs[i] for i in idx}
        by_group: dict = {}
        for i in idx:
            by_group.setdefault(groups[i], []).append(ok[i])
        acc = float(np.mean(list(ok.values())))
        acc_plus = float(np.mean([all(v) for v in by_group.values()]))
        out[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
        total += out[cat]["score"]
    out["total"] = total
    return out


def mme_parts(scores: dict) -> dict:
    """MME perception and cognition: sums of their categories' scores (categories as both peers list them;
    others count in ``total`` only)."""
    from mmbalance_llm.eval.benchmark_formats import MME_COGNITION, MME_PERCEPTION

    return {"perception": sum(v["score"] for k, v in scores.items() if k in MME_PERCEPTION),
            "cognition": sum(v["score"] for k, v in scores.items() if k in MME_COGNITION)}


def mmstar_breakdown(preds, refs, categories, l2_categories) -> dict:
    """MMStar accuracy per category and per l2-category (VLMEvalKit's report_acc, micro within each group), and
    lmms-eval's ``average``: the macro mean over l2-categories."""
    ok = np.array([p == r for p, r in zip(preds, refs)], dtype=float)
    cat = {c: float(ok[[i for i, x in enumerate(categories) if x == c]].mean()) for c in sorted(set(categories)) if c}
    l2 = {c: float(ok[[i for i, x in enumerate(l2_categories) if x == c]].mean()) for c in sorted(set(l2_categories))
          if c}
    return {"category": cat, "l2_category": l2, "macro_l2": float(np.mean(list(l2.values()))) if l2 else None}


def gain_leakage(s_v: float, s_wv: float, s_t: float | None = None) -> dict:
    """MMStar: multimodal gain MG = S_v - S_wv; multimodal leakage ML = max(0, S_wv - S_t) (needs S_t)."""
    return {"mg": s_v - s_wv, "ml": None if s_t is None else max(0.0, s_wv - s_t)}


def reliance_scores(acc: dict) -> dict:
    """{"<mode>_<m>": {"delta", "ratio"}} from accuracies keyed by condition (``full`` required)."""
    full = acc["full"]
    out = {}
    for cond, a in acc.items():
        if cond.startswith(("blank_", "drop_")) or cond == "no_media":
            out[cond] = {"delta": full - a, "ratio": (full - a) / full if full > 0 else 0.0}
    return out


# ------------------------------------------------------------------------------------------- scoring
def item_media(item, modality: str) -> list:
    """An item's media files of one modality."""
    return {"image": item.images, "audio": item.audios, "video": getattr(item, "videos", [])}[modality]



class MLLMScorer:
    """Scores the options of benchmark items on an HF MLLM (through its processor and chat template)."""

    def __init__(self, model, processor, batch_size: int = 16, max_length: int = 1024, decoding: str = "plain",
                 fmd: dict | None = None):
        from mmbalance_llm.data.chat import ChatCollator
        from mmbalance_llm.models.modality_map import get_modality_map

        # decoding="fmd": Fork-Merge Decoding over the prompt (mmbalance_llm.decoding), options as decode steps
        self.decoding, self.fmd = decoding, dict(fmd or {})
        self.model = model.eval()
        self.collator = ChatCollator(processor, model.config, max_length=max_length)
        self.accepts = [m for m in get_modality_map(model).modalities if m in ("image", "video", "audio")]
        self.batch_size = batch_size

    def record(self, item, keep: tuple) -> dict:
        media = {m: item_media(item, m) if m in keep else [] for m in ("image", "video", "audio")}
        ph = "<image>" * len(media["image"]) + "<video>" * len(media["video"]) + "<audio>" * len(media["audio"])
        return {"id": item.id, "messages": [{"role": "user", "content": ph + item.question},
                                            {"role": "assistant", "content": item.options[0]}],
                "images": list(media["image"]), "audios": list(media["audio"]),
                "videos": [[v] for v in media["video"]]}

    def option_logprobs(self, items, keep: tuple, blank: tuple = ()) -> list:
        """[[logp(option) for option in item.options] for item in items]."""
        import torch

        from mmbalance_llm.attribution.hf import BLANK_KEYS, answer_logprob

        encs, owner = [], []
        for i, it in enumerate(items):
            rec = self.record(it, keep)
            for o in it.options:
                encs.append(self.collator.encode(rec, answer=o, where=it.source))
                owner.append(i)
        from mmbalance_llm.decoding.fork_merge import decoding_context, prompt_length_groups

        chunks = ([list(range(s, min(s + self.batch_size, len(encs)))) for s in range(0, len(encs), self.batch_size)]
                  if self.decoding == "plain" else prompt_length_groups(encs, self.batch_size))
        scores = [0.0] * len(encs)
        with torch.no_grad(), decoding_context(self.model, self.decoding, **self.fmd):
            for idx in chunks:
                batch = self.collator.pad([encs[i] for i in idx])
                for m in blank:
                    if BLANK_KEYS[m] in batch:
                        batch[BLANK_KEYS[m]] = torch.zeros_like(batch[BLANK_KEYS[m]])
                for i, v in zip(idx, answer_logprob(self.model, batch)[0].tolist()):
                    scores[i] = v
        out = [[] for _ in items]
        for i, v in zip(owner, scores):
            out[i].append(v)
        return out


class TextLMScorer:
    """A text-only causal LM (MMStar's base LLM): prompt rendered with its chat template when it has one."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model.eval(), tokenizer

    def option_logprobs(self, items, keep=(), blank=()) -> list:
        import torch
        import torch.nn.functional as F

        out = []
        for it in items:
            if getattr(self.tok, "chat_template", None):
                prompt = self.tok.apply_chat_template([{"role": "user", "content": it.question}], tokenize=False,
                                                      add_generation_prompt=True)
            else:
                prompt = it.question + "\nAnswer: "
            p_ids = self.tok(prompt)["input_ids"]
            row = []
            for o in it.options:
                a_ids = self.tok(o, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + a_ids])
                with torch.no_grad():
                    lp = F.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), -1)
                tgt = ids[0, 1:]
                row.append(float(lp[torch.arange(len(tgt)), tgt][len(p_ids) - 1:].sum()))
            out.append(row)
        return out


def load_mllm(path: str):
    """(model, processor) from an MLLM folder, or from a peft adapter folder (LoRA / MokA) whose
    ``adapter_config.json`` names the base model folder (the processor is read from the base)."""
    import mmbalance_llm  # noqa: F401  (registers MokA with peft)
    from mmbalance_llm.models.tiny import load_tiny

    ac = Path(path) / "adapter_config.json"
    if not ac.is_file():
        return _readable(path, lambda: load_tiny(path))
    from peft import PeftModel

    from mmbalance_llm.adapters import install_peft_registration

    # peft is imported now, so this registers MokA at once (the post-import hook can be consumed by an
    # importlib.util.find_spec("peft") probe, e.g. transformers' is_peft_available, before peft is imported)
    install_peft_registration()
    base_path = json.loads(ac.read_text()).get("base_model_name_or_path")
    if not base_path or not Path(base_path).is_dir():
        raise ValueError(f"{ac}: base_model_name_or_path {base_path!r} is not a local model folder")
    base, proc = _readable(base_path, lambda: load_tiny(base_path))
    model = _readable(path, lambda: PeftModel.from_pretrained(base, path))
    return model.eval(), proc


def _readable(folder: str, load):
    """Run `load`; a corrupt or truncated safetensors file becomes one line naming the folder."""
    try:
        return load()
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        names = sorted(p.name for p in Path(folder).glob("*.safetensors"))
        raise ValueError(f"{folder}: {', '.join(names) or 'a safetensors file'} is corrupt or truncated ({exc})") from None


def load_scorer(path: str, batch_size: int = 16, decoding: str = "plain", fmd: dict | None = None):
    """An MLLM folder (any family with a modality map, or an adapter on one) or a plain causal LM folder.
    ``decoding``/``fmd`` apply to MLLMs only (see :class:`MLLMScorer`)."""
    from transformers import AutoConfig

    from mmbalance_llm.models.modality_map import supported_model_types

    if (Path(path) / "adapter_config.json").is_file():
        return MLLMScorer(*load_mllm(path), batch_size=batch_size, decoding=decoding, fmd=fmd)
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type in supported_model_types():
        return MLLMScorer(*load_mllm(path), batch_size=batch_size, decoding=decoding, fmd=fmd)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return TextLMScorer(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))


# ------------------------------------------------------------------------------------------- evaluation


def conditions_for(scorer, items, blank: bool = True, drop: bool = True) -> dict:
    """Condition name -> (kept media, blanked media)."""
    present = [m for m in scorer.accepts if any(item_media(it, m) for it in items)]
    conds = {"full": (tuple(present), ())}
    for m in present:
        if blank:
            conds[f"blank_{m}"] = (tuple(present), (m,))
        if drop:
            conds[f"drop_{m}"] = (tuple(x for x in present if x != m), ())
    conds["no_media"] = ((), ())
    return conds


def evaluate_reliance(scorer, items, fmt: str, base_scorer=None, blank: bool = True, drop: bool = True) -> dict:
    """Run every condition; returns {"results": {...}, "samples": [...], "conditions": [...], "ignored_media": [...]}"""
    conds = conditions_for(scorer, items, blank, drop)
    logps, cache = {}, {}
    for name, (keep, blanked) in conds.items():
        key = (keep, blanked)
        if key not in cache:  # e.g. drop_image == no_media for a single-modality model
            cache[key] = scorer.option_logprobs(items, keep, blanked)
        logps[name] = cache[key]
    if base_scorer is not None:
        logps["base_llm"] = base_scorer.option_logprobs(items, (), ())
    refs = [it.answer for it in items]
    preds = {c: [it.options[int(np.argmax(lp))] for it, lp in zip(items, v)] for c, v in logps.items()}
    acc = {c: accuracy(p, refs) for c, p in preds.items()}
    res: dict = {f"acc,{c}": a for c, a in acc.items()}
    gl = gain_leakage(acc["full"], acc["no_media"], acc.get("base_llm"))
    res["mmstar_mg"], res["mmstar_ml"] = gl["mg"], gl["ml"]
    correct_lp = {c: np.array([lp[it.options.index(it.answer)] for it, lp in zip(items, v)]) for c, v in logps.items()}
    for cond, r in reliance_scores(acc).items():
        res[f"reliance_delta,{cond}"] = r["delta"]
        res[f"reliance_ratio,{cond}"] = r["ratio"]
        res[f"delta_logp,{cond}"] = float((correct_lp["full"] - correct_lp[cond]).mean())
        res[f"flip_rate,{cond}"] = float(np.mean([a != b for a, b in zip(preds["full"], preds[cond])]))
    if fmt == "pope" or all(set(it.options) == {"yes", "no"} for it in items):
        for c, p in preds.items():
            for k, v in pope_metrics(p, refs).items():
                res[f"pope_{k},{c}"] = v
        res.update(pope_split_results(items, preds, refs) if fmt == "pope" else {})
    if fmt == "mme":
        res.update(mme_results(items, preds, refs))
    if fmt == "mmstar":
        res.update(mmstar_results(items, preds, refs))
    needs = [it.meta.get("needs") for it in items]
    if any(needs):
        for g in sorted({n for n in needs if n}):
            idx = [i for i, n in enumerate(needs) if n == g]
            for c, p in preds.items():
                res[f"acc_needs/{g},{c}"] = accuracy([p[i] for i in idx], [refs[i] for i in idx])
    samples = []
    for i, it in enumerate(items):
        samples.append({"doc_id": i, "doc": {"id": it.id, "question": it.question, "options": it.options,
                                             "category": it.category, "source": it.source, **it.meta},
                        "target": it.answer,
                        "conditions": {c: {"pred": preds[c][i], "acc": float(preds[c][i] == it.answer),
                                           "logprobs": logps[c][i]} for c in logps}})
    ignored = sorted({m for it in items for m in ("image", "video", "audio")
                      if item_media(it, m) and m not in scorer.accepts}) if hasattr(scorer, "accepts") else []
    return {"results": res, "samples": samples, "conditions": list(logps), "ignored_media": ignored}


def pope_split_results(items, preds: dict, refs: list) -> dict:
    """POPE metrics per split (an item in several splits counts in each, as VLMEvalKit's POPE_rating)."""
    res = {}
    splits = sorted({s for it in items for s in it.meta.get("splits", [])})
    for sp in splits:
        idx = [i for i, it in enumerate(items) if sp in it.meta.get("splits", [])]
        for c, p in preds.items():
            for k, v in pope_metrics([p[i] for i in idx], [refs[i] for i in idx]).items():
                res[f"pope_{k}/{sp},{c}"] = v
    return res


def mme_results(items, preds: dict, refs: list) -> dict:
    res = {}
    cats, groups = [it.category for it in items], [it.group for it in items]
    for c, p in preds.items():
        scores = mme_scores(p, refs, cats, groups)
        res[f"mme_total,{c}"] = scores.pop("total")
        for part, v in mme_parts(scores).items():
            res[f"mme_{part},{c}"] = v
        for cat, v in scores.items():
            for k, x in v.items():
                res[f"mme_{k}/{cat},{c}"] = x
    return res


def mmstar_results(items, preds: dict, refs: list) -> dict:
    res = {}
    cats, l2 = [it.category for it in items], [it.meta.get("l2_category", "") for it in items]
    for c, p in preds.items():
        b = mmstar_breakdown(p, refs, cats, l2)
        for k, v in b["category"].items():
            res[f"mmstar_acc/{k},{c}"] = v
        for k, v in b["l2_category"].items():
            res[f"mmstar_acc_l2/{k},{c}"] = v
        if b["macro_l2"] is not None:
            res[f"mmstar_macro_l2,{c}"] = b["macro_l2"]
    return res


def _group_table(results: dict, conditions: list, prefix: str, label: str, digits: int = 3) -> list:
    """Rows = groups found under ``prefix<group>,<condition>``; columns = conditions."""
    f = lambda v: "–" if v is None else f"{v:.{digits}f}"  # noqa: E731
    groups = sorted({k.split(",")[0][len(prefix):] for k in results if k.startswith(prefix)})
    if not groups:
        return []
    lines = ["", f"| {label} | " + " | ".join(conditions) + " |", "|" + "---|" * (len(conditions) + 1)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(f(results.get(f"{prefix}{g},{c}")) for c in conditions) + " |")
    return lines


def markdown_table(task: str, results: dict, conditions: list) -> str:
    """Rows = conditions; columns = accuracy, reliance delta/ratio, delta logp, flips (+ POPE F1 / yes-ratio)."""
    pope = any(k.startswith("pope_f1,") for k in results)
    head = ["condition", "acc", "reliance Δ", "ratio", "Δlogp", "flips"] + (["POPE F1", "yes-ratio"] if pope else [])
    lines = [f"**{task}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for c in conditions:
        row = [c, f(results.get(f"acc,{c}")), f(results.get(f"reliance_delta,{c}")),
               f(results.get(f"reliance_ratio,{c}")), f(results.get(f"delta_logp,{c}")),
               f(results.get(f"flip_rate,{c}"))]
        if pope:
            row += [f(results.get(f"pope_f1,{c}")), f(results.get(f"pope_yes_ratio,{c}"))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"MMStar multimodal gain MG = {f(results.get('mmstar_mg'))}, "
                  f"leakage ML = {f(results.get('mmstar_ml'))}" + ("" if results.get("mmstar_ml") is not None
                                                                 else " (no base LLM given)")]
    if any(k.startswith("mme_total,") for k in results):
        lines += ["", "MME score (acc + acc+, x100) per condition: "
                  + ", ".join(f"{c} {results[f'mme_total,{c}']:.1f}" for c in conditions if f"mme_total,{c}" in results)]
        lines += ["", "| MME | " + " | ".join(conditions) + " |", "|" + "---|" * (len(conditions) + 1)]
        for part in ("perception", "cognition", "total"):
            lines.append(f"| {part} | " + " | ".join(f"{results.get(f'mme_{part},{c}', 0.0):.1f}" for c in conditions)
                         + " |")
        lines += _group_table(results, conditions, "mme_score/", "MME category score", 1)
    lines += _group_table(results, conditions, "mmstar_acc/", "MMStar category acc")
    lines += _group_table(results, conditions, "mmstar_acc_l2/", "MMStar l2-category acc")
    if any(k.startswith("mmstar_macro_l2,") for k in results):
        lines += ["", "MMStar macro average over l2-categories (lmms-eval's `average`): "
                  + ", ".join(f"{c} {results[f'mmstar_macro_l2,{c}']:.3f}" for c in conditions
                              if f"mmstar_macro_l2,{c}" in results)]
    lines += _group_table(results, conditions, "pope_f1/", "POPE split F1")
    lines += _group_table(results, conditions, "pope_acc/", "POPE split acc")
    groups = sorted({k.split(",")[0].split("/", 1)[1] for k in results if k.startswith("acc_needs/")})
    if groups:
        lines += ["", "| needs | " + " | ".join(conditions) + " |", "|" + "---|" * (len(conditions) + 1)]
        for g in groups:
            lines.append(f"| {g} | " + " | ".join(f(results.get(f"acc_needs/{g},{c}")) for c in conditions) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, task: str, evaluation: dict, config: dict) -> dict:
    """lm-eval-harness style: ``results.json`` ({results, configs, n-samples, versions}), ``samples_<task>.jsonl``
    and ``results.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"results": {task: evaluation["results"]},
           "configs": {task: {**config, "conditions": evaluation["conditions"],
                              "ignored_media": evaluation["ignored_media"]}},
           "n-samples": {task: {"original": len(evaluation["samples"]), "effective": len(evaluation["samples"])}},
           "versions": {task: 1}}
    paths = {"results": out / "results.json", "samples": out / f"samples_{task}.jsonl", "markdown": out / "results.md"}
    paths["results"].write_text(json.dumps(doc, indent=2))
    with open(paths["samples"], "w", encoding="utf-8") as fh:
        for s in evaluation["samples"]:
            fh.write(json.dumps(s) + "\n")
    paths["markdown"].write_text(markdown_table(task, evaluation["results"], evaluation["conditions"]))
    return {k: str(v) for k, v in paths.items()}
