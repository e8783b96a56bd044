"""Reading peers' benchmark tables: VLMEvalKit TSVs and lmms-eval (HF datasets) parquet files.

* **VLMEvalKit TSV** (open-compass/VLMEvalKit@e8e78f0: vlmeval/smp/file.py ``load`` reads it with
  ``pd.read_csv(f, sep='\\t')``, so cells follow CSV quoting: ``"a ""quoted"" cell"``, line breaks inside
  quotes). ``image`` holds base64, a Python-style list of base64 strings (several images), or, when 64
  characters or fewer, the ``index`` of another row whose image it shares (vlmeval/dataset/image_base.py,
  ``ImageBaseDataset.__init__``). ``image_path`` is the name the decoded image is saved under when ``image`` is
  present (``dump_image``) and a file to open only when there is no ``image`` column.
* **lmms-eval parquet** (the HF dataset snapshots its tasks load, e.g. lmms_eval/tasks/mme/mme.yaml
  ``dataset_path``): one ``.parquet`` file or a folder of shards; an ``image`` cell is the datasets ``Image``
  struct ``{"bytes": ..., "path": ...}``.

Every problem is a :class:`FormatError` starting ``file:line`` (TSV: the line the row starts on; parquet:
the row number + 1, the header counted as line 1).
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import io
from pathlib import Path


class FormatError(ValueError):
    """A malformed benchmark file; the message starts with ``file:line``."""


def err(path, line, msg):
    return FormatError(f"{path}:{line}: {msg}")


# --------------------------------------------------------------------------------------------- tables
def parquet_files(path) -> list:
    p = Path(path)
    if p.is_dir():
        return sorted(p.rglob("*.parquet"))
    return [p] if p.suffix == ".parquet" else []


def read_table(path) -> tuple[list, list]:
    """(header, [(line, row dict)]) of a TSV or parquet file (or a folder of parquet shards)."""
    files = parquet_files(path)
    return _read_parquet(path, files) if files else _read_tsv(path)


def _read_tsv(path):
    csv.field_size_limit(1 << 30)
    out, header = [], None
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")  # the csv quoting pandas writes and reads
        start = 1
        try:
            for r in reader:
                line, start = start, reader.line_num + 1
                if header is None:
                    header = [h.strip() for h in r]
                    continue
                if not any(c.strip() for c in r):
                    continue
                if len(r) != len(header):
                    raise err(path, line, f"{len(r)} columns but the header has {len(header)}")
                out.append((line, dict(zip(header, r))))
        except csv.Error as e:
            raise err(path, start, f"bad TSV quoting ({e})") from None
    if header is None:
        raise FormatError(f"{path}:1: empty file (expected a header row)")
    return header, out


def _read_parquet(path, files):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FormatError(f"{path}:0: reading parquet needs pyarrow (pip install pyarrow)") from None
    header, out, line = None, [], 1
    for f in files:
        try:
            t = pq.read_table(f)
        except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
            raise FormatError(f"{f}:0: not a readable parquet file ({' '.join(str(e).split())})") from None
        if header is None:
            header = list(t.column_names)
        elif list(t.column_names) != header:
            raise FormatError(f"{f}:1: columns {t.column_names} differ from the first shard's {header}")
        for r in t.to_pylist():
            line += 1
            out.append((line, {k: _cell(v) for k, v in r.items()}))
    return header or [], out


def _cell(v):
    """Parquet cells as the TSV reader gives them: text for scalars, image structs kept as dicts."""
    if v is None:
        return ""
    if isinstance(v, (dict, bytes, list)):
        return v
    return str(v)


# --------------------------------------------------------------------------------------------- images
def _is_ref(v) -> bool:
    return isinstance(v, str) and 0 < len(v.strip()) <= 64


def resolve_image_refs(path, rows, col: str = "image") -> dict:
    """line -> image cell with VLMEvalKit's index references replaced by the referenced row's image."""
    by_index = {str(r.get("index", "")).strip(): r.get(col) for _, r in rows}
    out = {}
    for line, r in rows:
        v = r.get(col)
        if _is_ref(v):  # a short cell naming no row with an image is decoded (and refused) as base64
            target = by_index.get(v.strip())
            if target and not _is_ref(target):
                v = target
        out[line] = v
    return out


def image_sources(v) -> list:
    """One image cell -> list of base64 strings / bytes / image structs (VLMEvalKit lists several as "[...]")."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                items = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                return [s]
            return [str(x) for x in items]
        return [s] if s else []
    if isinstance(v, list):
        return list(v)
    return [v] if v else []


def decode_b64(b64: str, path, line, field="image") -> bytes:
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        hint = " nor the index of a row with an image" if _is_ref(b64) else ""
        raise err(path, line, f"field '{field}' is not valid base64{hint}") from None


def save_image_bytes(raw: bytes, path, line, media_dir: Path, stem: str, field="image") -> str:
    """Check that ``raw`` is an image and store it (PNG, named by content hash: shared images are stored once)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        raise err(path, line, f"field '{field}' decodes to bytes that are not an image") from None
    media_dir.mkdir(parents=True, exist_ok=True)
    out = media_dir / f"{stem}-{hashlib.sha1(raw).hexdigest()[:12]}.png"
    if not out.exists():
        im.save(out)
    return str(out)


def media_path(path, line, root: Path, rel: str, what: str, allow_outside: bool = False) -> str:
    """A media file named by a benchmark file: relative to ``root``, and inside it unless ``allow_outside``."""
    rel = str(rel).strip()
    p = Path(rel) if Path(rel).is_absolute() else root / rel
    if not allow_outside:
        try:
            p.resolve().relative_to(root.resolve())
        except ValueError:
            raise err(path, line, f"{what} path {rel!r} is outside the benchmark folder {root} "
                                  "(pass --allow-outside-media to allow it)") from None
    if not p.is_file():
        raise err(path, line, f"{what} file not found: {p}")
    return str(p)


def row_images(path, line, cell, media_dir: Path, stem: str, root: Path, allow_outside: bool) -> list:
    """Image files for one row's ``image`` cell (base64 / list of base64 / parquet struct)."""
    files = []
    for k, src in enumerate(image_sources(cell)):
        tag = stem if k == 0 else f"{stem}_{k}"
        if isinstance(src, dict):  # datasets Image struct
            if src.get("bytes"):
                files.append(save_image_bytes(src["bytes"], path, line, media_dir, tag))
            elif src.get("path"):
                files.append(media_path(path, line, root, src["path"], "image", allow_outside))
            else:
                raise err(path, line, "field 'image' has neither bytes nor a path")
        elif isinstance(src, bytes):
            files.append(save_image_bytes(src, path, line, media_dir, tag))
        else:
            files.append(save_image_bytes(decode_b64(src, path, line), path, line, media_dir, tag))
    return files
