"""Attribution adapter for the toolkit's classifiers (``MultimodalClassifier``, ``FusionTransformer``, any model
following the output contract: ``model(**{modality: x_m}) -> output.logits``, optional ``encode``/``fuse``).

Token layout: a modality input ``[B, T_m, D]`` contributes its ``T_m`` positions, any other shape
(``[B, D]``, images) one position. Tokens are laid out modality after modality in ``model.modalities`` order.
The target is ``log_softmax(logits)[y]`` with ``y`` the given class (default: the model's prediction on the
full input). Blanking a modality means a zero input (the toolkit's convention for a missing modality);
dropping it means zeroing its feature vector ``h_m`` between ``encode`` and ``fuse`` (models without the
two-stage interface cannot drop).

Attention (``method="attention"``) needs a model that attends over the tokens of all modalities jointly.
Its contract: ``model(**inputs, output_attentions=True)`` returns ``attentions`` (a tuple of ``[B, H, Q, K]``
per layer) and ``attention_modalities`` (``[K]`` or ``[B, K]``: modality index per key, -1 for special keys
such as [CLS]); the query is ``attention_query`` (int, default 0). The toolkit's ``FusionTransformer`` is read
without that flag: its ``layers`` return ``(x, (q0, k, attn0))`` (the fusion query's attention row) and
``encode_tokens`` gives each modality's token count, so forward hooks on the layers collect the rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassifierAdapter:
    kind = "classifier"

    def __init__(self, model, batch: dict, target=None):
        self.model = model
        mods = getattr(model, "modalities", None) or list(getattr(getattr(model, "config", None), "modalities", []))
        if not mods:
            raise ValueError("attribution: the classifier exposes no `modalities` list")
        missing = [m for m in mods if m not in batch]
        if missing:
            raise ValueError(f"attribution: the batch has no input for modality {missing[0]!r} "
                             f"(batch keys: {sorted(batch)})")
        self.modalities = list(mods)
        dev = next(model.parameters()).device
        self.inputs = {m: torch.as_tensor(batch[m]).to(dev).float() for m in mods}
        self.B = len(next(iter(self.inputs.values())))
        self.ntok = {m: (x.shape[1] if x.dim() == 3 else 1) for m, x in self.inputs.items()}
        self.T = sum(self.ntok.values())
        tm = torch.cat([torch.full((self.ntok[m],), i) for i, m in enumerate(mods)])
        self.token_modality = tm.unsqueeze(0).expand(self.B, -1).clone()
        if target is None:
            with torch.no_grad():
                self.y = self._logits(self.inputs).argmax(-1)
            self.target_desc = "log_softmax(logits)[predicted class] (prediction on the full input)"
        else:  # no forward pass needed: the cost of a method is then its own passes only
            y = torch.as_tensor(target, device=dev).long().reshape(-1)
            self.y = y.expand(self.B).clone() if y.numel() == 1 else y
            n_cls = getattr(getattr(model, "config", None), "num_classes", None)
            if len(self.y) != self.B or int(self.y.min()) < 0 or (n_cls is not None and int(self.y.max()) >= n_cls):
                raise ValueError(f"attribution: target must be one class id or {self.B} ids in [0, {n_cls})")
            self.target_desc = "log_softmax(logits)[given class]"

    # ---------------------------------------------------------------- scoring
    def _logits(self, xs: dict) -> torch.Tensor:
        return self.model(**xs).logits

    def _score(self, logits, idx):
        y = self.y if idx is None else self.y[idx]
        return F.log_softmax(logits.float(), -1).gather(1, y[:, None]).squeeze(1), logits.argmax(-1)

    def leaves(self) -> dict:
        return {m: x.detach().clone() for m, x in self.inputs.items()}

    def baseline_leaves(self, kind: str = "zero") -> dict:
        if kind == "zero":
            return {m: torch.zeros_like(x) for m, x in self.inputs.items()}
        if kind == "mean":  # batch mean per feature: a data-dependent reference input
            return {m: x.mean(0, keepdim=True).expand_as(x).clone() for m, x in self.inputs.items()}
        raise ValueError(f"baseline must be 'zero' or 'mean', got {kind!r}")

    def score(self, leaves: dict, idx=None):
        """(target [N], prediction [N]) for inputs whose rows are samples ``idx`` (None: the batch)."""
        return self._score(self._logits(leaves), idx)

    def interpolate(self, leaves, base, alpha: torch.Tensor, idx):
        """Path point base + alpha (x - base) for rows ``idx`` (alpha [N])."""
        out = {}
        for m in self.modalities:
            a = alpha.view(-1, *[1] * (leaves[m].dim() - 1))
            out[m] = base[m][idx] + a * (leaves[m][idx] - base[m][idx])
        return out

    def reduce_tokens(self, per_input: dict) -> torch.Tensor:
        """{m: tensor shaped like x_m} -> [B, T], summing the feature dimensions of each position."""
        cols = []
        for m in self.modalities:
            v = per_input[m]
            cols.append(v.sum(-1) if v.dim() == 3 else v.reshape(len(v), -1).sum(1, keepdim=True))
        return torch.cat(cols, 1)

    def masked_leaves(self, keep: torch.Tensor, idx: torch.Tensor, base: dict | None = None) -> dict:
        """Rows ``idx`` of the inputs with positions where ``keep`` [N, T] is False set to the baseline."""
        base = base or self.baseline_leaves("zero")
        out, off = {}, 0
        for m in self.modalities:
            x, b, n = self.inputs[m][idx], base[m][idx], self.ntok[m]
            k = keep[:, off:off + n].to(x.device)
            k = k.view(len(k), n, *[1] * (x.dim() - 2)) if x.dim() == 3 else k.view(len(k), *[1] * (x.dim() - 1))
            out[m] = torch.where(k, x, b)
            off += n
        return out

    def score_masked(self, keep: torch.Tensor, idx: torch.Tensor):
        return self.score(self.masked_leaves(keep, idx), idx)

    def score_blank(self, removed=()):
        xs = {m: (torch.zeros_like(x) if m in removed else x) for m, x in self.inputs.items()}
        return self.score(xs)

    def score_drop(self, modality: str):
        if not (hasattr(self.model, "encode") and hasattr(self.model, "fuse")):
            return None
        feats = dict(self.model.encode(**self.inputs))
        feats[modality] = torch.zeros_like(feats[modality])
        return self._score(self.model.fuse(feats).logits, None)

    blank_desc = "zero input for the removed modality"
    drop_desc = "zero feature vector h_m between encode and fuse"
    mask_desc = "masked positions set to zero input"

    # ---------------------------------------------------------------- attention
    def attention(self):
        """Per layer [L, B, H, K] attention of the query, key modality map [B, K], sink key index [B]."""
        try:
            out = self.model(**self.inputs, output_attentions=True)
        except TypeError:
            out = None
        atts = getattr(out, "attentions", None)
        kmod = getattr(out, "attention_modalities", None)
        if not atts or kmod is None:
            found = self._fusion_layer_attention()
            if found is not None:
                return found
            raise ValueError(f"attention attribution needs a model that attends over all modality tokens and "
                             f"returns `attentions` with `attention_modalities` for output_attentions=True; "
                             f"{type(self.model).__name__} does not (see mmbalance_llm.attribution.classifier)")
        q = int(getattr(out, "attention_query", 0) or 0)
        kmod = torch.as_tensor(kmod).long().cpu()
        if kmod.dim() == 1:
            kmod = kmod.unsqueeze(0).expand(self.B, -1)
        rows = torch.stack([a[:, :, q, :] for a in atts]).cpu()  # [L, B, H, K]
        return rows, kmod, torch.zeros(self.B, dtype=torch.long)  # the first key is the sink candidate

    def _fusion_layer_attention(self):
        """The toolkit's FusionTransformer: `layers` return (x, (q0, k, attn0)) with the fusion query at position
        0, and `encode_tokens` gives each modality's tokens (sequence [query; tokens_1; ...; tokens_M])."""
        layers, enc = getattr(self.model, "layers", None), getattr(self.model, "encode_tokens", None)
        if layers is None or enc is None:
            return None
        rows = []
        hooks = [layer.register_forward_hook(lambda _m, _i, o: rows.append(o[1][2].detach().cpu()))
                 for layer in layers]
        try:
            self.model(**self.inputs)
        finally:
            for h in hooks:
                h.remove()
        tokens, _ = enc(**self.inputs)
        kmod = torch.tensor([-1] + [i for i, m in enumerate(self.modalities) for _ in range(tokens[m].shape[1])])
        return torch.stack(rows), kmod.unsqueeze(0).expand(self.B, -1), torch.zeros(self.B, dtype=torch.long)

    def attention_token_map(self, kmod: torch.Tensor, key_scores: torch.Tensor) -> torch.Tensor:
        """Key scores [B, K] -> token scores [B, T]: keys of modality m map to its positions in order."""
        out = torch.zeros(self.B, self.T, dtype=key_scores.dtype)
        off = 0
        for i, m in enumerate(self.modalities):
            for b in range(self.B):
                v = key_scores[b][kmod[b] == i]
                if len(v) >= self.ntok[m] and len(v) <= self.ntok[m] + 1:
                    # equal, or one extra leading key (an encoder [CLS]): positions take the last ntok keys
                    out[b, off:off + self.ntok[m]] = v[len(v) - self.ntok[m]:]
                else:  # a model with its own tokenisation: spread the modality's mass over its positions
                    out[b, off:off + self.ntok[m]] = v.sum() / self.ntok[m]
            off += self.ntok[m]
        return out
