"""Write peers' files in their own layouts, with generated media, to try the toolkit on them (docs/peer_files.md).

    python docs/peer_files_demo.py OUT

OUT/llamafactory/  LLaMA-Factory's data/ folder in miniature: mllm_demo.json, mllm_audio_demo.json,
                   mllm_video_demo.json (the layout and keys of hiyouga/LLaMA-Factory@eb7130f:data/) and
                   mllm_demo_data/ with drawn jpgs, mp3/wav/flac tones and mp4/avi clips (PyAV, soundfile).
OUT/vlmevalkit/    MME.tsv, POPE.tsv, MMStar.tsv written by pandas as VLMEvalKit's TSVs are (base64 images,
                   de-duplicated as index references, image_path names, quoted cells).

The media are generated (shapes, tones, moving dots), not the peers' photos; the answers are the peers'
demo texts, so the files are for checking that everything reads and trains, not for accuracy.
"""
from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}


def _picture(colour, size=(64, 48), shape="ellipse"):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (245, 245, 245))
    draw = getattr(ImageDraw.Draw(im), shape)
    draw((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    return im


def _tone(sr, hz, seconds=1.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype("float32")


def _clip(path, n=16, rate=8, size=(64, 48)):
    import av
    from PIL import Image, ImageDraw

    with av.open(str(path), "w") as c:
        st = c.add_stream("mpeg4", rate=rate)
        st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            im = Image.new("RGB", size, (240, 240, 240))
            ImageDraw.Draw(im).ellipse((3 * i, 10, 3 * i + 16, 26), fill=(200, 40, 40))
            for pkt in st.encode(av.VideoFrame.from_image(im)):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


def write_llamafactory(out: Path) -> dict:
    import soundfile as sf

    media = out / "mllm_demo_data"
    media.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(COLOURS.values(), start=1):
        _picture(c).save(media / f"{i}.jpg")
    sf.write(media / "1.mp3", _tone(44100, 330), 44100, format="MP3")
    sf.write(media / "2.wav", _tone(16000, 550), 16000)
    sf.write(media / "3.flac", _tone(22050, 770), 22050)
    _clip(media / "1.mp4")
    _clip(media / "2.avi")
    _clip(media / "3.mp4", n=24, rate=12)

    def turns(*qa):
        return [m for q, a in zip(qa[::2], qa[1::2]) for m in ({"content": q, "role": "user"},
                                                               {"content": a, "role": "assistant"})]

    files = {
        "mllm_demo.json": [
            {"messages": turns("<image>Who are they?", "They're Kane and Gretzka from Bayern Munich.",
                               "What are they doing?", "They are celebrating on the soccer field."),
             "images": ["mllm_demo_data/1.jpg"]},
            {"messages": turns("<image>Who is he?", "He's Thomas Muller from Bayern Munich.",
                               "Why is he on the ground?", "Because he's sliding on his knees to celebrate."),
             "images": ["mllm_demo_data/2.jpg"]},
            {"messages": turns("<image>Please describe this image", "Chinese astronaut Gui Haichao is giving a speech.",
                               "What has he accomplished?", "He was appointed to be a payload specialist."),
             "images": ["mllm_demo_data/3.jpg"]}],
        "mllm_audio_demo.json": [
            {"messages": turns("<audio>What's that sound?", "It is the sound of glass shattering."),
             "audios": ["mllm_demo_data/1.mp3"]},
            {"messages": turns("<audio>What can you hear?", "A woman is coughing."),
             "audios": ["mllm_demo_data/2.wav"]},
            {"messages": turns("<audio>What does the person say?", "Mister Quiller is the apostle of the middle "
                                                                    "classes and we are glad to welcome his gospel."),
             "audios": ["mllm_demo_data/3.flac"]}],
        "mllm_video_demo.json": [
            {"messages": turns("<video>Why is this video funny?", "Because a baby is reading, and he is so cute!"),
             "videos": ["mllm_demo_data/1.mp4"]},
            {"messages": turns("<video>What is she doing?", "She is cooking."), "videos": ["mllm_demo_data/2.avi"]},
            {"messages": turns("<video>What's in the video?", "A baby is playing in the living room."),
             "videos": ["mllm_demo_data/3.mp4"]}],
    }
    paths = {}
    for name, recs in files.items():
        (out / name).write_text(json.dumps(recs, indent=2, ensure_ascii=False))
        paths[name] = str(out / name)
    return paths


def _b64(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def write_vlmevalkit(out: Path, n_images: int = 12, seed: int = 0) -> dict:
    """MME / POPE / MMStar TSVs in VLMEvalKit's columns, about coloured shapes (answers known from the picture)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    names, shapes = list(COLOURS), ["ellipse", "rectangle"]
    pics = [(names[rng.integers(3)], shapes[rng.integers(2)]) for _ in range(n_images)]
    b64 = [_b64(_picture(COLOURS[c], shape=s)) for c, s in pics]
    mme, pope, mmstar = [], [], []
    for i, (c, s) in enumerate(pics):
        other = names[(names.index(c) + 1 + rng.integers(2)) % 3]
        cat = ["color", "existence", "commonsense_reasoning"][i % 3]
        first = 2 * i
        mme.append((first, b64[i], f'Is the shape "{c}"?\nPlease answer yes or no.', "Yes", cat, f"{cat}/{i}.jpg"))
        mme.append((first + 1, str(first), f"Is the shape {other}? Please answer yes or no.", "No", cat,
                    f"{cat}/{i}.jpg"))
        word = "circle" if s == "ellipse" else "square"
        split = ["adversarial", "popular", "random", "popular,random"][i % 4]
        pope.append((first, b64[i], f"Is there a {word} in the image?", "Yes", split))
        pope.append((first + 1, str(first), f"Is there a {'square' if word == 'circle' else 'circle'} in the image?",
                     "No", split))
        opts = rng.permutation(names + ["black"]).tolist()
        l2 = ["image emotion", "recognition"][i % 2]
        mmstar.append((i, "What colour is the shape?", b64[i], "ABCD"[opts.index(c)],
                       ["coarse perception", "fine-grained perception"][i % 2], l2, "demo", *opts))
    paths = {}
    for name, rows, cols in (
            ("MME.tsv", mme, ["index", "image", "question", "answer", "category", "image_path"]),
            ("POPE.tsv", pope, ["index", "image", "question", "answer", "category"]),
            ("MMStar.tsv", mmstar, ["index", "question", "image", "answer", "category", "l2-category", "bench",
                                    "A", "B", "C", "D"])):
        pd.DataFrame(rows, columns=cols).to_csv(out / name, sep="\t", index=False)
        paths[name] = str(out / name)
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "runs/peer_files")
    paths = {**write_llamafactory(out / "llamafactory"), **write_vlmevalkit(out / "vlmevalkit")}
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
