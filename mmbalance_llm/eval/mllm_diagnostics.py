"""Per-modality diagnostics of an MLLM fine-tuning run, on a capped validation subset: who the answer relies
on, who drives the adapter's update, and where the answer positions attend.

``sft_diagnostics(model, batches, accelerator=None) -> dict`` takes padded SFT batches (``input_ids``,
``attention_mask``, ``labels`` on the answer tokens, the media tensors, ``mm_token_type_ids`` for Qwen2-VL) and
returns flat keys (the SFT task logs them under ``diagnostics/``):

* **reliance** per non-text modality m, over the samples that contain m: answer accuracy (teacher forced exact
  match: every answer token is the argmax) and mean answer-token log-prob with m present (``full``), blanked
  (media tensor zeroed, placeholders kept) and dropped (placeholders and media removed), as
  ``reliance/<m>/{accuracy,logp}_{full,blank,drop}``; ``reliance/<m>/delta_{blank,drop}`` = accuracy full minus
  without, ``ratio_drop`` = delta / accuracy full; and over all samples the MMStar-style multimodal gain
  ``reliance/multimodal_gain`` = accuracy with every medium minus accuracy with every medium dropped (MMStar's
  MG = S_v - S_wv, with teacher-forced exact match instead of option scoring), ``reliance/logp_gain`` likewise.
* **gradient share** (``grad_share/<m>`` for text and each medium): the adapter's down-projection (LoRA's A,
  MokA's per-modality A_m) gradient of the summed LM loss, split by the token position it comes from:
  G_m = sum_{t in m} g_t x_t^T (g_t the gradient at A's output, x_t A's input), exact because A's gradient is a
  sum over positions. Share = sum over layers of ||G_m||_F / the same summed over modalities.
  ``grad_share_sq/<m>`` uses squared norms (the gradient energy, the diagonal-Fisher form that IMoD's
  non-text dominance rate is based on; this is not IMoD's exact statistic). Both sum to 1. A's gradient is
  exactly zero while B is at its zero initialisation (before the first update), so these keys are absent then;
  ``grad_share_B/<m>`` splits the up-projection B's gradient the same way (sum_{t in m} g_t (A x_t)^T) and is
  defined from the start.
* **attention share** (``attention_share/<m>/layer<l>`` and ``attention_share/<m>/mean``): the attention mass
  that the positions predicting answer tokens put on each modality's key tokens, averaged over heads, positions
  and samples, per decoder layer (eager attention, switched on for this pass only).

The model's mode and its parameters' ``.grad`` are left as they were. Under several processes every sum is
reduced, so each rank returns the numbers of the whole subset (each rank passes its own share of it).
"""
from __future__ import annotations

import torch

from mmbalance_llm.attribution.hf import BLANK_KEYS
from mmbalance_llm.balance._mllm import IGNORE, adapter_modules, answer_logprob, without
from mmbalance_llm.models.modality_map import get_modality_map, modality_masks

# --------------------------------------------------------------------------------------------- reliance


def _answer_scores(net, batch):
    """(mean answer-token log-prob [B], exact match [B] as float, has-answer [B])."""
    logits = net(**batch).logits
    lp, n = answer_logprob(logits, batch["labels"])
    lab = batch["labels"][:, 1:]
    ok = ((logits[:, :-1].argmax(-1) == lab) | (lab == IGNORE)).all(1)
    return lp / n.clamp_min(1), ok.float(), n > 0


def _sum_into(acc: dict, key: str, values: torch.Tensor, keep: torch.Tensor) -> None:
    s = acc.setdefault(key, [0.0, 0.0])
    s[0] += float(values[keep].double().sum())
    s[1] += float(keep.sum())


@torch.no_grad()
def reliance_sums(net, batches, media: tuple) -> dict:
    """{condition key: [sum, count]} over the batches (see the module docstring)."""
    sums: dict = {}
    for batch in batches:
        masks = modality_masks(batch, net)
        lp, ok, has = _answer_scores(net, batch)
        _sum_into(sums, "all/accuracy_full", ok, has)
        _sum_into(sums, "all/logp_full", lp, has)
        nomedia, present, drop_scores = batch, [], None
        for m in media:
            if BLANK_KEYS[m] not in batch or not bool(masks[m].any()):
                continue
            with_m = has & masks[m].any(1)
            _sum_into(sums, f"{m}/accuracy_full", ok, with_m)
            _sum_into(sums, f"{m}/logp_full", lp, with_m)
            for removal in ("blank", "drop"):
                lp_w, ok_w, _ = _answer_scores(net, without(batch, m, net, removal))
                _sum_into(sums, f"{m}/accuracy_{removal}", ok_w, with_m)
                _sum_into(sums, f"{m}/logp_{removal}", lp_w, with_m)
                if removal == "drop":
                    drop_scores = (lp_w, ok_w, None)
            nomedia = without(nomedia, m, net, "drop")
            present.append(m)
        if not present:
            lp_n, ok_n = lp, ok
        elif len(present) == 1:  # dropping the only medium is the no-media batch: no second forward
            lp_n, ok_n, _ = drop_scores
        else:
            lp_n, ok_n, _ = _answer_scores(net, nomedia)
        _sum_into(sums, "all/accuracy_no_media", ok_n, has)
        _sum_into(sums, "all/logp_no_media", lp_n, has)
    return sums


def reliance_metrics(sums: dict, media: tuple) -> dict:
    mean = {k: s / c for k, (s, c) in sums.items() if c > 0}
    out = {}
    for m in media:
        if f"{m}/accuracy_full" not in mean:
            continue
        for what in ("accuracy", "logp"):
            for cond in ("full", "blank", "drop"):
                out[f"reliance/{m}/{what}_{cond}"] = mean[f"{m}/{what}_{cond}"]
        full = mean[f"{m}/accuracy_full"]
        for cond in ("blank", "drop"):
            out[f"reliance/{m}/delta_{cond}"] = full - mean[f"{m}/accuracy_{cond}"]
        out[f"reliance/{m}/ratio_drop"] = out[f"reliance/{m}/delta_drop"] / full if full > 0 else 0.0
        out[f"reliance/{m}/logp_gain"] = mean[f"{m}/logp_full"] - mean[f"{m}/logp_drop"]
    if "all/accuracy_full" in mean:
        out["reliance/accuracy_full"] = mean["all/accuracy_full"]
        out["reliance/accuracy_no_media"] = mean["all/accuracy_no_media"]
        out["reliance/multimodal_gain"] = mean["all/accuracy_full"] - mean["all/accuracy_no_media"]
        out["reliance/logp_gain"] = mean["all/logp_full"] - mean["all/logp_no_media"]
    return out


# --------------------------------------------------------------------------------------------- gradient share


class GradientSplit:
    """Accumulates, for every adapter projection P (A or B), its weight gradient split by the token position it
    comes from: G[m][P] = sum_{t in m} g_t x_t^T (g_t the gradient at P's output, x_t P's input).

    Use: ``with GradientSplit(model, modalities) as gs: gs.set_masks(masks); loss.backward()`` (one
    ``set_masks`` per forward), then ``gs.shares()``. Inputs of another [B,T] than the masks are ignored."""

    def __init__(self, model, modalities):
        self.modules = adapter_modules(model)
        if not self.modules:
            raise ValueError("gradient share needs an adapter (adapter: lora or moka)")
        self.kind = {n: k for n, k, _ in self.modules}
        self.modalities = list(modalities)
        self.G = {m: {} for m in self.modalities}
        self.masks = None
        self.handles = []

    def __enter__(self):
        for name, _kind, mod in self.modules:
            self.handles.append(mod.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def set_masks(self, masks: dict) -> None:
        self.masks = masks

    def _forward_hook(self, name):
        def hook(_mod, inp, out):
            masks = self.masks
            if masks is None or not out.requires_grad or out.dim() != 3:
                return None
            x = inp[0].detach()
            if tuple(x.shape[:2]) != tuple(next(iter(masks.values())).shape):
                return None

            def grad_hook(g):
                for m in self.modalities:
                    mk = masks[m].to(g.device, g.dtype).unsqueeze(-1)
                    part = torch.einsum("btr,btd->rd", (g * mk).float(), x.float())
                    prev = self.G[m].get(name)
                    self.G[m][name] = part if prev is None else prev + part
                return None

            out.register_hook(grad_hook)
            return None
        return hook

    def reduce(self, accelerator) -> None:
        """Sum the split gradients over processes (before the norms: norms of partial sums do not add)."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        refs = {n: mod.weight for n, _k, mod in self.modules}
        flat = []
        for m in self.modalities:
            for n, ref in refs.items():
                flat.append(self.G[m].get(n, torch.zeros(ref.shape, device=ref.device)).float().flatten())
        total = accelerator.reduce(torch.cat(flat), reduction="sum")
        i = 0
        for m in self.modalities:
            for n, ref in refs.items():
                k = ref.numel()
                self.G[m][n] = total[i:i + k].view(ref.shape)
                i += k

    def shares(self) -> dict:
        """{"grad_share/<m>", "grad_share_sq/<m>"} from the A gradients (norm and squared-norm shares) and
        {"grad_share_B/<m>"} from the B gradients; each family sums to 1. A family whose gradient is exactly zero
        (A's, while B is still at its zero initialisation) is left out."""
        out = {}
        for prefix, kind, power in (("grad_share", "A", 1), ("grad_share_sq", "A", 2), ("grad_share_B", "B", 1)):
            tot = {m: sum(float(G.norm()) ** power for n, G in self.G[m].items() if self.kind[n] == kind)
                   for m in self.modalities}
            total = sum(tot.values())
            if total > 0:
                out.update({f"{prefix}/{m}": tot[m] / total for m in self.modalities})
        return out


def gradient_shares(net, batches, modalities, accelerator=None) -> dict:
    """Gradient shares of the summed LM loss (token-weighted: loss * answer tokens per batch) over the batches."""
    params = [p for p in net.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad(), GradientSplit(net, modalities) as gs:
            for batch in batches:
                gs.set_masks(modality_masks(batch, net))
                out = net(**batch)
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                (out.loss * n).backward()
            gs.set_masks(None)
        gs.reduce(accelerator)
        return gs.shares()
    finally:
        for p, g in zip(params, saved):
            p.grad = g


# --------------------------------------------------------------------------------------------- attention share


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_layers(net):
    from mmbalance_llm.attribution.hf import _decoder

    _, lm, _ = _decoder(net)
    layers = getattr(lm, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"attention share: cannot find the decoder layers' self_attn in {type(lm).__name__}")
    return [layer.self_attn for layer in layers]


@torch.no_grad()
def attention_sums(net, batches, modalities) -> tuple[dict, int]:
    """({modality: tensor [L] of summed attention mass}, number of answer-predicting query rows).

    Each layer's attention weights are reduced by a forward hook on its ``self_attn`` as soon as they exist (only
    the answer-predicting rows are kept), so the full [B, H, T, T] maps of all layers are never held together."""
    base = _base(net)
    prev = getattr(base.config, "_attn_implementation", None)
    attn = _decoder_layers(net)
    sums, rows = {m: torch.zeros(len(attn), dtype=torch.float64) for m in modalities}, 0
    state: dict = {}

    def make_hook(layer):
        def hook(_mod, _inp, out):
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if w is None:
                raise ValueError("attention share needs the attention weights (attn_implementation 'eager')")
            b_idx, t_idx = state["rows"]
            sel = w[b_idx, :, t_idx, :].float().mean(1)  # [N, Tk], heads averaged
            for m in modalities:
                km = state["masks"][m][b_idx].to(sel.device, sel.dtype)
                sums[m][layer] += float((sel * km).sum())
        return hook

    handles = [a.register_forward_hook(make_hook(i)) for i, a in enumerate(attn)]
    try:
        if prev != "eager":
            base.set_attn_implementation("eager")
        for batch in batches:
            q = torch.zeros_like(batch["labels"], dtype=torch.bool)
            q[:, :-1] = batch["labels"][:, 1:] != IGNORE  # positions whose next token is an answer token
            state["rows"] = q.nonzero(as_tuple=True)
            state["masks"] = modality_masks(batch, net)
            rows += int(q.sum())
            net(**batch)
    finally:
        for h in handles:
            h.remove()
        if prev not in (None, "eager"):
            base.set_attn_implementation(prev)
    return sums, rows


def attention_metrics(sums: dict, rows: float) -> dict:
    out = {}
    for m, s in sums.items():
        share = (s / max(rows, 1)).tolist()
        for layer, v in enumerate(share):
            out[f"attention_share/{m}/layer{layer}"] = v
        out[f"attention_share/{m}/mean"] = sum(share) / max(len(share), 1)
    return out


# --------------------------------------------------------------------------------------------- entry point


def _reduce_reliance(sums: dict, keys: list, accelerator) -> dict:
    t = torch.tensor([v for k in keys for v in sums.get(k, [0.0, 0.0])], dtype=torch.float64,
                     device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum").tolist()
    return {k: [t[2 * i], t[2 * i + 1]] for i, k in enumerate(keys)}


def sft_diagnostics(model, batches, accelerator=None, reliance: bool = True, gradient: bool = True,
                    attention: bool = True) -> dict:
    """All three diagnostics on ``batches`` (on the model's device); ``model`` may be a PeftModel or a plain HF
    MLLM (gradient share needs an adapter and is skipped without one). Returns flat metric keys."""
    batches = list(batches)
    mmap = get_modality_map(model)
    media = tuple(mmap.modalities)
    modalities = ["text", *media]
    was_training = model.training
    model.eval()
    out: dict = {}
    try:
        if reliance:
            sums = reliance_sums(model, batches, media)
            if accelerator is not None and accelerator.num_processes > 1:
                keys = [f"{m}/{w}_{c}" for m in media for w in ("accuracy", "logp") for c in ("full", "blank", "drop")]
                keys += [f"all/{w}_{c}" for w in ("accuracy", "logp") for c in ("full", "no_media")]
                sums = _reduce_reliance(sums, keys, accelerator)
            out.update(reliance_metrics(sums, media))
        if gradient and adapter_modules(model):
            out.update(gradient_shares(model, batches, modalities, accelerator))
        if attention:
            sums, rows = attention_sums(model, batches, modalities)
            if accelerator is not None and accelerator.num_processes > 1:
                stacked = accelerator.reduce(torch.stack([sums[m] for m in modalities]).to(accelerator.device),
                                             reduction="sum")
                sums = dict(zip(modalities, stacked.cpu()))
                rows = float(accelerator.reduce(torch.tensor([float(rows)], device=accelerator.device),
                                                reduction="sum"))
            out.update(attention_metrics(sums, rows))
    finally:
        if was_training:
            model.train()
    return out
