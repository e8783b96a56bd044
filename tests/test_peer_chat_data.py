"""Peers' chat data files: LLaMA-Factory's demo layouts (image, audio, video), conversations with media lists,
TRL's conversational parts; audio in wav/flac/ogg/mp3, video files and frame lists; one-line media errors."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
sf = pytest.importorskip("soundfile")
av = pytest.importorskip("av")

from mmbalance_llm.data.chat import ChatCollator, ChatDataError, _video_patches, load_conversations  # noqa: E402
from mmbalance_llm.data.media import load_audio, load_video  # noqa: E402
from mmbalance_llm.models.tiny import tiny_model_and_processor  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tone(sr, seconds=1.0, hz=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype("float32")


def _write_video(path, n=12, rate=8, size=(48, 32), codec="mpeg4"):
    from PIL import Image, ImageDraw

    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=rate)
        st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            im = Image.new("RGB", size, (20 * i, 100, 200))
            ImageDraw.Draw(im).ellipse((2 * i, 4, 2 * i + 16, 20), fill=(255, 0, 0))
            for pkt in st.encode(av.VideoFrame.from_image(im)):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """LLaMA-Factory's data/ folder in miniature: its three demo files (same layout and keys as
    hiyouga/LLaMA-Factory@eb7130f:data/mllm_demo.json, mllm_audio_demo.json, mllm_video_demo.json) and
    mllm_demo_data/ with PIL-drawn jpgs, generated mp3/wav/flac clips and mp4/avi videos."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("llamafactory")
    media = root / "mllm_demo_data"
    media.mkdir()
    for i, col in enumerate([(255, 0, 0), (0, 200, 0), (0, 0, 255)], start=1):
        im = Image.new("RGB", (40, 30), (240, 240, 240))
        ImageDraw.Draw(im).ellipse((5, 5, 30, 25), fill=col)
        im.save(media / f"{i}.jpg")
    sf.write(media / "1.mp3", _tone(44100, hz=300), 44100, format="MP3")
    sf.write(media / "2.wav", _tone(16000, hz=500), 16000)
    sf.write(media / "3.flac", _tone(22050, hz=700), 22050)
    _write_video(media / "1.mp4")
    _write_video(media / "2.avi")
    _write_video(media / "3.mp4", n=20, rate=10)
    turn = lambda q, a: [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]  # noqa: E731
    (root / "mllm_demo.json").write_text(json.dumps([
        {"messages": turn("<image>Who are they?", "They're Kane and Gretzka from Bayern Munich.")
         + turn("What are they doing?", "They are celebrating on the soccer field."),
         "images": ["mllm_demo_data/1.jpg"]},
        {"messages": turn("<image>Who is he?", "He's Thomas Muller from Bayern Munich."),
         "images": ["mllm_demo_data/2.jpg"]}], indent=2))
    (root / "mllm_audio_demo.json").write_text(json.dumps([
        {"messages": turn("<audio>What's that sound?", "It is the sound of glass shattering."),
         "audios": ["mllm_demo_data/1.mp3"]},
        {"messages": turn("<audio>What can you hear?", "A woman is coughing."), "audios": ["mllm_demo_data/2.wav"]},
        {"messages": turn("<audio>What does the person say?", "Mister Quiller is the apostle of the middle classes."),
         "audios": ["mllm_demo_data/3.flac"]}], indent=2))
    (root / "mllm_video_demo.json").write_text(json.dumps([
        {"messages": turn("<video>Why is this video funny?", "Because a baby is reading, and he is so cute!"),
         "videos": ["mllm_demo_data/1.mp4"]},
        {"messages": turn("<video>What is she doing?", "She is cooking."), "videos": ["mllm_demo_data/2.avi"]},
        {"messages": turn("<video>What's in the video?", "A baby is playing in the living room."),
         "videos": ["mllm_demo_data/3.mp4"]}], indent=2))
    return root


def _media_count(batch, coll, mod):
    tid = coll.token_ids[mod]
    return int((batch["input_ids"] == tid).sum())


def test_llamafactory_image_audio_video_demos_reach_the_model(demo):
    model, proc = tiny_model_and_processor("llava")
    recs = load_conversations(demo / "mllm_demo.json")
    coll = ChatCollator(proc, model.config)
    b = coll(recs)
    assert _media_count(b, coll, "image") == 2 * model.config.image_seq_length
    assert torch.isfinite(model(**b).loss)

    model, proc = tiny_model_and_processor("qwen2_audio")
    recs = load_conversations(demo / "mllm_audio_demo.json")
    coll = ChatCollator(proc, model.config)
    b = coll(recs)
    assert b["input_features"].shape[0] == 3 and _media_count(b, coll, "audio") == 3 * 25  # 1 s clips -> 25 tokens
    assert torch.isfinite(model(**b).loss)

    recs = load_conversations(demo / "mllm_video_demo.json")
    assert recs[1]["videos"] == [[str(demo / "mllm_demo_data" / "2.avi")]]
    for fam in ("qwen2_vl", "qwen2_5_vl"):
        model, proc = tiny_model_and_processor(fam)
        coll = ChatCollator(proc, model.config)
        b = coll(recs)
        n = int(b["video_grid_thw"].prod(-1).sum()) // 4
        assert _media_count(b, coll, "video") == n > 0
        assert int((b["mm_token_type_ids"] == 2).sum()) == n  # video positions typed as video
        assert ("second_per_grid_ts" in b) == (fam == "qwen2_5_vl")
        assert torch.isfinite(model(**b).loss)


def test_video_patches_match_the_image_layout_for_a_still_clip(demo):
    """Two identical frames are one temporal patch: Qwen2-VL's image input of that frame, patch for patch."""
    from PIL import Image

    _, proc = tiny_model_and_processor("qwen2_vl")
    ip = proc.image_processor
    im = Image.open(demo / "mllm_demo_data" / "1.jpg").convert("RGB")
    pv, thw = _video_patches(ip, [im, im])
    ref = ip(images=[im], return_tensors="pt")
    assert thw.tolist() == ref["image_grid_thw"].tolist()
    assert torch.equal(pv, ref["pixel_values"])
    # two different frames: each patch vector is (channel, time, patch, patch), the video processor's layout
    other = Image.open(demo / "mllm_demo_data" / "3.jpg").convert("RGB")
    pv2, thw2 = _video_patches(ip, [im, other, other, im])
    assert thw2.tolist() == [[2, *ref["image_grid_thw"][0, 1:].tolist()]]
    c, tp, p = 3, ip.temporal_patch_size, ip.patch_size
    per = {k: ip(images=[f], return_tensors="pt")["pixel_values"].reshape(-1, c, tp, p, p)[:, :, 0]
           for k, f in (("a", im), ("b", other))}
    v = pv2.reshape(2, -1, c, tp, p, p)
    for t, (first, second) in enumerate((("a", "b"), ("b", "a"))):
        assert torch.equal(v[t, :, :, 0], per[first]) and torch.equal(v[t, :, :, 1], per[second])


def test_video_frame_sampling(demo):
    frames, fps = load_video([str(demo / "mllm_demo_data" / "3.mp4")], fps=2.0, max_frames=16)
    assert len(frames) == 4 and fps == pytest.approx(2.0)  # 2 s at 10 fps -> 2 frames per second
    frames, _ = load_video([str(demo / "mllm_demo_data" / "3.mp4")], fps=10.0, max_frames=6)
    assert len(frames) == 6
    frames, _ = load_video([str(demo / "mllm_demo_data" / f"{i}.jpg") for i in (1, 2, 3)], fps=2.0, max_frames=16)
    assert len(frames) == 4 and frames[3] is frames[2]  # padded to whole temporal patches


@pytest.mark.parametrize("fmt, sr", [("WAV", 16000), ("FLAC", 22050), ("OGG", 48000), ("MP3", 44100)])
def test_audio_formats_decode_and_resample(tmp_path, fmt, sr):
    p = tmp_path / f"tone.{fmt.lower()}"
    stereo = np.stack([_tone(sr, hz=440.0), _tone(sr, hz=440.0)], 1)
    sf.write(p, stereo, sr, format=fmt)
    x = load_audio(p, 16000)
    assert abs(len(x) - 16000) < 1200  # mp3 adds encoder padding
    spec = np.abs(np.fft.rfft(x[:16000] if len(x) >= 16000 else np.pad(x, (0, 16000 - len(x)))))
    assert abs(int(np.argmax(spec)) - 440) <= 2  # the tone survives decoding and resampling to 16 kHz
    assert 0.3 < np.abs(x).max() < 0.7


def test_system_conversations_with_media_lists_and_trl_parts(tmp_path, demo):
    img = str(demo / "mllm_demo_data" / "1.jpg")
    recs = [
        {"conversations": [{"from": "human", "value": "<image>What colour is the shape?"},
                           {"from": "gpt", "value": "red"}], "images": [img], "system": "Answer in one word."},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": [img]},
        {"messages": [{"role": "user",
                       "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": img}]},
                      {"role": "assistant", "content": "red"}]},
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    out = load_conversations(p)
    assert out[0]["messages"][0] == {"role": "system", "content": "Answer in one word."} and out[0]["images"] == [img]
    assert out[1]["messages"][0]["content"] == "<image>What colour?" and out[1]["messages"][1]["content"] == "red"
    assert out[2]["messages"][0]["content"] == "Look: <image>" and out[2]["images"] == [img]
    json.dumps(out)  # strings, lists and dicts only
    import datasets

    ds = datasets.Dataset.from_list(out)
    assert ds[0]["videos"] == [] and ds[2]["images"] == [img]
    model, proc = tiny_model_and_processor("qwen2_vl")
    coll = ChatCollator(proc, model.config)
    assert "Answer in one word." in coll._render(out[0]["messages"])
    b = coll(out)
    assert b["image_grid_thw"].shape[0] == 3
    assert int((b["mm_token_type_ids"] == 1).sum()) == int(b["image_grid_thw"].prod(-1).sum()) // 4


def test_unsupported_or_undecodable_media_is_one_line_naming_file_and_sample(tmp_path, demo):
    vid = str(demo / "mllm_demo_data" / "1.mp4")
    (tmp_path / "broken.mp3").write_bytes(b"ID3 this is not audio" * 10)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 10)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    turn = lambda q: [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]  # noqa: E731
    p = tmp_path / "d.json"
    p.write_text(json.dumps([
        {"id": "v1", "messages": turn("<video>What?"), "videos": [vid]},
        {"id": "a1", "messages": turn("<audio>What?"), "audios": ["broken.mp3"]},
        {"id": "v2", "messages": turn("<video>What?"), "videos": ["broken.mp4"]},
        {"id": "i1", "messages": turn("<image>What?"), "images": ["broken.jpg"]}]))
    recs = load_conversations(p)
    cases = [("llava", 0, r"sample id=v1: video .*1\.mp4: model type 'llava' takes no video"),
             ("qwen2_audio", 1, r"sample id=a1: cannot decode audio .*broken\.mp3"),
             ("qwen2_vl", 2, r"sample id=v2: cannot decode video .*broken\.mp4"),
             ("llava", 3, r"sample id=i1: cannot decode image .*broken\.jpg")]
    for fam, i, msg in cases:
        model, proc = tiny_model_and_processor(fam)
        with pytest.raises(ChatDataError, match=msg) as e:
            ChatCollator(proc, model.config)([recs[i]])
        assert "\n" not in str(e.value)
    with pytest.raises(ChatDataError, match=r"d2\.json: sample 0 \(id=s\): has a top-level 'system' and a system"):
        q = tmp_path / "d2.json"
        q.write_text(json.dumps([{"id": "s", "system": "a", "messages": [{"role": "system", "content": "b"}]
                                  + turn("<video>Q"), "videos": [vid]}]))
        load_conversations(q)
    with pytest.raises(ChatDataError, match=r"sample 0: 1 <video> placeholder\(s\) but 0 video\(s\) in 'videos'"):
        q.write_text(json.dumps([{"messages": turn("<video>Q")}]))
        load_conversations(q)
    with pytest.raises(ChatDataError, match=r"message 0 part 0 has type 'image_url'"):
        q.write_text(json.dumps([{"messages": [{"role": "user", "content": [{"type": "image_url"}]},
                                               {"role": "assistant", "content": "x"}]}]))
        load_conversations(q)
