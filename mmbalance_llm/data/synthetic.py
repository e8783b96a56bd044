"""Synthetic multimodal imbalance suite.

Each modality carries the class signal with its own strength (`snr`), its own encoding and its own
informative fraction, so that one can build cases where joint training lets an easy modality win and
leaves a slower one under-trained. Encodings:

- `linear`: x = snr * mu_y + noise. A linear read-out suffices (learned fast).
- `mixture`: x = s * snr * mu_y + noise with a random sign s per sample. The class means cancel, so a
  linear read-out fails and the encoder must learn a nonlinearity (learned slowly).
- `tokens`: x is [T, D] noise with snr * mu_y added to `signal_tokens` random positions.

A sample where a modality is not informative (probability 1 - `informative`) carries pure noise there.
The result is a `datasets.DatasetDict` (train / validation / test) saved with `save_to_disk`, plus
`card.json` with every generator parameter.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

ENCODINGS = ("linear", "mixture", "tokens")


@dataclass
class ModalitySpec:
    name: str
    dim: int = 32
    snr: float = 2.0
    encoding: str = "linear"
    informative: float = 1.0
    seq_len: int = 16
    signal_tokens: int = 2

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"modality '{self.name}': encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 0.0 <= self.informative <= 1.0:
            raise ValueError(f"modality '{self.name}': informative must be in [0, 1], got {self.informative}")
        if self.encoding == "tokens" and not 1 <= self.signal_tokens <= self.seq_len:
            raise ValueError(f"modality '{self.name}': signal_tokens must be in [1, seq_len]")


@dataclass
class SyntheticSpec:
    modalities: list
    num_classes: int = 8
    train_size: int = 3000
    validation_size: int = 1000
    test_size: int = 1000
    seed: int = 0
    preset: Optional[str] = None
    description: str = ""

    def __post_init__(self):
        self.modalities = [m if isinstance(m, ModalitySpec) else ModalitySpec(**m) for m in self.modalities]
        if not 1 <= len(self.modalities) <= 4:
            raise ValueError(f"the synthetic generator makes 1 to 4 modalities, got {len(self.modalities)}")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names) or "label" in names:
            raise ValueError(f"modality names must be unique and not 'label': {names}")


PRESETS = {
    # Audio is linear and strong but silent on a tenth of the samples; visual is always informative
    # but needs a nonlinearity. Trained alone, visual reaches clearly higher accuracy than the visual
    # branch of a jointly trained model: the audio branch fits first and starves it.
    "av_imbalance": dict(
        description="2 modalities: fast linear 'audio' (informative on 90%) dominates a slower nonlinear 'visual'.",
        modalities=[
            dict(name="audio", dim=32, snr=4.0, encoding="linear", informative=0.9),
            dict(name="visual", dim=32, snr=2.5, encoding="mixture", informative=1.0),
        ],
    ),
    "balanced": dict(
        description="2 modalities with the same encoding and strength (control case).",
        modalities=[
            dict(name="audio", dim=32, snr=1.5, encoding="linear"),
            dict(name="visual", dim=32, snr=1.5, encoding="linear"),
        ],
    ),
    "tri_modal": dict(
        description="3 modalities (M > 2): strong linear 'text', weaker linear 'audio', nonlinear 'visual'.",
        modalities=[
            dict(name="text", dim=32, snr=3.0, encoding="linear", informative=0.7),
            dict(name="audio", dim=32, snr=1.5, encoding="linear", informative=0.9),
            dict(name="visual", dim=32, snr=2.5, encoding="mixture"),
        ],
    ),
    "tokens": dict(
        description="2 token-sequence modalities [16, 16]: a strong 'audio' and a weak 'visual'.",
        modalities=[
            dict(name="audio", dim=16, snr=3.0, encoding="tokens", informative=0.8, seq_len=16, signal_tokens=4),
            dict(name="visual", dim=16, snr=2.0, encoding="tokens", informative=1.0, seq_len=16, signal_tokens=2),
        ],
    ),
    # For attention fusion (RollingQ): 'audio' is loud on 4 of 8 tokens and is learned at once, so the
    # fusion query locks onto the audio keys; 'visual' is always informative but quieter (2 of 8
    # tokens), and its encoder is starved of gradient unless the query attends to it.
    "tokens_capture": dict(
        description="2 token-sequence modalities [8, 16]: loud 'audio' captures the fusion attention, quiet 'visual'.",
        modalities=[
            dict(name="audio", dim=16, snr=4.0, encoding="tokens", informative=0.7, seq_len=8, signal_tokens=4),
            dict(name="visual", dim=16, snr=2.0, encoding="tokens", informative=1.0, seq_len=8, signal_tokens=2),
        ],
    ),
    # RollingQ's benchmark preset: 'audio' is loud on 6 of 8 tokens but informative on only half the
    # samples, so the fusion query locks onto the audio keys while the fused task still needs 'visual',
    # which carries its signal in a single token of 8. The starved visual encoder is what RollingQ
    # should help.
    "tokens_starve": dict(
        description="2 token-sequence modalities [8, 16]: loud half-informative 'audio' captures the fusion "
                    "query; 'visual' is always informative but in 1 of 8 tokens.",
        train_size=2000,
        modalities=[
            dict(name="audio", dim=16, snr=6.0, encoding="tokens", informative=0.5, seq_len=8, signal_tokens=6),
            dict(name="visual", dim=16, snr=3.0, encoding="tokens", informative=1.0, seq_len=8, signal_tokens=1),
        ],
    ),
}


def preset_spec(name: str, **overrides) -> SyntheticSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; choose one of {', '.join(PRESETS)}")
    params = dict(PRESETS[name])
    params.update({k: v for k, v in overrides.items() if v is not None})
    return SyntheticSpec(preset=name, **params)


def _prototypes(rng: np.random.Generator, num_classes: int, dim: int) -> np.ndarray:
    protos = rng.standard_normal((num_classes, dim))
    return protos / np.linalg.norm(protos, axis=1, keepdims=True)


def _sample_modality(rng, spec: ModalitySpec, protos: np.ndarray, labels: np.ndarray) -> np.ndarray:
    n = len(labels)
    informative = (rng.random(n) < spec.informative).astype(np.float32)
    signal = spec.snr * protos[labels] * informative[:, None]
    if spec.encoding == "linear":
        return (rng.standard_normal((n, spec.dim)) + signal).astype(np.float32)
    if spec.encoding == "mixture":
        sign = rng.choice([-1.0, 1.0], size=n)[:, None]
        return (rng.standard_normal((n, spec.dim)) + sign * signal).astype(np.float32)
    x = rng.standard_normal((n, spec.seq_len, spec.dim))
    for i in range(n):
        pos = rng.choice(spec.seq_len, size=spec.signal_tokens, replace=False)
        x[i, pos] += signal[i]
    return x.astype(np.float32)


def generate(spec: SyntheticSpec) -> dict:
    """Return {split: {column: np.ndarray}} for train / validation / test."""
    rng = np.random.default_rng(spec.seed)
    protos = {m.name: _prototypes(rng, spec.num_classes, m.dim) for m in spec.modalities}
    sizes = {"train": spec.train_size, "validation": spec.validation_size, "test": spec.test_size}
    splits = {}
    for split, n in sizes.items():
        labels = rng.integers(0, spec.num_classes, size=n)
        cols = {m.name: _sample_modality(rng, m, protos[m.name], labels) for m in spec.modalities}
        cols["label"] = labels.astype(np.int64)
        splits[split] = cols
    return splits


def to_dataset_dict(splits: dict, spec: SyntheticSpec):
    import datasets

    features = {}
    for m in spec.modalities:
        if m.encoding == "tokens":
            features[m.name] = datasets.Array2D(shape=(m.seq_len, m.dim), dtype="float32")
        else:
            features[m.name] = datasets.Sequence(datasets.Value("float32"), length=m.dim)
    features["label"] = datasets.ClassLabel(num_classes=spec.num_classes)
    feats = datasets.Features(features)
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(cols, features=feats) for name, cols in splits.items()}
    )


def write_synthetic(out_dir: str, spec: SyntheticSpec) -> str:
    """Generate `spec` and save it to `out_dir` (DatasetDict + card.json). Returns out_dir."""
    import datasets

    ds = to_dataset_dict(generate(spec), spec)
    os.makedirs(out_dir, exist_ok=True)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # three per-split "Saving the dataset" bars say nothing useful here
    try:
        ds.save_to_disk(out_dir)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    card = dataclasses.asdict(spec)
    card["columns"] = [m.name for m in spec.modalities] + ["label"]
    with open(os.path.join(out_dir, "card.json"), "w", encoding="utf-8") as fh:
        json.dump(card, fh, indent=2)
    return out_dir


def ensure_preset(out_dir: str, preset: str = "av_imbalance", seed: int = 0, **overrides) -> str:
    """Write a preset to `out_dir` unless the same card is already there (cheap reuse in compare/tests)."""
    spec = preset_spec(preset, seed=seed, **overrides)
    card_path = os.path.join(out_dir, "card.json")
    if os.path.isfile(card_path):
        with open(card_path, encoding="utf-8") as fh:
            old = json.load(fh)
        old.pop("columns", None)
        if old == dataclasses.asdict(spec):
            return out_dir
    return write_synthetic(out_dir, spec)


def spec_from_args(preset: Optional[str], modality_args: list[str], **kw) -> SyntheticSpec:
    """Build a spec from the CLI: a preset, and/or `--modality name:dim=32,snr=2,encoding=linear` items."""
    if not modality_args:
        return preset_spec(preset or "av_imbalance", **kw)
    mods = []
    for text in modality_args:
        name, _, rest = text.partition(":")
        params = {"name": name}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            fields = {f.name: f for f in dataclasses.fields(ModalitySpec)}
            if key not in fields or key == "name":
                raise ValueError(f"--modality {text!r}: unknown field {key!r} (valid: dim, snr, encoding, informative, seq_len, signal_tokens)")
            kind = type(fields[key].default)
            params[key] = value if kind is str else kind(float(value)) if kind is int else kind(value)
        mods.append(params)
    kw = {k: v for k, v in kw.items() if v is not None}
    return SyntheticSpec(modalities=mods, preset=None, **kw)


__all__ = ["ModalitySpec", "SyntheticSpec", "PRESETS", "preset_spec", "generate", "write_synthetic", "ensure_preset"]
