"""Decoding media files for chat data: images (PIL), audio (soundfile, resampled), video (PyAV or frame files).

Every failure is a :class:`MediaError` whose one-line message names the file; the collator prefixes the sample.

* **audio**: wav, flac, ogg and mp3 through ``soundfile`` (libsndfile >= 1.1 reads mp3), ``.npy`` arrays as is;
  multi-channel audio is averaged to mono and resampled to the processor's rate with a polyphase filter
  (``scipy.signal.resample_poly``; linear interpolation when scipy is missing). Without ``soundfile`` only 16-bit
  PCM wav is read (stdlib ``wave``).
* **video**: a video file decoded with PyAV (``pip install av``), or a list of frame image files. Frames are
  sampled at ``fps`` frames per second of video (at most ``max_frames``), the way LLaMA-Factory samples
  (``video_fps`` / ``video_maxlen``), and the count is rounded down to a multiple of the model's temporal patch
  (at least one patch; a short clip repeats its last frame).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class MediaError(ValueError):
    """A media file that cannot be decoded (the message names the file)."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"cannot decode image {path}: {_one_line(e)}") from None


def resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Resample a mono float signal (polyphase FIR when scipy is present, else linear interpolation)."""
    if sr_from == sr_to or len(x) == 0:
        return x.astype("float32")
    try:
        from scipy.signal import resample_poly
    except ImportError:
        n = int(round(len(x) * sr_to / sr_from))
        return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype("float32")
    g = math.gcd(int(sr_from), int(sr_to))
    return resample_poly(x, int(sr_to) // g, int(sr_from) // g).astype("float32")


def load_audio(path, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples at ``sampling_rate``."""
    p = str(path)
    if p.endswith(".npy"):
        try:
            return np.load(p).astype("float32")
        except (OSError, ValueError) as e:
            raise MediaError(f"cannot read audio array {p}: {_one_line(e)}") from None
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is None:
        if not p.lower().endswith(".wav"):
            raise MediaError(f"cannot decode audio {p}: reading {Path(p).suffix or 'this'} files needs soundfile "
                             "(pip install 'mmbalance_llm[media]')")
        import wave

        from mmbalance_llm.data.mm_synthetic import read_wav

        try:
            x, sr = read_wav(p)
        except (wave.Error, EOFError, ValueError, OSError) as e:
            raise MediaError(f"cannot decode audio {p}: {_one_line(e)}") from None
    else:
        try:
            x, sr = sf.read(p, dtype="float32", always_2d=True)
        except (RuntimeError, TypeError, ValueError, OSError) as e:  # sf.LibsndfileError is a RuntimeError
            raise MediaError(f"cannot decode audio {p}: {_one_line(e)}") from None
        x = x.mean(1)
    if len(x) == 0:
        raise MediaError(f"cannot decode audio {p}: no samples")
    return resample(x, sr, sampling_rate)


def _sample_indices(total: int, native_fps: float | None, fps: float, max_frames: int, multiple: int) -> list:
    """Evenly spaced frame indices: ``fps`` per second of video, at most ``max_frames``, a multiple of ``multiple``."""
    n = total if not native_fps else total / native_fps * fps
    n = min(max(int(n), 1), max_frames, total)
    n = max(n // multiple * multiple, 1)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def load_video(paths, fps: float = 2.0, max_frames: int = 16, multiple: int = 2) -> tuple[list, float]:
    """(frames as RGB PIL images, the clip's frames-per-second after sampling).

    ``paths``: one video file, or frame image files (in order; their rate is taken as ``fps``)."""
    paths = [str(p) for p in paths]
    if all(p.lower().endswith(IMAGE_EXTS) for p in paths):
        idx = _sample_indices(len(paths), None, fps, max_frames, multiple) if len(paths) > max_frames else \
            list(range(len(paths)))
        frames = [load_image(paths[i]) for i in idx]
        sampled_fps = fps
    elif len(paths) == 1:
        frames, sampled_fps = _decode_video_file(paths[0], fps, max_frames, multiple)
    else:
        raise MediaError(f"a video is one video file or a list of frame images, got {paths}")
    while len(frames) % multiple:  # a short clip: repeat the last frame (as Qwen2-VL's video processor pads)
        frames.append(frames[-1])
    return frames, sampled_fps


def _decode_video_file(path: str, fps: float, max_frames: int, multiple: int):
    try:
        import av
    except ImportError:
        raise MediaError(f"cannot decode video {path}: decoding video files needs PyAV "
                         "(pip install 'mmbalance_llm[media]'), or give the video as a list of frame images") from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            native = float(stream.average_rate) if stream.average_rate else None
            frames = list(container.decode(stream))
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as e:
        raise MediaError(f"cannot decode video {path}: {_one_line(e)}") from None
    if not frames:
        raise MediaError(f"cannot decode video {path}: no frames")
    idx = _sample_indices(len(frames), native, fps, max_frames, multiple)
    span = len(frames) / native if native else len(idx) / fps
    return [frames[i].to_image().convert("RGB") for i in idx], len(idx) / span if span else fps
