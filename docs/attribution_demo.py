"""Reproduce the attribution / reliance figures of docs/attribution.md on a CPU (a few minutes).

    PYTHONPATH=. python docs/attribution_demo.py [--work /tmp/mmbalance-demo] [--assets docs/assets/attribution]

1. Fine-tunes the tiny LLaVA twin on the synthetic image instruction set three ways (full fine-tuning,
   LoRA, MokA; ``recipes/llava/moka_sft_tiny.yaml`` with overrides).
2. Writes the diagnostic benchmark (``mmbalance_llm.data.diagnostic``) and runs ``mmbalance reliance`` on its
   AVQA-style file for each model, the untrained twin serving as the base LLM (MMStar's S_t).
3. Runs ``mmbalance attribute`` on image questions and on text questions of the held-out split.
4. Copies the tables and PNGs to ``--assets``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/mmbalance-attribution-demo")
    p.add_argument("--assets", default=str(ROOT / "docs" / "assets" / "attribution"))
    a = p.parse_args(argv)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        os.environ.setdefault(k, "1")
    import torch

    torch.set_num_threads(1)
    from mmbalance_llm.attribution.cli import attribute_main
    from mmbalance_llm.data.diagnostic import write_diagnostic
    from mmbalance_llm.eval.reliance_cli import reliance_main
    from mmbalance_llm.models.tiny import build_tiny
    from mmbalance_llm.cli import main as cli_main

    work, assets = Path(a.work), Path(a.assets)
    assets.mkdir(parents=True, exist_ok=True)
    base = work / "tiny_llava"
    if not base.is_dir():
        build_tiny("llava", base)
    data = work / "mm_instruct_image"
    runs = {"full": ["adapter=none", "model.freeze.language_model=false", "model.freeze.projector=false",
                     "model.freeze.tower=false", "train.lr=2e-3"],
            "lora": ["adapter=lora"], "moka": ["adapter=moka"]}
    common = [f"model.name_or_path={base}", f"data.train={data}/train.json", f"data.validation={data}/validation.json",
              f"data.test={data}/test.json"]
    models = {}
    for name, extra in runs.items():
        out = work / f"sft_{name}"
        if not (out / "final_metrics.json").is_file():
            assert cli_main(["train", str(ROOT / "recipes/llava/moka_sft_tiny.yaml"), *common, *extra,
                             f"output_dir={out}"]) == 0
        best = out / "best"
        models[name] = best
    diag = write_diagnostic(work / "diagnostic", n=240, seed=1)
    tables = []
    for name, path in models.items():
        out = work / f"reliance_{name}"
        assert reliance_main(["--model", str(path), "--benchmark", diag["avqa"], "--out", str(out),
                              "--base-llm", str(base), "--task", f"diagnostic ({name} fine-tune)"]) == 0
        tables.append((out / "results.md").read_text())
    (assets / "reliance_diagnostic.md").write_text("\n".join(tables))
    test = json.loads((data / "test.json").read_text())
    for needs in ("image", "text"):
        sub = work / f"test_{needs}.json"
        sub.write_text(json.dumps([r for r in test if r["needs"] == needs][:12]))
        if not (work / "images").exists():
            os.symlink(data / "images", work / "images")
        out = work / f"attribution_{needs}"
        assert attribute_main(["--model", str(models["full"]), "--data", str(sub), "--out", str(out), "--limit", "12",
                               "--n-groups", "4", "--n-permutations", "16"]) == 0
        doc = json.loads((out / "attribution.json").read_text())
        (assets / f"attribution_{needs}_questions.json").write_text(json.dumps(
            {m: d["mean_share"] for m, d in doc["methods"].items()}, indent=1))
        for png in ("modality_shares.png", "token_heatmap.png", "attention_layers.png"):
            shutil.copy(out / png, assets / f"{needs}_{png}")
    shutil.copy(work / "attribution_image" / "report.html", assets / "report_image_questions.html")
    print(f"assets in {assets}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
