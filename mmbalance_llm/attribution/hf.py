"""Attribution adapter for HF multimodal LLMs (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio) via the modality maps.

Target: ``f = sum_t log p(y_t | x, y_<t)`` over the answer tokens (positions with ``labels != -100``), teacher
forced. The answer is the batch's ``labels`` when present, else the tokens given as ``target`` (ids appended
to each prompt), else the model's own greedy next token.

The differentiable input is the language model's ``inputs_embeds`` *after* the media features were merged
in: a forward pre-hook on the decoder captures it (with the decoder's other kwargs), and later passes call
the decoder and ``lm_head`` directly on edited embeddings, so the towers run once per distinct media input.
Scored positions are the prompt (answer tokens and padding are not scored); their modality comes from
``mm_token_type_ids`` or the config's token ids (``models.modality_map``).

Removal baselines: *blank* zeroes the media input (pixel values in the processor's normalised space, log-mel
features) and keeps the placeholder tokens; for text it zeroes the prompt text embeddings except the first
position. *drop* removes the placeholder tokens and the media tensors. Token-level masking (MM-SHAP) sets the
masked positions' merged embeddings to zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbalance_llm.models.modality_map import MODALITY_IDS, get_modality_map, token_modality_ids

IGNORE = -100
MEDIA_KEYS = {"image": ("pixel_values", "image_grid_thw", "image_sizes"),
              "video": ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
              "audio": ("input_features", "feature_attention_mask")}
BLANK_KEYS = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "input_features"}


def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        raise ValueError(f"attribution: cannot find the language model of {type(base).__name__} (model.language_model)")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else getattr(base, "lm_head")
    return base, lm, head


def answer_logprob(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs [B], argmax token at the first answer position [B]) from a full forward.
    Labels go into the forward too: adapters with modality masks (MokA) use them to find the question."""
    logits = model(**batch).logits
    return _gather_logprob(logits, batch["labels"])


def _gather_logprob(logits, labels):
    lab = labels[:, 1:]
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    mask = lab != IGNORE
    tok = lp.gather(2, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    first = mask.float().argmax(1)
    pred = logits[torch.arange(len(lab)), first].argmax(-1)
    return tok.sum(1), pred


class HFAdapter:
    kind = "hf"

    def __init__(self, model, batch: dict, target=None):
        self.model = model
        self.base, self.lm, self.head = _decoder(model)
        self.mmap = get_modality_map(self.base)
        self.dev = next(model.parameters()).device
        batch = {k: (v.to(self.dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if "input_ids" not in batch:
            raise ValueError("attribution: an MLLM batch needs 'input_ids'")
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        self.batch = self._with_target(batch, target)
        self.B, self.T = self.batch["input_ids"].shape
        present = [m for m in self.mmap.modalities if any(k in self.batch for k in MEDIA_KEYS[m][:1])]
        self.modalities = ["text"] + present
        ids = token_modality_ids(self.batch, self.base)
        prompt = (self.batch["labels"] == IGNORE) & self.batch["attention_mask"].bool()
        tm = torch.full_like(ids, -1)
        for i, m in enumerate(self.modalities):
            tm[(ids == MODALITY_IDS[m]) & prompt] = i
        self.token_modality = tm.cpu()
        self.prompt = prompt
        self.first_pos = self.batch["attention_mask"].float().argmax(1)  # first real token (the sink candidate)
        self.E, self.kw = self._capture(self.batch)

    # ---------------------------------------------------------------- target
    def _with_target(self, batch, target):
        if target is None and "labels" in batch:
            self.target_desc = "sum of answer-token log-probs (batch labels, teacher forcing)"
            return batch
        if target is None:
            with torch.no_grad():
                logits = self.model(**batch).logits
            last = batch["attention_mask"].sum(1) - 1
            target = logits[torch.arange(len(last)), last].argmax(-1)[:, None].tolist()
            self.target_desc = "log-prob of the model's greedy next token after the prompt"
        else:
            self.target_desc = "sum of log-probs of the given answer tokens (teacher forcing)"
        if isinstance(target, torch.Tensor):
            target = target.tolist()
        if target and not isinstance(target[0], (list, tuple)):
            target = [target] * len(batch["input_ids"])
        return append_answer(batch, target)

    # ---------------------------------------------------------------- decoder passes
    def _capture(self, batch):
        cap = {}

        def hook(_mod, args, kwargs):
            cap.update(kwargs)
            cap["__args"] = args

        h = self.lm.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(**batch)
        finally:
            h.remove()
        E = cap.pop("inputs_embeds")
        cap.pop("__args", None)
        for k in ("past_key_values", "cache", "use_cache", "output_attentions", "output_hidden_states"):
            cap.pop(k, None)
        return E.detach(), cap

    def _kw(self, idx):
        out = {}
        for k, v in self.kw.items():
            if isinstance(v, torch.Tensor) and idx is not None:
                if k == "position_ids" and v.dim() == 3:  # mrope position ids [3|4, B, T] (even when B is 3)
                    v = v[:, idx]
                elif v.dim() >= 2 and v.shape[0] == self.B:
                    v = v[idx]
                elif v.dim() == 3 and v.shape[1] == self.B:
                    v = v[:, idx]
            out[k] = v
        return out

    def _sync_mask_context(self, idx):
        """MokA-style adapters keep per-forward modality masks set by a pre-hook on the top model; a direct
        decoder call on re-indexed rows must refresh them, or the layers would treat every token as text."""
        ctx = getattr(getattr(self.model, "base_model", None), "mask_context", None)
        if ctx is None:
            return
        keys = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
        ctx.update({k: (self.batch[k] if idx is None else self.batch[k][idx]) for k in keys if k in self.batch})

    def _decode_score(self, E, idx):
        labels = self.batch["labels"] if idx is None else self.batch["labels"][idx]
        self._sync_mask_context(idx)
        h = self.lm(inputs_embeds=E, use_cache=False, **self._kw(idx)).last_hidden_state
        lab = labels[:, 1:]
        mask = lab != IGNORE
        hs = h[:, :-1][mask]
        lp = F.log_softmax(self.head(hs).float(), -1).gather(1, lab[mask][:, None]).squeeze(1)
        rows = torch.arange(len(lab), device=E.device).unsqueeze(1).expand_as(lab)[mask]
        score = torch.zeros(len(lab), device=E.device, dtype=lp.dtype).index_add(0, rows, lp)
        first = mask.float().argmax(1)
        pred = self.head(h[torch.arange(len(lab)), first]).argmax(-1)
        return score, pred

    # ---------------------------------------------------------------- adapter interface
    def leaves(self):
        return {"embeds": self.E.clone()}

    def baseline_leaves(self, kind="zero"):
        if kind == "zero":
            base = torch.zeros_like(self.E)
        elif kind == "mean":  # mean prompt embedding of each sample
            w = self.prompt.unsqueeze(-1).float()
            base = ((self.E * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)).expand_as(self.E).clone()
        else:
            raise ValueError(f"baseline must be 'zero' or 'mean', got {kind!r}")
        # answer positions keep their embeddings: the target is defined on them
        return {"embeds": torch.where(self.prompt.unsqueeze(-1), base, self.E)}

    def score(self, leaves, idx=None):
        return self._decode_score(leaves["embeds"], idx)

    def interpolate(self, leaves, base, alpha, idx):
        a = alpha.view(-1, 1, 1)
        return {"embeds": base["embeds"][idx] + a * (leaves["embeds"][idx] - base["embeds"][idx])}

    def reduce_tokens(self, per_input):
        return per_input["embeds"].sum(-1)

    def masked_leaves(self, keep, idx, base=None):
        idx = idx.to(self.dev)
        keep = keep.to(self.dev) | ~self.prompt[idx]
        E = self.E[idx]
        return {"embeds": torch.where(keep.unsqueeze(-1), E, torch.zeros_like(E))}

    def score_masked(self, keep, idx):
        return self.score(self.masked_leaves(keep, idx), idx)

    def _blank_media(self, modality):
        b = dict(self.batch)
        key = BLANK_KEYS[modality]
        b[key] = torch.zeros_like(b[key])
        return b

    def score_blank(self, removed=()):
        E = self.E.clone()
        tm = self.token_modality.to(self.dev)
        for m in removed:
            i = self.modalities.index(m)
            pos = tm == i
            if m == "text":
                pos = pos.clone()
                pos[torch.arange(self.B, device=self.dev), self.first_pos] = False  # keep the first token (BOS/sink)
                E[pos] = 0
            else:
                Em, _ = self._capture(self._blank_media(m))
                E[pos] = Em[pos]  # merged embeddings at m's positions depend only on m's media
        return self._decode_score(E, None)

    def score_drop(self, modality):
        if modality == "text":
            return None
        return answer_logprob(self.model, drop_modality(self.batch, modality, self.base))

    blank_desc = "zeroed media input (normalised pixel values / log-mel features), placeholders kept; text: zero embeddings"
    drop_desc = "placeholder tokens and media tensors removed"
    mask_desc = "masked positions' merged LLM input embeddings set to zero"

    # ---------------------------------------------------------------- attention
    def attention(self):
        base = self.base
        prev = getattr(base.config, "_attn_implementation", None)
        try:
            if prev != "eager":
                if not hasattr(base, "set_attn_implementation"):
                    raise ValueError("attention attribution needs attn_implementation='eager'")
                base.set_attn_implementation("eager")
            with torch.no_grad():
                out = self.model(**self.batch, output_attentions=True)
        finally:
            if prev not in (None, "eager"):
                base.set_attn_implementation(prev)
        if not out.attentions:
            raise ValueError("the model returned no attentions (is attn_implementation 'eager'?)")
        q = (self.batch["labels"][:, 1:] != IGNORE).float().argmax(1)  # last prompt position predicts the answer
        ar = torch.arange(self.B, device=self.dev)
        rows = torch.stack([a[ar, :, q, :] for a in out.attentions])  # [L, B, H, T]
        kmod = self.token_modality.to(self.dev).clone()
        return rows, kmod, self.first_pos

    def attention_token_map(self, kmod, key_scores):
        return key_scores


def append_answer(batch: dict, answers: list) -> dict:
    """Insert answer token ids after each sample's prompt (right padding kept) and label only them."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    if len(answers) != len(ids):
        raise ValueError(f"target: {len(answers)} answers for a batch of {len(ids)}")
    lens = am.sum(1).tolist()
    T = max(int(n) + len(a) for n, a in zip(lens, answers))
    pad = 0
    out = {"input_ids": torch.full((len(ids), T), pad, dtype=ids.dtype, device=ids.device),
           "attention_mask": torch.zeros((len(ids), T), dtype=am.dtype, device=ids.device),
           "labels": torch.full((len(ids), T), IGNORE, dtype=ids.dtype, device=ids.device)}
    tt = batch.get("mm_token_type_ids")
    if tt is not None:
        out["mm_token_type_ids"] = torch.zeros((len(ids), T), dtype=tt.dtype, device=ids.device)
    for i, (n, a) in enumerate(zip(lens, answers)):
        n = int(n)
        real = am[i].bool()
        out["input_ids"][i, :n] = ids[i][real]
        out["input_ids"][i, n:n + len(a)] = torch.tensor(a, dtype=ids.dtype)
        out["attention_mask"][i, :n + len(a)] = 1
        out["labels"][i, n:n + len(a)] = torch.tensor(a, dtype=ids.dtype)
        if tt is not None:
            out["mm_token_type_ids"][i, :n] = tt[i][real]
    return {**{k: v for k, v in batch.items() if k not in out and k != "labels"}, **out}


def drop_modality(batch: dict, modality: str, model_or_config) -> dict:
    """The batch without ``modality``: its placeholder positions removed (then re-padded on the right) and its
    media tensors removed."""
    ids = token_modality_ids(batch, model_or_config)
    keep = ids != MODALITY_IDS[modality]
    cfg = getattr(model_or_config, "config", model_or_config)
    for attr in (f"{modality}_start_token_id", f"{modality}_end_token_id"):  # Qwen2.5-Omni's <|audio_bos|>/<|audio_eos|>
        tid = getattr(cfg, attr, None)  # its rope index counts audio starts, so they go with the audio
        if isinstance(tid, int) and "input_ids" in batch:
            keep &= batch["input_ids"] != tid
    seq_keys = [k for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids") if k in batch]
    n_keep = keep.sum(1)
    T = int(n_keep.max())
    fills = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE, "mm_token_type_ids": 0}
    out = {k: v for k, v in batch.items() if k not in seq_keys and k not in MEDIA_KEYS[modality]}
    for k in seq_keys:
        v = batch[k]
        new = torch.full((len(v), T), fills[k], dtype=v.dtype, device=v.device)
        for i in range(len(v)):
            row = v[i][keep[i]]
            new[i, :len(row)] = row
        out[k] = new
    return out
