"""Miniature replicas of the raw layouts that `mmbalance make-data <dataset>` converts (for tests and demos).

    mmbalance make-data raw-replica {cremad,kinetics-sounds,ave,vggsound,ucf101,food101,mosei,all} OUT
        [--per-class 4] [--seed 0]

Each replica uses the dataset's own folder structure, file names and list / annotation formats, with a
few generated files: wav tones and JPEG / video frames whose pitch and colour depend on the class (so a
model can learn them), short mp4 / avi / flv clips with PyAV, text titles, and for CMU-MOSEI the aligned
feature pickle. The layouts follow the datasets' releases and BalanceBenchmark's loaders
(GeWu-Lab/BalanceBenchmark@39ed569:balancemm/datasets/): see docs/raw_media.md.
"""
from __future__ import annotations

import argparse
import csv
import os
import pickle

import numpy as np

SR = 16000
CREMAD_EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
CREMAD_SENTENCES = ["IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI"]
KS_CLASSES = ["playing bagpipes", "chopping wood", "playing accordion"]
AVE_CLASSES = ["Church bell", "Male speech, man speaking", "Bark"]
VGGSOUND_CLASSES = ["dog barking", "playing violin, fiddle", "people clapping"]
UCF_CLASSES = ["ApplyEyeMakeup", "Basketball", "PlayingGuitar"]
FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "sushi"]


def tone(label: int, seconds: float, rng, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.5 * np.sin(2 * np.pi * 220.0 * (1 + 0.5 * label) * t) + 0.05 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def frame(label: int, k: int, rng, size: int = 48) -> np.ndarray:
    """An RGB frame whose dominant colour is the class; a moving bar makes frames differ."""
    colours = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220], [200, 200, 40], [200, 40, 200],
                        [40, 200, 200]], np.float32)
    img = np.tile(colours[label % len(colours)], (size, size, 1)) + rng.normal(0, 20, (size, size, 3))
    img[:, (4 * k) % size: (4 * k) % size + 4] = 255
    return np.clip(img, 0, 255).astype(np.uint8)


def write_wav(path: str, wave: np.ndarray, sr: int = SR) -> None:
    import soundfile as sf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, wave, sr)


def write_jpg(path: str, arr: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def write_video(path: str, label: int, rng, frames: int = 8, fps: int = 8, audio: bool = True) -> None:
    """A clip with `frames` frames (mpeg4 in mp4 / avi, flv1 in flv) and, if asked, an AAC / PCM tone."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    codec = {".flv": "flv", ".avi": "mpeg4", ".mp4": "mpeg4"}[ext]
    with av.open(path, "w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width = vs.height = 48
        vs.pix_fmt = "yuv420p"
        astream = None
        if audio:
            astream = out.add_stream("aac" if ext == ".mp4" else ("mp3" if ext == ".flv" else "pcm_s16le"), rate=SR)
            astream.layout = "mono"
        for k in range(frames):
            for packet in vs.encode(av.VideoFrame.from_ndarray(frame(label, k, rng), format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if astream is not None:
            wave = tone(label, frames / fps, rng)
            fmt = astream.codec_context.format.name
            chunk = 1024
            for start in range(0, len(wave), chunk):
                part = wave[start:start + chunk]
                if fmt.startswith("s16"):
                    data = (part * 32767).astype(np.int16)[None]
                else:
                    data = part[None].astype(np.float32)
                af = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
                af.sample_rate = SR
                for packet in astream.encode(af):
                    out.mux(packet)
            for packet in astream.encode():
                out.mux(packet)


# -- one function per dataset ------------------------------------------------------------------------
def cremad(out: str, per_class: int, rng) -> None:
    """AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav, VideoFlash/<same>.flv, and the train.csv /
    test.csv lists ('<clip>,<EMO>') that OGM-GE and BalanceBenchmark ship."""
    rows = []
    for e, emo in enumerate(CREMAD_EMOTIONS):
        for i in range(per_class):
            name = f"{1001 + i}_{CREMAD_SENTENCES[(e + i) % 12]}_{emo}_{['LO', 'MD', 'HI', 'XX'][i % 4]}"
            write_wav(os.path.join(out, "AudioWAV", name + ".wav"), tone(e, 1.0, rng))
            write_video(os.path.join(out, "VideoFlash", name + ".flv"), e, rng, audio=False)
            rows.append((name, emo))
    order = rng.permutation(len(rows))
    test = {rows[i][0] for i in order[: max(1, len(rows) // 5)]}
    for split, keep in (("train", lambda n: n not in test), ("test", lambda n: n in test)):
        with open(os.path.join(out, f"{split}.csv"), "w", newline="") as fh:
            csv.writer(fh).writerows(r for r in rows if keep(r[0]))


def kinetics_sounds(out: str, per_class: int, rng) -> None:
    """Kinetics-400 release: annotations/{train,validate,test}.csv (label,youtube_id,time_start,time_end,
    split) and clips <split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4."""
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for split, n in (("train", per_class), ("validate", max(1, per_class // 2)), ("test", max(1, per_class // 2))):
        with open(os.path.join(out, "annotations", f"{split}.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for c, label in enumerate(KS_CLASSES):
                for i in range(n):
                    yt = f"{split[:2]}{c}{i:02d}abcdefg"[:11]
                    start = 10 * i
                    w.writerow([label, yt, start, start + 10, split])
                    write_video(os.path.join(out, split, label, f"{yt}_{start:06d}_{start + 10:06d}.mp4"), c, rng)


def ave(out: str, per_class: int, rng) -> None:
    """AVE_Dataset/: AVE/<video_id>.mp4, Annotations.txt and trainSet / valSet / testSet.txt, lines
    'Category&VideoID&Quality&StartTime&EndTime'."""
    root = os.path.join(out, "AVE_Dataset")
    lines = {"trainSet": [], "valSet": [], "testSet": []}
    for c, label in enumerate(AVE_CLASSES):
        for i in range(per_class + 2):
            vid = f"av{c}{i:02d}XyZ123"[:11]
            write_video(os.path.join(root, "AVE", vid + ".mp4"), c, rng)
            split = "valSet" if i == per_class else "testSet" if i == per_class + 1 else "trainSet"
            lines[split].append(f"{label}&{vid}&good&0&8")
    with open(os.path.join(root, "Annotations.txt"), "w") as fh:
        fh.write("Category&VideoID&Quality&StartTime&EndTime\n")
        fh.write("\n".join(sum(lines.values(), [])) + "\n")
    for split, rows in lines.items():
        with open(os.path.join(root, split + ".txt"), "w") as fh:
            fh.write("\n".join(rows) + "\n")


def vggsound(out: str, per_class: int, rng) -> None:
    """vggsound.csv (no header: youtube_id,start_seconds,label,split) and video/<youtube_id>_<start:06d>.mp4."""
    with open(os.path.join(_mk(out), "vggsound.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        for c, label in enumerate(VGGSOUND_CLASSES):
            for i in range(per_class + 1):
                yt, start = f"vg{c}{i:02d}QwErTy"[:11], 30 + i
                w.writerow([yt, start, label, "test" if i == per_class else "train"])
                write_video(os.path.join(out, "video", f"{yt}_{start:06d}.mp4"), c, rng)


def ucf101(out: str, per_class: int, rng) -> None:
    """ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt, UCF-101/<Class>/v_<Class>_gXX_cYY.avi and the
    TV-L1 flow frames tvl1_flow/{u,v}/v_<Class>_gXX_cYY/frame000001.jpg."""
    lists = os.path.join(out, "ucfTrainTestlist")
    os.makedirs(lists, exist_ok=True)
    train, test = [], []
    with open(os.path.join(lists, "classInd.txt"), "w") as fh:
        fh.write("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    for c, cls in enumerate(UCF_CLASSES):
        for i in range(per_class + 1):
            name = f"v_{cls}_g{8 + i:02d}_c01" if i < per_class else f"v_{cls}_g01_c01"
            write_video(os.path.join(out, "UCF-101", cls, name + ".avi"), c, rng, audio=False)
            for k in range(6):
                for comp in ("u", "v"):
                    flow = np.clip(128 + (c - 1) * 60 + rng.normal(0, 10, (48, 48)), 0, 255).astype(np.uint8)
                    write_jpg(os.path.join(out, "tvl1_flow", comp, name, f"frame{k + 1:06d}.jpg"),
                              np.stack([flow] * 3, -1))
            (test if i == per_class else train).append(f"{cls}/{name}.avi" + (f" {c + 1}" if i < per_class else ""))
    for fname, rows in (("trainlist01.txt", train), ("testlist01.txt", test)):
        with open(os.path.join(lists, fname), "w") as fh:
            fh.write("\n".join(rows) + "\n")


def food101(out: str, per_class: int, rng) -> None:
    """UPMC Food-101: images/{train,test}/<label>/<label>_<n>.jpg and texts/{train,test}_titles.csv
    (Image_path,text,label), the columns BalanceBenchmark reads."""
    words = {"apple_pie": "apple pie crust cinnamon", "baby_back_ribs": "ribs barbecue smoked pork",
             "sushi": "sushi rice salmon roll"}
    os.makedirs(os.path.join(out, "texts"), exist_ok=True)
    for split, n in (("train", per_class), ("test", max(1, per_class // 2))):
        with open(os.path.join(out, "texts", f"{split}_titles.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["Image_path", "text", "label"])
            for c, label in enumerate(FOOD_CLASSES):
                for i in range(n):
                    name = f"{label}_{i}.jpg" if split == "train" else f"{label}_{100 + i}.jpg"
                    write_jpg(os.path.join(out, "images", split, label, name), frame(c, i, rng))
                    w.writerow([name, f"Best homemade {words[label]} recipe #{i} http://example.com/{i}", label])


def mosei(out: str, per_class: int, rng) -> None:
    """mosei_senti_data.pkl (the aligned MulT pickle): {train, valid, test} x {vision [N,T,35],
    audio [N,T,74], text [N,T,300], labels [N,1,1], id}."""
    data = {}
    for split, n in (("train", 4 * per_class), ("valid", per_class), ("test", per_class)):
        labels = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
        sign = np.sign(labels[:, 0, 0])[:, None, None]
        audio = rng.normal(0, 1, (n, 8, 74)).astype(np.float32) + 0.5 * sign
        audio[:, 0, 0] = -np.inf  # COVAREP has -inf entries; BalanceBenchmark sets them to 0
        data[split] = {"vision": rng.normal(0, 1, (n, 8, 35)).astype(np.float32),
                       "audio": audio,
                       "text": rng.normal(0, 1, (n, 8, 300)).astype(np.float32) + sign,
                       "labels": labels,
                       "id": np.array([[f"vid{split}{i}", "0", "1"] for i in range(n)])}
    with open(os.path.join(_mk(out), "mosei_senti_data.pkl"), "wb") as fh:
        pickle.dump(data, fh)


def _mk(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


REPLICAS = {"cremad": cremad, "kinetics-sounds": kinetics_sounds, "ave": ave, "vggsound": vggsound,
            "ucf101": ucf101, "food101": food101, "mosei": mosei}


def write_replica(name: str, out: str, per_class: int = 4, seed: int = 0) -> None:
    if name not in REPLICAS:
        raise ValueError(f"unknown replica {name!r}; choose one of {', '.join(REPLICAS)} or all")
    REPLICAS[name](_mk(out), per_class, np.random.default_rng(seed))


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="mmbalance make-data raw-replica",
                                description="Write a miniature replica of a dataset's raw layout.")
    p.add_argument("name", choices=list(REPLICAS) + ["all"])
    p.add_argument("out_dir")
    p.add_argument("--per-class", type=int, default=4, help="training clips per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = list(REPLICAS) if args.name == "all" else [args.name]
    for name in names:
        out = os.path.join(args.out_dir, name) if args.name == "all" else args.out_dir
        write_replica(name, out, args.per_class, args.seed)
        print(f"[mmbalance] wrote a {name} replica to {out}")
    return 0


def write_tiny_tokenizer(path: str, texts: list) -> str:
    """A word-level `PreTrainedTokenizerFast` over `texts` (BERT's special tokens, [PAD] = 0), saved to
    `path`: the tokenizer of the random-weight tiny BERT in tests and CPU twins."""
    import re

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    fast.save_pretrained(path)
    return path
