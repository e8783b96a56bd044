"""Readers for local VLM benchmark files in their peers' layouts, with strict validation.

Formats (``load_benchmark(path, fmt="auto")``; ``auto`` tells them apart by their columns, then by their
answers and categories, see :func:`detect_format`):

* ``mmstar`` - MMStar as VLMEvalKit's TSV (``index, question, A, B, C, D, answer, category, l2-category, image``
  base64) or lmms-eval's parquet (``index, question, image, answer, category, l2_category, meta_info``, the
  options inside the question). ``answer`` is a letter; without option columns the options are ``A``-``D``.
* ``pope`` - POPE as JSONL (``{"question_id", "image", "text", "label": "yes"|"no"}``, ``question``/``answer``
  accepted), VLMEvalKit's TSV (``index, question, answer, category, image``; ``category`` the split, or several
  joined by commas) or lmms-eval's parquet (``id, question_id, question, answer, image_source, image,
  category``). Each item's splits are in ``meta["splits"]``.
* ``mme`` - MME as VLMEvalKit's TSV (``index, image, question, answer, category`` and ``image_path``, the name
  the picture is saved under, which pairs its questions for acc+), a TSV with ``image_path`` files and no
  ``image`` column, lmms-eval's parquet (``question_id, image, question, answer, category``; ``question_id``
  pairs the questions), or the MME folder layout ``ROOT/<category>/{images/, questions_answers_YN/}`` or
  ``ROOT/<category>/{x.png, x.txt}`` with ``question<TAB>answer`` lines.
* ``avqa`` - AVQA-style JSON list or JSONL: ``{"id", "question", "options": [...], "answer": text or index,
  "image"?: path, "audio"?: path, "video"?: path}`` (``multi_choice``/``answer_idx`` accepted).

TSVs are read with CSV quoting and VLMEvalKit's image conventions (base64, lists of base64, a short cell that
names another row's ``index``); see :mod:`mmbalance_llm.eval.benchmark_tables`. Media files a benchmark names
must lie inside its folder (or ``media_dir``) unless ``allow_outside_media=True``.

Every problem raises :class:`FormatError` with ``file:line`` and the field, e.g.
``pope.jsonl:7: field 'label' must be yes/no, got 'maybe'``. Extra columns/fields (the diagnostic benchmark's
``needs``) are kept in ``BenchItem.meta``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mmbalance_llm.eval.benchmark_tables import (FormatError, err, media_path, parquet_files, read_table,
                                                 resolve_image_refs, row_images)

FORMATS = ("mmstar", "pope", "mme", "avqa")
LETTERS = ("A", "B", "C", "D", "E", "F")
POPE_SPLITS = ("adversarial", "popular", "random")
# MME's two parts, as both peers define them (VLMEvalKit's yorn.py MME_rating calls cognition "reasoning";
# lmms-eval's tasks/mme/utils.py eval_type_dict)
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


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
    videos: list = field(default_factory=list)  # video files


_err = err


def _media_dir(path, media_dir):
    if media_dir is not None:
        return Path(media_dir)
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mmbalance-bench-"))


def _need(path, line, row, key):
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise _err(path, line, f"missing field '{key}'")
    return v.strip() if isinstance(v, str) else v


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none"))


def _root(path) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def _table(path, table):
    return table if table is not None else read_table(path)


def _images_of(path, header, rows, media_dir, stem, allow_outside):
    """line -> image files of each row: the ``image`` column (base64 / refs / structs), else ``image_path`` files."""
    root = _root(path)
    if "image" in header:
        cells = resolve_image_refs(path, rows)
        md = _media_dir(path, media_dir)
        out = {}
        for line, r in rows:
            cell = cells[line]
            if (_blank(cell) if isinstance(cell, str) else not cell):
                raise _err(path, line, "missing field 'image'")
            out[line] = row_images(path, line, cell, md, stem, root, allow_outside)  # stored by content
        return out
    if "image_path" in header:
        return {line: [media_path(path, line, root, _need(path, line, r, "image_path"), "image", allow_outside)]
                for line, r in rows}
    raise FormatError(f"{path}:1: header needs a column 'image' (base64) or 'image_path'")


def _l2(r) -> str:
    v = r.get("l2-category", r.get("l2_category", ""))
    return "" if _blank(v) else str(v).strip()


def load_mmstar(path, media_dir=None, allow_outside_media: bool = False, table=None) -> list:
    header, rows = _table(path, table)
    for col in ("index", "question", "answer"):
        if col not in header:
            raise FormatError(f"{path}:1: header has no column '{col}' (MMStar needs index, question, answer, image)")
    if "image" not in header:
        raise FormatError(f"{path}:1: header has no column 'image' (MMStar needs index, question, answer, image)")
    imgs = _images_of(path, header, rows, media_dir, "mmstar", allow_outside_media)
    has_opts = [c for c in LETTERS if c in header]
    items = []
    for line, r in rows:
        idx = _need(path, line, r, "index")
        q = _need(path, line, r, "question")
        opts = [c for c in has_opts if not _blank(r.get(c))] if has_opts else list(LETTERS[:4])
        if len(opts) < 2:
            raise _err(path, line, f"needs at least 2 options in columns {', '.join(has_opts)}")
        ans = _need(path, line, r, "answer").upper()
        if ans not in opts:
            raise _err(path, line, f"field 'answer' is {ans!r} but the options are {', '.join(opts)}")
        prompt = q
        if "hint" in header and not _blank(r.get("hint")):
            prompt = f"Hint: {r['hint'].strip()}\n{prompt}"
        if has_opts:
            prompt += "\nOptions:\n" + "\n".join(f"{c}. {str(r[c]).strip()}" for c in opts)
        prompt += "\nAnswer with the option's letter from the given choices directly."
        extra = {k: v for k, v in r.items() if k not in ("index", "question", "answer", "image", "image_path", *LETTERS)
                 and isinstance(v, (str, int, float, dict, list))}
        extra["l2_category"] = _l2(r)
        items.append(BenchItem(str(idx), prompt, opts, ans, imgs[line], [], str(r.get("category", "")).strip(), "",
                               extra, f"{path}:{line}"))
    return items


def _splits(v) -> list:
    return [s.strip() for s in str(v or "").split(",") if s.strip()]


def load_pope(path, image_root=None, allow_outside_media: bool = False, table=None) -> list:
    if table is None and not _tabular(Path(path)):
        return _load_pope_jsonl(path, image_root, allow_outside_media)
    header, rows = _table(path, table)
    for col in ("question", "answer"):
        if col not in header:
            raise FormatError(f"{path}:1: header has no column '{col}' (POPE needs question, answer, image)")
    imgs = _images_of(path, header, rows, image_root, "pope", allow_outside_media)
    items = []
    for line, r in rows:
        q = _need(path, line, r, "question")
        lab = _yn(path, line, r.get("answer"))
        qid = next((str(r[k]).strip() for k in ("index", "question_id", "id") if not _blank(r.get(k))), str(line))
        splits = _splits(r.get("category"))
        extra = {k: v for k, v in r.items() if k not in ("question", "answer", "image") and isinstance(v, str)}
        extra["splits"] = splits
        items.append(BenchItem(qid, q, ["yes", "no"], lab, imgs[line], [], ",".join(splits) or Path(path).stem, "",
                               extra, f"{path}:{line}"))
    return items


def _load_pope_jsonl(path, image_root=None, allow_outside_media: bool = False) -> list:
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
            cat = r.get("category", Path(path).stem)
            extra["splits"] = _splits(cat)
            items.append(BenchItem(str(qid), q.strip(), ["yes", "no"], lab.strip().lower(),
                                   [media_path(path, line, root, img, "image", allow_outside_media)], [],
                                   cat, "", extra, f"{path}:{line}"))
    return items


def _yn(path, line, a):
    a = (a or "").strip().lower()
    if a not in ("yes", "no"):
        raise _err(path, line, f"field 'answer' must be Yes/No, got {a!r}")
    return a


def load_mme(path, media_dir=None, allow_outside_media: bool = False, table=None) -> list:
    if Path(path).is_dir() and not parquet_files(path):
        return _load_mme_folder(Path(path))
    header, rows = _table(path, table)
    for col in ("category", "question", "answer"):
        if col not in header:
            raise FormatError(f"{path}:1: header has no column '{col}' (MME needs index or question_id, category, "
                              "question, answer, and image or image_path)")
    if "index" not in header and "question_id" not in header:
        raise FormatError(f"{path}:1: header has no column 'index' (or lmms-eval's 'question_id')")
    imgs = _images_of(path, header, rows, media_dir, "mme", allow_outside_media)
    items = []
    for line, r in rows:
        idx = _need(path, line, r, "index" if "index" in header else "question_id")
        cat = _need(path, line, r, "category")
        # the acc+ pair: VLMEvalKit groups by image_path, lmms-eval by question_id (the image's file name);
        # with neither, questions on the same picture (same content hash) pair up
        if not _blank(r.get("image_path")):
            group = str(r["image_path"]).strip()
        elif "index" not in header:
            group = idx
        else:
            group = Path(imgs[line][0]).stem.rsplit("-", 1)[-1]
        extra = {k: v for k, v in r.items() if k not in ("index", "question", "answer", "image") and isinstance(v, str)}
        items.append(BenchItem(str(idx), _need(path, line, r, "question"), ["yes", "no"],
                               _yn(path, line, r.get("answer")), imgs[line], [], cat, f"{cat}/{group}", extra,
                               f"{path}:{line}"))
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


def load_avqa(path, media_root=None, allow_outside_media: bool = False) -> list:
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
        media = {k: [media_path(path, line, root, r[k], k, allow_outside_media)] if r.get(k) else []
                 for k in ("image", "audio", "video")}
        extra = {k: v for k, v in r.items() if k not in ("question", "options", "multi_choice", "answer", "answer_idx",
                                                           "image", "audio", "video")}
        items.append(BenchItem(str(r.get("id", line)), q, list(opts), ans, media["image"], media["audio"],
                               r.get("category", ""), "", extra, f"{path}:{line}", media["video"]))
    return items


def _tabular(p: Path) -> bool:
    return p.suffix in (".tsv", ".parquet") or (p.is_dir() and bool(parquet_files(p)))


def detect_format(path, table=None) -> str:
    """The format of a benchmark file. Tables (TSV, parquet) are told apart by their columns: option columns
    ``A``/``B`` or an ``l2-category``/``l2_category`` column -> mmstar; ``image_source`` (lmms-eval POPE) -> pope;
    ``image_path`` or ``question_id`` without ``image_source`` -> mme; otherwise by their answers and categories:
    letters -> mmstar, yes/no with POPE's splits (adversarial, popular, random) as categories -> pope, other
    yes/no -> mme."""
    p = Path(path)
    if p.is_dir() and not parquet_files(p):
        return "mme"
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as fh:
            try:
                first = next((json.loads(t) for t in fh if t.strip()), {})
            except json.JSONDecodeError:
                first = {}
        return "pope" if isinstance(first, dict) and ("label" in first or "text" in first) else "avqa"
    if p.suffix == ".json":
        return "avqa"
    if not _tabular(p):
        raise FormatError(f"{path}:0: cannot tell the benchmark format from the name; pass --format "
                          f"(one of {', '.join(FORMATS)})")
    header, rows = _table(path, table)
    cols = set(header)
    if {"A", "B"} <= cols or cols & {"l2-category", "l2_category"}:
        return "mmstar"
    if "image_source" in cols:
        return "pope"
    answers = {str(r.get("answer", "")).strip().lower() for _, r in rows} - {""}
    cats = {s for _, r in rows for s in _splits(r.get("category"))}
    if answers and answers <= {"yes", "no"}:
        if cats and cats <= set(POPE_SPLITS):
            return "pope"
        return "mme"
    if answers and answers <= {c.lower() for c in LETTERS}:
        return "mmstar"
    raise FormatError(f"{path}:1: cannot tell MMStar, POPE or MME apart from columns {sorted(cols)} and answers "
                      f"{sorted(answers)[:5]}; pass --format")


def load_benchmark(path, fmt: str = "auto", media_dir=None, allow_outside_media: bool = False) -> tuple[str, list]:
    """(format, items) for a benchmark file or folder. ``media_dir``: where decoded images go (tables) / what
    media paths are relative to (JSON). Media named by the file must stay inside its folder (or ``media_dir``)
    unless ``allow_outside_media``."""
    if not Path(path).exists():
        raise FormatError(f"{path}:0: benchmark file not found")
    if fmt not in ("auto",) + FORMATS:
        raise FormatError(f"{path}:0: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    table = read_table(path) if _tabular(Path(path)) else None
    fmt = detect_format(path, table) if fmt == "auto" else fmt
    if table is not None and fmt == "avqa":
        raise FormatError(f"{path}:0: format 'avqa' is a JSON/JSONL layout, not a table")
    kw = {"allow_outside_media": allow_outside_media}
    if fmt == "mmstar":
        items = load_mmstar(path, media_dir, table=table, **kw)
    elif fmt == "pope":
        items = load_pope(path, media_dir, table=table, **kw)
    elif fmt == "mme":
        items = load_mme(path, media_dir, table=table, **kw)
    else:
        items = load_avqa(path, media_dir, **kw)
    if not items:
        raise FormatError(f"{path}:0: no items")
    return fmt, items
