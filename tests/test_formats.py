"""Benchmark file loaders: the diagnostic files in every format, and malformed rows rejected with file:line."""
from __future__ import annotations

import base64
import io
import json

import pytest

from mmbalance_llm.eval.benchmark_formats import FormatError, detect_format, load_benchmark


@pytest.fixture(scope="module")
def diag(tmp_path_factory):
    from mmbalance_llm.data.diagnostic import write_diagnostic

    out = tmp_path_factory.mktemp("diag")
    return out, write_diagnostic(out, n=24, seed=0)


def _png_b64():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_diagnostic_files_load_in_every_format(diag, tmp_path):
    _, paths = diag
    truth = json.loads(open(paths["truth"]).read())["needs"]
    fmt, avqa = load_benchmark(paths["avqa"], media_dir=None)
    assert fmt == "avqa" and len(avqa) == 24
    assert {it.meta["needs"] for it in avqa} == {"image", "audio", "text", "image+text", "audio+text", "image+audio"}
    assert all(it.answer in it.options and it.images and it.audios for it in avqa)
    assert all(truth[it.id] == it.meta["needs"] for it in avqa)
    fmt, mmstar = load_benchmark(paths["mmstar"], media_dir=tmp_path / "media")
    assert fmt == "mmstar" and all(it.answer in it.options and it.options[0] == "A" for it in mmstar)
    assert all("audio" not in it.meta["needs"] for it in mmstar)
    assert "Options:" in mmstar[0].question and (tmp_path / "media").is_dir()
    fmt, pope = load_benchmark(paths["pope"])
    assert fmt == "pope" and {it.answer for it in pope} <= {"yes", "no"}
    fmt, mme = load_benchmark(paths["mme"])
    assert fmt == "mme" and len(mme) % 2 == 0
    groups = {}
    for it in mme:
        groups.setdefault(it.group, []).append(it.answer)
    assert all(sorted(v) == ["no", "yes"] for v in groups.values())  # one yes and one no per image (acc+)


def test_detect_format(diag, tmp_path):
    _, paths = diag
    assert [detect_format(paths[k]) for k in ("mmstar", "pope", "mme", "avqa")] == ["mmstar", "pope", "mme", "avqa"]
    with pytest.raises(FormatError, match="cannot tell"):
        detect_format(tmp_path / "x.csv")


def _tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    return path


def test_mmstar_rejects_bad_rows_with_file_and_line(tmp_path):
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "image"]
    good = ["0", "What?", "x", "y", "z", "w", "B", "c", _png_b64()]
    p = _tsv(tmp_path / "mm.tsv", header, [good, ["1", "What?", "x", "y", "", "", "C", "c", _png_b64()]])
    with pytest.raises(FormatError, match=rf"^{p}:3: field 'answer' is 'C' but the options are A, B$"):
        load_benchmark(p, "mmstar", tmp_path / "m")
    p = _tsv(tmp_path / "mm2.tsv", header, [good, good[:-1] + ["%%%notbase64"]])
    with pytest.raises(FormatError, match=rf"^{p}:3: field 'image' is not valid base64"):
        load_benchmark(p, "mmstar", tmp_path / "m")
    p = _tsv(tmp_path / "mm3.tsv", header, [good, good[:4]])
    with pytest.raises(FormatError, match=rf"^{p}:3: 4 columns but the header has 9"):
        load_benchmark(p, "mmstar", tmp_path / "m")
    p = _tsv(tmp_path / "mm4.tsv", ["index", "question", "answer"], [["0", "q", "A"]])
    with pytest.raises(FormatError, match=rf"^{p}:1: header has no column 'image'"):
        load_benchmark(p, "mmstar", tmp_path / "m")
    p = _tsv(tmp_path / "mm5.tsv", header, [good[:-1] + [base64.b64encode(b"not an image").decode()]])
    with pytest.raises(FormatError, match=rf"^{p}:2: field 'image' decodes to bytes that are not an image"):
        load_benchmark(p, "mmstar", tmp_path / "m")


def test_pope_rejects_bad_rows_with_file_and_line(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ok = {"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"}
    p = tmp_path / "pope.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [ok, ok, {**ok, "label": "maybe"}]) + "\n")
    with pytest.raises(FormatError, match=rf"^{p}:3: field 'label' must be yes/no, got 'maybe'"):
        load_benchmark(p, "pope")
    p.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "image": "missing.png"}) + "\n")
    with pytest.raises(FormatError, match=rf"^{p}:2: image file not found"):
        load_benchmark(p, "pope")
    p.write_text(json.dumps(ok) + "\n{broken\n")
    with pytest.raises(FormatError, match=rf"^{p}:2: not valid JSON"):
        load_benchmark(p, "pope")
    p.write_text(json.dumps({k: v for k, v in ok.items() if k != "text"}) + "\n")
    with pytest.raises(FormatError, match=rf"^{p}:1: missing field 'text'"):
        load_benchmark(p, "pope")


def test_mme_folder_and_tsv(tmp_path):
    from PIL import Image

    cat = tmp_path / "mme" / "color"
    (cat / "images").mkdir(parents=True)
    (cat / "questions_answers_YN").mkdir()
    Image.new("RGB", (8, 8)).save(cat / "images" / "1.png")
    qa = cat / "questions_answers_YN" / "1.txt"
    qa.write_text("Is it red?\tYes\nIs it blue?\tNo\n")
    fmt, items = load_benchmark(tmp_path / "mme")
    assert fmt == "mme" and [it.answer for it in items] == ["yes", "no"] and items[0].group == items[1].group
    qa.write_text("Is it red?\tYes\nIs it blue? No\n")
    with pytest.raises(FormatError, match=rf"^{qa}:2: expected 'question<TAB>answer', got 1 field"):
        load_benchmark(tmp_path / "mme")
    p = _tsv(tmp_path / "mme.tsv", ["index", "category", "image", "question", "answer"],
             [["0", "c", _png_b64(), "Is it green?", "Yes"], ["1", "c", _png_b64(), "Is it red?", "Perhaps"]])
    with pytest.raises(FormatError, match=rf"^{p}:3: field 'answer' must be Yes/No, got 'perhaps'"):
        load_benchmark(p, "mme", tmp_path / "m")


def test_avqa_json_list_reports_the_line_of_the_bad_record(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    recs = [{"id": "a", "question": "Which?", "options": ["x", "y"], "answer": "x", "image": "a.png"},
            {"id": "b", "question": "Which?", "options": ["x", "y"], "answer": 1},
            {"id": "c", "question": "Which?", "options": ["x", "y"], "answer": "z"}]
    p = tmp_path / "avqa.json"
    p.write_text(json.dumps(recs, indent=1))
    third = [i for i, t in enumerate(p.read_text().splitlines(), start=1) if t == " {"][2]  # record 3 starts here
    with pytest.raises(FormatError, match=rf"^{p}:{third}: field 'answer' is 'z', not one of the options"):
        load_benchmark(p)
    p.write_text(json.dumps(recs[:2]))
    _, items = load_benchmark(p)
    assert items[1].answer == "y" and items[0].images and not items[1].images
    p.write_text(json.dumps([{**recs[0], "options": ["x"]}]))
    with pytest.raises(FormatError, match=rf"^{p}:1: field 'options' must be a list of at least 2"):
        load_benchmark(p)


def test_missing_benchmark_file_is_named(tmp_path):
    with pytest.raises(FormatError, match=r"nope\.tsv:0: benchmark file not found"):
        load_benchmark(tmp_path / "nope.tsv")
