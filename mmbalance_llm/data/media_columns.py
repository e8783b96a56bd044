"""Raw-media columns in the classifier dataset contract: image, audio, video and text.

A column is a media column when the recipe's `data.media.<column>` or the dataset folder's `media.json`
(written by `mmbalance make-data <dataset>`) names its `kind`:

- image: a path (absolute, or relative to `data.path`), raw bytes, or `{"bytes", "path"}` (the storage of
  `datasets.Image(decode=False)`);
- audio: a path to wav / flac / ogg / mp3 (soundfile) or to a video file (its audio track, PyAV), or
  `{"array", "sampling_rate"}`;
- video: a folder of frames (jpg / png, sorted by name), a video file (PyAV), or a list of frame paths;
  `num_frames` frames are taken from the middles of equal segments (BalanceBenchmark's test-time pick);
- flow: optical flow as `{"u": frame folder, "v": frame folder}` of grayscale frames (the TV-L1 u / v
  layout of UCF-101 preprocessing), `[N, 2, size, size]` in [0, 1];
- text: a string, tokenised to `max_length` ids (the pad id marks padding).

Every split is decoded and preprocessed ONCE by `datasets.map`, whose Arrow output is cached under
`data.media_cache_dir` (default `<data.path>/.media_cache`) with a fingerprint of the split, the column
specs and the processor, so later runs and later epochs only read tensors. Random augmentation (random
resized crop and flip of images / frames, train split only) runs per item, outside the cache.

A file that is missing or cannot be decoded stops loading with one line naming split, column, row and
file, before any training.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from mmbalance_llm.data.features import DataError

MEDIA_KINDS = ("image", "audio", "video", "flow", "text")
VIDEO_EXTS = (".mp4", ".avi", ".flv", ".mkv", ".webm", ".mov", ".mpg", ".mpeg")
FRAME_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
MEDIA_CARD = "media.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CACHE_VERSION = "2"  # bump when the preprocessing code changes what it writes


def _help(text: str, **kw):
    return dataclasses.field(metadata={"help": text}, **kw)


@dataclass
class MediaSpec:
    kind: str = _help("'image', 'audio', 'video', 'flow' or 'text'.", default="image")
    processor: Optional[Any] = _help(
        "How to turn the decoded media into the encoder's input. A local folder or hub id "
        "(AutoImageProcessor / AutoFeatureExtractor / AutoTokenizer.from_pretrained, passed unchanged); "
        "a dict {class: <transformers processor class>, ...kwargs} (e.g. ViTImageProcessor, ASTFeatureExtractor); "
        "'imagenet' (resize to size x size, ImageNet mean/std: the ResNet input, default for image/video); "
        "'spectrogram' (log |STFT|, [1, n_fft/2+1, T]: BalanceBenchmark's ResNet audio input, default for audio); "
        "'waveform' (the raw samples, [sampling_rate * max_seconds]).",
        default=None,
    )
    size: int = _help("For 'imagenet': the square side the images / frames are resized to.", default=224)
    num_frames: int = _help("For video: frames sampled per clip.", default=3)
    sampling_rate: int = _help("For audio: samples per second after resampling.", default=16000)
    max_seconds: float = _help("For audio: clips are cut / padded to this length (short clips are tiled).",
                               default=3.0)
    tile: bool = _help("For audio: repeat a short clip to fill max_seconds (BalanceBenchmark) instead of "
                       "padding with zeros.", default=True)
    n_fft: int = _help("For 'spectrogram': FFT size.", default=512)
    hop_length: int = _help("For 'spectrogram': hop between frames, in samples.", default=353)
    max_length: int = _help("For text: tokens per row (padded / truncated).", default=40)
    augment: bool = _help("For image / video on the train split: random resized crop and horizontal flip "
                          "per item (never cached).", default=True)
    crop_scale: float = _help("For augment: smallest crop area as a fraction of the image.", default=0.08)


def parse_spec(column: str, raw) -> MediaSpec:
    where = f"data.media.{column}"
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be a mapping with 'kind', got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(MediaSpec)}
    for key in raw:
        if key not in fields:
            raise DataError(f"unknown key '{where}.{key}' (valid: {', '.join(fields)})")
    spec = MediaSpec(**raw)
    if spec.kind not in MEDIA_KINDS:
        raise DataError(f"{where}.kind is {spec.kind!r}; choose one of {', '.join(MEDIA_KINDS)}")
    if spec.kind == "text" and spec.processor is None:
        raise DataError(f"{where}.processor must name a tokenizer (a local folder or hub id) for a text column")
    for key in ("size", "num_frames", "sampling_rate", "n_fft", "hop_length", "max_length"):
        if int(getattr(spec, key)) < 1:
            raise DataError(f"{where}.{key} must be >= 1")
    return spec


def media_specs(cfg, modalities: list) -> dict:
    """{column: MediaSpec} for the media columns among `modalities`: `media.json` in the data folder,
    updated key by key by the recipe's `data.media`."""
    merged: dict = {}
    card = os.path.join(cfg.path or "", MEDIA_CARD)
    if cfg.path and os.path.isfile(card):
        try:
            with open(card, encoding="utf-8") as fh:
                columns = json.load(fh).get("columns", {})
        except (OSError, ValueError) as exc:
            raise DataError(f"could not read '{card}': {exc}") from None
        merged = {c: dict(v) for c, v in columns.items()}
    for column, raw in (getattr(cfg, "media", None) or {}).items():
        if isinstance(raw, str):
            raw = {"kind": raw}
        if not isinstance(raw, dict):
            raise DataError(f"data.media.{column} must be a mapping with 'kind', got {type(raw).__name__}")
        merged.setdefault(column, {}).update(raw)
    unknown = [c for c in getattr(cfg, "media", None) or {} if c not in modalities]
    if unknown:
        raise DataError(f"data.media names column(s) {unknown} that are not modalities ({', '.join(modalities)})")
    return {c: parse_spec(c, v) for c, v in merged.items() if c in modalities}


def processors_from_encoders(data_cfg, model_cfg):
    """A copy of `data_cfg` whose media columns without a `processor` use their encoder's checkpoint
    (`model.encoders.<column>.name_or_path` when it is a folder or hub id): the encoder's own processor
    without repeating the id in the recipe. The trainer calls it before `load_feature_data`."""
    filled = {}
    for column, enc in (getattr(model_cfg, "encoders", None) or {}).items():
        source = (enc or {}).get("name_or_path")
        if (enc or {}).get("encoder") == "hf" and isinstance(source, str):
            spec = dict((data_cfg.media or {}).get(column) or {})
            if spec.get("processor") is None:
                filled[column] = {**spec, "processor": source}
    if not filled:
        return data_cfg
    return dataclasses.replace(data_cfg, media={**(data_cfg.media or {}), **filled})


def saved_run_data_config(model_dir: str, data_path: str):
    """The DataConfig for evaluating a saved model on raw media: `data.media` of the run's recipe
    (`<run>/config.yaml` next to `<run>/best`), over the data folder's media.json."""
    import yaml

    from mmbalance_llm.config import DataConfig

    recipe = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "config.yaml")
    section = {}
    if os.path.isfile(recipe):
        with open(recipe, encoding="utf-8") as fh:
            section = (yaml.safe_load(fh) or {}).get("data") or {}
    return DataConfig(path=data_path, media=section.get("media") or {},
                      media_cache_dir=section.get("media_cache_dir"),
                      media_in_memory_gb=section.get("media_in_memory_gb", 2.0))


# -- decoding --------------------------------------------------------------------------------------
def _resolve(path: str, base: str) -> str:
    return path if os.path.isabs(path) or not base else os.path.join(base, path)


def _where(value) -> str:
    if isinstance(value, dict):
        return value.get("path") or "<bytes>"
    if isinstance(value, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(value, (list, tuple)):
        return f"{value[0]}, ..." if value else "<empty list>"
    return str(value)


def load_image(value, base: str):
    from PIL import Image

    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        value = data if data else path
    if isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    else:
        img = Image.open(_resolve(str(value), base))
    return img.convert("RGB")


def _resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wave
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(sr), int(target))
    return resample_poly(wave, target // g, sr // g).astype(np.float32)


def _video_audio(path: str):
    import av

    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError("the video has no audio stream")
        chunks, sr = [], container.streams.audio[0].rate
        for frame in container.decode(audio=0):
            arr = frame.to_ndarray().astype(np.float32)
            if frame.format.is_planar:
                arr = arr.mean(axis=0)
            else:  # interleaved channels
                arr = arr.reshape(-1, len(frame.layout.channels)).mean(axis=1)
            if frame.format.name.startswith("s16"):
                arr = arr / 32768.0
            chunks.append(arr)
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), sr


def load_audio(value, base: str, spec: MediaSpec) -> np.ndarray:
    """Mono float32 samples at spec.sampling_rate, cut / tiled / padded to spec.max_seconds."""
    if isinstance(value, dict) and value.get("array") is not None:
        wave, sr = np.asarray(value["array"], dtype=np.float32), int(value.get("sampling_rate") or spec.sampling_rate)
    else:
        path = value.get("path") if isinstance(value, dict) else value
        path = _resolve(str(path), base)
        if path.lower().endswith(VIDEO_EXTS):
            wave, sr = _video_audio(path)
        else:
            import soundfile as sf

            wave, sr = sf.read(path, dtype="float32", always_2d=True)
            wave = wave.mean(axis=1)
    if wave.ndim > 1:
        wave = wave.mean(axis=-1)
    if len(wave) == 0:
        raise ValueError("no audio samples")
    wave = np.clip(_resample(wave, sr, spec.sampling_rate), -1.0, 1.0)
    n = int(round(spec.max_seconds * spec.sampling_rate))
    if len(wave) < n:
        wave = np.tile(wave, -(-n // len(wave))) if spec.tile else np.pad(wave, (0, n - len(wave)))
    return np.ascontiguousarray(wave[:n], dtype=np.float32)


def pick_indices(count: int, n: int) -> list:
    """The middle of each of n equal segments (repeats when the clip has fewer than n frames)."""
    if count <= 0:
        raise ValueError("no frames")
    return [min(count - 1, int((i + 0.5) * count / n)) for i in range(n)]


def load_video(value, base: str, spec: MediaSpec) -> list:
    from PIL import Image

    if isinstance(value, (list, tuple)):
        files = [_resolve(str(v), base) for v in value]
        return [Image.open(files[i]).convert("RGB") for i in pick_indices(len(files), spec.num_frames)]
    path = _resolve(str(value), base)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTS))
        if not files:
            raise ValueError("the frame folder holds no jpg/png frames")
        return [Image.open(os.path.join(path, files[i])).convert("RGB")
                for i in pick_indices(len(files), spec.num_frames)]
    import av

    with av.open(path) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    return [frames[i].convert("RGB") for i in pick_indices(len(frames), spec.num_frames)]


def load_flow(value, base: str, spec: MediaSpec) -> np.ndarray:
    from PIL import Image

    if not isinstance(value, dict) or not {"u", "v"} <= set(value):
        raise ValueError("a flow value is {'u': folder, 'v': folder}")
    dirs = {c: _resolve(str(value[c]), base) for c in ("u", "v")}
    files = {c: sorted(f for f in os.listdir(d) if f.lower().endswith(FRAME_EXTS)) for c, d in dirs.items()}
    count = min(len(files["u"]), len(files["v"]))
    out = []
    for i in pick_indices(count, spec.num_frames):
        pair = [np.asarray(Image.open(os.path.join(dirs[c], files[c][i])).convert("L").resize(
            (spec.size, spec.size), Image.BILINEAR), dtype=np.float32) / 255.0 for c in ("u", "v")]
        out.append(np.stack(pair))
    return np.stack(out)


def _exists(value, base: str) -> Optional[str]:
    """The missing path named by `value`, if any (bytes and arrays need no file)."""
    if isinstance(value, dict) and {"u", "v"} <= set(value):
        return _exists([value["u"], value["v"]], base)
    if isinstance(value, dict):
        if value.get("bytes") or value.get("array") is not None:
            return None
        value = value.get("path")
    if isinstance(value, (list, tuple)):
        return next((str(v) for v in value if not os.path.exists(_resolve(str(v), base))), None)
    if isinstance(value, str):
        return None if os.path.exists(_resolve(value, base)) else value
    return None


# -- processors ------------------------------------------------------------------------------------
def load_processor(spec: MediaSpec):
    """The object that turns decoded media into arrays: a transformers processor or a built-in name."""
    proc = spec.processor
    if proc is None:
        return "spectrogram" if spec.kind == "audio" else "imagenet"
    if isinstance(proc, str) and proc in ("imagenet", "spectrogram", "waveform"):
        return proc
    import transformers

    if isinstance(proc, dict):
        kwargs = dict(proc)
        name = kwargs.pop("class", None)
        if not name or not hasattr(transformers, str(name)):
            raise DataError(f"data.media processor dict needs 'class' naming a transformers class, got {name!r}")
        cls = getattr(transformers, name)
        if "name_or_path" in kwargs:
            return cls.from_pretrained(kwargs.pop("name_or_path"), **kwargs)
        return cls(**kwargs)
    auto = {"image": transformers.AutoImageProcessor, "video": transformers.AutoImageProcessor,
            "audio": transformers.AutoFeatureExtractor, "text": transformers.AutoTokenizer}[spec.kind]
    try:
        return auto.from_pretrained(proc)
    except Exception as exc:  # from_pretrained raises many kinds for a bad path or id
        raise DataError(f"could not load the {spec.kind} processor '{proc}': {str(exc).splitlines()[0]}") from None


def processor_signature(processor) -> str:
    if isinstance(processor, str):
        return processor
    for attr in ("to_json_string",):
        if hasattr(processor, attr):
            try:
                return getattr(processor, attr)()
            except Exception:
                pass
    if hasattr(processor, "get_vocab"):  # tokenizers: class, vocabulary and special tokens
        return json.dumps([type(processor).__name__, sorted(processor.get_vocab().items()),
                           str(processor.special_tokens_map)], default=str)
    return repr(processor)


def imagenet_array(img, size: int) -> np.ndarray:
    from PIL import Image

    img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def log_spectrogram(wave: np.ndarray, spec: MediaSpec) -> np.ndarray:
    """log(|STFT| + 1e-7) with a Hann window, [1, n_fft/2+1, frames] (OGM-GE / BalanceBenchmark audio)."""
    x = torch.from_numpy(wave)
    stft = torch.stft(x, spec.n_fft, spec.hop_length, window=torch.hann_window(spec.n_fft), center=True,
                      pad_mode="constant", return_complex=True)
    return torch.log(stft.abs() + 1e-7).unsqueeze(0).numpy().astype(np.float32)


def _first_output(out) -> np.ndarray:
    for key in ("pixel_values", "input_values", "input_features"):
        if key in out:
            return np.asarray(out[key][0], dtype=np.float32)
    raise ValueError(f"the processor returned none of pixel_values / input_values / input_features ({list(out)})")


def process_value(value, spec: MediaSpec, processor, base: str) -> np.ndarray:
    if spec.kind == "text":
        enc = processor(str(value), padding="max_length", truncation=True, max_length=spec.max_length)
        return np.asarray(enc["input_ids"], dtype=np.int64)
    if spec.kind == "audio":
        wave = load_audio(value, base, spec)
        if processor == "spectrogram":
            return log_spectrogram(wave, spec)
        if processor == "waveform":
            return wave
        return _first_output(processor(wave, sampling_rate=spec.sampling_rate, return_tensors="np"))
    if spec.kind == "flow":
        return load_flow(value, base, spec)
    images = [load_image(value, base)] if spec.kind == "image" else load_video(value, base, spec)
    if processor == "imagenet":
        arrays = [imagenet_array(img, spec.size) for img in images]
    else:
        arrays = [_first_output(processor(images=img, return_tensors="np")) for img in images]
    return arrays[0] if spec.kind == "image" else np.stack(arrays)


# -- preprocessing once, cached ----------------------------------------------------------------------
def check_files(ds, split: str, specs: dict, base: str) -> None:
    """Every referenced file exists: one line naming the first missing one, before decoding starts."""
    for column, spec in specs.items():
        if spec.kind == "text":
            continue
        for row, value in enumerate(ds[column]):
            if value is None:
                raise DataError(f"split '{split}', column '{column}', row {row}: no {spec.kind} (null)")
            missing = _exists(value, base)
            if missing is not None:
                raise DataError(f"split '{split}', column '{column}', row {row}: file '{missing}' does not exist")


def _fingerprint(ds, split: str, specs: dict, processors: dict) -> str:
    from datasets.fingerprint import Hasher

    parts = [_CACHE_VERSION, ds._fingerprint, split]
    for column in sorted(specs):
        parts += [column, json.dumps(dataclasses.asdict(specs[column]), sort_keys=True, default=str),
                  processor_signature(processors[column])]
    return Hasher.hash(parts)


def preprocess_split(ds, split: str, specs: dict, base: str, cache_dir: str):
    """Decode and preprocess the media columns of one split through `datasets.map`, cached on disk."""
    check_files(ds, split, specs, base)
    processors = {c: load_processor(s) for c, s in specs.items()}
    fp = _fingerprint(ds, split, specs, processors)
    os.makedirs(cache_dir, exist_ok=True)

    def convert(row, idx):
        out = {}
        for column, spec in specs.items():
            value = row[column]
            try:
                out[column] = process_value(value, spec, processors[column], base)
            except DataError:
                raise
            except Exception as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise DataError(f"split '{split}', column '{column}', row {idx}: cannot read "
                                f"'{_where(value)}' as {spec.kind}: {msg}") from None
        return out

    cache_file = os.path.join(cache_dir, f"{split}-{fp}.arrow")
    features = None if os.path.isfile(cache_file) or not len(ds) else array_features(convert(ds[0], 0))
    return ds.map(convert, with_indices=True, new_fingerprint=fp, load_from_cache_file=True, features=features,
                  cache_file_name=cache_file, desc=f"preprocessing {split} media")


def array_features(example: dict):
    """Fixed-shape Arrow tensor types (Array2D..5D) for the processed columns: they read back as numpy
    arrays without a pass through Python lists, which is what makes a cached epoch cheap."""
    import datasets

    kinds = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    out = {}
    for column, arr in example.items():
        arr = np.asarray(arr)
        dtype = str(arr.dtype)
        if arr.ndim in kinds:
            out[column] = kinds[arr.ndim](shape=tuple(arr.shape), dtype=dtype)
        elif arr.ndim == 1:
            out[column] = datasets.Sequence(datasets.Value(dtype), length=int(arr.shape[0]))
        else:
            raise DataError(f"column '{column}': preprocessed rows of shape {list(arr.shape)} are not supported")
    return datasets.Features(out)


def _main_process_first():
    """Rank 0 writes the cache, the other ranks then read it (no concurrent writers)."""
    import contextlib

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState().main_process_first()
    return contextlib.nullcontext()


# -- the torch Dataset --------------------------------------------------------------------------------
def random_resized_crop_flip(x: torch.Tensor, min_scale: float) -> torch.Tensor:
    """RandomResizedCrop (scale [min_scale, 1], ratio [3/4, 4/3]) back to the input size, then a flip with
    p = 0.5, on [C, H, W] or [N, C, H, W] (one crop for all frames of a clip)."""
    import math

    import torch.nn.functional as F

    h, w = x.shape[-2:]
    area = h * w
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(min_scale, 1.0))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))))
        ch, cw = int(round(math.sqrt(target / ratio))), int(round(math.sqrt(target * ratio)))
        if 0 < ch <= h and 0 < cw <= w:
            top = int(torch.randint(0, h - ch + 1, (1,)))
            left = int(torch.randint(0, w - cw + 1, (1,)))
            break
    else:
        ch, cw, top, left = h, w, 0, 0
    crop = x[..., top:top + ch, left:left + cw]
    batch = crop.unsqueeze(0) if crop.dim() == 3 else crop
    out = F.interpolate(batch, size=(h, w), mode="bilinear", align_corners=False)
    out = out[0] if x.dim() == 3 else out
    if float(torch.rand(1)) < 0.5:
        out = out.flip(-1)
    return out


class MediaDataset(torch.utils.data.Dataset):
    """The `FeatureDataset` interface over a preprocessed Arrow split.

    Items are `{modality: tensor, ..., "labels", "index"}`; `(i, keep)` zeroes the modalities not in
    `keep` (data-stage balancers). Float-array columns stay in memory as tensors; media columns are held
    in memory too when the split fits `data.media_in_memory_gb`, else read from the memory-mapped cache
    (a batch per Arrow read); image / video / flow columns of the train split are augmented per item.
    """

    def __init__(self, processed, tensors: dict, labels: torch.Tensor, split: str, modalities: list,
                 specs: dict, train: bool, in_memory: bool = False):
        self.processed = processed.with_format("numpy", columns=[m for m in modalities if m in specs])
        self.tensors = dict(tensors)
        if in_memory:  # the whole preprocessed split as tensors: the speed of pre-extracted arrays
            for m in self.processed.column_names:
                self.tensors[m] = torch.from_numpy(np.ascontiguousarray(self.processed[m]))
            self.from_arrow = set()
        else:
            self.from_arrow = set(self.processed.column_names)
        self.labels = labels
        self.split = split
        self.modalities = list(modalities)
        self.specs = specs
        self.augment = {m for m, s in specs.items() if train and s.augment and s.kind in ("image", "video", "flow")}

    def __len__(self) -> int:
        return len(self.labels)

    def _item(self, idx: int, row: dict, keep) -> dict:
        item = {}
        for m in self.modalities:
            x = torch.from_numpy(np.asarray(row[m])) if m in self.from_arrow else self.tensors[m][idx]
            if m in self.augment:
                x = random_resized_crop_flip(x, self.specs[m].crop_scale)
            item[m] = x if keep is None or m in keep else torch.zeros_like(x)
        item["labels"] = self.labels[idx]
        item["index"] = idx
        return item

    def __getitem__(self, idx):
        keep = None
        if isinstance(idx, (tuple, list)):
            idx, keep = idx
        idx = int(idx)
        return self._item(idx, self.processed[idx] if self.from_arrow else {}, keep)

    def __getitems__(self, indices: list) -> list:
        """A whole batch in one Arrow read (the DataLoader calls this when it exists)."""
        if not self.from_arrow or not indices or any(isinstance(i, (tuple, list)) for i in indices):
            return [self[i] for i in indices]
        idx = [int(i) for i in indices]
        block = self.processed[idx]
        return [self._item(i, {m: block[m][j] for m in block}, None) for j, i in enumerate(idx)]

    def input_shapes(self) -> dict:
        first = self.processed[0] if len(self.processed) and self.from_arrow else {}
        shapes = {m: list(np.asarray(first[m]).shape) for m in self.from_arrow if m in first}
        shapes.update({m: list(t.shape[1:]) for m, t in self.tensors.items()})
        return {m: shapes[m] for m in self.modalities if m in shapes}


def build_media_dataset(cfg, ds, split: str, modalities: list, specs: dict, labels: torch.Tensor,
                        train: bool) -> MediaDataset:
    """Preprocess (or read from cache) one split and wrap it; float-array columns go through the usual
    contract checks."""
    from mmbalance_llm.data.features import column_tensor

    base = cfg.path if cfg.path and os.path.isdir(cfg.path) else ""
    cache_dir = getattr(cfg, "media_cache_dir", None) or os.path.join(base or ".", ".media_cache")
    tensors = {m: column_tensor(ds, split, m) for m in modalities if m not in specs}
    keep = [m for m in modalities if m in specs]
    with _main_process_first():
        processed = preprocess_split(ds.select_columns(keep), split, specs, base, cache_dir)
    limit = getattr(cfg, "media_in_memory_gb", 2.0)
    in_memory = limit is not None and processed.data.nbytes <= float(limit) * 2 ** 30
    return MediaDataset(processed, tensors, labels, split, modalities, specs, train, in_memory)


def write_media_card(out_dir: str, columns: dict, **extra) -> None:
    """`media.json`: which columns hold media and of which kind (read by `media_specs`)."""
    with open(os.path.join(out_dir, MEDIA_CARD), "w", encoding="utf-8") as fh:
        json.dump({"columns": columns, **extra}, fh, indent=2)
