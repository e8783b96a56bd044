"""Multimodal chat data for MLLM fine-tuning: loading peers' layouts, validation, processor collation.

Accepted records (a JSON list or JSONL file), as the peers write them:

* **sharegpt / LLaMA-Factory** (hiyouga/LLaMA-Factory@eb7130f:data/mllm_demo.json, mllm_audio_demo.json,
  mllm_video_demo.json): ``{"messages": [{"role": "user", "content": "<image>What ...?"}, {"role": "assistant",
  ...}], "images": [...], "videos": [...], "audios": [...], "system": "..."}``; also ``conversations`` with
  ``from``/``value`` (human/gpt/system) and the same media lists.
* **LLaVA JSON**: ``{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}``
* **TRL conversational**: ``content`` as a list of parts, ``[{"type": "image"}, {"type": "text", "text": ...}]``,
  media from ``images``/``videos``/``audios`` in order (or named in the part: ``{"type": "image", "image": "a.png"}``).

A video is a video file (decoded with PyAV) or a list of frame images. Media paths are relative to the data
file's folder (or ``media_root``). Every problem is a one-line ``ChatDataError`` naming the file and the sample
(index and id): unknown roles, placeholders that do not match the media lists, missing or undecodable files, a
media kind the model has no input for, media tokens that truncation would cut. Nothing is dropped silently.

Collation renders each conversation with the processor's chat template, tokenises the rendered text once
(identical ids to the HF processor) and labels exactly the tokens inside assistant replies, located by
rendering the conversation turn by turn; runs every media item through
the processor's image processor / feature extractor and expands its placeholder to the number of tokens
the model expects; ``mm_token_type_ids`` is added for families that take it (Qwen2-VL).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance_llm.data.media import MediaError, load_audio, load_image, load_video

IGNORE_INDEX = -100
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}  # modality -> record key
_PH_RE = re.compile(r"(<image>|<video>|<audio>)")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TYPE_IDS = {"image": 1, "video": 2, "audio": 3}  # mm_token_type_ids values (modality_map.MODALITY_IDS)
_PATH_KEYS = ("image", "video", "audio", "path", "url")  # where a TRL / HF content part may carry its file


class ChatDataError(ValueError):
    """Bad multimodal chat sample (the message names file and sample)."""


def _where(src: str, idx: int, rec: dict) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{src}: sample {idx}" + (f" (id={rid})" if rid is not None else "")


def _as_list(v, where, key):
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return list(v)
    raise ChatDataError(f"{where}: '{key}' must be a path or a list of paths, got {type(v).__name__}")


def _parts_to_text(parts, where, k, inline):
    """TRL / HF conversational content (``[{"type": "image"}, {"type": "text", "text": ...}]``) -> text with
    placeholders; a part that names its file (``{"type": "image", "image": "a.png"}``) adds it to ``inline``."""
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ChatDataError(f"{where}: message {k} part {j} has type 'text' but no string 'text'")
            out.append(part["text"])
        elif kind in PLACEHOLDERS:
            out.append(PLACEHOLDERS[kind])
            path = next((part[x] for x in _PATH_KEYS if isinstance(part.get(x), str)), None)
            inline[kind].append(path)
        else:
            raise ChatDataError(f"{where}: message {k} part {j} has type {kind!r}; "
                                "expected text, image, video or audio")
    return "".join(out)


def normalize_record(rec: dict, src: str = "<data>", idx: int = 0, media_root: str | Path | None = None,
                     check_files: bool = True) -> dict:
    """One record (any accepted layout) -> ``{"id", **extra, "messages", "images", "audios", "videos"}``, validated.

    Layouts: sharegpt ``messages`` (role/content; content a string with ``<image>``/``<video>``/``<audio>``
    placeholders, or TRL's list of typed parts), LLaMA-Factory / LLaVA ``conversations`` (from/value), with
    media in ``images``/``videos``/``audios`` (LLaVA: ``image``; LLaVA-Video: ``video``) and an optional top-level
    ``system`` prompt (it becomes the first message). ``images``/``audios`` are lists of absolute paths;
    ``videos`` is a list of videos, each a list of paths (one video file, or its frame images). The result holds
    only strings, lists and dicts, so records can live in a ``datasets.Dataset``.
    """
    where = _where(src, idx, rec)
    if not isinstance(rec, dict):
        raise ChatDataError(f"{where}: expected an object, got {type(rec).__name__}")
    root = Path(media_root) if media_root is not None else None
    if "messages" in rec:
        raw, rk, ck = rec["messages"], "role", "content"
    elif "conversations" in rec:
        raw, rk, ck = rec["conversations"], "from", "value"
    else:
        raise ChatDataError(f"{where}: needs 'messages' (sharegpt) or 'conversations' (LLaVA JSON)")
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise ChatDataError(f"{where}: '{'messages' if rk == 'role' else 'conversations'}' must be a list of objects")
    media = {"image": _as_list(rec.get("images", rec.get("image")), where, "images"),
             "video": _as_list(rec.get("videos", rec.get("video")), where, "videos"),
             "audio": _as_list(rec.get("audios", rec.get("audio")), where, "audios")}
    inline = {m: [] for m in PLACEHOLDERS}
    msgs = []
    for k, m in enumerate(raw):
        role, content = m.get(rk, m.get("role")), m.get(ck, m.get("content"))
        if role not in _ROLES:
            raise ChatDataError(f"{where}: message {k} has role {role!r}; expected one of {sorted(_ROLES)}")
        if isinstance(content, list):
            content = _parts_to_text(content, where, k, inline)
        if not isinstance(content, str):
            raise ChatDataError(f"{where}: message {k} content must be a string or a list of typed parts")
        msgs.append({"role": _ROLES[role], "content": content})
    for mod, paths in inline.items():  # TRL parts that name their files replace the record-level list
        named = [p for p in paths if p is not None]
        if named and (len(named) != len(paths) or media[mod]):
            raise ChatDataError(f"{where}: {mod} files are named both in content parts and in "
                                f"'{MEDIA_KEYS[mod]}' (or only in some parts); use one of the two")
        if named:
            media[mod] = named
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ChatDataError(f"{where}: 'system' must be a string")
        if msgs and msgs[0]["role"] == "system":
            raise ChatDataError(f"{where}: has a top-level 'system' and a system message; keep one")
        if system.strip():
            msgs.insert(0, {"role": "system", "content": system})
    turns = [m["role"] for m in msgs if m["role"] != "system"]
    if not turns or turns[-1] != "assistant" or any(r == turns[i - 1] for i, r in enumerate(turns) if i):
        raise ChatDataError(f"{where}: turns must alternate user/assistant and end with assistant, got {turns}")
    for mod, items in media.items():
        n_ph = sum(m["content"].count(PLACEHOLDERS[mod]) for m in msgs)
        if n_ph != len(items):
            raise ChatDataError(f"{where}: {n_ph} {PLACEHOLDERS[mod]} placeholder(s) but {len(items)} {mod}(s) "
                                f"in '{MEDIA_KEYS[mod]}'")
        if any(PLACEHOLDERS[mod] in m["content"] for m in msgs if m["role"] != "user"):
            raise ChatDataError(f"{where}: {PLACEHOLDERS[mod]} placeholder outside a user message")
    base = root if root is not None else Path(src).parent

    def resolve(p, what):
        if not isinstance(p, str) or not p:
            raise ChatDataError(f"{where}: {what} path must be a non-empty string, got {p!r}")
        full = str(p if Path(p).is_absolute() else base / p)
        if check_files and not Path(full).is_file():
            raise ChatDataError(f"{where}: media file not found: {full}")
        return full

    images = [resolve(p, "image") for p in media["image"]]
    audios = [resolve(p, "audio") for p in media["audio"]]
    videos = []
    for v in media["video"]:
        frames = _as_list(v, where, "videos")
        if not frames:
            raise ChatDataError(f"{where}: a video in 'videos' is an empty list of frames")
        videos.append([resolve(p, "video") for p in frames])
    skip = ("messages", "conversations", "image", "images", "audio", "audios", "video", "videos", "system")
    extra = {k: v for k, v in rec.items() if k not in skip}
    return {"id": rec.get("id", f"{Path(src).stem}-{idx}"), **extra, "messages": msgs, "images": images,
            "audios": audios, "videos": videos}


def load_conversations(path: str | Path, media_root: str | Path | None = None, check_files: bool = True) -> list[dict]:
    """Read a chat data file (JSON list or JSONL; any layout :func:`normalize_record` takes) into records."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChatDataError(f"{path}: not a UTF-8 JSON/JSONL file") from None
    try:
        data = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise ChatDataError(f"{path}: not valid JSON/JSONL ({e})") from None
    return [normalize_record(r, str(path), i, media_root, check_files) for i, r in enumerate(data)]


# ---------------------------------------------------------------------------------------------- processors
@dataclass
class MMProcessor:
    """Tokenizer + image processor / feature extractor, for families whose HF processor class cannot be built
    here (Qwen2-VL's insists on a torchvision video processor). Saves and loads like a processor."""

    tokenizer: Any
    image_processor: Any = None
    feature_extractor: Any = None

    @property
    def chat_template(self):
        return self.tokenizer.chat_template

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)
        if self.feature_extractor is not None:  # both write preprocessor_config.json: audio goes to a sub-folder
            self.feature_extractor.save_pretrained(Path(path) / "feature_extractor" if self.image_processor
                                                   is not None else path)

    @classmethod
    def from_pretrained(cls, path):
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        ip = fe = None
        try:
            ip = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError):
            try:
                fe = AutoFeatureExtractor.from_pretrained(path)
            except (OSError, ValueError, KeyError):
                pass
        if fe is None and (Path(path) / "feature_extractor").is_dir():  # image + audio folders (Omni thinker twin)
            fe = AutoFeatureExtractor.from_pretrained(Path(path) / "feature_extractor")
        return cls(tok, ip, fe)


def load_processor(path_or_processor):
    """``AutoProcessor.from_pretrained(path)``, or an :class:`MMProcessor` of its parts when that cannot be built."""
    if not isinstance(path_or_processor, (str, Path)):
        return path_or_processor
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path_or_processor)
    except (ImportError, AttributeError, ValueError, TypeError, OSError):
        return MMProcessor.from_pretrained(path_or_processor)


# ---------------------------------------------------------------------------------------------- collation
def _video_patches(image_processor, frames):
    """Qwen2-VL video input (``pixel_values_videos``, ``video_grid_thw``) from frames, with the image processor.

    The image processor resizes and normalises every frame exactly as the video processor does (same smart
    resize, mean and std) but repeats each frame ``temporal_patch_size`` times; this keeps one copy per frame and
    lays consecutive frames out as the video processor's ``patchify`` does (transformers 5.x,
    models/qwen2_vl/video_processing_qwen2_vl.py), so no torchvision video processor is needed."""
    t = image_processor(images=frames, return_tensors="pt")
    grids = t["image_grid_thw"]
    if not bool((grids == grids[0]).all()):
        raise MediaError("video frames differ in size")
    _, gh, gw = (int(x) for x in grids[0])
    m, tp = int(image_processor.merge_size), int(image_processor.temporal_patch_size)
    p = int(image_processor.patch_size)
    f = len(frames)
    c = t["pixel_values"].shape[-1] // (tp * p * p)
    x = t["pixel_values"].reshape(f, gh // m, gw // m, m, m, c, tp, p, p)[..., 0, :, :]
    x = x.reshape(f // tp, tp, gh // m, gw // m, m, m, c, p, p).permute(0, 2, 3, 4, 5, 6, 1, 7, 8)
    import torch

    return x.reshape((f // tp) * gh * gw, c * tp * p * p), torch.tensor([[f // tp, gh, gw]])


class ChatCollator:
    """Turn normalised records into model batches (``input_ids``, ``attention_mask``, ``labels``, media tensors).

    ``train_on="assistant"`` puts labels on assistant tokens only (template headers, user text and media get
    -100). ``max_length`` truncates text on the right but never cuts media tokens: that is an error naming the
    sample. ``encode(rec, add_answer=False)`` gives the generation prompt; ``answer=`` replaces the last reply
    (used to score answer options).
    """

    def __init__(self, processor, model_config, max_length: int = 512, padding_side: str = "right",
                 media_cache_size: int = 0, video_fps: float = 2.0, video_max_frames: int = 16):
        from mmbalance_llm.models.modality_map import get_modality_map

        self.processor = processor
        self.tok = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        self.video_processor = getattr(processor, "video_processor", None)
        # video frame sampling, as LLaMA-Factory's video_fps / video_maxlen
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.config = model_config
        self.mmap = get_modality_map(model_config)
        self.token_ids = self.mmap.token_ids(model_config)
        self.max_length = max_length
        self.padding_side = padding_side
        # processed media by file path (FIFO); worth it for small media seen every epoch, off by default
        self.media_cache_size = media_cache_size
        self._media_cache: dict = {}
        if getattr(processor, "chat_template", None) is None and getattr(self.tok, "chat_template", None) is None:
            raise ValueError("the processor/tokenizer has no chat_template; set one before collating chat data")
        self.template = getattr(processor, "chat_template", None) or self.tok.chat_template

    # -- rendering
    def _content(self, text: str, role: str):
        if role != "user":
            return [{"type": "text", "text": text}]
        parts = []
        for piece in _PH_RE.split(text):
            if piece in ("<image>", "<video>", "<audio>"):
                parts.append({"type": piece[1:-1]})
            elif piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def _render(self, msgs, add_generation_prompt=False):
        conv = [{"role": m["role"], "content": self._content(m["content"], m["role"])} for m in msgs]
        return self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            chat_template=self.template)

    def _segments(self, msgs, add_answer):
        """(text, is_label) pieces whose concatenation is the rendered conversation."""
        segs, prev = [], ""
        last = len(msgs) if add_answer else len(msgs) - 1
        for k in range(last):
            if msgs[k]["role"] == "assistant":
                head = self._render(msgs[:k], add_generation_prompt=True)
                full = self._render(msgs[: k + 1])
                if not head.startswith(prev) or not full.startswith(head):
                    raise ValueError("the chat template is not prefix-stable; cannot locate assistant tokens")
                segs += [(head[len(prev):], False), (full[len(head):], True)]
                prev = full
            else:
                full = self._render(msgs[: k + 1])
                if not full.startswith(prev):
                    raise ValueError("the chat template is not prefix-stable; cannot locate assistant tokens")
                segs.append((full[len(prev):], False))
                prev = full
        if not add_answer:
            full = self._render(msgs[:last], add_generation_prompt=True)
            segs.append((full[len(prev):], False))
        return segs

    # -- media
    def _media_tokens(self, rec, where):
        """Per media kind: list of (n_tokens, tensors dict) in placeholder order."""
        key = (tuple(rec["images"]), tuple(rec["audios"]), tuple(tuple(v) for v in rec.get("videos") or ()))
        if key in self._media_cache:
            return self._media_cache[key]
        out = self._process_media(rec, where)
        if self.media_cache_size:
            if len(self._media_cache) >= self.media_cache_size:
                self._media_cache.pop(next(iter(self._media_cache)))
            self._media_cache[key] = out
        return out

    def _process_media(self, rec, where):
        import torch

        out = {"image": [], "video": [], "audio": []}
        todo = [("image", p) for p in rec["images"]] + [("video", v) for v in rec.get("videos") or ()] + \
            [("audio", p) for p in rec["audios"]]
        for mod, p in todo:
            if mod not in self.mmap.modalities:
                name = p if isinstance(p, str) else (p[0] if len(p) == 1 else f"{p[0]} ... ({len(p)} frames)")
                raise ChatDataError(f"{where}: {mod} {name}: model type {self.mmap.model_type!r} takes no {mod} "
                                    f"(it takes {', '.join(self.mmap.modalities)})")
            try:
                out[mod].append(getattr(self, f"_{mod}_input")(p, where, torch))
            except MediaError as e:
                raise ChatDataError(f"{where}: {e}") from None
        return out

    def _image_input(self, p, where, torch):
        if self.image_processor is None:
            raise ChatDataError(f"{where}: has images but the processor has no image processor")
        t = self.image_processor(images=[load_image(p)], return_tensors="pt")
        if "image_grid_thw" in t:
            n = int(t["image_grid_thw"].prod()) // int(self.image_processor.merge_size) ** 2
            return n, {"pixel_values": t["pixel_values"], "image_grid_thw": t["image_grid_thw"]}
        n = int(getattr(self.config, "image_seq_length", 0) or getattr(self.processor, "num_image_tokens", 0))
        return n, {"pixel_values": t["pixel_values"]}

    def _video_input(self, paths, where, torch):
        ip = self.video_processor or self.image_processor
        if ip is None or not hasattr(ip, "merge_size"):
            raise ChatDataError(f"{where}: has videos but the processor has no Qwen2-VL-style image/video processor")
        tp = int(getattr(ip, "temporal_patch_size", 2))
        frames, fps = load_video(paths, self.video_fps, self.video_max_frames, multiple=tp)
        if self.video_processor is not None:  # the real one (needs torchvision); frames are sampled already
            t = self.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
            pv, thw = t["pixel_values_videos"], t["video_grid_thw"]
        else:
            pv, thw = _video_patches(self.image_processor, frames)
        tensors = {"pixel_values_videos": pv, "video_grid_thw": thw}
        if self.mmap.model_type == "qwen2_5_vl":  # M-RoPE time axis: seconds covered by one temporal patch
            tensors["second_per_grid_ts"] = torch.tensor([tp / fps], dtype=torch.float32)
        return int(thw.prod()) // int(ip.merge_size) ** 2, tensors

    def _audio_input(self, p, where, torch):
        fe = self.feature_extractor
        if fe is None:
            raise ChatDataError(f"{where}: has audio but the processor has no feature extractor")
        t = fe(load_audio(p, fe.sampling_rate), sampling_rate=fe.sampling_rate, return_attention_mask=True,
               padding="max_length", return_tensors="pt")
        length = int(t["attention_mask"].sum())
        n = ((length - 1) // 2 + 1 - 2) // 2 + 1  # Qwen2-Audio encoder: conv stride 2, then pool stride 2
        return n, {"input_features": t["input_features"], "feature_attention_mask": t["attention_mask"]}

    def encode(self, rec: dict, add_answer: bool = True, answer: str | None = None, where: str | None = None,
               media: dict | None = None) -> dict:
        """One record -> ids/labels/types (+ processed ``media``, reusable across calls for the same record)."""
        import torch

        where = where or f"sample id={rec.get('id')}"
        msgs = [dict(m) for m in rec["messages"]]
        if answer is not None:
            msgs[-1] = {"role": "assistant", "content": answer}
        media = media if media is not None else self._media_tokens(rec, where)
        segs = self._segments(msgs, add_answer)
        text = "".join(t for t, _ in segs)
        spans, pos = [], 0
        for t, is_label in segs:
            if is_label:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        if getattr(self.tok, "is_fast", False):
            # tokenise the whole rendered text once (as the processor does) and label the tokens that overlap an
            # assistant span; tokenising segment by segment would change BPE merges at the boundaries
            t = self.tok(text, add_special_tokens=True, return_offsets_mapping=True)
            ids = t["input_ids"]
            labels = [i if any(a < e and b > s_ for s_, e in spans) else IGNORE_INDEX
                      for i, (a, b) in zip(ids, t["offset_mapping"])]
        else:
            ids, labels, first = [], [], True
            for seg, is_label in segs:
                t = self.tok(seg, add_special_tokens=first)["input_ids"]
                first = False
                ids += t
                labels += t if is_label else [IGNORE_INDEX] * len(t)
        types = [0] * len(ids)
        exp_ids, exp_labels, exp_types = [], [], []
        media = {m: media.get(m, []) for m in ("image", "video", "audio")}
        seen = {m: 0 for m in media}
        tid_to_mod = {self.token_ids.get(m): m for m in media if m in self.token_ids}
        for i, l, ty in zip(ids, labels, types):
            mod = tid_to_mod.get(i)
            if mod is None:
                exp_ids.append(i), exp_labels.append(l), exp_types.append(ty)
                continue
            k = seen[mod]
            if k >= len(media[mod]):
                raise ChatDataError(f"{where}: more {mod} placeholders in the rendered prompt than {mod}s given")
            n = media[mod][k][0]
            seen[mod] += 1
            exp_ids += [i] * n
            exp_labels += [IGNORE_INDEX] * n
            exp_types += [_TYPE_IDS[mod]] * n
        for mod in media:
            if seen[mod] != len(media[mod]):
                raise ChatDataError(f"{where}: {len(media[mod])} {mod}(s) but {seen[mod]} placeholder(s) reached "
                                    "the rendered prompt (does the chat template drop them?)")
        if len(exp_ids) > self.max_length:
            media_pos = [j for j, ty in enumerate(exp_types) if ty]
            if media_pos and media_pos[-1] >= self.max_length:
                raise ChatDataError(f"{where}: truncation to max_length={self.max_length} would cut media tokens "
                                    f"(sequence has {len(exp_ids)} tokens, last media token at {media_pos[-1]}); "
                                    "raise max_length or shorten the sample")
            exp_ids, exp_labels, exp_types = (x[: self.max_length] for x in (exp_ids, exp_labels, exp_types))
            if add_answer and all(x == IGNORE_INDEX for x in exp_labels):
                raise ChatDataError(f"{where}: truncation to max_length={self.max_length} removes every answer token")
        enc = {"input_ids": torch.tensor(exp_ids), "labels": torch.tensor(exp_labels),
               "mm_token_type_ids": torch.tensor(exp_types), "media": media}
        return enc

    def pad(self, encs: list[dict], padding_side: str | None = None) -> dict:
        import torch

        side = padding_side or self.padding_side
        pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        T = max(len(e["input_ids"]) for e in encs)
        batch = {"input_ids": [], "attention_mask": [], "labels": [], "mm_token_type_ids": []}
        for e in encs:
            n = T - len(e["input_ids"])
            for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
                p = torch.full((n,), fill, dtype=torch.long)
                batch[key].append(torch.cat([e[key], p] if side == "right" else [p, e[key]]))
            ones, zeros = torch.ones(len(e["input_ids"]), dtype=torch.long), torch.zeros(n, dtype=torch.long)
            batch["attention_mask"].append(torch.cat([ones, zeros] if side == "right" else [zeros, ones]))
        out = {k: torch.stack(v) for k, v in batch.items()}
        if not self.mmap.uses_mm_token_type_ids:
            out.pop("mm_token_type_ids")
        tensors: dict[str, list] = {}
        for e in encs:
            for mod in ("image", "video", "audio"):
                for _, t in e["media"].get(mod, ()):
                    for k, v in t.items():
                        tensors.setdefault(k, []).append(v)
        out.update({k: torch.cat(v) for k, v in tensors.items()})
        return out

    def __call__(self, records: list[dict]) -> dict:
        return self.pad([self.encode(r) for r in records])
