"""Peers' benchmark files: VLMEvalKit TSVs (pandas-written, CSV quoting, base64 / index-reference images,
``image_path`` names) and lmms-eval parquet (datasets ``Image`` structs) for MME, POPE and MMStar; format
detection by columns; per-part / per-category / per-split scores; media kept inside the benchmark folder."""
from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

from mmbalance_llm.eval.benchmark_formats import FormatError, detect_format, load_benchmark  # noqa: E402
from mmbalance_llm.eval.reliance import evaluate_reliance, markdown_table  # noqa: E402


def _pic(colour, size=(16, 12)):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(im).rectangle((2, 2, 10, 9), fill=colour)
    return im


def _b64(im):
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


class FixedScorer:
    """Predicts a fixed option per item id in every condition (the metric maths is what is under test)."""

    accepts = ["image"]

    def __init__(self, preds):
        self.preds = preds

    def option_logprobs(self, items, keep, blank=()):
        return [[0.0 if o == self.preds[it.id] else -3.0 for o in it.options] for it in items]


# ------------------------------------------------------------------------------------------------- MME
def _mme_frame():
    same = _b64(_pic((200, 0, 0)))  # color/1.jpg and color/2.jpg are the same picture: image_path keeps them apart
    code = _b64(_pic((0, 0, 200)))
    rows = [  # VLMEvalKit's MME.tsv columns; a later question on an image holds the first one's index
        (1, same, 'Is the "box" red?\nPlease answer yes or no.', "Yes", "color", "color/1.jpg"),
        (2, "1", "Is the box green? Please answer yes or no.", "No", "color", "color/1.jpg"),
        (3, same, "Is the box red? Please answer yes or no.", "Yes", "color", "color/2.jpg"),
        (4, "3", "Is the box blue? Please answer yes or no.", "No", "color", "color/2.jpg"),
        (5, code, "Does the code print 3? Please answer yes or no.", "Yes", "code_reasoning", "code_reasoning/1.png"),
        (6, "5", "Does the code print 4? Please answer yes or no.", "No", "code_reasoning", "code_reasoning/1.png"),
    ]
    return pd.DataFrame(rows, columns=["index", "image", "question", "answer", "category", "image_path"])


MME_PREDS = {"1": "yes", "2": "no", "3": "yes", "4": "yes", "5": "yes", "6": "no"}  # one miss on color/2.jpg


@pytest.mark.parametrize("quoting", [csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
def test_vlmevalkit_mme_tsv_reads_and_scores_perception_and_cognition(tmp_path, quoting):
    p = tmp_path / "MME.tsv"
    _mme_frame().to_csv(p, sep="\t", index=False, quoting=quoting)  # how VLMEvalKit's dump writes a TSV
    assert detect_format(p) == "mme"
    fmt, items = load_benchmark(p, media_dir=tmp_path / "media")
    assert fmt == "mme" and len(items) == 6
    assert items[0].question == 'Is the "box" red?\nPlease answer yes or no.'  # quotes and line break intact
    assert items[1].images == items[0].images  # the index reference resolves to row 1's picture
    assert items[0].group != items[2].group  # same picture, different image_path: separate acc+ pairs
    assert items[4].source.endswith(":7")  # the quoted line break shifts later rows by one physical line
    ev = evaluate_reliance(FixedScorer(MME_PREDS), items, fmt, blank=False, drop=False)
    r = ev["results"]
    # color: acc 3/4, acc+ 1/2 -> 125; code_reasoning: 200 (VLMEvalKit MME_rating / lmms-eval mme_aggregate_results)
    assert r["mme_score/color,full"] == pytest.approx(125.0) and r["mme_score/code_reasoning,full"] == 200.0
    assert r["mme_perception,full"] == pytest.approx(125.0) and r["mme_cognition,full"] == pytest.approx(200.0)
    assert r["mme_total,full"] == pytest.approx(325.0)
    md = markdown_table("MME", r, ev["conditions"])
    assert "| perception | 125.0 |" in md and "| cognition | 200.0 |" in md and "| color | 125.0 |" in md


def test_tsv_errors_name_the_physical_line(tmp_path):
    df = _mme_frame()
    df.loc[3, "answer"] = "Maybe"
    p = tmp_path / "MME.tsv"
    df.to_csv(p, sep="\t", index=False)
    with pytest.raises(FormatError, match=rf"^{p}:6: field 'answer' must be Yes/No, got 'maybe'$"):
        load_benchmark(p, "mme", tmp_path / "m")
    df = _mme_frame()
    df.loc[1, "image"] = "99"  # names no row
    df.to_csv(p, sep="\t", index=False)
    with pytest.raises(FormatError, match=rf"^{p}:4: field 'image' is not valid base64 nor the index of a row"):
        load_benchmark(p, "mme", tmp_path / "m")
    p.write_text('index\timage\tquestion\tanswer\tcategory\n1\t"unterminated\tq\tYes\tcolor\n')
    with pytest.raises(FormatError, match=rf"^{p}:2: "):
        load_benchmark(p, "mme", tmp_path / "m")


# ------------------------------------------------------------------------------------------------- POPE
POPE_ROWS = [  # (index, answer, category, prediction)
    (1, "Yes", "adversarial", "yes"), (2, "No", "adversarial", "yes"), (3, "Yes", "popular,random", "no"),
    (4, "No", "popular,random", "no"), (5, "Yes", "random", "yes")]


def _check_pope(items, fmt):
    assert fmt == "pope" and len(items) == 5
    preds = {it.id: p for it, (_, _, _, p) in zip(items, POPE_ROWS)}
    r = evaluate_reliance(FixedScorer(preds), items, fmt, blank=False, drop=False)["results"]
    # every item once overall: TP 2, FP 1, FN 1, TN 1
    assert r["pope_acc,full"] == pytest.approx(0.6) and r["pope_f1,full"] == pytest.approx(2 / 3)
    assert r["pope_yes_ratio,full"] == pytest.approx(0.6)
    assert r["pope_precision/adversarial,full"] == 0.5 and r["pope_recall/adversarial,full"] == 1.0
    assert r["pope_f1/popular,full"] == 0.0 and r["pope_acc/popular,full"] == 0.5
    assert r["pope_acc/random,full"] == pytest.approx(2 / 3) and r["pope_f1/random,full"] == pytest.approx(2 / 3)
    return r


def test_vlmevalkit_pope_tsv_is_detected_as_pope_and_scored_per_split(tmp_path):
    pic = _b64(_pic((0, 120, 0)))
    df = pd.DataFrame([(i, pic if i == 1 else "1", f"Is there a cat {i}?", a, c) for i, a, c, _ in POPE_ROWS],
                      columns=["index", "image", "question", "answer", "category"])
    p = tmp_path / "POPE.tsv"
    df.to_csv(p, sep="\t", index=False)
    assert detect_format(p) == "pope"  # yes/no answers, categories are POPE's splits
    fmt, items = load_benchmark(p, media_dir=tmp_path / "m")
    assert items[2].meta["splits"] == ["popular", "random"]
    r = _check_pope(items, fmt)
    md = markdown_table("POPE", r, ["full"])
    assert "| POPE split F1 | full |" in md and "| random | 0.667 |" in md
    fmt, items = load_benchmark(p, "mme", tmp_path / "m")  # --format overrides the detection
    assert fmt == "mme" and items[0].category == "adversarial"


def test_vlmevalkit_mmstar_tsv_with_l2_category(tmp_path):
    pic = _b64(_pic((90, 90, 0)))
    rows = [(0, "Which mood?", "happy", "sad", "calm", "angry", "A", "coarse perception", "image emotion"),
            (1, "Which mood?", "happy", "sad", "calm", "angry", "B", "coarse perception", "image emotion"),
            (2, "Which mood?", "happy", "sad", "calm", "angry", "C", "coarse perception", "image emotion"),
            (3, "How many sides?", "3", "4", "5", "6", "B", "math", "geometry"),
            (4, "What is the mean?", "1", "2", "3", "4", "D", "math", "statistical reasoning")]
    df = pd.DataFrame([(i, pic if i == 0 else "0", q, a, b, c, d, ans, cat, l2, "MMStar")
                       for i, q, a, b, c, d, ans, cat, l2 in rows],
                      columns=["index", "image", "question", "A", "B", "C", "D", "answer", "category", "l2-category",
                               "bench"])
    df = df[["index", "question", "image", "answer", "category", "l2-category", "bench", "A", "B", "C", "D"]]
    p = tmp_path / "MMStar.tsv"
    df.to_csv(p, sep="\t", index=False)
    assert detect_format(p) == "mmstar"
    fmt, items = load_benchmark(p, media_dir=tmp_path / "m")
    assert fmt == "mmstar" and items[3].meta["l2_category"] == "geometry" and "B. 4" in items[3].question
    preds = {"0": "A", "1": "B", "2": "A", "3": "B", "4": "A"}
    ev = evaluate_reliance(FixedScorer(preds), items, fmt, blank=False, drop=False)
    r = ev["results"]
    assert r["acc,full"] == pytest.approx(0.6)  # VLMEvalKit's Overall: every item counts once
    assert r["mmstar_acc/coarse perception,full"] == pytest.approx(2 / 3) and r["mmstar_acc/math,full"] == 0.5
    assert r["mmstar_acc_l2/statistical reasoning,full"] == 0.0
    assert r["mmstar_macro_l2,full"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # lmms-eval's `average`
    md = markdown_table("MMStar", r, ev["conditions"])
    assert "| MMStar l2-category acc | full |" in md and "| geometry | 1.000 |" in md


# ------------------------------------------------------------------------------------------------- lmms-eval
def _parquet(path, cols: dict, shards=1):
    datasets = pytest.importorskip("datasets")
    feats = {k: datasets.Image() if k == "image" else datasets.Value("string") for k in cols}
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
    if shards == 1:
        ds.to_parquet(str(path))
        return path
    path.mkdir(parents=True)
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(str(path / f"test-{k:05d}-of-{shards:05d}.parquet"))
    return path


def test_lmms_eval_parquet_layouts(tmp_path):
    red, blue = _pic((200, 0, 0)), _pic((0, 0, 200))
    # lmms-lab MME: question_id is the image's name and pairs its two questions
    mme = _parquet(tmp_path / "mme", {
        "question_id": ["color/1.jpg", "color/1.jpg", "color/2.jpg", "color/2.jpg", "code_reasoning/1.png",
                        "code_reasoning/1.png"],
        "image": [red, red, red, red, blue, blue],
        "question": ["Is it red?", "Is it green?", "Is it red?", "Is it blue?", "Prints 3?", "Prints 4?"],
        "answer": ["Yes", "No", "Yes", "No", "Yes", "No"],
        "category": ["color"] * 4 + ["code_reasoning"] * 2}, shards=2)
    assert detect_format(mme) == "mme"
    fmt, items = load_benchmark(mme, media_dir=tmp_path / "m")
    assert fmt == "mme" and len(items) == 6 and items[0].group == "color/color/1.jpg"
    # ids repeat within a pair (question_id), so score by position
    preds = dict(zip(range(6), ["yes", "no", "yes", "yes", "yes", "no"]))
    for k, it in enumerate(items):
        it.id = str(k)
    r = evaluate_reliance(FixedScorer({str(k): v for k, v in preds.items()}), items, fmt, blank=False,
                          drop=False)["results"]
    assert r["mme_perception,full"] == pytest.approx(125.0) and r["mme_cognition,full"] == pytest.approx(200.0)

    # lmms-lab POPE
    pope = _parquet(tmp_path / "pope.parquet", {
        "id": [str(i) for i, *_ in POPE_ROWS], "question_id": [str(i) for i, *_ in POPE_ROWS],
        "question": [f"Is there a cat {i}?" for i, *_ in POPE_ROWS], "answer": [a.lower() for _, a, _, _ in POPE_ROWS],
        "image_source": ["COCO_val2014_000000001"] * 5, "image": [red] * 5,
        "category": [c for _, _, c, _ in POPE_ROWS]})
    assert detect_format(pope) == "pope"
    _check_pope(*reversed(load_benchmark(pope, media_dir=tmp_path / "m")))

    # Lin-Chen/MMStar: options inside the question, l2_category with an underscore, meta_info a struct
    mm = _parquet(tmp_path / "mmstar.parquet", {
        "index": ["0", "1"], "question": ["Which mood?\nOptions: A: happy, B: sad, C: calm, D: angry"] * 2,
        "image": [red, blue], "answer": ["A", "D"], "category": ["coarse perception"] * 2,
        "l2_category": ["image emotion"] * 2})
    fmt, items = load_benchmark(mm, media_dir=tmp_path / "m")
    assert fmt == "mmstar" and items[1].options == ["A", "B", "C", "D"] and items[1].answer == "D"
    assert items[0].meta["l2_category"] == "image emotion" and items[0].images != items[1].images


# ------------------------------------------------------------------------------------------------- media paths
def test_media_paths_stay_inside_the_benchmark_folder(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    _pic((1, 2, 3)).save(tmp_path / "outside.png")
    _pic((1, 2, 3)).save(bench / "inside.png")
    p = bench / "pope.jsonl"
    rec = {"question_id": 1, "text": "Is there a cat?", "label": "yes"}
    for bad in ("../outside.png", str(tmp_path / "outside.png")):
        p.write_text(json.dumps({**rec, "image": "inside.png"}) + "\n" + json.dumps({**rec, "image": bad}) + "\n")
        with pytest.raises(FormatError, match=rf"^{p}:2: image path .* is outside the benchmark folder .*"
                                              r"--allow-outside-media"):
            load_benchmark(p)
        _, items = load_benchmark(p, allow_outside_media=True)
        assert items[1].images[0].endswith("outside.png")
    a = bench / "avqa.json"
    a.write_text(json.dumps([{"question": "Which?", "options": ["x", "y"], "answer": "x", "audio": "../outside.png"}]))
    with pytest.raises(FormatError, match="audio path '../outside.png' is outside the benchmark folder"):
        load_benchmark(a)
    t = bench / "mme.tsv"
    pd.DataFrame([(0, "c", "../outside.png", "Is it?", "Yes")],
                 columns=["index", "category", "image_path", "question", "answer"]).to_csv(t, sep="\t", index=False)
    with pytest.raises(FormatError, match=rf"^{t}:2: image path '../outside.png' is outside"):
        load_benchmark(t)


# ------------------------------------------------------------------------------------------------- video items
def test_video_items_are_scored_through_qwen2_vl(tmp_path):
    torch = pytest.importorskip("torch")
    av = pytest.importorskip("av")
    from PIL import Image

    from mmbalance_llm.eval.reliance import MLLMScorer
    from mmbalance_llm.models.tiny import tiny_model_and_processor

    with av.open(str(tmp_path / "clip.mp4"), "w") as c:
        st = c.add_stream("mpeg4", rate=4)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            for pkt in st.encode(av.VideoFrame.from_image(Image.new("RGB", (32, 32), (60 * i, 0, 0)))):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    p = tmp_path / "avqa.json"
    p.write_text(json.dumps([{"id": "v", "question": "Is it getting brighter?", "options": ["yes", "no"],
                              "answer": "yes", "video": "clip.mp4"}]))
    fmt, items = load_benchmark(p)
    assert items[0].videos == [str(tmp_path / "clip.mp4")]
    torch.set_num_threads(1)
    model, proc = tiny_model_and_processor("qwen2_vl")
    ev = evaluate_reliance(MLLMScorer(model, proc, batch_size=4), items, fmt)
    assert ev["conditions"] == ["full", "blank_video", "drop_video", "no_media"] and not ev["ignored_media"]
    lp = {c: ev["samples"][0]["conditions"][c]["logprobs"] for c in ev["conditions"]}
    assert not np.allclose(lp["full"], lp["drop_video"])  # the video reached the model
    assert evaluate_reliance(FixedScorer({"v": "yes"}), items, fmt)["ignored_media"] == ["video"]  # LLaVA-like


def test_vlmevalkit_image_list_cell_gives_several_images(tmp_path):
    a, b = _b64(_pic((200, 0, 0))), _b64(_pic((0, 0, 200)))
    df = pd.DataFrame([(0, str([a, b]), "Which picture is red?", "first", "second", "A", "c", "l2")],
                      columns=["index", "image", "question", "A", "B", "answer", "category", "l2-category"])
    p = tmp_path / "multi.tsv"
    df.to_csv(p, sep="\t", index=False)
    _, items = load_benchmark(p, media_dir=tmp_path / "m")
    assert len(items[0].images) == 2 and items[0].images[0] != items[0].images[1]
