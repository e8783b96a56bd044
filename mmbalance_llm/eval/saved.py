"""Evaluate a saved model of any registered architecture (for example `RUN/best`) on one split of a dataset."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from mmbalance_llm.data.features import DataError, FeatureDataset, collate, column_tensor, label_tensor, load_splits
from mmbalance_llm.eval.evaluator import evaluate


def evaluate_saved(model_dir: str, data_path: str, split: str = "test", batch_size: int = 256,
                   label_column: str = "label") -> dict:
    from accelerate import Accelerator

    from transformers import AutoModel

    from mmbalance_llm.models.registry import available_architectures

    available_architectures()  # imports every architecture module, which registers it with AutoModel
    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise DataError(f"model folder '{model_dir}' not found (a saved run's best/ with config.json)")
    try:
        model = AutoModel.from_pretrained(model_dir)
    except Exception as exc:  # a corrupt or truncated weights file: say which folder, in one line
        if type(exc).__name__ != "SafetensorError":
            raise
        raise DataError(f"'{model_dir}/model.safetensors' is corrupt or truncated ({exc})") from None
    raw = load_splits(data_path, [split])
    if split not in raw:
        raise DataError(f"data '{data_path}' has no split '{split}'")
    ds = raw[split]
    from mmbalance_llm.data.media_columns import build_media_dataset, media_specs, saved_run_data_config

    data_cfg = saved_run_data_config(model_dir, data_path)  # raw media: the run's preprocessing
    specs = media_specs(data_cfg, list(model.modalities))
    labels = label_tensor(ds, split, label_column, model.config.num_classes)
    if specs:
        dataset = build_media_dataset(data_cfg, ds, split, list(model.modalities), specs, labels, train=False)
        shapes = dataset.input_shapes()
    else:
        dataset = FeatureDataset({m: column_tensor(ds, split, m) for m in model.modalities}, labels, split)
        shapes = dataset.input_shapes()
    for m, shape in shapes.items():
        if list(shape) != list(model.config.input_shapes[m]):
            raise DataError(f"split '{split}', column '{m}': rows have shape {list(shape)}, "
                            f"the model expects {model.config.input_shapes[m]}")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    if not model.has_unimodal_logits:
        raise DataError(f"model '{model_dir}' has fusion '{model.config.fusion}' without split logits; its unimodal "
                        f"accuracy needs a linear probe on training data (see the run's final_metrics.json)")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    loader = acc.prepare(loader)
    model = model.to(acc.device)
    return evaluate(model, loader, acc, list(model.modalities), model.config.num_classes, unimodal="split")
