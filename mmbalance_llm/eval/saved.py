"""Evaluate a saved `MultimodalClassifier` (for example `RUN/best`) on one split of a dataset."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mmbalance_llm.data.features import DataError, FeatureDataset, collate, column_tensor, label_tensor, load_splits
from mmbalance_llm.eval.evaluator import evaluate


def evaluate_saved(model_dir: str, data_path: str, split: str = "test", batch_size: int = 256,
                   label_column: str = "label") -> dict:
    from accelerate import Accelerator

    from mmbalance_llm.models.classifier import MultimodalClassifier

    model = MultimodalClassifier.from_pretrained(model_dir)
    raw = load_splits(data_path, [split])
    if split not in raw:
        raise DataError(f"data '{data_path}' has no split '{split}'")
    ds = raw[split]
    tensors = {m: column_tensor(ds, split, m) for m in model.modalities}
    for m, t in tensors.items():
        if list(t.shape[1:]) != list(model.config.input_shapes[m]):
            raise DataError(f"split '{split}', column '{m}': rows have shape {list(t.shape[1:])}, "
                            f"the model expects {model.config.input_shapes[m]}")
    labels = label_tensor(ds, split, label_column, model.config.num_classes)
    loader = DataLoader(FeatureDataset(tensors, labels, split), batch_size=batch_size, collate_fn=collate)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model, loader = acc.prepare(model, loader)
    # A split head gives unimodal accuracy directly; other fusions would need training data for a probe.
    mode = "split" if acc.unwrap_model(model).has_unimodal_logits else "auto"
    if mode != "split":
        raise DataError(f"model '{model_dir}' has fusion '{model.config.fusion}' without split logits; "
                        f"its unimodal accuracy needs a linear probe on training data (see final_metrics.json)")
    return evaluate(acc.unwrap_model(model), loader, acc, list(model.config.modalities) if hasattr(model, "config")
                    else acc.unwrap_model(model).modalities, model.config.num_classes, unimodal=mode)
