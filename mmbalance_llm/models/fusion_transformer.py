"""`FusionTransformer`: per-modality token encoders, a learnable fusion query and attention-fusion layers.

The sequence `[q; tokens_1 + e_1; ...; tokens_M + e_M]` (q a learned query, e_m a modality-type
embedding) runs through `fusion_layers` pre-norm Transformer blocks with `fusion_heads` heads; the
classifier reads position 0. This is the attention-fusion setting of RollingQ (Ni et al., ICML 2025),
which uses one single-head layer; more layers and heads are a generalisation.

Model-output contract: `logits` (fused), `features[m]` = modality m's summary vector (the mean of the
tokens the fusion attends to for Transformer and HF encoders, the vector itself for MLP encoders),
`unimodal_logits[m]` = a **probe** head on the *detached* `features[m]`. The probes only monitor: they
do not sum to the fused logits (`unimodal_logits_are_split = False`, `has_unimodal_logits = False`, so
methods that need split logits refuse this model), and they are trained by their own cross-entropy,
returned as `aux_loss` when labels are given (the trainer adds it under every method).

RollingQ: every (layer, head) has a rotation `query_rotation[l, h]` (dh x dh, identity at start) applied
to the projected query at position 0 once `config.rotation_count > 0`; keys, values and other queries
are untouched. The buffer is saved with the model and restored by `from_pretrained`.

Diagnostics (evaluator hook `eval.evaluator.recording`): per layer and head, the query's attention
share of each modality (raw, and per token), the cosine alignment a_m = mean_b cos(q_b, mean_i k^m_{b,i})
and AIR = max_m a_m - min_m a_m (for M = 2, |a_1 - a_2|, the paper's |AIR|), plus the key and query
sums that RollingQ needs for its rotation target.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from mmbalance_llm.models.classifier import MultimodalClassifierConfig
from mmbalance_llm.models.encoders import HFEncoder, MLPEncoder, TransformerEncoder, build_encoder
from mmbalance_llm.models.outputs import MultimodalOutput
from mmbalance_llm.models.registry import register_architecture
from mmbalance_llm.models.common import check_modality_inputs, encoder_parameters, register_auto, keep_native_weight_names


class FusionTransformerConfig(MultimodalClassifierConfig):
    model_type = "mmbalance_fusion_transformer"

    def __init__(self, fusion_layers: int = 1, fusion_heads: int = 1, fusion_dropout: float = 0.0,
                 rotation_count: int = 0, **kwargs):
        self.fusion_layers = fusion_layers
        self.fusion_heads = fusion_heads
        self.fusion_dropout = fusion_dropout
        self.rotation_count = rotation_count  # > 0: apply query_rotation (set by RollingQ)
        super().__init__(**kwargs)


class TokenEncoder(nn.Module):
    """Wraps a foundation encoder so that it returns (tokens [B, T, d], summary [B, d])."""

    def __init__(self, kind: str, in_shape, settings: dict):
        super().__init__()
        self.inner = build_encoder(kind, in_shape, settings)

    def forward(self, x: torch.Tensor):
        enc = self.inner
        if hasattr(enc, "tokens_and_summary"):  # raw-media encoders (models/media_encoders.py)
            return enc.tokens_and_summary(x)
        if isinstance(enc, TransformerEncoder):
            tokens = enc.out(enc.tokens(x))
            return tokens, tokens.mean(dim=1)
        if isinstance(enc, HFEncoder):
            x3 = x.unsqueeze(1) if x.dim() == 2 else x
            tokens = enc.out(enc.model(inputs_embeds=enc.proj(x3)).last_hidden_state)
            return tokens, tokens.mean(dim=1)
        if isinstance(enc, MLPEncoder):
            h = enc(x)
            return h.unsqueeze(1), h
        raise TypeError(f"no token view for encoder {type(enc).__name__}")


class AttentionFusionLayer(nn.Module):
    """Pre-norm self-attention block; exposes the projected query at position 0, the keys and the
    attention row of position 0 for diagnostics and RollingQ."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.feature_dim ({dim}) must be divisible by model.fusion_heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, rotation: Optional[torch.Tensor] = None):
        b, t, d = x.shape
        h = self.norm1(x)
        split = lambda z: z.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731 -> [B, H, T, dh]
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        if rotation is not None:  # RollingQ: q0 <- R q0 per head, nothing else changes
            q0 = torch.einsum("hij,bhj->bhi", rotation.to(q.dtype), q[:, :, 0])
            q = torch.cat([q0.unsqueeze(2), q[:, :, 1:]], dim=2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(out)
        x = x + self.mlp(self.norm2(x))
        return x, (q[:, :, 0], k, attn[:, :, 0])


class FusionTransformer(PreTrainedModel):
    config_class = FusionTransformerConfig
    base_model_prefix = "mmbalance"
    main_input_name = "labels"
    unimodal_logits_are_split = False  # probe heads on detached features; they do not sum to `logits`
    has_unimodal_logits = False  # (the split-logit contract of balance/base.py)
    aux_loss_from_labels = True  # the trainer passes labels so the probes train under every method

    def __init__(self, config: FusionTransformerConfig):
        super().__init__(config)
        if not config.modalities:
            raise ValueError("FusionTransformerConfig.modalities is empty")
        missing = [m for m in config.modalities if m not in config.input_shapes]
        if missing:
            raise ValueError(f"FusionTransformerConfig.input_shapes has no shape for {missing}")
        for key in ("fusion_layers", "fusion_heads"):
            if int(getattr(config, key)) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(config, key)}")
        self.modalities = list(config.modalities)
        d, L, H = config.feature_dim, config.fusion_layers, config.fusion_heads
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            settings = config.encoder_settings(m)
            self.encoders[m] = TokenEncoder(settings["encoder"], config.input_shapes[m], settings)
        self.type_embed = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in self.modalities})
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.layers = nn.ModuleList(AttentionFusionLayer(d, H, config.fusion_dropout) for _ in range(L))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.num_classes))
        self.probes = nn.ModuleDict({m: nn.Linear(d, config.num_classes) for m in self.modalities})
        eye = torch.eye(d // H).expand(L, H, d // H, d // H).clone()
        self.register_buffer("query_rotation", eye, persistent=True)
        self.recording_diagnostics = False
        self._diag: dict = {}
        self.post_init()
        keep_native_weight_names(self)

    def _init_weights(self, module):
        pass  # PyTorch defaults; the rotation buffer starts as the identity

    @property
    def num_heads(self) -> int:
        return self.config.fusion_heads

    def modality_parameters(self, modality: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Encoder m and its type embedding. Fusion layers, classifier and probes belong to none."""
        yield from encoder_parameters(self.encoders, self.modalities, modality)
        yield f"type_embed.{modality}", self.type_embed[modality]

    # -- forward ------------------------------------------------------------------------------
    def encode_tokens(self, **inputs):
        check_modality_inputs(self.modalities, inputs)
        tokens, features = {}, {}
        for m in self.modalities:
            tokens[m], features[m] = self.encoders[m](inputs[m])
        return tokens, features

    def forward(self, labels: Optional[torch.Tensor] = None, **inputs) -> MultimodalOutput:
        tokens, features = self.encode_tokens(**inputs)
        b = next(iter(tokens.values())).shape[0]
        seq = [self.query.expand(b, -1, -1)] + [tokens[m] + self.type_embed[m] for m in self.modalities]
        spans, start = [], 1
        for m in self.modalities:
            spans.append((start, start + tokens[m].shape[1]))
            start += tokens[m].shape[1]
        x = torch.cat(seq, dim=1)
        rotate = int(self.config.rotation_count) > 0
        for i, layer in enumerate(self.layers):
            x, (q0, k, attn0) = layer(x, self.query_rotation[i] if rotate else None)
            if self.recording_diagnostics:
                self._record(i, q0.detach(), k.detach(), attn0.detach(), spans)
        logits = self.head(x[:, 0])
        unimodal = {m: self.probes[m](features[m].detach()) for m in self.modalities}
        loss = aux = None
        if labels is not None:
            aux = sum(F.cross_entropy(z, labels) for z in unimodal.values())
            loss = F.cross_entropy(logits, labels) + aux
        return MultimodalOutput(loss=loss, logits=logits, features=features, unimodal_logits=unimodal, aux_loss=aux)

    # -- diagnostics and RollingQ statistics -------------------------------------------------
    def reset_diagnostics(self) -> None:
        self._diag = {}

    def _record(self, layer: int, q0, k, attn0, spans) -> None:
        L, H = self.config.fusion_layers, self.config.fusion_heads
        M, dh = len(self.modalities), q0.shape[-1]
        if not self._diag:
            z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=q0.device)  # noqa: E731
            self._diag = {"n": z(1), "share": z(L, H, M), "self_share": z(L, H), "cos": z(L, H, M),
                          "key_sum": z(L, H, M, dh), "query_sum": z(L, H, dh), "tokens": z(M)}
        s = self._diag
        if layer == 0:
            s["n"] += q0.shape[0]
            s["tokens"] += torch.tensor([q0.shape[0] * (b - a) for a, b in spans], dtype=torch.float64,
                                        device=q0.device)
        s["self_share"][layer] += attn0[:, :, 0].sum(0).double()
        s["query_sum"][layer] += q0.sum(0).double()
        for j, (a, b) in enumerate(spans):
            s["share"][layer, :, j] += attn0[:, :, a:b].sum((0, 2)).double()
            k_m = k[:, :, a:b]
            s["key_sum"][layer, :, j] += k_m.sum((0, 2)).double()
            s["cos"][layer, :, j] += F.cosine_similarity(q0, k_m.mean(2), dim=-1).sum(0).double()

    def diagnostic_sums(self) -> dict:
        if not self._diag:
            raise RuntimeError("no diagnostics recorded: run forward passes with recording_diagnostics = True")
        return dict(self._diag)

    def summarize_diagnostics(self, sums: dict) -> dict:
        """{"attention": {...}} with per-modality means over layers and heads and a per-(layer, head) table."""
        n = sums["n"].clamp_min(1)
        share = sums["share"] / n  # [L, H, M]
        per_token = share / (sums["tokens"] / n)
        per_token = per_token / per_token.sum(-1, keepdim=True).clamp_min(1e-12)
        align = sums["cos"] / n
        air = align.max(-1).values - align.min(-1).values  # [L, H]
        mods = self.modalities
        by = lambda t: {m: float(t[..., j].mean()) for j, m in enumerate(mods)}  # noqa: E731
        out = {"share": by(share), "share_per_token": by(per_token), "alignment": by(align),
               "self_share": float((sums["self_share"] / n).mean()), "air": float(air.mean()),
               "share_gap": float((per_token.max(-1).values - per_token.min(-1).values).mean())}
        if len(mods) == 2:
            out["air_signed"] = float((align[..., 0] - align[..., 1]).mean())
        L, H = share.shape[:2]
        if L * H > 1:
            out["heads"] = {f"l{i}h{h}": {"share": {m: float(share[i, h, j]) for j, m in enumerate(mods)},
                                          "air": float(air[i, h])} for i in range(L) for h in range(H)}
        return {"attention": out}


@register_architecture("fusion_transformer")
def build_fusion_transformer(model_cfg, modalities, input_shapes, num_classes) -> FusionTransformer:
    unknown = set(model_cfg.encoders) - set(modalities)
    if unknown:
        raise ValueError(f"model.encoders names modalities not in the data: {sorted(unknown)} (modalities: {modalities})")
    cfg = FusionTransformerConfig(
        modalities=modalities, input_shapes=input_shapes, num_classes=num_classes,
        encoder=model_cfg.encoder, feature_dim=model_cfg.feature_dim, hidden_dim=model_cfg.hidden_dim,
        num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads, dropout=model_cfg.dropout,
        fusion="attention", encoders=model_cfg.encoders, hf_encoder=model_cfg.hf_encoder,
        fusion_layers=model_cfg.fusion_layers, fusion_heads=model_cfg.fusion_heads,
        fusion_dropout=model_cfg.dropout)
    return FusionTransformer(cfg)


register_auto(FusionTransformerConfig, FusionTransformer)
