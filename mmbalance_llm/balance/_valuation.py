"""Shared machinery of the valuation methods (Wei et al., CVPR 2024): per-sample modality Shapley
values and the re-sampling loader that adds single-modality copies of training samples.

Utility of a coalition S for sample i: v_i(S) = 1[the fused prediction with only the inputs of S kept
(the others zeroed) is correct], v_i(empty) measured with every input zeroed (as the evaluator's Shapley
metric), so a modality that never changes the outcome gets phi = 0 and
sum_m phi_m = v_i(full) - v_i(empty). The original code assumes v(empty) = 0, which credits a signal-free
modality whenever the blank-input prediction happens to be right, and scores v(full) = 2 when correct
(M = 2), which adds v(full) / M to every modality's value; its re-sampling thresholds are on that scale,
so they are applied to the *score* phi_m + v_i(full) / M (`resampling_score`), which equals the
original contribution for M = 2 whenever the blank prediction is wrong. Inputs are zeroed (not features), the same operation as the
re-sampled copies and the evaluator's Shapley metric.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmbalance_llm.data.features import collate
from mmbalance_llm.eval.metrics import shapley_values, subsets


def shapley_from_correct(correct: dict, mods) -> torch.Tensor:
    """phi [N, M] from correct[S] = bool [N] for every coalition S, the empty one included (v(S) = correct)."""
    phi = shapley_values({s: c.float() for s, c in correct.items()}, mods)
    return torch.stack([phi[m] for m in mods], dim=1)


class ResamplingState:
    """What both valuation methods share: the epoch's extra single-modality copies, the loader that
    serves them, and their checkpointed state."""

    copies: list

    def train_loader(self, epoch):
        if not self.copies:
            return None
        return resample_loader(self.ctx, self.ctx.train_dataset, self.copies, epoch)

    def loss(self, model, batch, outputs):
        """Fused CE as the mean over the *global* batch: re-sampled global batches of odd size split into
        unequal per-rank pieces, where DDP's average of per-rank means would weigh samples unevenly. Each
        rank's summed CE is scaled by W / n_global, so DDP's average is the global mean (one process: the
        plain mean, untouched)."""
        ctx = self.ctx
        if ctx is None or ctx.accelerator.num_processes == 1:
            return super().loss(model, batch, outputs)
        labels = batch["labels"]
        total = F.cross_entropy(outputs.logits, labels, reduction="sum")
        count = ctx.reduce_sum(torch.tensor(float(len(labels)), device=outputs.logits.device))
        return total * ctx.accelerator.num_processes / count.clamp_min(1), {}

    def state_dict(self):
        return {"copies": copies_to_tensor(self.copies, self.ctx.modalities if self.ctx else [])}

    def load_state_dict(self, state):
        if "copies" in state and self.ctx is not None:
            self.copies = copies_from_tensor(state["copies"], self.ctx.modalities)


@torch.no_grad()
def sample_shapley(model, loader, accelerator, modalities, num_samples: int):
    """Per-sample Shapley values phi [num_samples, M] of the training set and the full-input correctness
    [num_samples] (NaN rows for samples the loader does not cover), gathered so that every rank holds the
    same tables.

    The encoders run once on the real inputs and once on zeros; every coalition then only re-runs the
    fusion head (2^M head passes), which equals zeroing the inputs for per-sample encoders."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    mods = list(modalities)
    coalitions = subsets(mods)
    phi = torch.full((num_samples, len(mods)), float("nan"))
    full = torch.full((num_samples,), float("nan"))
    for batch in loader:
        inputs = {m: batch[m] for m in mods}
        labels = batch["labels"]
        if hasattr(net, "encode") and hasattr(net, "fuse"):
            real = net.encode(**inputs)
            zero = net.encode(**{m: torch.zeros_like(x) for m, x in inputs.items()})
            logits = {s: net.fuse({m: (real[m] if m in s else zero[m]) for m in mods}).logits for s in coalitions}
        else:
            logits = {s: net(**{m: (x if m in s else torch.zeros_like(x)) for m, x in inputs.items()}).logits
                      for s in coalitions}
        correct = {s: z.argmax(-1) == labels for s, z in logits.items()}
        chunk = {"index": batch["index"], "phi": shapley_from_correct(correct, mods),
                 "full": correct[frozenset(mods)].float()}
        chunk = accelerator.gather_for_metrics(chunk)
        idx = chunk["index"].long().cpu()
        phi[idx] = chunk["phi"].float().cpu()
        full[idx] = chunk["full"].float().cpu()
    net.train(was_training)
    return phi, full


def resampling_score(phi: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """phi_m + v(full) / M: the original code's contribution scale (exact for M = 2)."""
    return phi + full[:, None] / phi.shape[1]


def subset_loader(dataset, indices, batch_size: int, num_workers: int = 0):
    """An ordered loader over `indices` of `dataset` (for valuation on a subset)."""
    return DataLoader(torch.utils.data.Subset(dataset, list(map(int, indices))), batch_size=batch_size,
                      shuffle=False, collate_fn=collate, num_workers=num_workers)


class ResampleBatchSampler:
    """Global batches over the original samples plus single-modality copies.

    Items are ints (an original sample) or `(i, keep_modalities)` pairs, read by `FeatureDataset`. Each
    epoch the items are shuffled with a generator seeded by (seed, epoch), identical on every rank, and
    cut into G = ceil(items / (batch_size * num_processes)) *global* batches, each then split into
    `num_processes` consecutive per-rank pieces (so the batch list is a multiple of `num_processes`, none
    larger than `batch_size`). The global batches depend only on the global batch size, so 1 process at
    batch B and 2 processes at batch B/2 train on the same samples per step. It declares no fixed
    `batch_size`, so Accelerate's shard hands whole batches round-robin to the ranks and never pads: each
    item, copies included, lands on exactly one rank once per epoch.
    """

    def __init__(self, num_samples: int, copies: list, batch_size: int, num_processes: int = 1, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
        self.items = list(range(num_samples)) + [(int(i), tuple(keep)) for i, keep in copies]
        self.max_batch = batch_size
        self.num_processes = num_processes
        self.seed = seed
        self.epoch = 0
        self.num_global = max(1, math.ceil(len(self.items) / (batch_size * num_processes)))
        self.num_batches = num_processes * self.num_global
        if len(self.items) < self.num_batches:
            raise ValueError(f"{len(self.items)} training items cannot fill {self.num_batches} batches")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.items), generator=gen).numpy()
        for global_batch in np.array_split(order, self.num_global):
            for chunk in np.array_split(global_batch, self.num_processes):
                yield [self.items[j] for j in chunk]


def resample_loader(ctx, dataset, copies: list, epoch: int):
    """A prepared (sharded, device-placing) training loader over `dataset` plus `copies`."""
    cfg = ctx.recipe.train
    sampler = ResampleBatchSampler(len(dataset), copies, cfg.per_device_train_batch_size, ctx.accelerator.num_processes, cfg.seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=ctx.num_workers)
    return ctx.accelerator.prepare_data_loader(loader)


def copies_to_tensor(copies: list, modalities) -> torch.Tensor:
    """[K, 1 + M] int64: sample index and a keep flag per modality (for checkpoints)."""
    rows = [[i] + [int(m in keep) for m in modalities] for i, keep in copies]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 1 + len(modalities))


def copies_from_tensor(t: torch.Tensor, modalities) -> list:
    return [(int(r[0]), tuple(m for m, f in zip(modalities, r[1:].tolist()) if f)) for r in t]
