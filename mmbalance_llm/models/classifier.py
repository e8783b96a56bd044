"""`MultimodalClassifier`: one encoder per modality and a fusion head, as a `transformers.PreTrainedModel`.

`save_pretrained` / `from_pretrained` round-trip exactly (safetensors + config.json). The forward takes
one keyword argument per modality and returns `MultimodalOutput`. Two finer entry points serve
balancers that need them: `encode(**inputs) -> {m: h_m}` and `fuse(features, labels) -> output`, so a
method can edit features (drop, mask, reuse) without re-running the encoders.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from mmbalance_llm.models.encoders import build_encoder
from mmbalance_llm.models.fusion import build_fusion
from mmbalance_llm.models.outputs import MultimodalOutput
from mmbalance_llm.models.registry import register_architecture
from mmbalance_llm.models.common import check_modality_inputs, encoder_parameters, register_auto, keep_native_weight_names

_ENCODER_KEYS = ("encoder", "feature_dim", "hidden_dim", "num_layers", "num_heads", "dropout", "hf_encoder")


class MultimodalClassifierConfig(PreTrainedConfig):
    model_type = "mmbalance_classifier"

    def __init__(
        self,
        modalities: Optional[list] = None,
        input_shapes: Optional[dict] = None,
        num_classes: int = 2,
        encoder: str = "default",
        feature_dim: int = 64,
        hidden_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        fusion: str = "concat",
        encoders: Optional[dict] = None,
        hf_encoder=None,
        **kwargs,
    ):
        self.modalities = list(modalities or [])
        self.input_shapes = {m: list(s) for m, s in (input_shapes or {}).items()}
        self.num_classes = num_classes
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.fusion = fusion
        self.encoders = dict(encoders or {})
        self.hf_encoder = hf_encoder
        super().__init__(**kwargs)

    def encoder_settings(self, modality: str) -> dict:
        """Global encoder settings merged with the per-modality overrides in `encoders[modality]`."""
        from mmbalance_llm.models.media_encoders import MEDIA_ENCODER_DEFAULTS  # per-modality only

        settings = {k: getattr(self, k) for k in _ENCODER_KEYS}
        settings.update(MEDIA_ENCODER_DEFAULTS)
        override = self.encoders.get(modality) or {}
        unknown = set(override) - set(_ENCODER_KEYS) - set(MEDIA_ENCODER_DEFAULTS)
        if unknown:
            valid = list(_ENCODER_KEYS) + list(MEDIA_ENCODER_DEFAULTS)
            raise ValueError(f"model.encoders.{modality}: unknown key(s) {sorted(unknown)}; valid: {valid}")
        if override.get("feature_dim", self.feature_dim) != self.feature_dim:
            raise ValueError(f"model.encoders.{modality}.feature_dim must equal model.feature_dim (the fusion input)")
        settings.update(override)
        return settings

    @classmethod
    def from_recipe(cls, model_cfg, modalities, input_shapes, num_classes) -> "MultimodalClassifierConfig":
        unknown = set(model_cfg.encoders) - set(modalities)
        if unknown:
            raise ValueError(f"model.encoders names modalities not in the data: {sorted(unknown)} (modalities: {modalities})")
        return cls(
            modalities=modalities, input_shapes=input_shapes, num_classes=num_classes,
            encoder=model_cfg.encoder, feature_dim=model_cfg.feature_dim, hidden_dim=model_cfg.hidden_dim,
            num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads, dropout=model_cfg.dropout,
            fusion=model_cfg.fusion, encoders=model_cfg.encoders, hf_encoder=model_cfg.hf_encoder,
        )


class MultimodalClassifier(PreTrainedModel):
    config_class = MultimodalClassifierConfig
    base_model_prefix = "mmbalance"
    main_input_name = "labels"

    def __init__(self, config: MultimodalClassifierConfig):
        super().__init__(config)
        if not config.modalities:
            raise ValueError("MultimodalClassifierConfig.modalities is empty")
        missing = [m for m in config.modalities if m not in config.input_shapes]
        if missing:
            raise ValueError(f"MultimodalClassifierConfig.input_shapes has no shape for {missing}")
        self.modalities = list(config.modalities)
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            settings = config.encoder_settings(m)
            self.encoders[m] = build_encoder(settings["encoder"], config.input_shapes[m], settings)
        self.fusion = build_fusion(config.fusion, self.modalities, config.feature_dim, config.num_classes)
        self.post_init()
        keep_native_weight_names(self)

    def _init_weights(self, module):
        # Keep PyTorch's default initialisation; HF encoders initialise themselves.
        pass

    @property
    def has_unimodal_logits(self) -> bool:
        return self.fusion.has_unimodal_logits

    def modality_parameters(self, modality: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs of modality `modality`'s encoder. The fusion head belongs to none."""
        yield from encoder_parameters(self.encoders, self.modalities, modality)

    def encode(self, **inputs) -> dict:
        check_modality_inputs(self.modalities, inputs)
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def fuse(self, features: dict, labels: Optional[torch.Tensor] = None) -> MultimodalOutput:
        logits, unimodal = self.fusion(features)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return MultimodalOutput(loss=loss, logits=logits, features=features, unimodal_logits=unimodal)

    def forward(self, labels: Optional[torch.Tensor] = None, **inputs) -> MultimodalOutput:
        return self.fuse(self.encode(**inputs), labels)


@register_architecture("classifier")
def build_classifier(model_cfg, modalities, input_shapes, num_classes) -> MultimodalClassifier:
    if model_cfg.fusion not in ("concat", "sum", "film", "gated"):
        raise ValueError(f"model.fusion {model_cfg.fusion!r} is not a classifier fusion (concat, sum, film, gated)")
    return MultimodalClassifier(MultimodalClassifierConfig.from_recipe(model_cfg, modalities, input_shapes, num_classes))


register_auto(MultimodalClassifierConfig, MultimodalClassifier)
