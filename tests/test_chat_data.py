"""Chat data: LLaVA JSON / sharegpt loading, one-line errors naming the sample, processor-consistent collation."""
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from mmbalance_llm.data.chat import IGNORE_INDEX, ChatCollator, ChatDataError, load_conversations  # noqa: E402
from mmbalance_llm.data.mm_synthetic import (  # noqa: E402
    generate_items, read_wav, write_instruction_set)
from mmbalance_llm.models.tiny import tiny_model_and_processor  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    write_instruction_set(root / "img", ("image",), 6, 2, 2, seed=5)
    write_instruction_set(root / "llava", ("image",), 4, 1, 1, seed=5, fmt="llava")
    write_instruction_set(root / "aud", ("audio",), 4, 1, 1, seed=6)
    return root


@pytest.fixture(scope="module")
def llava():
    return tiny_model_and_processor("llava")


def _write(path, recs):
    path.write_text(json.dumps(recs))
    return path


def test_llava_json_and_sharegpt_normalise_alike(data):
    recs = load_conversations(data / "llava" / "train.json")
    r = recs[0]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    assert len(r["images"]) == 1 and os.path.isabs(r["images"][0]) and r["audios"] == []
    assert r["messages"][0]["content"].startswith("<image>")
    s = load_conversations(data / "img" / "train.json")[0]
    assert set(s) >= {"id", "messages", "images", "audios", "answer", "options", "needs"}


@pytest.mark.parametrize("bad, msg", [
    ({"id": "a1", "messages": [{"role": "user", "content": "<image><image>Q?"}, {"role": "assistant", "content": "x"}],
      "images": ["img.png"]}, r"bad\.json: sample 0 \(id=a1\): 2 <image> placeholder\(s\) but 1 image\(s\)"),
    ({"id": "a2", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "x"}],
      "audios": ["t.wav"]}, r"sample 0 \(id=a2\): 0 <audio> placeholder\(s\) but 1 audio"),
    ({"id": "a3", "messages": [{"role": "robot", "content": "Q?"}]}, r"id=a3\): message 0 has role 'robot'"),
    ({"id": "a4", "messages": [{"role": "user", "content": "Q?"}]}, r"id=a4\): turns must alternate"),
    ({"id": "a5", "messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "x"}],
      "images": ["missing.png"]}, r"id=a5\): media file not found: .*missing\.png"),
    ({"id": "a6", "text": "hi"}, r"id=a6\): needs 'messages' \(sharegpt\) or 'conversations'"),
])
def test_bad_samples_give_one_line_errors_naming_file_and_sample(tmp_path, data, bad, msg):
    (tmp_path / "img.png").write_bytes((data / "img" / "images" / "train_00000.png").read_bytes())
    p = _write(tmp_path / "bad.json", [bad])
    with pytest.raises(ChatDataError, match=msg) as e:
        load_conversations(p)
    assert "\n" not in str(e.value)


def test_labels_only_on_assistant_tokens(data, llava):
    model, proc = llava
    recs = load_conversations(data / "img" / "train.json")
    b = ChatCollator(proc, model.config)(recs[:3])
    tok = proc.tokenizer
    for i, r in enumerate(recs[:3]):
        sup = b["labels"][i][b["labels"][i] != IGNORE_INDEX]
        assert tok.decode(sup).strip() == r["answer"] + "</s>"
    assert (b["labels"][b["input_ids"] == model.config.image_token_id] == IGNORE_INDEX).all()
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_multi_turn_labels_cover_every_assistant_turn(tmp_path, data, llava):
    model, proc = llava
    img = str(data / "img" / "images" / "train_00000.png")
    rec = {"id": "mt", "messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                                    {"role": "assistant", "content": "red"},
                                    {"role": "user", "content": "Which shape is in the image?"},
                                    {"role": "assistant", "content": "circle"}], "images": [img]}
    recs = load_conversations(_write(tmp_path / "mt.json", [rec]))
    b = ChatCollator(proc, model.config)(recs)
    sup = b["labels"][0][b["labels"][0] != IGNORE_INDEX]
    assert proc.tokenizer.decode(sup).replace(" ", "") == "red</s>circle</s>"


def test_llava_ids_match_the_hf_processor(data, llava):
    model, proc = llava
    rec = load_conversations(data / "img" / "train.json")[0]
    coll = ChatCollator(proc, model.config)
    enc = coll.encode(rec)
    from PIL import Image

    text = coll._render(rec["messages"])
    ref = proc(text=[text], images=[Image.open(rec["images"][0]).convert("RGB")], return_tensors="pt")
    assert enc["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert torch.allclose(coll([rec])["pixel_values"], ref["pixel_values"])


def test_qwen2_audio_ids_match_the_hf_processor(data):
    model, proc = tiny_model_and_processor("qwen2_audio")
    rec = load_conversations(data / "aud" / "train.json")[0]
    coll = ChatCollator(proc, model.config)
    enc = coll.encode(rec)
    wav, sr = read_wav(rec["audios"][0])
    ref = proc(text=[coll._render(rec["messages"])], audio=[wav], sampling_rate=sr, return_tensors="pt")
    assert enc["input_ids"].tolist() == ref["input_ids"][0].tolist()
    out = model(**coll([rec]))
    assert torch.isfinite(out.loss)


def test_truncation_never_cuts_media(data, llava):
    model, proc = llava
    rec = load_conversations(data / "img" / "train.json")[0]
    n = len(ChatCollator(proc, model.config).encode(rec)["input_ids"])
    with pytest.raises(ChatDataError, match=r"id=train_00000: truncation to max_length=10 would cut media tokens"):
        ChatCollator(proc, model.config, max_length=10).encode(rec)
    with pytest.raises(ChatDataError, match="removes every answer token"):
        ChatCollator(proc, model.config, max_length=n - 3).encode(rec)
    enc = ChatCollator(proc, model.config, max_length=n - 1).encode(rec)  # cuts only the final </s>
    assert len(enc["input_ids"]) == n - 1 and (enc["labels"] != IGNORE_INDEX).any()


def test_generated_items_have_known_answers(tmp_path):
    items = generate_items(40, tmp_path, ("image", "audio"), seed=0)
    for it in items:
        assert it.answer in it.options and it.image and it.audio
        if it.kind == "colour":
            assert it.answer == it.attributes["colour"]
        if it.kind == "sum":
            assert it.answer == ["zero", "one", "two", "three", "four", "five", "six"][sum(it.attributes.values())]
    assert {it.needs for it in items} == {"image", "audio", "text"}
    from PIL import Image

    it = next(i for i in items if i.kind == "colour")
    px = Image.open(tmp_path / it.image).convert("RGB")
    assert px.size == (32, 32)
    wav, sr = read_wav(tmp_path / items[0].audio)
    assert sr == 16000 and len(wav) == 16000 and abs(wav).max() > 0.3
