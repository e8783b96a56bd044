"""Per-modality encoders: x_m ([B, D] or [B, T, D]) -> h_m ([B, feature_dim])."""
from __future__ import annotations

import math

import torch
from torch import nn


class MLPEncoder(nn.Module):
    """Flattens its input and runs `num_layers` hidden ReLU layers, then projects to `feature_dim`."""

    def __init__(self, in_shape, hidden_dim: int, feature_dim: int, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        in_dim = math.prod(int(d) for d in in_shape)  # plain ints: from_pretrained builds on the meta device
        layers, width = [], in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, feature_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class TransformerEncoder(nn.Module):
    """A small pre-norm Transformer over tokens with a learned [CLS] token and positions.

    A vector input [B, D] is read as a single token. `tokens()` exposes the per-token outputs for
    attention-fusion models.
    """

    def __init__(self, in_shape, hidden_dim: int, feature_dim: int, num_layers: int = 2, num_heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        seq_len, in_dim = (1, in_shape[0]) if len(in_shape) == 1 else in_shape
        self.proj = nn.Linear(in_dim, hidden_dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.pos = nn.Parameter(torch.zeros(1, seq_len + 1, hidden_dim))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, feature_dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        h = self.proj(x)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1) + self.pos[:, : h.shape[1] + 1]
        return self.norm(self.blocks(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.tokens(x)[:, 0])


class HFEncoder(nn.Module):
    """Any Hugging Face `AutoModel` that accepts `inputs_embeds`, built from a local path or a config dict.

    Features are linearly projected to the model's hidden size, fed as `inputs_embeds`, mean-pooled and
    projected to `feature_dim`. A config dict (with `model_type`) gives random weights, which is what
    tests and CPU demos use; a local path loads pretrained weights (never from the hub when offline).
    """

    def __init__(self, in_shape, feature_dim: int, source, trust_remote_code: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if isinstance(source, dict):
            cfg = dict(source)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ValueError("model.hf_encoder: a config dict needs 'model_type'")
            self.model = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))
        else:
            self.model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code)
        hidden = self.model.config.hidden_size
        self.proj = nn.Linear(in_shape[-1], hidden)
        self.out = nn.Linear(hidden, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        hidden = self.model(inputs_embeds=self.proj(x)).last_hidden_state
        return self.out(hidden.mean(dim=1))


def build_encoder(kind: str, in_shape, settings: dict) -> nn.Module:
    if kind == "default":
        kind = "transformer" if len(in_shape) == 2 else "mlp"
    if kind == "mlp":
        return MLPEncoder(in_shape, settings["hidden_dim"], settings["feature_dim"], settings["num_layers"],
                          settings["dropout"])
    if kind == "transformer":
        return TransformerEncoder(in_shape, settings["hidden_dim"], settings["feature_dim"], settings["num_layers"],
                                  settings["num_heads"], settings["dropout"])
    if kind == "resnet18" or (kind == "hf" and settings.get("name_or_path") is not None):
        from mmbalance_llm.models.media_encoders import build_media_encoder  # raw media (data/media_columns.py)

        return build_media_encoder(kind, in_shape, settings)
    if kind == "hf":
        if settings.get("hf_encoder") is None:
            raise ValueError("model.encoder is 'hf' but model.hf_encoder (path or config dict) is not set")
        return HFEncoder(in_shape, settings["feature_dim"], settings["hf_encoder"])
    raise ValueError(f"unknown encoder {kind!r}; choose default, mlp, transformer, hf or resnet18")
