"""Encoders for preprocessed raw media (data/media_columns.py): pretrained Hugging Face backbones and ResNet-18.

Per-modality settings (recipe `model.encoders.<modality>`):

- `encoder: hf` with `name_or_path`: a local folder or a hub id (passed to `from_pretrained` unchanged),
  or a config dict with `model_type` (random weights: tests and CPU twins). The backbone's own main input
  is fed: `pixel_values` (ViT, CLIP vision, DINOv2), `input_values` (AST, wav2vec2, HuBERT),
  `input_features` (the Whisper encoder), `input_ids` (BERT, RoBERTa; padding masked by the pad id).
  Encoder-decoder checkpoints (Whisper) keep their encoder; dual encoders (CLIP) keep the vision tower
  (the text tower for a text column). A video column `[N, 3, H, W]` runs the image backbone per frame
  and averages the frame features.
- `pooling`: `cls` (the first token), `mean` (masked mean over tokens) or `attention` (a learned
  attention pool); `train_layers`: fine-tune only the last k blocks (and the final norms), `freeze`: train
  none of the backbone (a linear probe), `lr`: this modality's learning rate (models/param_groups.py).
- `encoder: resnet18`: transformers' ResNetModel in the ResNet-18 shape (basic blocks 2-2-2-2, widths
  64-512, the torchvision architecture) on `[C, H, W]` images, `[1, F, T]` spectrograms (1 input channel)
  or `[N, 3, H, W]` frames, whose feature maps are average-pooled over time and space as in
  BalanceBenchmark (GeWu-Lab/BalanceBenchmark@39ed569:balancemm/models/avclassify_model.py). With
  `name_or_path` it loads pretrained ResNet weights (e.g. a microsoft/resnet-18 folder); a 1-channel input
  then gets the channel mean of the first convolution.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MEDIA_ENCODER_DEFAULTS = {"name_or_path": None, "pooling": "cls", "train_layers": None, "freeze": False,
                          "lr": None, "branch": None}
POOLINGS = ("cls", "mean", "attention")


def loading_saved_model() -> bool:
    """True while an enclosing `from_pretrained` builds the model on the meta device: the backbone is then
    built from its config only, and the enclosing load fills in the saved (fine-tuned) weights."""
    return torch.empty(0).device.type == "meta"


def _load_backbone(source, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModel

    if isinstance(source, dict):
        cfg = dict(source)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.encoders.<modality>.name_or_path: a config dict needs 'model_type'")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))
    if loading_saved_model():
        return AutoModel.from_config(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
    return AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code)


def _select_tower(model, text_input: bool, branch: Optional[str]):
    """(module, input name): the encoder of an encoder-decoder, one tower of a dual encoder."""
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        enc = model.get_encoder()
        return enc, getattr(enc, "main_input_name", model.main_input_name)
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        want = branch or ("text" if text_input else "vision")
        if want == "text":
            return model.text_model, "input_ids"
        return model.vision_model, "pixel_values"
    return model, model.main_input_name


def _block_list(module) -> Optional[nn.ModuleList]:
    """The backbone's stack of Transformer blocks (the longest ModuleList named layer/layers/blocks)."""
    best = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and name.split(".")[-1] in ("layer", "layers", "blocks"):
            if best is None or len(sub) > len(best):
                best = sub
    return best


def freeze_backbone(backbone: nn.Module, train_layers: Optional[int], freeze: bool) -> None:
    """`freeze`: no backbone parameter trains. `train_layers=k`: only the last k blocks and the norms /
    pooler outside the blocks train; embeddings and earlier blocks are frozen."""
    if not freeze and train_layers is None:
        return
    for p in backbone.parameters():
        p.requires_grad_(False)
    if freeze or not train_layers:
        return
    blocks = _block_list(backbone)
    if blocks is None:
        raise ValueError("model.encoders.<modality>.train_layers: the backbone has no layer/layers/blocks list")
    k = int(train_layers)
    if k < 0 or k > len(blocks):
        raise ValueError(f"model.encoders.<modality>.train_layers must be in [0, {len(blocks)}], got {k}")
    block_params = {id(p) for p in blocks.parameters()}
    for block in list(blocks)[len(blocks) - k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for name, p in backbone.named_parameters():
        if id(p) not in block_params and ("norm" in name.lower() or "pooler" in name):
            p.requires_grad_(True)


def drop_unused_parameters(backbone: nn.Module) -> Optional[nn.Module]:
    """Keep every trainable backbone parameter in the graph (DDP refuses unused ones): remove a pooler
    head with weights (ViT, BERT: its output is never read), freeze the mask embeddings of wav2vec2 /
    HuBERT / DINOv2 (used only on steps where a mask is drawn), turn LayerDrop off (wav2vec2 / HuBERT skip
    random blocks) and return CLIP's post-layernorm, which this encoder applies to every token instead
    of only to the pooled one."""
    for holder in (backbone, getattr(backbone, "vision_model", None)):
        pooler = getattr(holder, "pooler", None) if holder is not None else None
        if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
            holder.pooler = None
    for name, p in backbone.named_parameters():
        if name.endswith(("masked_spec_embed", "mask_token")):  # only used under masked pre-training
            p.requires_grad_(False)
    for key in ("layerdrop", "encoder_layerdrop"):  # LayerDrop skips whole blocks at random steps
        if getattr(backbone.config, key, 0.0):
            setattr(backbone.config, key, 0.0)
    inner = getattr(backbone, "vision_model", backbone)
    return getattr(inner, "post_layernorm", None)


class AttentionPool(nn.Module):
    """softmax_t(w . h_t) weighted sum of the tokens, padding masked."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        scores = self.score(hidden).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return (torch.softmax(scores, dim=-1).unsqueeze(-1) * hidden).sum(1)


def pool_tokens(hidden: torch.Tensor, mask: Optional[torch.Tensor], pooling: str, attn: Optional[nn.Module]):
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "attention":
        return attn(hidden, mask)
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class HFMediaEncoder(nn.Module):
    """A Hugging Face backbone on its native input; pooled, then projected to `feature_dim`."""

    def __init__(self, in_shape, feature_dim: int, source, pooling: str = "cls", train_layers=None,
                 freeze: bool = False, branch: Optional[str] = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.encoders.<modality>.pooling is {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.text_input = len(in_shape) == 1 and branch != "vision"
        self.backbone, self.input_name = _select_tower(_load_backbone(source), self.text_input, branch)
        self.text_input = self.input_name == "input_ids"
        self.post_norm = drop_unused_parameters(self.backbone)
        # A video clip is [N, 3, H, W] per row: frames go through the image backbone one by one.
        self.frames = self.input_name == "pixel_values" and len(in_shape) == 4
        cfg = self.backbone.config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
        self.pad_id = getattr(cfg, "pad_token_id", None)
        self.pooling = pooling
        self.attn = AttentionPool(hidden) if pooling == "attention" else None
        self.out = nn.Linear(hidden, feature_dim)
        freeze_backbone(self.backbone, train_layers, freeze)

    def _hidden(self, x: torch.Tensor):
        mask = None
        if self.text_input:
            x = x.long()
            mask = x != (self.pad_id if self.pad_id is not None else 0)
            mask[:, 0] = True  # an all-padding row (a dropped modality) still has one token to pool
            hidden = self.backbone(input_ids=x, attention_mask=mask.long()).last_hidden_state
        else:
            hidden = self.backbone(**{self.input_name: x}).last_hidden_state
        if self.post_norm is not None:
            hidden = self.post_norm(hidden)
        return hidden, mask

    def tokens_and_summary(self, x: torch.Tensor):
        """(tokens [B, T, feature_dim], summary [B, feature_dim]); a video's tokens are its frames."""
        if self.frames:
            b, n = x.shape[:2]
            hidden, _ = self._hidden(x.flatten(0, 1))
            per_frame = pool_tokens(hidden, None, self.pooling, self.attn).view(b, n, -1)
            tokens = self.out(per_frame)
            return tokens, tokens.mean(1)
        hidden, mask = self._hidden(x)
        return self.out(hidden), self.out(pool_tokens(hidden, mask, self.pooling, self.attn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens_and_summary(x)[1]


def resnet18_config(num_channels: int):
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=num_channels, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                        depths=[2, 2, 2, 2], layer_type="basic", downsample_in_first_stage=False)


class ResNet18Encoder(nn.Module):
    """ResNet-18 over images, spectrograms or frames; features average-pooled over (time,) height, width."""

    def __init__(self, in_shape, feature_dim: int, name_or_path=None, train_layers=None, freeze: bool = False):
        super().__init__()
        from transformers import ResNetModel

        if len(in_shape) not in (3, 4):
            raise ValueError(f"encoder 'resnet18' needs [C, H, W] or [N, C, H, W] rows, got shape {list(in_shape)}")
        self.frames = len(in_shape) == 4
        channels = int(in_shape[-3])
        if name_or_path is None:
            self.backbone = ResNetModel(resnet18_config(channels))
        elif loading_saved_model():  # the enclosing from_pretrained loads the fine-tuned weights
            from transformers import ResNetConfig

            self.backbone = ResNetModel(ResNetConfig.from_pretrained(name_or_path, num_channels=channels))
        else:
            self.backbone = ResNetModel.from_pretrained(name_or_path)
            conv = self.backbone.embedder.embedder.convolution
            if conv.in_channels != channels:  # pretrained RGB stem on a 1-channel spectrogram
                new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
                new.weight.data.copy_(conv.weight.data.mean(1, keepdim=True).expand_as(new.weight))
                new._is_hf_initialized = True  # the enclosing model's post_init must not re-draw it
                self.backbone.embedder.embedder.convolution = new
                self.backbone.embedder.num_channels = channels
                self.backbone.config.num_channels = channels
        width = self.backbone.config.hidden_sizes[-1]
        self.out = nn.Identity() if width == feature_dim else nn.Linear(width, feature_dim)
        if freeze or train_layers is not None:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            stages = list(self.backbone.encoder.stages)
            for stage in stages[len(stages) - int(train_layers or 0):] if not freeze else []:
                for p in stage.parameters():
                    p.requires_grad_(True)

    def tokens_and_summary(self, x: torch.Tensor):
        b = x.shape[0]
        if self.frames:
            n = x.shape[1]
            fmap = self.backbone(pixel_values=x.flatten(0, 1)).last_hidden_state  # [B*N, C, h, w]
            fmap = fmap.view(b, n, *fmap.shape[1:]).permute(0, 1, 3, 4, 2)  # [B, N, h, w, C]
        else:
            fmap = self.backbone(pixel_values=x).last_hidden_state.permute(0, 2, 3, 1)  # [B, h, w, C]
        tokens = fmap.reshape(b, -1, fmap.shape[-1])
        return self.out(tokens), self.out(tokens.mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens_and_summary(x)[1]


def build_media_encoder(kind: str, in_shape, settings: dict) -> nn.Module:
    if kind == "resnet18":
        return ResNet18Encoder(in_shape, settings["feature_dim"], settings.get("name_or_path"),
                               settings.get("train_layers"), bool(settings.get("freeze")))
    return HFMediaEncoder(in_shape, settings["feature_dim"], settings["name_or_path"], settings.get("pooling") or "cls",
                          settings.get("train_layers"), bool(settings.get("freeze")), settings.get("branch"))


def enable_gradient_checkpointing(model: nn.Module) -> list:
    """Recompute the Transformer blocks of every Hugging Face backbone inside `model` in backward (recipe
    `model.gradient_checkpointing`, the classify twin of the sft key): less activation memory, one more
    forward per step, the same gradients. Non-reentrant torch checkpointing, as transformers' Trainer
    uses. Returns the names of the backbones it was enabled on (ResNet has no checkpointing: skipped).

    A dual encoder's tower (CLIP's `vision_model`) is not a PreTrainedModel of its own; its blocks carry
    transformers' `gradient_checkpointing` flag, which is set the way `PreTrainedModel` sets it."""
    import functools

    from torch.utils.checkpoint import checkpoint
    from transformers import PreTrainedModel

    enabled, covered = [], set()
    kwargs = {"use_reentrant": False}
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        if isinstance(module, PreTrainedModel) and module is not model:
            if not module.supports_gradient_checkpointing:
                continue
            if getattr(module.config, "use_cache", False):
                module.config.use_cache = False  # an encoder keeps no cache; transformers warns about it otherwise
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x name
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif isinstance(module, HFMediaEncoder) and not isinstance(module.backbone, PreTrainedModel):
            flagged = [m for m in module.backbone.modules() if hasattr(m, "gradient_checkpointing")]
            if not flagged:
                continue
            for m in flagged:
                m._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)
                m.gradient_checkpointing = True
            name = f"{name}.backbone" if name else "backbone"
        else:
            continue
        enabled.append(name)
        covered.add(name)
    return enabled
