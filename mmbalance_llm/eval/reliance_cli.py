"""`mmbalance reliance --model PATH --benchmark FILE`: modality reliance of an MLLM on a local benchmark file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmbalance reliance",
                                description="Evaluate an MLLM on a local VLM benchmark with each modality present, "
                                            "blanked and dropped; report accuracy per condition, MMStar MG/ML, "
                                            "reliance, POPE and MME metrics.")
    p.add_argument("--model", required=True, help="HF MLLM folder (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio)")
    p.add_argument("--benchmark", required=True, help="benchmark file or MME folder")
    p.add_argument("--format", default="auto", choices=("auto", "mmstar", "pope", "mme", "avqa"),
                   help="benchmark layout; auto tells MMStar / POPE / MME tables apart by their columns and answers")
    p.add_argument("--base-llm", default=None, help="text-only base model (MMStar S_t): an MLLM or causal LM folder")
    p.add_argument("--out", default=None, help="output folder (default: <benchmark stem>-reliance next to the file)")
    p.add_argument("--task", default=None, help="task name in the results (default: the benchmark file stem)")
    p.add_argument("--media-dir", default=None,
                   help="where base64 images are decoded (TSV) / what media paths are relative to (JSON)")
    p.add_argument("--allow-outside-media", action="store_true",
                   help="allow media paths that point outside the benchmark's folder (refused by default)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-blank", action="store_true", help="skip the blank_<m> conditions")
    p.add_argument("--no-drop", action="store_true", help="skip the drop_<m> conditions")
    from mmbalance_llm.decoding.cli_args import add_decoding_args

    add_decoding_args(p, allow_both=True)
    return p


def reliance_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    from mmbalance_llm.eval.benchmark_formats import FormatError, load_benchmark
    from mmbalance_llm.eval.reliance import evaluate_reliance, load_scorer, markdown_table, write_outputs

    try:
        fmt, items = load_benchmark(a.benchmark, a.format, a.media_dir, allow_outside_media=a.allow_outside_media)
    except FormatError as e:
        print(f"mmbalance: error: {e}", file=sys.stderr)
        return 2
    if a.limit:
        items = items[: a.limit]
    if a.limit is not None and a.limit < 1:
        print("mmbalance: error: --limit must be >= 1", file=sys.stderr)
        return 2
    from mmbalance_llm.decoding.cli_args import DecodingArgError, decodings_from_args

    try:
        decodings, fmd = decodings_from_args(a)
    except DecodingArgError as e:
        print(f"mmbalance: error: {e}", file=sys.stderr)
        return 2
    scorer = load_scorer(a.model, a.batch_size)
    if not hasattr(scorer, "accepts"):
        print(f"mmbalance: error: --model {a.model} is not a multimodal LLM with a modality map", file=sys.stderr)
        return 2
    if "fmd" in decodings:  # check the settings against this model before anything is written
        from mmbalance_llm.decoding import ForkMerge

        try:
            ForkMerge(scorer.model, **fmd)
        except ValueError as e:
            print(f"mmbalance: error: --decoding fmd: {e}", file=sys.stderr)
            return 2
    base = load_scorer(a.base_llm, a.batch_size) if a.base_llm else None
    task = a.task or Path(a.benchmark).stem
    out = a.out or str(Path(a.benchmark).with_name(f"{task}-reliance"))
    cfg = {"model": a.model, "benchmark": str(a.benchmark), "format": fmt, "base_llm": a.base_llm,
           "n_items": len(items), "scoring": "argmax over options of the summed answer-token log-prob"}
    by_decoding = {}
    for dec in decodings:  # one scorer, the same items: plain and FMD rows are paired
        scorer.decoding, scorer.fmd = dec, (fmd if dec == "fmd" else {})
        ev = evaluate_reliance(scorer, items, fmt, base, blank=not a.no_blank, drop=not a.no_drop)
        sub = out if len(decodings) == 1 else str(Path(out) / dec)
        paths = write_outputs(sub, task, ev, {**cfg, "decoding": dec, **({"fmd": fmd} if dec == "fmd" else {})})
        print(markdown_table(task if len(decodings) == 1 else f"{task} ({dec})", ev["results"], ev["conditions"]))
        by_decoding[dec] = ev
    if len(decodings) > 1:
        from mmbalance_llm.decoding.cli_args import write_decoding_comparison

        paths = {**paths, "comparison": write_decoding_comparison(out, task, by_decoding)}
        print(Path(paths["comparison"]).read_text())
    if ev["ignored_media"]:
        print(f"note: the model takes no {', '.join(ev['ignored_media'])}; those media were ignored")
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(reliance_main(sys.argv[1:]))
