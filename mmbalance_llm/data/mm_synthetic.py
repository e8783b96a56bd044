"""Generated multimodal instruction items with known answers (images of coloured shapes, audio tones).

One generator serves two users:

* **fine-tuning** (`write_instruction_set`): sharegpt-style JSON files (``messages`` + ``images`` /
  ``audios`` with ``<image>`` / ``<audio>`` placeholders) split into train / validation / test, so an MLLM
  has something real to learn on a CPU;
* **modality reliance** (`generate_items`): the same items as plain records that say which modality the
  answer needs (``needs`` = "image", "audio" or "text"), the answer options and the generating attributes,
  so blanking / dropping a modality has a known expected effect.

Questions of each kind:

==========  ============================================  ==========================
needs       question                                      answers
==========  ============================================  ==========================
image       colour of the shape / which shape             red green blue yellow / circle square triangle
audio       pitch of the tone / how many beeps            low medium high / one two three
text        small sums written in words                   one .. six
==========  ============================================  ==========================

**Text dominance** (``text_prior``): the question alone gives the answer away on most media items. Each media
question kind has a prior answer (its first option: red, circle, low, one), and a ``text_prior`` fraction of the
training and validation media items get that answer (the rest draw it uniformly), as in VQA-CP's changing
priors. A model can then score most of the training items from the question text, and only the minority whose
answer is not the prior needs the image or the audio: the situation in which fine-tuning learns to under-use
the media. ``test_prior`` chooses the test split: ``absent`` (uniform answers, every media item needs its
medium), ``misleading`` (never the prior answer) or ``same`` (the training distribution). With a prior, every
media record says whether its answer is the prior one (``cue``: "prior" or "nonprior"). The validation split
follows the training distribution, so checkpoint choice sees what training sees.

Images are 32x32 PNG files (random position, size and grey background); audio clips are 1 s, 16 kHz mono
16-bit WAV files written with the standard-library ``wave`` module (no torchcodec needed).

CLI: ``python -m mmbalance_llm.data.mm_synthetic OUT --modalities image --n-train 600``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
PITCHES = {"low": 300.0, "medium": 1000.0, "high": 3000.0}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
SAMPLE_RATE = 16000
IMAGE_SIZE = 32

QUESTIONS = {
    "colour": ("image", "What colour is the shape in the image?", tuple(COLOURS)),
    "shape": ("image", "Which shape is in the image?", SHAPES),
    "pitch": ("audio", "Is the tone in the audio low, medium or high?", tuple(PITCHES)),
    "beeps": ("audio", "How many beeps are in the audio?", NUMBERS[1:4]),
    "sum": ("text", "What is {a} plus {b}?", NUMBERS[1:7]),
}
SUFFIX = " Answer with one word."
TEST_PRIORS = ("absent", "misleading", "same")


@dataclass
class Item:
    """One generated question with its known answer. Paths are relative to the output folder."""

    id: str
    kind: str                     # key of QUESTIONS
    needs: str                    # the modality whose content determines the answer
    question: str
    answer: str
    options: list[str]
    image: str | None = None
    audio: str | None = None
    attributes: dict = field(default_factory=dict)
    cue: str | None = None        # with a text prior: "prior" (the answer is the kind's prior answer) or "nonprior"


def vocabulary_corpus() -> list[str]:
    """Sentences covering every question and answer word (used to train the tiny tokenizers)."""
    lines = []
    for kind, (_, q, answers) in QUESTIONS.items():
        for a in answers:
            for x in NUMBERS[1:4]:
                lines.append(q.format(a=x, b=x) + SUFFIX + " " + a)
            lines.append("assistant\n" + a)  # answers also start a line (Qwen templates): no leading space
    return lines * 5


def draw_shape(shape: str, colour: str, rng: random.Random, size: int = IMAGE_SIZE):
    """A PIL image with one filled ``shape`` in ``colour`` at a random place on a random grey background."""
    from PIL import Image, ImageDraw

    bg = rng.randint(90, 170)
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    s = rng.randint(size // 2, size - 6)
    x0, y0 = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=fill)
    else:
        d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)
    return img


def make_tone(pitch: str, beeps: int, rng: random.Random, seconds: float = 1.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """float32 waveform in [-1, 1]: ``beeps`` sine bursts at the pitch's frequency, with slight jitter and noise."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f = PITCHES[pitch] * (1 + rng.uniform(-0.05, 0.05))
    env = np.zeros(n, dtype=np.float64)
    slot = n // beeps
    for k in range(beeps):
        a, b = k * slot + slot // 8, k * slot + slot // 8 + int(slot * 0.55)
        env[a:b] = 1.0
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 0.02, n)
    return (0.6 * env * np.sin(2 * math.pi * f * t) + noise).clip(-1, 1).astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a mono 16-bit WAV (as written by :func:`write_wav`) into float32 [-1, 1] and its sample rate."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported, got {8 * w.getsampwidth()}-bit")
        sr, ch = w.getframerate(), w.getnchannels()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32767.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(1)
    return x, sr


def generate_items(n: int, out_dir: str | Path, modalities=("image",), seed: int = 0,
                   text_fraction: float = 0.25, prefix: str = "item", text_prior: float | None = None,
                   against_prior: bool = False) -> list[Item]:
    """Generate ``n`` items, writing their media under ``out_dir/{images,audio}``.

    ``modalities`` chooses which media kinds exist ("image", "audio" or both). A ``text_fraction`` of the items
    are text-only sums; the rest are spread evenly over the media question kinds. When both modalities are
    requested every media item carries both an image and a tone, and only one of them answers the question,
    which is what modality-reliance tests need.

    ``text_prior``: the fraction of media items whose answer is forced to the question kind's prior answer
    (``options[0]``); ``against_prior=True`` instead draws every media answer from the other options. Both are
    drawn from their own generator, so images, tones and the other items do not change (``text_prior=None``:
    no prior, no ``cue`` field; the items of the set before the knob existed).
    """
    bad = set(modalities) - {"image", "audio"}
    if bad or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of ('image', 'audio'), got {modalities!r}")
    if text_prior is not None and not 0.0 <= text_prior <= 1.0:
        raise ValueError(f"text_prior must be in [0, 1], got {text_prior!r}")
    out = Path(out_dir)
    rng = random.Random(seed)
    prior_rng = random.Random(seed * 7919 + 17)
    kinds = [k for k, (need, _, _) in QUESTIONS.items() if need in modalities]
    items = []
    for i in range(n):
        iid = f"{prefix}{i:05d}"
        kind = "sum" if rng.random() < text_fraction else kinds[i % len(kinds)]
        need, q, options = QUESTIONS[kind]
        attrs = {"colour": rng.choice(tuple(COLOURS)), "shape": rng.choice(SHAPES),
                 "pitch": rng.choice(tuple(PITCHES)), "beeps": rng.randint(1, 3)}
        if kind != "sum" and (text_prior is not None or against_prior):
            # the prior answer replaces the drawn one (before any medium is drawn from it)
            others = [o for o in options if o != options[0]]
            value = prior_rng.choice(others) if against_prior else (
                options[0] if prior_rng.random() < (text_prior or 0.0) else prior_rng.choice(options))
            attrs[kind] = NUMBERS.index(value) if kind == "beeps" else value
        item = Item(iid, kind, need, q, "", list(options), attributes={})
        if kind == "sum":
            a = rng.randint(1, 3)
            b = rng.randint(1, 6 - a) if a < 6 else 0
            item.question, item.answer = q.format(a=NUMBERS[a], b=NUMBERS[b]), NUMBERS[a + b]
            item.attributes = {"a": a, "b": b}
        else:
            item.answer = {"colour": attrs["colour"], "shape": attrs["shape"], "pitch": attrs["pitch"],
                           "beeps": NUMBERS[attrs["beeps"]]}[kind]
            item.attributes = attrs
            if text_prior is not None or against_prior:
                item.cue = "prior" if item.answer == options[0] else "nonprior"
        # text items still carry the media of the dataset, so the model must learn to ignore it for them
        if "image" in modalities:
            (out / "images").mkdir(parents=True, exist_ok=True)
            item.image = f"images/{iid}.png"
            draw_shape(attrs["shape"], attrs["colour"], rng).save(out / item.image)
        if "audio" in modalities:
            (out / "audio").mkdir(parents=True, exist_ok=True)
            item.audio = f"audio/{iid}.wav"
            write_wav(out / item.audio, make_tone(attrs["pitch"], attrs["beeps"], rng))
        items.append(item)
    return items


def to_sharegpt(item: Item) -> dict:
    """One item as a sharegpt-style record (``messages`` + ``images``/``audios`` + answer metadata)."""
    ph = ("<image>" if item.image else "") + ("<audio>" if item.audio else "")
    rec = {"id": item.id, "messages": [{"role": "user", "content": ph + item.question + SUFFIX},
                                       {"role": "assistant", "content": item.answer}],
           "answer": item.answer, "options": item.options, "needs": item.needs, "kind": item.kind}
    if item.cue:
        rec["cue"] = item.cue
    if item.image:
        rec["images"] = [item.image]
    if item.audio:
        rec["audios"] = [item.audio]
    return rec


def to_llava(item: Item) -> dict:
    """One image item as a LLaVA-JSON record (``image`` + ``conversations`` with human/gpt turns)."""
    if item.audio:
        raise ValueError(f"item {item.id}: LLaVA JSON has no audio field; use the sharegpt format")
    rec = {"id": item.id, "conversations": [{"from": "human", "value": "<image>\n" + item.question + SUFFIX},
                                            {"from": "gpt", "value": item.answer}],
           "answer": item.answer, "options": item.options, "needs": item.needs}
    if item.cue:
        rec["cue"] = item.cue
    if item.image:
        rec["image"] = item.image
    return rec


def write_instruction_set(out_dir: str | Path, modalities=("image",), n_train: int = 600, n_validation: int = 100,
                          n_test: int = 200, seed: int = 0, fmt: str = "sharegpt", text_prior: float = 0.0,
                          test_prior: str = "absent") -> dict[str, Path]:
    """Write ``{train,validation,test}.json`` (+ media, + ``items.jsonl`` with every attribute) under ``out_dir``.

    Returns the split -> file mapping. ``fmt`` is "sharegpt" or "llava". ``text_prior`` > 0 creates text
    dominance in train and validation, ``test_prior`` says what the test split gets (module docstring);
    ``text_prior=0`` writes the set as before the knob existed.
    """
    if fmt not in ("sharegpt", "llava"):
        raise ValueError(f"fmt must be 'sharegpt' or 'llava', got {fmt!r}")
    if test_prior not in TEST_PRIORS:
        raise ValueError(f"test_prior must be one of {', '.join(TEST_PRIORS)}, got {test_prior!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conv = to_sharegpt if fmt == "sharegpt" else to_llava
    paths = {}
    with open(out / "items.jsonl", "w") as meta:
        for k, (split, n) in enumerate((("train", n_train), ("validation", n_validation), ("test", n_test))):
            prior, against = (text_prior or None), False
            if prior is not None and split == "test" and test_prior != "same":
                prior, against = (0.0, False) if test_prior == "absent" else (None, True)
            items = generate_items(n, out, modalities, seed=seed * 1000 + k, prefix=f"{split}_", text_prior=prior,
                                   against_prior=against)
            for it in items:
                meta.write(json.dumps({"split": split, **asdict(it)}) + "\n")
            paths[split] = out / f"{split}.json"
            paths[split].write_text(json.dumps([conv(it) for it in items], indent=1))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmbalance_llm.data.mm_synthetic",
                                description="Write the synthetic multimodal instruction set (images/tones + questions).")
    p.add_argument("out_dir")
    p.add_argument("--modalities", default="image", help="comma list from image,audio (default: image)")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-validation", type=int, default=100)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", dest="fmt", choices=("sharegpt", "llava"), default="sharegpt")
    p.add_argument("--text-prior", type=float, default=0.0,
                   help="fraction of media questions in train/validation whose answer is the question's prior "
                        "answer, so the text alone gives it away (text dominance; default 0)")
    p.add_argument("--test-prior", choices=TEST_PRIORS, default="absent",
                   help="the test split's answers: absent (uniform, default), misleading (never the prior answer) "
                        "or same (as in training)")
    a = p.parse_args(argv)
    if not 0.0 <= a.text_prior <= 1.0:
        p.error(f"--text-prior must be in [0, 1], got {a.text_prior}")
    paths = write_instruction_set(a.out_dir, tuple(m.strip() for m in a.modalities.split(",") if m.strip()),
                                  a.n_train, a.n_validation, a.n_test, a.seed, a.fmt, a.text_prior, a.test_prior)
    print("wrote " + ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
