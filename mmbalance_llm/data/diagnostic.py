"""Diagnostic modality-reliance benchmark with ground truth, written in the VLM benchmark file formats.

Items come from the shared generator (:mod:`mmbalance_llm.data.mm_synthetic`: the same shapes, tones and
questions MLLM fine-tuning uses) plus two-modality kinds built from the same drawing functions. Each item
says which modalities its answer depends on (``needs``):

=============  ====================================================  ===========
needs          question                                              answers
=============  ====================================================  ===========
image          colour / shape of the shape (shared generator)        the words
audio          pitch / number of beeps (shared generator)            the words
text           sums written in words (shared generator)              one .. six
image+text     "Is the shape <colour>?" (colour named in the text)   yes / no
audio+text     "Are there <n> beeps in the audio?"                   yes / no
image+audio    "Is the shape a circle and the tone high?"            yes / no
=============  ====================================================  ===========

Every item carries both an image and a tone, so removing a modality the answer does not need must not hurt,
and removing one it needs must bring accuracy to chance. Files written by :func:`write_diagnostic`:
``diagnostic_avqa.json`` (all items, both media), ``diagnostic_mmstar.tsv`` (items answerable from image and
text, letter options, base64 images), ``diagnostic_pope.jsonl`` ("Is there a <shape>?"),
``diagnostic_mme.tsv`` (two questions per image, one yes and one no, for acc+), plus ``truth.json``.

CLI: ``python -m mmbalance_llm.data.diagnostic OUT --n 120``.
"""
from __future__ import annotations

import argparse
import base64
import json
import random
import sys
from pathlib import Path

from mmbalance_llm.data import mm_synthetic as gen

TWO_MODALITY_KINDS = ("image+text", "audio+text", "image+audio")


def _media(out: Path, iid: str, attrs: dict, rng: random.Random):
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    gen.draw_shape(attrs["shape"], attrs["colour"], rng).save(out / f"images/{iid}.png")
    gen.write_wav(out / f"audio/{iid}.wav", gen.make_tone(attrs["pitch"], attrs["beeps"], rng))
    return f"images/{iid}.png", f"audio/{iid}.wav"


def _two_modality_item(kind: str, iid: str, rng: random.Random, out: Path) -> dict:
    attrs = {"colour": rng.choice(tuple(gen.COLOURS)), "shape": rng.choice(gen.SHAPES),
             "pitch": rng.choice(tuple(gen.PITCHES)), "beeps": rng.randint(1, 3)}
    yes = rng.random() < 0.5
    if kind == "image+text":
        named = attrs["colour"] if yes else rng.choice([c for c in gen.COLOURS if c != attrs["colour"]])
        q = f"Is the shape {named}?"
    elif kind == "audio+text":
        n = attrs["beeps"] if yes else rng.choice([k for k in (1, 2, 3) if k != attrs["beeps"]])
        q = f"Are there {gen.NUMBERS[n]} beeps in the audio?"
    else:
        if yes:
            attrs["shape"], attrs["pitch"] = "circle", "high"
        elif (attrs["shape"], attrs["pitch"]) == ("circle", "high"):
            attrs["pitch"] = rng.choice(["low", "medium"])
        q = "Is the shape a circle and the tone high?"
    img, aud = _media(out, iid, attrs, rng)
    return {"id": iid, "kind": kind, "needs": kind, "question": q + gen.SUFFIX, "options": ["yes", "no"],
            "answer": "yes" if yes else "no", "image": img, "audio": aud, "attributes": attrs}


def diagnostic_items(out_dir, n: int = 120, seed: int = 0) -> list:
    """``n`` items (about half single-modality from the shared generator, half two-modality), media written
    under ``out_dir``. Each item dict has id, kind, needs, question, options, answer, image, audio."""
    out = Path(out_dir)
    n_single = n // 2
    single = gen.generate_items(n_single, out, ("image", "audio"), seed=seed, text_fraction=0.2, prefix="diag")
    items = [{"id": it.id, "kind": it.kind, "needs": it.needs, "question": it.question + gen.SUFFIX,
              "options": list(it.options), "answer": it.answer, "image": it.image, "audio": it.audio,
              "attributes": it.attributes} for it in single]
    rng = random.Random(seed + 7919)
    for i in range(n - n_single):
        items.append(_two_modality_item(TWO_MODALITY_KINDS[i % 3], f"diag2_{i:05d}", rng, out))
    return items


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _clean(s: str) -> str:
    return s.replace("\t", " ").replace("\n", " ")


def write_diagnostic(out_dir, n: int = 120, seed: int = 0) -> dict:
    """Write the diagnostic benchmark in all four formats; returns {format: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = diagnostic_items(out, n, seed)
    rng = random.Random(seed + 104729)
    paths = {"avqa": out / "diagnostic_avqa.json", "mmstar": out / "diagnostic_mmstar.tsv",
             "pope": out / "diagnostic_pope.jsonl", "mme": out / "diagnostic_mme.tsv", "truth": out / "truth.json"}
    paths["avqa"].write_text(json.dumps([{k: it[k] for k in ("id", "question", "options", "answer", "image", "audio",
                                                             "needs", "kind")} for it in items], indent=1))
    # MMStar: only items answerable from image + text; up to 4 lettered options including the answer
    with open(paths["mmstar"], "w", encoding="utf-8") as fh:
        fh.write("\t".join(["index", "question", "A", "B", "C", "D", "answer", "category", "l2_category", "needs",
                            "image"]) + "\n")
        k = 0
        for it in items:
            if "audio" in it["needs"]:
                continue
            opts = list(it["options"])
            if len(opts) > 4:
                opts = [it["answer"]] + rng.sample([o for o in opts if o != it["answer"]], 3)
            rng.shuffle(opts)
            letters = "ABCD"
            cells = [opts[j] if j < len(opts) else "" for j in range(4)]
            fh.write("\t".join([str(k), _clean(it["question"].replace(gen.SUFFIX, "")), *cells,
                                letters[opts.index(it["answer"])], it["kind"], it["needs"], it["needs"],
                                _b64(out / it["image"])]) + "\n")
            k += 1
    # POPE: object-existence questions about the shape, balanced yes/no
    with open(paths["pope"], "w", encoding="utf-8") as fh:
        for j, it in enumerate(items):
            shape = it["attributes"].get("shape")
            if not shape:
                continue
            yes = rng.random() < 0.5
            asked = shape if yes else rng.choice([s for s in gen.SHAPES if s != shape])
            fh.write(json.dumps({"question_id": j, "image": it["image"], "text": f"Is there a {asked} in the image?",
                                 "label": "yes" if yes else "no", "category": "diagnostic", "needs": "image+text"}) + "\n")
    # MME: two questions per image (true colour -> yes, another colour -> no), grouped by image_path
    with open(paths["mme"], "w", encoding="utf-8") as fh:
        fh.write("\t".join(["index", "category", "image_path", "question", "answer", "needs"]) + "\n")
        k = 0
        for it in items:
            col = it["attributes"].get("colour")
            if not col:
                continue
            other = rng.choice([c for c in gen.COLOURS if c != col])
            for c, a in ((col, "Yes"), (other, "No")):
                fh.write("\t".join([str(k), "colour", it["image"], f"Is the shape {c}? Please answer yes or no.", a,
                                    "image+text"]) + "\n")
                k += 1
    truth = {"needs": {it["id"]: it["needs"] for it in items}, "n": len(items), "seed": seed,
             "expectation": "removing a modality in `needs` brings accuracy to chance; removing any other keeps it"}
    paths["truth"].write_text(json.dumps(truth, indent=1))
    return {k: str(v) for k, v in paths.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmbalance_llm.data.diagnostic",
                                description="Write the diagnostic modality-reliance benchmark (MMStar/POPE/MME/AVQA formats).")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for k, v in write_diagnostic(a.out_dir, a.n, a.seed).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
