"""The model card written into `best/README.md`: task, data, method, the best checkpoint and its metrics,
and how to load it. An existing card (peft writes one for adapters) keeps its text and gets this section."""
from __future__ import annotations

import json
import os

MARK = "<!-- mmbalance_llm run -->"


def _scalars(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def card_text(recipe, final: dict) -> str:
    r = recipe
    data = r.data.path if r.task == "classify" else r.data.train
    lines = [MARK, "## Trained with mmbalance_llm", "",
             f"- task: `{r.task}`" + (f", adapter `{r.adapter}` on `{r.model.name_or_path}`" if r.task == "sft" else ""),
             f"- data: `{data}`",
             f"- balancing method: `{final.get('method')}` {json.dumps({k: v for k, v in r.balance.items() if k != 'method'})}",
             f"- best checkpoint: step {final.get('best_step')}, epoch {final.get('best_epoch')}, chosen on validation "
             f"`{final.get('metric_for_best')}`; {final.get('world_size')} process(es), {final.get('distributed_type')}",
             "", "| split | " + " | ".join(sorted(_scalars(final.get("validation")))) + " |",
             "|---|" + "---|" * len(_scalars(final.get("validation")))]
    for split in ("validation", "test"):
        vals = _scalars(final.get(split))
        if vals:
            lines.append(f"| {split} | " + " | ".join(f"{vals[k]:.4f}" if isinstance(vals[k], float) else str(vals[k])
                                                      for k in sorted(_scalars(final.get("validation")))
                                                      if k in vals) + " |")
    how = ("`MultimodalClassifier.from_pretrained(path)` (or `AutoModel` after "
           "`mmbalance_llm.models.register_all()`)" if r.task == "classify" else
           "`PeftModel.from_pretrained(base, path)` after `import mmbalance_llm`" if r.adapter != "none" else
           "the model class's `from_pretrained(path)`")
    lines += ["", f"Load it with {how}; the resolved recipe is `../config.yaml`.", ""]
    return "\n".join(lines)


def write_model_card(best_dir: str, recipe, final: dict) -> None:
    if not os.path.isdir(best_dir):
        return
    path = os.path.join(best_dir, "README.md")
    text = card_text(recipe, final)
    old = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            old = fh.read().split(MARK)[0].rstrip()
    from mmbalance_llm.train.io import write_text_atomic

    write_text_atomic(path, (old + "\n\n" if old else "") + text)
