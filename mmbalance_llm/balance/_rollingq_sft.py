"""RollingQ on a Hugging Face MLLM decoder, driven by the `rollingq` balancer in a `task: sft` run.

The classifier version rotates the single fusion query of `fusion_transformer`; here the queries are those
that predict the answer: per sample, the decoder positions whose next token is an answer token (teacher
forced), and in generation the last position. `add_rolling_query(..., query_mode="answer")` hooks the chosen
decoder layers' `q_proj` / `k_proj`; at an epoch end (while fewer than `r_time` rotations were made) one pass
over the ordered training split (eval mode, no gradient; `estimate_max_batches` caps it) records, per
(layer, head), the alignment a_m = mean cos(q, mean key of modality m) of the answer queries with every
modality's keys (text, image, audio: the placeholder-token positions), AIR = max_m a_m - min_m a_m, the key
means and the mean query; sums are reduced over processes, so every rank rotates alike. Heads with AIR > beta
get R <- R_new R toward the balanced key target (the same math as the classifier version,
models/rolling_query.py). The rotation acts on every later forward (training, validation, test, generation).

Saved with the model: the rotation is part of the balancer's checkpoint state (resume is exact) and is
written next to the adapter in `best/` as `rolling_query.safetensors`, from which the test read restores it;
outside this toolkit, `add_rolling_query(model, token_ids, query_mode="answer", layers=...)` +
`handle.load(path)` re-applies it to the reloaded model.
"""
from __future__ import annotations

import os

import torch

from mmbalance_llm.models.rolling_query import add_rolling_query

ROTATION_FILE = "rolling_query.safetensors"


class DecoderRollingQ:
    def __init__(self, ctx, model, config):
        from mmbalance_llm.models.modality_map import get_modality_map

        self.ctx, self.config = ctx, config
        net = ctx.unwrap(model)
        token_ids = get_modality_map(net).token_ids(net.config)
        if not token_ids:
            raise ValueError("balance.method 'rollingq' (task sft) needs a model with media placeholder tokens")
        layers = list(config.layers) or None
        self.handle = add_rolling_query(net, token_ids, layers=layers, query_mode="answer",
                                        modalities=["text", *token_ids])

    @torch.no_grad()
    def estimate(self, model) -> dict:
        ctx, cap = self.ctx, self.config.estimate_max_batches
        was_training = model.training
        model.eval()
        self.handle.reset()
        self.handle.recording = True
        try:
            for i, batch in enumerate(ctx.loaders["train_eval"]):
                if cap and i >= cap:
                    break
                model(**batch)
        finally:
            self.handle.recording = False
            model.train(was_training)
        sums = self.handle.statistics()
        device = ctx.accelerator.device
        return {k: ctx.reduce_sum(v.to(device)).cpu() for k, v in sums.items()}

    def rotate(self, model) -> dict:
        """One RollingQ round: the estimation pass, then R <- R_new R for every head above beta."""
        sums = self.estimate(model)
        info = self.handle.rotate(self.config.beta, self.config.sigma, self.config.rotation, sums=sums)
        self.handle.reset()
        return info

    def state(self) -> dict:
        return {"rotation": self.handle.rotation.detach().clone(), "rotation_count": self.handle.rotation_count}

    def load(self, state: dict) -> None:
        if "rotation" in state:
            self.handle.rotation.copy_(state["rotation"])
        self.handle.rotation_count = int(state.get("rotation_count", self.handle.rotation_count))

    def save_pretrained(self, path: str) -> None:
        if self.ctx.accelerator.is_main_process:
            os.makedirs(path, exist_ok=True)
            self.handle.save(os.path.join(path, ROTATION_FILE))

    def load_pretrained(self, path: str) -> None:
        f = os.path.join(path, ROTATION_FILE)
        if os.path.exists(f):
            self.handle.load(f)
