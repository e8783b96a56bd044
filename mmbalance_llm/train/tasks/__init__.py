"""Tasks the one training loop drives: `classify` (multimodal classifiers) and `sft` (multimodal LLMs)."""
from __future__ import annotations


def make_task(recipe):
    if recipe.task == "classify":
        from mmbalance_llm.train.tasks.classify import ClassifyTask

        return ClassifyTask(recipe)
    if recipe.task == "sft":
        from mmbalance_llm.train.tasks.sft import SFTTask

        return SFTTask(recipe)
    raise ValueError(f"unknown task {recipe.task!r}")
