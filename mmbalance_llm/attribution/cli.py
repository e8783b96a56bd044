"""`mmbalance attribute --model PATH --data PATH`: run the attribution methods on a few samples and write
``attribution.json``, ``report.html`` and PNG plots.

* HF MLLM folder (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio): ``--data`` is chat data (sharegpt / LLaVA JSON,
  the last assistant reply is the target answer) or a benchmark file (its correct option is the target).
* Toolkit classifier folder (``MultimodalClassifier`` saved by a run): ``--data`` is a feature dataset; the
  target is the predicted class (``--target label`` uses the gold label).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    from mmbalance_llm.attribution import METHOD_NAMES

    p = argparse.ArgumentParser(prog="mmbalance attribute",
                                description="Token-level modality attribution with a JSON + HTML report.")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None, help="output folder (default: attribution-<model folder name>)")
    p.add_argument("--methods", default="all", help=f"comma list from {', '.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--limit", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split", default="test", help="split of a feature dataset (classifiers)")
    p.add_argument("--target", choices=("pred", "label"), default="pred", help="classifier target class")
    p.add_argument("--steps", type=int, default=16, help="integrated-gradients steps")
    p.add_argument("--baseline", choices=("zero", "mean"), default="zero", help="integrated-gradients baseline")
    p.add_argument("--n-groups", type=int, default=8, help="MM-SHAP token groups per modality")
    p.add_argument("--n-permutations", type=int, default=32, help="MM-SHAP sampled permutations")
    p.add_argument("--media-dir", default=None)
    from mmbalance_llm.decoding.cli_args import add_decoding_args

    add_decoding_args(p)  # --decoding fmd: attribution of the model under Fork-Merge Decoding (HF MLLMs)
    return p


def _display(tok: str) -> str:
    return tok.replace("Ġ", " ").replace("Ċ", "\\n")


def _hf_batches(model, processor, data, limit, bs, media_dir):
    from mmbalance_llm.data.chat import ChatCollator, ChatDataError, load_conversations

    try:
        recs = load_conversations(data)
        answers = [r["messages"][-1]["content"] for r in recs]
    except ChatDataError:
        from mmbalance_llm.eval.benchmark_formats import load_benchmark
        from mmbalance_llm.eval.reliance import MLLMScorer

        _, items = load_benchmark(data, "auto", media_dir)
        scorer = MLLMScorer(model, processor)
        recs, answers = [], []
        for it in items:
            r = scorer.record(it, tuple(scorer.accepts))
            r["messages"][-1]["content"] = it.answer
            recs.append(r)
            answers.append(it.answer)
    recs, answers = recs[:limit], answers[:limit]
    col = ChatCollator(processor, model.config)
    tok = col.tok
    for s in range(0, len(recs), bs):
        batch = col(recs[s:s + bs])
        yield batch, [r["id"] for r in recs[s:s + bs]], answers[s:s + bs], tok


def _classifier_batches(model, data, split, limit, bs, use_label):
    import torch

    from mmbalance_llm.data.features import column_tensor, load_splits

    raw = load_splits(data, [split])
    if split not in raw:
        raise SystemExit(f"mmbalance: error: --data {data} has no split {split!r}")
    ds = raw[split]
    n = min(limit, len(ds))
    cols = {m: column_tensor(ds, split, m)[:n] for m in model.modalities}
    labels = torch.as_tensor(np.asarray(ds["label"][:n])) if "label" in ds.column_names else None
    for s in range(0, n, bs):
        batch = {m: v[s:s + bs] for m, v in cols.items()}
        target = labels[s:s + bs] if (use_label and labels is not None) else None
        yield batch, [f"{split}-{i}" for i in range(s, min(n, s + bs))], target


def _classifier_tokens(model, batch):
    toks = []
    for m in model.modalities:
        x = batch[m]
        toks += [f"{m}[{t}]" for t in range(x.shape[1])] if x.dim() == 3 else [m]
    return toks


def attribute_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    from transformers import AutoConfig

    from mmbalance_llm.attribution import METHOD_NAMES, attribute, is_hf_mllm, make_adapter
    from mmbalance_llm.attribution.methods import frozen
    from mmbalance_llm.eval.report_html import render_report

    methods = list(METHOD_NAMES) if a.methods == "all" else [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        print(f"mmbalance: error: --methods: unknown method {bad[0]!r}; choose from {', '.join(METHOD_NAMES)}", file=sys.stderr)
        return 2
    if not Path(a.model).is_dir():
        print(f"mmbalance: error: --model {a.model}: folder not found", file=sys.stderr)
        return 2
    from mmbalance_llm.decoding.cli_args import DecodingArgError, decodings_from_args

    try:
        (decoding,), fmd = decodings_from_args(a, allow_both=False)
    except DecodingArgError as e:
        print(f"mmbalance: error: {e}", file=sys.stderr)
        return 2
    adapter_dir = (Path(a.model) / "adapter_config.json").is_file()
    from mmbalance_llm.models import register_all

    register_all()  # the toolkit's classifiers, known to AutoConfig / AutoModel

    cfg = AutoConfig.from_pretrained(a.model) if (Path(a.model) / "config.json").is_file() else None
    opts = {"steps": a.steps, "baseline": a.baseline, "n_groups": a.n_groups, "n_permutations": a.n_permutations}
    from mmbalance_llm.models.modality_map import supported_model_types

    if adapter_dir or (cfg is not None and cfg.model_type in supported_model_types()):
        from mmbalance_llm.eval.reliance import load_mllm

        model, proc = load_mllm(a.model)
        if decoding == "fmd":  # FMD forks each prompt: one sample per batch (prompt lengths differ)
            from mmbalance_llm.decoding import ForkMerge

            try:
                ForkMerge(model, **fmd)
            except ValueError as e:
                print(f"mmbalance: error: --decoding fmd: {e}", file=sys.stderr)
                return 2
            a.batch_size = 1
        source = ((b, ids, ans, tok) for b, ids, ans, tok in _hf_batches(model, proc, a.data, a.limit, a.batch_size,
                                                                          a.media_dir))
    else:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(a.model)
        source = ((b, ids, t, None) for b, ids, t in _classifier_batches(model, a.data, a.split, a.limit,
                                                                          a.batch_size, a.target == "label"))
        if decoding != "plain":
            print(f"mmbalance: error: --decoding {decoding} applies to HF MLLMs only, not to {a.model}", file=sys.stderr)
            return 2
    model.eval()
    import contextlib

    from mmbalance_llm.decoding.fork_merge import decoding_context

    decoding_scope = contextlib.ExitStack()
    decoding_scope.enter_context(decoding_context(model, decoding, **(fmd if decoding == "fmd" else {})))
    per_method = {m: {"shares": [], "target": "", "baseline": ""} for m in methods}
    skipped, samples, attn_layers, extras = {}, [], [], {}
    if decoding == "fmd" and "attention" in methods:
        skipped["attention"] = "the fork layers have two attention maps per token under fmd; run it with plain"
    modalities: list = []
    for batch, ids, ans, tok in source:
        target = None if is_hf_mllm(model) else ans
        with frozen(model):
            ad = make_adapter(model, batch, target)
        mods = ad.modalities
        modalities = modalities or list(mods)
        rows = [{"id": i, "modalities": list(mods), "scores": {}, "share": {},
                 "answer": (a_ if isinstance(a_, str) else None)} for i, a_ in zip(ids, ans if ans is not None
                                                                                      else [None] * len(ids))]
        if tok is not None:
            for r, seq in zip(rows, ad.batch["input_ids"]):
                r["tokens"] = [_display(t) for t in tok.convert_ids_to_tokens(seq.tolist())]
        else:
            names = _classifier_tokens(model, ad.inputs)
            for r in rows:
                r["tokens"] = names
        for r, tm in zip(rows, ad.token_modality):
            r["token_modality"] = tm.tolist()
        for me in methods:
            if me in skipped:
                continue
            try:
                res = attribute(model, batch, me, adapter=ad, **opts)
            except ValueError as e:
                skipped[me] = str(e)
                continue
            pm = per_method[me]
            pm["target"], pm["baseline"] = res.target, res.baseline
            for b, r in enumerate(rows):
                r["scores"][me] = res.scores[b].tolist()
                r["share"][me] = {m: float(res.modality_share[m][b]) for m in mods}
                pm["shares"].append(r["share"][me])
            if me == "attention":
                pl = res.details["per_layer"]["raw_no_sink"]
                attn_layers += [{m: pl[m][b].tolist() for m in mods} for b in range(len(rows))]
            if me == "shapley_modality":
                extras.setdefault("shapley_phi_mean", []).append({m: float(v.mean()) for m, v in res.details["phi"].items()})
            if me == "ablation":
                extras.setdefault("delta_logp_blank_mean", []).append(
                    {m: float(v.mean()) for m, v in res.details["delta_logp_blank"].items()})
        samples += rows
    decoding_scope.close()
    if not samples:
        print(f"mmbalance: error: --data {a.data}: no samples", file=sys.stderr)
        return 2
    summary = {"model": a.model, "data": a.data, "decoding": decoding, **({"fmd": fmd} if decoding == "fmd" else {}),
               "n_samples": len(samples), "modalities": modalities,
               "methods": {}, "skipped": skipped, "options": opts, "samples": samples}
    for me, pm in per_method.items():
        if not pm["shares"]:
            continue
        arr = {m: np.array([s[m] for s in pm["shares"]]) for m in modalities}
        summary["methods"][me] = {"mean_share": {m: float(v.mean()) for m, v in arr.items()},
                                  "std_share": {m: float(v.std()) for m, v in arr.items()},
                                  "target": pm["target"], "baseline": pm["baseline"], "n": len(pm["shares"])}
    if attn_layers:
        summary["attention_per_layer"] = {m: np.mean([r[m] for r in attn_layers], 0).tolist() for m in modalities}
    summary["extras"] = {k: {m: float(np.mean([d[m] for d in v])) for m in v[0]} for k, v in extras.items()}
    out = Path(a.out or f"attribution-{Path(a.model).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "attribution.json").write_text(json.dumps(summary, indent=1))
    paths = render_report(summary, out)
    print(f"{'method':<22}" + "".join(f"{m:>10}" for m in modalities))
    for me, d in summary["methods"].items():
        print(f"{me:<22}" + "".join(f"{d['mean_share'][m]:>10.3f}" for m in modalities))
    for me, why in skipped.items():
        print(f"skipped {me}: {why}")
    print(f"wrote {out / 'attribution.json'}, " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(attribute_main(sys.argv[1:]))
