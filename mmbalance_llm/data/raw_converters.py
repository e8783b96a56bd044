"""`mmbalance make-data <dataset> RAW_DIR OUT`: the field's datasets, from their published layouts, into
the dataset contract (train / validation / test jsonl + media.json).

    mmbalance make-data cremad RAW_DIR OUT            AudioWAV/*.wav + VideoFlash/*.flv (or visual/<clip>/ frames)
    mmbalance make-data kinetics-sounds RAW_DIR OUT   annotations/*.csv + <split>/[<label>/]<id>_<t0>_<t1>.mp4
    mmbalance make-data ave RAW_DIR OUT               AVE_Dataset/{AVE/*.mp4, trainSet/valSet/testSet.txt}
    mmbalance make-data vggsound RAW_DIR OUT          vggsound.csv + video/<id>_<t0>.mp4
    mmbalance make-data ucf101 RAW_DIR OUT            ucfTrainTestlist/ + UCF-101/<Class>/*.avi + tvl1_flow/{u,v}/
    mmbalance make-data food101 RAW_DIR OUT           texts/{train,test}_titles.csv + images/{train,test}/<label>/
    mmbalance make-data mosei RAW_DIR OUT             mosei_senti_data.pkl (aligned features; --labels 2|3|7)
    common options: [--validation-fraction 0.1] [--seed 0] [--classes a,b,...]

Rows hold absolute paths into RAW_DIR (nothing is copied); decoding and preprocessing happen once, at
training time, through data/media_columns.py. Where a dataset has no validation split, `--validation-fraction` of
train is carved off with `--seed`; where it has no official split at all (CREMA-D without list files),
10% of the clips become test first. Classes are numbered in the order given in docs/raw_media.md (the
BalanceBenchmark order where it fixes one). Loader conventions follow
GeWu-Lab/BalanceBenchmark@39ed569:balancemm/datasets/{cremad,KS,ucf101,food,Mosei}_dataset.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pickle

import numpy as np

from mmbalance_llm.data.features import DataError
from mmbalance_llm.data.media_columns import write_media_card

CREMAD_CLASSES = {"NEU": 0, "HAP": 1, "SAD": 2, "FEA": 3, "DIS": 4, "ANG": 5}  # BalanceBenchmark's class_dict
AV_MEDIA = {"audio": {"kind": "audio"}, "visual": {"kind": "video", "num_frames": 3}}


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"{what}: '{path}' does not exist")
    return path


def carve(rows: list, fraction: float, seed: int) -> tuple:
    """(kept, carved): a seeded random `fraction` of rows (at least one when there are two or more)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n = min(len(rows) - 1, max(1, int(round(fraction * len(rows))))) if len(rows) > 1 else 0
    carved = set(order[:n].tolist())
    return [r for i, r in enumerate(rows) if i not in carved], [r for i, r in enumerate(rows) if i in carved]


def write_contract(out: str, splits: dict, media: dict, classes: list, dataset: str, args) -> None:
    """train / validation / test jsonl, media.json (column kinds, classes, source)."""
    if "validation" not in splits or not splits["validation"]:
        splits["train"], splits["validation"] = carve(splits["train"], args.validation_fraction, args.seed)
    for split in ("train", "validation", "test"):
        if not splits.get(split):
            raise DataError(f"{dataset}: split '{split}' is empty after conversion (check RAW_DIR and --classes)")
    os.makedirs(out, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    write_media_card(out, media, classes=classes, dataset=dataset, raw_dir=os.path.abspath(args.raw_dir))
    sizes = "/".join(str(len(splits[s])) for s in ("train", "validation", "test"))
    print(f"[mmbalance] wrote {out} ({dataset}: {sizes} train/validation/test, {len(classes)} classes)")


def _class_filter(args, found: list) -> list:
    if not args.classes:
        return found
    wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"--classes: {missing} not in the dataset's classes ({', '.join(found[:10])}, ...)")
    return wanted


# -- CREMA-D -------------------------------------------------------------------------------------------
def cremad(args) -> None:
    raw = os.path.abspath(args.raw_dir)
    audio_dir = _need(os.path.join(raw, "AudioWAV"), "CREMA-D audio folder")
    frames_dir, video_dir = os.path.join(raw, "visual"), os.path.join(raw, "VideoFlash")
    names = sorted(f[:-4] for f in os.listdir(audio_dir) if f.endswith(".wav"))

    def row(name: str):
        emo = name.split("_")[2] if name.count("_") == 3 else None
        if emo not in CREMAD_CLASSES:
            raise DataError(f"CREMA-D clip '{name}': expected <actor>_<sentence>_<emotion>_<level> with emotion "
                            f"in {', '.join(CREMAD_CLASSES)}")
        visual = os.path.join(frames_dir, name)
        if not os.path.isdir(visual):
            visual = _need(os.path.join(video_dir, name + ".flv"), f"CREMA-D clip '{name}' video")
        return {"audio": os.path.join(audio_dir, name + ".wav"), "visual": visual, "label": CREMAD_CLASSES[emo]}

    splits = {}
    lists = {s: os.path.join(raw, f"{s}.csv") for s in ("train", "test")}
    if all(os.path.isfile(p) for p in lists.values()):  # the OGM-GE / BalanceBenchmark split
        for split, path in lists.items():
            with open(path, newline="") as fh:
                splits[split] = [row(item[0]) for item in csv.reader(fh) if item and item[1] in CREMAD_CLASSES]
    else:
        splits["train"], splits["test"] = carve([row(n) for n in names], 0.1, args.seed)
    media = {"audio": {"kind": "audio", "sampling_rate": 22050, "max_seconds": 3.0},
             "visual": {"kind": "video", "num_frames": 2}}
    write_contract(args.out_dir, splits, media, list(CREMAD_CLASSES), "cremad", args)


# -- Kinetics-Sounds / AVE / VGGSound (video clips with sound) -------------------------------------
def _clip_row(path: str, label: int, frames_root: str, clip: str) -> dict:
    """Audio from the clip's sound track; frames from <frames_root>/<clip>/ when extracted, else the clip."""
    frames = os.path.join(frames_root, clip) if frames_root else ""
    return {"audio": path, "visual": frames if frames and os.path.isdir(frames) else path, "label": label}


def kinetics_sounds(args) -> None:
    raw = os.path.abspath(args.raw_dir)
    ann_dir = _need(os.path.join(raw, "annotations"), "Kinetics annotations folder")
    entries = {}
    for split, fname in (("train", "train.csv"), ("validation", "validate.csv"), ("test", "test.csv")):
        path = os.path.join(ann_dir, fname)
        if os.path.isfile(path):
            with open(path, newline="") as fh:
                entries[split] = list(csv.DictReader(fh))
    if "train" not in entries:
        raise DataError(f"Kinetics annotations: '{os.path.join(ann_dir, 'train.csv')}' does not exist")
    classes = _class_filter(args, sorted({e["label"] for e in entries["train"]}))
    index = {c: i for i, c in enumerate(classes)}
    folder = {"train": "train", "validation": "validate", "test": "test"}
    splits = {}
    for split, rows in entries.items():
        out = []
        for e in rows:
            if e["label"] not in index:
                continue
            clip = f"{e['youtube_id']}_{int(float(e['time_start'])):06d}_{int(float(e['time_end'])):06d}"
            nested = os.path.join(raw, folder[split], e["label"], clip + ".mp4")
            flat = os.path.join(raw, folder[split], clip + ".mp4")
            path = nested if os.path.isfile(nested) else flat
            if not os.path.isfile(path):
                if args.skip_missing:
                    continue
                raise DataError(f"Kinetics clip '{clip}' ({split}): neither '{nested}' nor '{flat}' exists "
                                "(--skip-missing drops clips that failed to download)")
            out.append(_clip_row(path, index[e["label"]], os.path.join(raw, "frames"), clip))
        splits[split] = out
    write_contract(args.out_dir, splits, AV_MEDIA, classes, "kinetics-sounds", args)


def ave(args) -> None:
    raw = os.path.abspath(args.raw_dir)
    root = os.path.join(raw, "AVE_Dataset") if os.path.isdir(os.path.join(raw, "AVE_Dataset")) else raw
    lists = {"train": "trainSet.txt", "validation": "valSet.txt", "test": "testSet.txt"}
    parsed = {}
    for split, fname in lists.items():
        with open(_need(os.path.join(root, fname), "AVE split list")) as fh:
            parsed[split] = [line.strip().split("&") for line in fh if "&" in line and not line.startswith("Category&")]
    classes = _class_filter(args, sorted({p[0] for p in parsed["train"]}))
    index = {c: i for i, c in enumerate(classes)}
    splits = {split: [_clip_row(_need(os.path.join(root, "AVE", p[1] + ".mp4"), f"AVE clip '{p[1]}'"),
                                index[p[0]], os.path.join(root, "frames"), p[1])
                      for p in rows if p[0] in index] for split, rows in parsed.items()}
    write_contract(args.out_dir, splits, AV_MEDIA, classes, "ave", args)


def vggsound(args) -> None:
    raw = os.path.abspath(args.raw_dir)
    with open(_need(os.path.join(raw, "vggsound.csv"), "VGGSound list"), newline="") as fh:
        items = [r for r in csv.reader(fh) if len(r) >= 4]
    classes = _class_filter(args, sorted({r[2] for r in items}))
    index = {c: i for i, c in enumerate(classes)}
    splits = {"train": [], "test": []}
    for yt, start, label, split in (r[:4] for r in items):
        if label not in index or split not in splits:
            continue
        clip = f"{yt}_{int(float(start)):06d}"
        path = os.path.join(raw, "video", clip + ".mp4")
        if not os.path.isfile(path):
            if args.skip_missing:
                continue
            raise DataError(f"VGGSound clip '{clip}': '{path}' does not exist (--skip-missing drops it)")
        splits[split].append(_clip_row(path, index[label], os.path.join(raw, "frames"), clip))
    write_contract(args.out_dir, splits, AV_MEDIA, classes, "vggsound", args)


# -- UCF-101 (RGB + optical flow) ------------------------------------------------------------------
def ucf101(args) -> None:
    raw = os.path.abspath(args.raw_dir)
    lists = os.path.join(raw, "ucfTrainTestlist") if os.path.isdir(os.path.join(raw, "ucfTrainTestlist")) else raw
    with open(_need(os.path.join(lists, "classInd.txt"), "UCF-101 class list")) as fh:
        classes = [line.split()[1] for line in fh if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    # TV-L1 flow as tvl1_flow/{u,v}/<clip>/ (the two-stream release) or {u,v}/<clip>/ (BalanceBenchmark's paths)
    flow_root = os.path.join(raw, "tvl1_flow") if os.path.isdir(os.path.join(raw, "tvl1_flow")) else raw
    frames_root = os.path.join(raw, "ucf101-frames-1fps", "video-set")
    splits = {}
    for split, fname in (("train", f"trainlist0{args.split}.txt"), ("test", f"testlist0{args.split}.txt")):
        rows = []
        with open(_need(os.path.join(lists, fname), "UCF-101 split list")) as fh:
            for line in fh:
                if not line.strip():
                    continue
                rel = line.split()[0]
                cls, name = rel.split("/")[0], os.path.splitext(rel.split("/")[1])[0]
                frames = os.path.join(frames_root, name)
                rgb = frames if os.path.isdir(frames) else _need(os.path.join(raw, "UCF-101", rel), "UCF-101 video")
                flow = {c: _need(os.path.join(flow_root, c, name), f"UCF-101 '{name}' flow {c}") for c in ("u", "v")}
                rows.append({"visual": rgb, "flow": flow, "label": index[cls]})
        splits[split] = rows
    media = {"visual": {"kind": "video", "num_frames": 3}, "flow": {"kind": "flow", "num_frames": 3}}
    write_contract(args.out_dir, splits, media, classes, "ucf101", args)


# -- UPMC Food-101 (image + text) ---------------------------------------------------------------------
def food101(args) -> None:
    import re

    raw = os.path.abspath(args.raw_dir)
    classes = _class_filter(args, sorted(os.listdir(_need(os.path.join(raw, "images", "train"), "Food-101 images"))))
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        with open(_need(os.path.join(raw, "texts", f"{split}_titles.csv"), "Food-101 titles"), newline="",
                  encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if rows and rows[0][:3] == ["Image_path", "text", "label"]:
            rows = rows[1:]
        out = []
        for image, text, label in (r[:3] for r in rows if len(r) >= 3):
            if label not in index:
                continue
            # BalanceBenchmark's clean_text: drop 'RT', links and '#'
            text = re.sub(r"#", "", re.sub(r"https?://\S*", "", re.sub(r"^RT\s+", "", text))).strip()
            path = os.path.join(raw, "images", split, label, image)
            if not os.path.isfile(path):
                if args.skip_missing:
                    continue
                raise DataError(f"Food-101 '{split}_titles.csv': image '{path}' does not exist")
            out.append({"image": path, "text": text, "label": index[label]})
        splits[split] = out
    media = {"image": {"kind": "image"}, "text": {"kind": "text", "max_length": 40}}
    write_contract(args.out_dir, splits, media, classes, "food101", args)


# -- CMU-MOSEI (aligned features) ---------------------------------------------------------------------
def _sentiment_class(y: np.ndarray, n: int) -> np.ndarray:
    """BalanceBenchmark's acc2 (y >= 0), acc3 (< -0.5, > 0.5, else neutral=2) and acc7 (rounded bins)."""
    if n == 2:
        return (y >= 0).astype(np.int64)
    if n == 3:
        return np.where(y < -0.5, 0, np.where(y > 0.5, 1, 2)).astype(np.int64)
    return np.select([y < -2, y < -1, y < 0, y == 0, y <= 1, y <= 2], [0, 1, 2, 3, 4, 5], 6).astype(np.int64)


def mosei(args) -> None:
    import datasets

    raw = os.path.abspath(args.raw_dir)
    name = "mosei_senti_data.pkl" if not args.unaligned else "mosei_senti_data_noalign.pkl"
    with open(_need(os.path.join(raw, name), "CMU-MOSEI feature pickle"), "rb") as fh:
        data = pickle.load(fh)
    out = {}
    for split, key in (("train", "train"), ("validation", "valid"), ("test", "test")):
        if key not in data:
            raise DataError(f"'{name}': no '{key}' split (keys: {', '.join(data)})")
        part = data[key]
        cols = {}
        for m in ("audio", "visual", "text"):
            arr = np.asarray(part["vision" if m == "visual" else m], dtype=np.float32)
            arr[~np.isfinite(arr)] = 0.0  # COVAREP -inf (BalanceBenchmark zeroes them)
            cols[m] = list(arr)
        cols["label"] = _sentiment_class(np.asarray(part["labels"], np.float32).reshape(len(cols["audio"]), -1)[:, 0],
                                         args.labels).tolist()
        out[split] = datasets.Dataset.from_dict(cols)
    datasets.DatasetDict(out).save_to_disk(args.out_dir)
    classes = {2: ["negative", "non-negative"], 3: ["negative", "positive", "neutral"]}.get(
        args.labels, [str(v) for v in range(-3, 4)])
    write_media_card(args.out_dir, {}, classes=classes, dataset="mosei", raw_dir=raw)
    print(f"[mmbalance] wrote {args.out_dir} (mosei: {'/'.join(str(len(out[s])) for s in out)} "
          f"train/validation/test, {args.labels} classes)")


CONVERTERS = {"cremad": cremad, "kinetics-sounds": kinetics_sounds, "ave": ave, "vggsound": vggsound,
              "ucf101": ucf101, "food101": food101, "mosei": mosei}


def make_main(name: str):
    """The `mmbalance make-data <name>` entry point (registered in cli.DELEGATED)."""

    def main(argv) -> int:
        p = argparse.ArgumentParser(prog=f"mmbalance make-data {name}",
                                    description=f"Convert the raw {name} layout into the dataset contract.")
        p.add_argument("raw_dir")
        p.add_argument("out_dir")
        p.add_argument("--validation-fraction", type=float, default=0.1,
                       help="fraction of train carved off as validation when the dataset has none")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--classes", default=None, help="comma-separated class names to keep (default: all)")
        p.add_argument("--skip-missing", action="store_true", help="drop listed clips whose file is missing")
        p.add_argument("--split", type=int, default=1, choices=[1, 2, 3], help="UCF-101 split list number")
        p.add_argument("--labels", type=int, default=2, choices=[2, 3, 7], help="CMU-MOSEI sentiment classes")
        p.add_argument("--unaligned", action="store_true", help="CMU-MOSEI: read the _noalign pickle")
        args = p.parse_args(argv)
        if not os.path.isdir(args.raw_dir):
            raise DataError(f"RAW_DIR '{args.raw_dir}' is not a folder")
        CONVERTERS[name](args)
        return 0

    return main


cremad_main, kinetics_sounds_main, ave_main, vggsound_main, ucf101_main, food101_main, mosei_main = (
    make_main(n) for n in CONVERTERS)
