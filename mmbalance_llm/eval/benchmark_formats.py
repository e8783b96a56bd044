"""Readers for local VLM benchmark files in their common formats, with strict validation.

Formats (``load_benchmark(path, fmt="auto")``):

* ``mmstar`` - MMStar / VLMEvalKit-style TSV: ``index, question, answer, image`` (base64) and option columns
  ``A, B, C, D`` (optional: without them the options are inside the question). ``answer`` is a letter.
* ``pope`` - POPE JSONL: ``{"question_id", "image", "text", "label": "yes"|"no"}`` (``question``/``answer`` are
  accepted aliases); ``image`` is relative to ``image_root`` (default: the file's folder).
* ``mme`` - MME-style TSV (``index, category, image`` base64 or ``image_path``, ``question``, ``answer``
  Yes/No) or the MME folder layout ``ROOT/<category>/{images/, questions_answers_YN/}`` or
  ``ROOT/<category>/{x.png, x.txt}`` with ``question<TAB>answer`` lines. Items on one image form an acc+ pair.
* ``avqa`` - AVQA-style JSON list or JSONL: ``{"id", "question", "options": [...], "answer": text or index,
  "image"?: path, "audio"?: path}`` (``multi_choice``/``answer_idx`` accepted).

Every problem raises :class:`FormatError` with ``file:line`` and the field, e.g.
``pope.jsonl:7: field 'label' must be yes/no, got 'maybe'``. Extra columns/fields (the diagnostic benchmark's
``needs``) are kept in ``BenchItem.meta``.
"""
from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("mmstar", "pope", "mme", "avqa")
LETTERS = ("A", "B", "C", "D", "E", "F")


class FormatError(ValueError):
    """A malformed benchmark file; the message starts with ``file:line``."""


@dataclass
class BenchItem:
    id: str
    question: str          # full prompt text (options included for letter-scored formats)
    options: list          # candidate answers scored by log-probability
    answer: str            # the correct option (an element of ``options``)
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    category: str = ""
    group: str = ""        # items sharing a group form an MME acc+ set (same image)
    meta: dict = field(default_factory=dict)
    source: str = ""       # file:line


def _err(path, line, msg):
    return FormatError(f"{path}:{line}: {msg}")


def _save_b64_image(b64: str, path, line, media_dir: Path, stem: str) -> str:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _err(path, line, "field 'image' is not valid base64") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise _err(path, line, "field 'image' decodes to bytes that are not an image") from None
    media_dir.mkdir(parents=True, exist_ok=True)
    out = media_dir / f"{stem}-{hashlib.sha1(raw).hexdigest()[:12]}.png"
    if not out.exists():
        im.save(out)
    return str(out)


def _media_dir(path, media_dir):
    if media_dir is not None:
        return Path(media_dir)
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mmbalance-bench-"))


def _read_tsv(path):
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise FormatError(f"{path}:1: empty file (expected a header row)")
    header = [h.strip() for h in rows[0]]
    out = []
    for i, r in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in r):
            continue
        if len(r) != len(header):
            raise _err(path, i, f"{len(r)} columns but the header has {len(header)}")
        out.append((i, dict(zip(header, r))))
    return header, out


def _need(path, line, row, key):
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise _err(path, line, f"missing field '{key}'")
    return v.strip() if isinstance(v, str) else v


def _resolve(path, line, root: Path, rel: str, what: str) -> str:
    p = Path(rel) if os.path.isabs(rel) else root / rel
    if not p.is_file():
        raise _err(path, line, f"{what} file not found: {p}")
    return str(p)


def load_mmstar(path, media_dir=None) -> list:
    header, rows = _read_tsv(path)
    for col in ("index", "question", "answer", "image"):
        if col not in header:
            raise FormatError(f"{path}:1: header has no column '{col}' (MMStar TSV needs index, question, answer, image)")
    md = _media_dir(path, media_dir)
    has_opts = [c for c in LETTERS if c in header]
    items = []
    for line, r in rows:
        idx = _need(path, line, r, "index")
        q = _need(path, line, r, "question")
        opts = [c for c in has_opts if r.get(c, "").strip() and r[c].strip().lower() != "nan"] if has_opts else list(LETTERS[:4])
        if len(opts) < 2:
            raise _err(path, line, f"needs at least 2 options in columns {', '.join(has_opts)}")
        ans = _need(path, line, r, "answer").upper()
        if ans not in opts:
            raise _err(path, line, f"field 'answer' is {ans!r} but the options are {', '.join(opts)}")
        prompt = q
        if has_opts:
            prompt = q + "\nOptions:\n" + "\n".join(f"{c}. {r[c].strip()}" for c in opts)
        prompt += "\nAnswer with the option's letter from the given choices directly."
        img = _save_b64_image(_need(path, line, r, "image"), path, line, md, f"mmstar-{idx}")
        extra = {k: v for k, v in r.items() if k not in ("index", "question", "answer", "image", *LETTERS)}
        items.append(BenchItem(str(idx), prompt, opts, ans, [img], [], r.get("category", ""), "", extra,
                               f"{path}:{line}"))
    return items


def load_pope(path, image_root=None) -> list:
    root = Path(image_root) if image_root else Path(path).parent
    items = []
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                r = json.loads(text)
            except json.JSONDecodeError as e:
                raise _err(path, line, f"not valid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise _err(path, line, "expected a JSON object")
            q = r.get("text", r.get("question"))
            if not isinstance(q, str) or not q.strip():
                raise _err(path, line, "missing field 'text' (the question)")
            lab = r.get("label", r.get("answer"))
            if not isinstance(lab, str) or lab.strip().lower() not in ("yes", "no"):
                raise _err(path, line, f"field 'label' must be yes/no, got {lab!r}")
            img = _need(path, line, r, "image")
            qid = r.get("question_id", line)
            extra = {k: v for k, v in r.items() if k not in ("text", "question", "label", "answer", "image")}
            items.append(BenchItem(str(qid), q.strip(), ["yes", "no"], lab.strip().lower(),
                                   [_resolve(path, line, root, img, "image")], [],
                                   r.get("category", Path(path).stem), "", extra, f"{path}:{line}"))
    return items


def _yn(path, line, a):
    a = (a or "").strip().lower()
    if a not in ("yes", "no"):
        raise _err(path, line, f"field 'answer' must be Yes/No, got {a!r}")
    return a


def load_mme(path, media_dir=None) -> list:
    if Path(path).is_dir():
        return _load_mme_folder(Path(path))
    header, rows = _read_tsv(path)
    for col in ("index", "category", "question", "answer"):
        if col not in header:
            raise FormatError(f"{path}:1: header has no column '{col}' (MME TSV needs index, category, question, answer, "
                              "and image or image_path)")
    if "image" not in header and "image_path" not in header:
        raise FormatError(f"{path}:1: header needs a column 'image' (base64) or 'image_path'")
    md = _media_dir(path, media_dir)
    root = Path(path).parent
    items = []
    for line, r in rows:
        idx = _need(path, line, r, "index")
        if r.get("image_path", "").strip():
            img = _resolve(path, line, root, r["image_path"].strip(), "image")
            group = r["image_path"].strip()
        else:
            b64 = _need(path, line, r, "image")
            img = _save_b64_image(b64, path, line, md, f"mme-{idx}")
            group = Path(img).stem.split("-")[-1]  # content hash: the same picture pairs its questions
        extra = {k: v for k, v in r.items() if k not in ("index", "question", "answer", "image", "image_path")}
        items.append(BenchItem(str(idx), _need(path, line, r, "question"), ["yes", "no"],
                               _yn(path, line, r.get("answer")), [img], [], _need(path, line, r, "category"),
                               f"{r['category']}/{group}", extra, f"{path}:{line}"))
    return items


def _load_mme_folder(root: Path) -> list:
    items = []
    cats = sorted(p for p in root.iterdir() if p.is_dir())
    if not cats:
        raise FormatError(f"{root}:0: MME folder has no category sub-folders")
    exts = (".png", ".jpg", ".jpeg")
    for cat in cats:
        qa_dir = cat / "questions_answers_YN" if (cat / "questions_answers_YN").is_dir() else cat
        img_dir = cat / "images" if (cat / "images").is_dir() else cat
        for txt in sorted(qa_dir.glob("*.txt")):
            img = next((img_dir / (txt.stem + e) for e in exts if (img_dir / (txt.stem + e)).is_file()), None)
            if img is None:
                raise FormatError(f"{txt}:0: no image {txt.stem}.png/.jpg in {img_dir}")
            for line, text in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not text.strip():
                    continue
                parts = text.split("\t")
                if len(parts) != 2:
                    raise _err(txt, line, f"expected 'question<TAB>answer', got {len(parts)} field(s)")
                items.append(BenchItem(f"{cat.name}/{txt.stem}/{line}", parts[0].strip(), ["yes", "no"],
                                       _yn(txt, line, parts[1]), [str(img)], [], cat.name,
                                       f"{cat.name}/{txt.stem}", {}, f"{txt}:{line}"))
    return items


def _json_records(path):
    """(line, record) pairs from a JSON list or JSONL file, with the line each record starts on."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        dec = json.JSONDecoder()
        pos = text.index("[") + 1
        out = []
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise FormatError(f"{path}:{text.count(chr(10)) + 1}: unterminated JSON list")
            if text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            try:
                rec, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise _err(path, e.lineno, f"not valid JSON ({e.msg})") from None
            out.append((line, rec))
    out = []
    for line, t in enumerate(text.splitlines(), start=1):
        if t.strip():
            try:
                out.append((line, json.loads(t)))
            except json.JSONDecodeError as e:
                raise _err(path, line, f"not valid JSON ({e.msg})") from None
    return out


def load_avqa(path, media_root=None) -> list:
    root = Path(media_root) if media_root else Path(path).parent
    items = []
    for line, r in _json_records(path):
        if not isinstance(r, dict):
            raise _err(path, line, "expected a JSON object")
        q = _need(path, line, r, "question")
        opts = r.get("options", r.get("multi_choice"))
        if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) and o for o in opts):
            raise _err(path, line, "field 'options' must be a list of at least 2 non-empty strings")
        ans = r.get("answer", r.get("answer_idx"))
        if isinstance(ans, int) and not isinstance(ans, bool):
            if not 0 <= ans < len(opts):
                raise _err(path, line, f"field 'answer' index {ans} is out of range for {len(opts)} options")
            ans = opts[ans]
        if not isinstance(ans, str) or ans not in opts:
            raise _err(path, line, f"field 'answer' is {ans!r}, not one of the options {opts}")
        images = [_resolve(path, line, root, r[k], k) for k in ("image",) if r.get(k)]
        audios = [_resolve(path, line, root, r[k], k) for k in ("audio",) if r.get(k)]
        extra = {k: v for k, v in r.items() if k not in ("question", "options", "multi_choice", "answer", "answer_idx",
                                                           "image", "audio")}
        items.append(BenchItem(str(r.get("id", line)), q, list(opts), ans, images, audios, r.get("category", ""),
                               "", extra, f"{path}:{line}"))
    return items


def detect_format(path) -> str:
    p = Path(path)
    if p.is_dir():
        return "mme"
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as fh:
            first = next((json.loads(t) for t in fh if t.strip()), {})
        return "pope" if isinstance(first, dict) and ("label" in first or "text" in first) else "avqa"
    if p.suffix == ".json":
        return "avqa"
    if p.suffix == ".tsv":
        with open(p, encoding="utf-8") as fh:
            header = fh.readline().rstrip("\n").split("\t")
        return "mmstar" if "A" in header or "l2_category" in header else "mme"
    raise FormatError(f"{path}:0: cannot tell the benchmark format from the name; pass fmt= one of {', '.join(FORMATS)}")


def load_benchmark(path, fmt: str = "auto", media_dir=None) -> tuple[str, list]:
    """(format, items) for a benchmark file or folder."""
    if not Path(path).exists():
        raise FormatError(f"{path}:0: benchmark file not found")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "mmstar":
        items = load_mmstar(path, media_dir)
    elif fmt == "pope":
        items = load_pope(path, media_dir)
    elif fmt == "mme":
        items = load_mme(path, media_dir)
    elif fmt == "avqa":
        items = load_avqa(path, media_dir)
    else:
        raise FormatError(f"{path}:0: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not items:
        raise FormatError(f"{path}:0: no items")
    return fmt, items
