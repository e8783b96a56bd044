"""lmms-eval evaluates a MokA adapter trained here (plugin ``mmbalance_llava``), offline on a tiny LLaVA and a
local file in lmms-eval's MME layout (question_id / image / question / answer / category, two questions per image)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("lmms_eval")

import mmbalance_llm  # noqa: E402,F401
from mmbalance_llm import MokaConfig  # noqa: E402
from mmbalance_llm.adapters.moka import MokaLinear  # noqa: E402
from mmbalance_llm.models.tiny import build_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_YAML = """dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
task: mme_tiny
test_split: test
output_type: generate_until
doc_to_visual: !function utils.mme_doc_to_visual
doc_to_text: !function utils.mme_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 4, temperature: 0, do_sample: false}}
process_results: !function utils.mme_process_results
metric_list:
  - {{metric: mme_perception_score, aggregation: !function utils.mme_aggregate_results, higher_is_better: true}}
  - {{metric: mme_cognition_score, aggregation: !function utils.mme_aggregate_results, higher_is_better: true}}
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "\\nAnswer the question using a single word or phrase."}}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from datasets import Dataset
    from datasets import Image as HFImage
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("lmms")
    base_dir = build_tiny("llava", root / "base")
    torch.manual_seed(0)
    pm = peft.get_peft_model(LlavaForConditionalGeneration.from_pretrained(base_dir), MokaConfig(init_lora_weights=False))
    pm.save_pretrained(root / "adapter")
    rows = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for pair, (colour, other, cat) in enumerate([("red", "blue", "color"), ("green", "red", "commonsense_reasoning")]):
        for asked, ans in ((colour, "Yes"), (other, "No")):
            rows["question_id"].append(f"{cat}/{pair}.png")
            rows["image"].append(Image.new("RGB", (32, 32), colour))
            rows["question"].append(f"Is the square {asked}? Please answer yes or no.")
            rows["answer"].append(ans)
            rows["category"].append(cat)
    task = root / "task"
    task.mkdir()
    Dataset.from_dict(rows).cast_column("image", HFImage()).to_parquet(task / "mme_tiny.parquet")
    (task / "mme_tiny.yaml").write_text(TASK_YAML.format(parquet=task / "mme_tiny.parquet"))
    (task / "utils.py").write_text("from lmms_eval.tasks.mme.utils import *  # noqa: F401,F403\n")
    return {"root": root, "base_dir": base_dir, "adapter": root / "adapter", "task": task}


def test_plugin_model_is_the_peft_model(env):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmbalance_llm.integrations.lmms_plugin.models.mmbalance_llava import MmbalanceLlava

    lm = MmbalanceLlava(pretrained=str(env["adapter"]), device="cpu", dtype="float32")
    assert sum(isinstance(m, MokaLinear) for m in lm._model.modules()) == 14
    proc = AutoProcessor.from_pretrained(env["base_dir"])
    from PIL import Image

    batch = proc(images=[Image.new("RGB", (32, 32), "red")], text=["USER: <image>\nIs it red? ASSISTANT:"],
                 return_tensors="pt")
    ref = peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(env["base_dir"]),
                                         env["adapter"]).eval()
    with torch.no_grad():
        assert torch.equal(lm._model(**batch).logits, ref(**batch).logits)


def test_resolve_refuses_in_one_line(env, tmp_path):
    from mmbalance_llm.integrations.lmms_plugin.models.mmbalance_llava import resolve_base_and_adapter

    assert resolve_base_and_adapter(str(env["adapter"])) == (str(env["base_dir"]), str(env["adapter"]))
    assert resolve_base_and_adapter(str(env["adapter"]), base="/x")[0] == "/x"
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        resolve_base_and_adapter(str(env["base_dir"]), adapter=str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "MOKA"}))
    with pytest.raises(ValueError, match="no base_model_name_or_path; pass base=PATH"):
        resolve_base_and_adapter(str(tmp_path))


@pytest.mark.slow
def test_lmms_eval_cli_scores_an_adapter_offline(env):
    out = env["root"] / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmbalance_llava",
           "--model_args", f"pretrained={env['adapter']},device=cpu,dtype=float32", "--tasks", "mme_tiny",
           "--include_path", str(env["task"]), "--batch_size", "1", "--output_path", str(out), "--log_samples"]
    run_env = {**os.environ, "LMMS_EVAL_PLUGINS": "mmbalance_llm.integrations.lmms_plugin", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=600)
    results = list(out.glob("*/*_results.json"))
    assert r.returncode == 0 and results, (r.stdout + r.stderr)[-3000:]
    scores = json.loads(results[0].read_text())["results"]["mme_tiny"]
    assert {"mme_perception_score,none", "mme_cognition_score,none"} <= set(scores)
    samples = [json.loads(line) for f in out.glob("*/*_samples_mme_tiny.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == 4
