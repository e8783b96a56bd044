"""lmms-eval plugin: ``--model mmbalance_llava`` evaluates a LLaVA base with an adapter trained here (MokA or LoRA).

MokA cannot be merged into the base weights, so there is no full model to export: the plugin loads lmms-eval's own
``llava_hf`` model on the base and adds the adapter with transformers' ``load_adapter`` (the model stays a
``LlavaForConditionalGeneration``; MokA's masks come from its forward hook, generated tokens are text). Register it
with lmms-eval either way::

    pip install -e .[lmms]            # entry point 'lmms_eval.models' -> mmbalance_llava
    LMMS_EVAL_PLUGINS=mmbalance_llm.integrations.lmms_plugin python -m lmms_eval ...   # lmms-eval's legacy route

    python -m lmms_eval --model mmbalance_llava \
        --model_args pretrained=runs/llava_moka/best,device=cpu,dtype=float32 --tasks mme

``pretrained`` is the adapter folder (its ``adapter_config.json`` names the base) or the base, with
``adapter=FOLDER``; ``base=PATH`` overrides the base recorded in the adapter (a run made on another machine).
"""
from __future__ import annotations

MODEL_ID = "mmbalance_llava"
CLASS_PATH = "mmbalance_llm.integrations.lmms_plugin.models.mmbalance_llava.MmbalanceLlava"


def manifest():
    """Entry-point payload for lmms-eval's model registry (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
