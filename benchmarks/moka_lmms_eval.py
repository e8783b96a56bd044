"""lmms-eval on a MokA adapter fine-tuned here: the synthetic image test split as an lmms-eval task, scored for the
base model (lmms-eval's own ``llava_hf``) and for base + adapter (the ``mmbalance_llava`` plugin).

    mmbalance train recipes/llava/moka_sft_tiny.yaml                    # writes runs/llava_moka_sft_tiny/best
    PYTHONPATH=$PWD python benchmarks/moka_lmms_eval.py runs/llava_moka_sft_tiny/best \
        runs/data/mm_instruct_image/test.json                          # needs lmms-eval (pip install -e .[lmms])

The task is written to a temporary ``--include_path`` folder: one parquet row per test item (``image``,
``question`` without its ``<image>`` placeholder, which lmms-eval's models add, ``answer``, ``needs``), greedy generation of 3 tokens, and
exact match of the reply's first word. Writes a markdown table to ``benchmarks/results/moka_lmms_eval.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    words = results[0].strip().split()
    first = words[0].strip(".,!").lower() if words else ""
    return {"exact_match": float(first == doc["answer"].lower())}
'''
YAML = """dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
task: mm_instruct_image
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 3, temperature: 0, do_sample: false}}
process_results: !function utils.process_results
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


def write_task(test_json: Path, out: Path) -> Path:
    from datasets import Dataset
    from datasets import Image as HFImage

    from mmbalance_llm.data.chat import load_conversations

    recs = load_conversations(test_json)
    rows = {"image": [r["images"][0] for r in recs],
            # lmms-eval's models put the image placeholder in themselves ("<image>\n" before the text)
            "question": [r["messages"][0]["content"].replace("<image>", "") for r in recs],
            "answer": [r["answer"] for r in recs], "needs": [r.get("needs", "") for r in recs]}
    out.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows).cast_column("image", HFImage()).to_parquet(out / "mm_instruct_image.parquet")
    (out / "mm_instruct_image.yaml").write_text(YAML.format(parquet=out / "mm_instruct_image.parquet"))
    (out / "utils.py").write_text(UTILS)
    return out


def lmms_eval(model: str, model_args: str, task_dir: Path, out: Path) -> float:
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "mmbalance_llm.integrations.lmms_plugin", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks",
           "mm_instruct_image", "--include_path", str(task_dir), "--batch_size", "1", "--output_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    results = sorted(out.glob("*/*_results.json"))
    if r.returncode or not results:
        raise SystemExit(f"lmms_eval failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(results[-1].read_text())["results"]["mm_instruct_image"]["exact_match,none"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", help="an adapter folder saved by `mmbalance train` (e.g. RUN/best)")
    ap.add_argument("test_json", help="the synthetic test split (records with messages + images)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moka_lmms_eval.md"))
    a = ap.parse_args(argv)
    base = json.loads((Path(a.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    work = Path(tempfile.mkdtemp(prefix="moka_lmms_"))
    task = write_task(Path(a.test_json), work / "task")
    common = "device=cpu,dtype=float32"
    rows = [("base (lmms-eval `llava_hf`)", lmms_eval("llava_hf", f"pretrained={base},{common},device_map=cpu",
                                                      task, work / "base")),
            ("base + MokA adapter (`mmbalance_llava`)", lmms_eval("mmbalance_llava", f"pretrained={a.adapter},{common}",
                                                                 task, work / "moka"))]
    n = len(json.loads(Path(a.test_json).read_text()))
    text = (f"lmms-eval, greedy first-word exact match on the synthetic image test split ({n} items), tiny LLaVA "
            f"(`python benchmarks/moka_lmms_eval.py`).\n\n| model | exact match |\n|---|---|\n"
            + "".join(f"| {m} | {v:.3f} |\n" for m, v in rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
