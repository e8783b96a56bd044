"""Modality masks for MokA layers, delivered without touching HF model code.

HF decoders call ``q_proj(h)`` with no extra arguments, so the masks travel through a :class:`MokaMaskContext`
shared by all MokA layers of one model. A forward pre-hook on the wrapped HF model (the module peft's tuner
calls, and the one ``generate`` calls at every step) reads the batch (``input_ids`` / ``mm_token_type_ids`` /
``labels`` / ``attention_mask`` / ``past_key_values`` or ``cache``) and fills the context before any layer runs.

* The context keeps the masks until the next forward, so gradient checkpointing (which re-runs layers during
  backward) sees the same masks.
* A forward with a non-empty KV cache is a decode step: every new token is text (only ``A_text`` is used,
  as in the reference code).
* Layers only use the masks when the hidden states' ``[B, T]`` equals the masks' shape; anything else
  (e.g. a call made outside a model forward) is treated as text.

Question positions (the keys/values of the cross-attention) follow the reference VisualText code: text
positions after the sample's last media token, before its first supervised answer token (``labels != -100``),
and not padding. When no text follows the media, all text before the answer is used. Without ``labels`` every
prompt position counts, so **pass labels whenever the input contains the answer** (the SFT loop does);
otherwise media tokens could attend to answer text. When labels supervise the prompt too (TRL on ``messages``
data), the answer starts after the configured assistant header (``MokaConfig.answer_marker_ids``); a batch
with media but no question tokens warns once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from mmbalance_llm.models.modality_map import MODALITY_IDS, token_modality_ids


@dataclass
class CrossIndex:
    """Gathered positions of one modality's rows and of the question columns, padded over the batch."""

    media_idx: torch.Tensor   # [B, Tm] long, positions of the modality's tokens (0 where padded)
    media_valid: torch.Tensor  # [B, Tm] bool
    q_idx: torch.Tensor        # [B, Tq] long, question positions
    q_valid: torch.Tensor      # [B, Tq] bool


def _pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [B,T] -> (indices [B,K], valid [B,K]) with K the largest count in the batch (stable order)."""
    B, T = mask.shape
    k = int(mask.sum(1).max()) if mask.numel() else 0
    if k == 0:
        z = torch.zeros(B, 0, dtype=torch.long, device=mask.device)
        return z, z.bool()
    # sort positions so True entries come first, in order of position
    key = (~mask).long() * T + torch.arange(T, device=mask.device)
    idx = key.argsort(dim=1)[:, :k]
    return idx, torch.gather(mask, 1, idx)


def _first_match_after(input_ids: torch.Tensor, marker: Sequence[int], after: torch.Tensor) -> torch.Tensor:
    """[B] end position (exclusive) of the first occurrence of ``marker`` starting after ``after`` [B]; T if none."""
    B, T = input_ids.shape
    L = len(marker)
    if L == 0 or L > T:
        return torch.full((B,), T, device=input_ids.device)
    pat = torch.as_tensor(list(marker), device=input_ids.device, dtype=input_ids.dtype)
    hit = (input_ids.unfold(1, L, 1) == pat).all(-1)  # [B, T-L+1]: marker starts here
    start = torch.arange(T - L + 1, device=input_ids.device).expand(B, -1)
    hit = hit & (start > after[:, None])
    return torch.where(hit.any(1), torch.where(hit, start, T).min(1).values + L, torch.full((B,), T, device=hit.device))


def question_mask(mod_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                  after_media: bool = True, input_ids: torch.Tensor | None = None,
                  answer_marker: Sequence[int] | None = None) -> torch.Tensor:
    """Bool [B,T]: the text positions the media rows may attend to (never an answer token, never padding).

    When ``labels`` also supervise the prompt (a sample's first supervised token is not after its last media
    token, as in TRL's ``messages`` collation), the answer is taken to start after the first ``answer_marker``
    (the chat template's assistant header, e.g. the ids of ``"ASSISTANT:"``) that follows the media; without a
    marker match such a sample has no question tokens.
    """
    B, T = mod_ids.shape
    pos = torch.arange(T, device=mod_ids.device).expand(B, T)
    text = mod_ids == MODALITY_IDS["text"]
    if attention_mask is not None:
        text = text & attention_mask.bool()
    media_all = mod_ids != MODALITY_IDS["text"]
    if labels is not None:
        sup = labels != -100
        first_ans = torch.where(sup.any(1), torch.where(sup, pos, T).min(1).values, torch.full((B,), T, device=pos.device))
        last_media_all = torch.where(media_all, pos, -1).max(1).values
        covers_prompt = (last_media_all >= 0) & (first_ans <= last_media_all)
        if answer_marker and input_ids is not None and bool(covers_prompt.any()):
            marker_end = _first_match_after(input_ids, answer_marker, last_media_all)
            first_ans = torch.where(covers_prompt & (marker_end < T), marker_end, first_ans)
    else:
        first_ans = torch.full((B,), T, device=pos.device)
    before = text & (pos < first_ans[:, None])
    if not after_media:
        return before
    media = media_all & (pos < first_ans[:, None])
    last_media = torch.where(media, pos, -1).max(1).values
    after = before & (pos > last_media[:, None])
    # samples whose question precedes the media: fall back to all prompt text
    return torch.where(after.any(1, keepdim=True), after, before)


NO_QUESTION_WARNING = ("MokA: {n} of {b} samples with media tokens have no question tokens, so their cross-attention "
                       "is off (labels cover the prompt and MokaConfig.answer_marker_ids found no assistant header "
                       "after the media); mask the prompt in labels or set answer_marker_ids="
                       "mmbalance_llm.adapters.moka.answer_marker_ids(processor)")


class MokaMaskContext:
    """Masks of the current forward, shared by the MokA layers of one model."""

    def __init__(self, model_config: Any, question_after_media: bool = True,
                 answer_marker: Sequence[int] | None = None):
        self.model_config = model_config
        self.question_after_media = question_after_media
        self.answer_marker = tuple(answer_marker or ())
        self._warned = False
        self.clear()

    def clear(self) -> None:
        self.mod_ids: torch.Tensor | None = None
        self.decode = False
        self._cross: dict[int, CrossIndex] = {}
        self._rows: dict = {}

    def update(self, batch: dict) -> None:
        """Compute the masks for a forward call's keyword arguments."""
        self.clear()
        pkv = batch.get("past_key_values")
        if pkv is None:
            pkv = batch.get("cache")  # transformers 5.2x passes the KV cache as `cache`
        if pkv is not None and hasattr(pkv, "get_seq_length") and int(pkv.get_seq_length()) > 0:
            self.decode = True  # cached decoding: new tokens are text
            return
        if batch.get("input_ids") is None and batch.get("mm_token_type_ids") is None:
            return  # inputs_embeds only: nothing says where media is, so everything is text
        mod_ids = token_modality_ids(batch, self.model_config)
        self.mod_ids = mod_ids
        am = batch.get("attention_mask")
        am = am if isinstance(am, torch.Tensor) and am.shape == mod_ids.shape else None
        labels = batch.get("labels")
        labels = labels if isinstance(labels, torch.Tensor) and labels.shape == mod_ids.shape else None
        ids = batch.get("input_ids")
        ids = ids if isinstance(ids, torch.Tensor) and ids.shape == mod_ids.shape else None
        qm = question_mask(mod_ids, labels, am, self.question_after_media, ids, self.answer_marker)
        q_idx, q_valid = _pack(qm)
        if not self._warned:
            has_media = (mod_ids != MODALITY_IDS["text"]).any(1)
            n = int((has_media & ~qm.any(1)).sum())
            if n:  # once per model: the cross-attention silently off is what this is for
                self._warned = True
                warnings.warn(NO_QUESTION_WARNING.format(n=n, b=int(has_media.sum())), stacklevel=2)
        for mid in mod_ids.unique().tolist():
            if mid == MODALITY_IDS["text"]:
                continue
            m = mod_ids == mid
            if am is not None:
                m = m & am.bool()
            m_idx, m_valid = _pack(m)
            self._cross[mid] = CrossIndex(m_idx, m_valid, q_idx, q_valid)

    def lookup(self, x: torch.Tensor):
        """(mod_ids [B,T] or None, cross-index dict) for hidden states ``x`` [B,T,d]; None means all text."""
        if self.decode or self.mod_ids is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(self.mod_ids.shape):
            return None, {}
        if self.mod_ids.device != x.device:  # model split over devices
            self.mod_ids = self.mod_ids.to(x.device)
            self._rows = {}
            self._cross = {k: CrossIndex(*(t.to(x.device) for t in vars(v).values())) for k, v in self._cross.items()}
        return self.mod_ids, self._cross


    def row_mask(self, mid: int, dtype: torch.dtype) -> torch.Tensor:
        """[B,T,1] 0/1 mask of modality ``mid`` in ``dtype``, computed once per forward and shared by all layers."""
        key = (mid, dtype)
        if key not in self._rows:
            self._rows[key] = (self.mod_ids == mid).unsqueeze(-1).to(dtype)
        return self._rows[key]


def cross_attend(h_media: torch.Tensor, h_text: torch.Tensor, ci: CrossIndex, rank: int) -> torch.Tensor:
    """Attention output, scattered back to [B,T,r]: the modality's rows (queries, from its own A) attend to
    the question rows of ``h_text`` (keys = values, from ``A_text``). Rows with no question get zero."""
    B, T, r = h_media.shape
    if ci.media_idx.shape[1] == 0 or ci.q_idx.shape[1] == 0:
        return torch.zeros_like(h_media)
    q = torch.gather(h_media, 1, ci.media_idx[..., None].expand(-1, -1, r))
    kv = torch.gather(h_text, 1, ci.q_idx[..., None].expand(-1, -1, r))
    scores = q @ kv.transpose(1, 2) / rank ** 0.5
    # finite fill instead of -inf: a row with no question stays finite (and is zeroed below), so no NaN gradients
    scores = scores.masked_fill(~ci.q_valid[:, None, :], torch.finfo(scores.dtype).min)
    o = scores.softmax(-1) @ kv
    keep = (ci.media_valid & ci.q_valid.any(1, keepdim=True))[..., None].to(o.dtype)
    out = torch.zeros_like(h_media)
    return out.scatter_add(1, ci.media_idx[..., None].expand(-1, -1, r), o * keep)
