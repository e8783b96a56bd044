"""The evaluation pass: fused accuracy and macro-F1, unimodal accuracy (split head or linear probe),
exact modality Shapley values and the imbalance score.

Absent modalities are replaced by zero inputs (the project's choice: v(S) is the accuracy with
the inputs of modalities outside S set to zero; v(empty) is measured). Every process evaluates its
shard of the data and the predictions are gathered, so all ranks return the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbalance_llm.eval.metrics import accuracy, accuracy_ratio, imbalance, macro_f1, shapley_values, subsets
from mmbalance_llm.eval.probe import accuracy_imbalance, probe_metrics
from mmbalance_llm.eval.subset_pass import SubsetPredictor


class recording:
    """Model diagnostics hook: a model that defines `reset_diagnostics()`, `diagnostic_sums()` (a dict of
    sum tensors) and `summarize_diagnostics(sums) -> dict` and has a `recording_diagnostics` flag
    accumulates statistics (e.g. attention shares) during the forward passes made inside this context.
    Sums are reduced over processes, so every rank sees the same summary. Other models: a no-op."""

    def __init__(self, model, accelerator, enabled: bool = True):
        self.core = accelerator.unwrap_model(model)
        self.accelerator = accelerator
        self.enabled = enabled and hasattr(self.core, "diagnostic_sums")
        if self.enabled:
            self.core.reset_diagnostics()

    def __enter__(self):
        if self.enabled:
            self.core.recording_diagnostics = True
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.core.recording_diagnostics = False

    def sums(self) -> dict:
        sums = self.core.diagnostic_sums()
        if self.accelerator.num_processes > 1:
            sums = {k: self.accelerator.reduce(v.detach().clone(), reduction="sum") for k, v in sums.items()}
        return sums

    def summary(self) -> dict | None:
        return self.core.summarize_diagnostics(self.sums()) if self.enabled else None


@torch.no_grad()
def collect(model, loader, accelerator, modalities, keep_sets=(), want_features=False, diagnostics=False):
    """One pass over `loader`: gathered labels, fused logits, unimodal logits (if any), features (if
    asked) and, for each subset in `keep_sets`, the fused predictions with the other inputs zeroed.
    With `diagnostics`, a model's own diagnostics (see `recording`) of the full-input passes."""
    was_training = model.training
    model.eval()
    out = {"labels": [], "logits": [], "unimodal": {}, "features": {}, "subset_preds": {s: [] for s in keep_sets}}
    rec = recording(model, accelerator, enabled=diagnostics)
    subset_predictions = SubsetPredictor(model, accelerator, keep_sets)  # encodes once where it can
    for batch in loader:
        inputs = {m: batch[m] for m in modalities}
        with rec:
            res = model(**inputs)
        chunk = {"labels": batch["labels"], "logits": res.logits.float()}
        if res.unimodal_logits is not None:
            chunk["unimodal"] = {m: z.float() for m, z in res.unimodal_logits.items()}
        if want_features:
            chunk["features"] = {m: h.float() for m, h in res.features.items()}
        chunk.update(subset_predictions(inputs, res))
        chunk = accelerator.gather_for_metrics(chunk)
        out["labels"].append(chunk["labels"])
        out["logits"].append(chunk["logits"])
        for m, z in chunk.get("unimodal", {}).items():
            out["unimodal"].setdefault(m, []).append(z)
        for m, h in chunk.get("features", {}).items():
            out["features"].setdefault(m, []).append(h)
        for s in keep_sets:
            out["subset_preds"][s].append(chunk[f"subset::{','.join(sorted(s))}"])
    model.train(was_training)
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return {
        "diagnostics": rec.summary(),
        "labels": cat(out["labels"]),
        "logits": cat(out["logits"]),
        "unimodal": {m: cat(v) for m, v in out["unimodal"].items()} or None,
        "features": {m: cat(v) for m, v in out["features"].items()} or None,
        "subset_preds": {s: cat(v) for s, v in out["subset_preds"].items()},
    }


def linear_probe(train_feats: dict, train_labels, num_classes: int, steps: int = 200, seed: int = 0):
    """Fit a fresh concat linear head on frozen features (full-batch Adam, fixed seed); return it as a
    function that gives split unimodal logits {m: z_m} for new features."""
    mods = list(train_feats)
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([train_feats[m] for m in mods], dim=1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    xn = (x - mean) / std
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(xn), train_labels).backward()
            opt.step()
    sizes = [train_feats[m].shape[1] for m in mods]

    @torch.no_grad()
    def split_logits(feats: dict) -> dict:
        xn = (torch.cat([feats[m] for m in mods], dim=1) - mean) / std
        out, start = {}, 0
        for m, d in zip(mods, sizes):
            out[m] = xn[:, start:start + d] @ head.weight[:, start:start + d].t() + head.bias / len(mods)
            start += d
        return out

    return split_logits


def unimodal_probes(model, probe_loader, accelerator, modalities, num_classes, res, train=None, seed=0) -> dict:
    """`unimodal_probe_accuracy` and `imbalance_probe` of the evaluated split `res` (a `collect` result
    with features); `train` is the training split's `collect` result when already at hand."""
    if not res.get("features"):  # a model without per-modality features: nothing to probe
        return {}
    if train is None:
        train = collect(model, probe_loader, accelerator, modalities, want_features=True)
    return probe_metrics(train["features"], train["labels"], res["features"], res["labels"], num_classes, seed=seed)


def evaluate(model, loader, accelerator, modalities, num_classes, *, shapley=True, unimodal="auto",
             probe_loader=None, seed=0, unimodal_probe=True) -> dict:
    """Metrics of the evaluation pass on one split. `probe_loader` (the ordered training data) feeds the
    linear probes: the joint one when the unimodal accuracy needs it, and with `unimodal_probe` one
    fresh probe per modality (`unimodal_probe_accuracy`, eval/probe.py). Without it those are skipped."""
    keep_sets = [s for s in subsets(modalities) if len(s) < len(modalities)] if shapley else []
    res = collect(model, loader, accelerator, modalities, keep_sets, want_features=True, diagnostics=True)
    labels, preds = res["labels"], res["logits"].argmax(-1)
    metrics = {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels, num_classes),
               "num_samples": int(len(labels))}
    if res["diagnostics"]:
        metrics.update(res["diagnostics"])

    train = None  # the training split's features, collected once for both kinds of probe
    use_split = res["unimodal"] is not None and unimodal in ("auto", "split")
    if unimodal == "split" and res["unimodal"] is None:
        raise ValueError("train.unimodal_metric is 'split' but the fusion head gives no unimodal logits")
    if use_split:
        uni_logits = res["unimodal"]
        metrics["unimodal_source"] = "split_head"
    else:
        if probe_loader is None:
            raise ValueError("a linear probe needs the training data (probe_loader)")
        train = collect(model, probe_loader, accelerator, modalities, want_features=True)
        probe = linear_probe(train["features"], train["labels"], num_classes, seed=seed)
        uni_logits = probe(res["features"])
        metrics["unimodal_source"] = "linear_probe"
    metrics["unimodal_accuracy"] = {m: accuracy(z.argmax(-1), labels) for m, z in uni_logits.items()}
    metrics["accuracy_ratio"] = accuracy_ratio(metrics["unimodal_accuracy"])
    metrics["imbalance_unimodal"] = accuracy_imbalance(metrics["unimodal_accuracy"], labels)
    if unimodal_probe and probe_loader is not None:
        metrics.update(unimodal_probes(model, probe_loader, accelerator, modalities, num_classes, res, train, seed))

    if keep_sets:
        value = {s: accuracy(p, labels) for s, p in res["subset_preds"].items()}
        value[frozenset(modalities)] = metrics["accuracy"]
        phi = shapley_values(value, modalities)
        metrics["shapley"] = phi
        metrics["imbalance"] = imbalance(phi)
        metrics["accuracy_no_modality"] = value[frozenset()]
    return metrics
