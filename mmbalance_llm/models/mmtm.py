"""`MMTMClassifier`: the classifier with MMTM cross-modal blocks between the encoders' layers (the
architecture of Greedy, Wu et al., ICML 2022; MMTM from Joze et al., CVPR 2020).

After every hidden layer l of the per-modality encoders, one MMTM block squeezes each modality's hidden
state (mean over tokens for sequences), maps the concatenation to a joint code z = relu(W_s [s_1; ...; s_M])
and excites every modality with e_m = 2 * sigmoid(W_m z): h_m <- h_m * e_m. Every block keeps running
means of the squeezes (EMA buffers) and of the excitation gates (cumulative means over all training
forwards, as the official Greedy code's `running_avg_weight_*`); training-mode batch means are averaged over
processes first, so the buffers do not depend on how a global batch is split. `forward(curate=m)` is
Greedy's re-balancing step, after which m's branch receives no per-sample cross-modal information; with
`curation = "gate"` (the official mechanism, default) m's gate e_m is replaced by its running mean, with
`curation = "squeeze"` m's excitation sees the running means of the other modalities' squeezes instead
of their per-sample values. Any batch size and M >= 2 work.

Encoders must be `mlp` or `transformer` with the same number of layers for every modality (one block per
layer). Built from the recipe's `model` section (architecture name `mmtm`); fusion heads as the classifier
(concat by default, so split unimodal logits exist). `AutoModel.from_pretrained(dir)` restores it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig
from mmbalance_llm.models.encoders import MLPEncoder, TransformerEncoder
from mmbalance_llm.models.registry import register_architecture
from mmbalance_llm.models.common import check_modality_inputs, encoder_parameters, register_auto


class MMTMConfig(MultimodalClassifierConfig):
    model_type = "mmbalance_mmtm"

    def __init__(self, mmtm_ratio: int = 4, mmtm_momentum: float = 0.1, **kwargs):
        self.mmtm_ratio = mmtm_ratio
        self.mmtm_momentum = mmtm_momentum
        super().__init__(**kwargs)


def _global_batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch dimension of x, over every process when distributed (sum and count reduced)."""
    import torch.distributed as dist

    total, count = x.sum(0), x.new_tensor(float(len(x)))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([total.flatten(), count.view(1)])
        dist.all_reduce(flat)
        total, count = flat[:-1].view_as(total), flat[-1]
    return total / count


class MMTMBlock(nn.Module):
    curation = "gate"  # Greedy's re-balancing mechanism: "gate" (official) or "squeeze"

    def __init__(self, dims: dict, ratio: int = 4, momentum: float = 0.1):
        super().__init__()
        self.modalities = list(dims)
        total = sum(dims.values())
        hidden = max(1, total // ratio)
        self.momentum = momentum
        self.squeeze = nn.Linear(total, hidden)
        self.excite = nn.ModuleDict({m: nn.Linear(hidden, d) for m, d in dims.items()})
        for m, d in dims.items():
            self.register_buffer(f"running_{m}", torch.zeros(d))
            self.register_buffer(f"gate_{m}", torch.zeros(d))
        self.register_buffer("gate_steps", torch.zeros(()))

    @staticmethod
    def _squeeze(h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1) if h.dim() == 3 else h

    def forward(self, hs: dict, curate: Optional[str] = None) -> dict:
        s = {m: self._squeeze(hs[m]) for m in self.modalities}
        if self.training:
            with torch.no_grad():
                for m in self.modalities:
                    buf = getattr(self, f"running_{m}")
                    buf.mul_(1 - self.momentum).add_(self.momentum * _global_batch_mean(s[m].detach().float()).to(buf.dtype))
        z = torch.relu(self.squeeze(torch.cat([s[m] for m in self.modalities], dim=1)))
        z_cur = None
        if curate is not None and self.curation == "squeeze":
            frozen = [s[m] if m == curate else getattr(self, f"running_{m}").to(s[m].dtype).expand_as(s[m])
                      for m in self.modalities]
            z_cur = torch.relu(self.squeeze(torch.cat(frozen, dim=1)))
        gates = {m: 2 * torch.sigmoid(self.excite[m](z_cur if m == curate and z_cur is not None else z))
                 for m in self.modalities}
        if self.training:
            with torch.no_grad():  # the cumulative mean includes this batch, as the official update order
                n = float(self.gate_steps)
                for m in self.modalities:
                    buf = getattr(self, f"gate_{m}")
                    buf.copy_((_global_batch_mean(gates[m].detach().float()).to(buf.dtype) + buf * n) / (n + 1))
                self.gate_steps.add_(1)
        out = {}
        for m in self.modalities:
            e = gates[m]
            if curate == m and self.curation == "gate":
                e = getattr(self, f"gate_{m}").to(e.dtype).expand_as(e)
            out[m] = hs[m] * (e.unsqueeze(1) if hs[m].dim() == 3 else e)
        return out


def _encoder_stages(enc: nn.Module):
    """(prelude, [stage, ...], final) of an MLP or Transformer encoder, reusing its own modules."""
    if isinstance(enc, MLPEncoder):
        layers = list(enc.net)
        n = (len(layers) - 1) // 3
        stages = [nn.Sequential(*layers[3 * i:3 * i + 3]) for i in range(n)]
        return (lambda x: x.flatten(1)), stages, layers[-1]
    if isinstance(enc, TransformerEncoder):
        def prelude(x):
            if x.dim() == 2:
                x = x.unsqueeze(1)
            h = enc.proj(x)
            return torch.cat([enc.cls.expand(len(h), -1, -1), h], dim=1) + enc.pos[:, : h.shape[1] + 1]

        return prelude, list(enc.blocks.layers), (lambda h: enc.out(enc.norm(h)[:, 0]))
    raise ValueError(f"architecture 'mmtm' needs model.encoder 'mlp' or 'transformer', got {type(enc).__name__}")


class MMTMClassifier(MultimodalClassifier):
    config_class = MMTMConfig

    def __init__(self, config: MMTMConfig):
        super().__init__(config)
        stages = {m: _encoder_stages(self.encoders[m])[1] for m in self.modalities}
        counts = {m: len(s) for m, s in stages.items()}
        if len(set(counts.values())) != 1 or not next(iter(counts.values())):
            raise ValueError(f"architecture 'mmtm' needs the same number (>= 1) of encoder layers for every modality "
                             f"(model.num_layers / model.encoders.*.num_layers), got {counts}")
        widths = {m: config.encoder_settings(m)["hidden_dim"] for m in self.modalities}
        self.mmtm = nn.ModuleList(MMTMBlock(widths, config.mmtm_ratio, config.mmtm_momentum)
                                  for _ in range(next(iter(counts.values()))))

    def main_parameters(self, modality: str):
        """Modality m's own branch (its encoder)."""
        return list(self.encoders[modality].named_parameters())

    def bypass_parameters(self, modality: str):
        """The cross-modal path into modality m: its excitation layer in every MMTM block."""
        return [(f"mmtm.{i}.excite.{modality}.{n}", p) for i, b in enumerate(self.mmtm)
                for n, p in b.excite[modality].named_parameters()]

    def shared_bypass_parameters(self):
        """The joint squeeze layers, on every modality's cross-modal path (the official BDR counts them for both)."""
        return [(f"mmtm.{i}.squeeze.{n}", p) for i, b in enumerate(self.mmtm) for n, p in b.squeeze.named_parameters()]

    def set_curation(self, mechanism: str) -> None:
        if mechanism not in ("gate", "squeeze"):
            raise ValueError(f"MMTM curation must be 'gate' or 'squeeze', got {mechanism!r}")
        for block in self.mmtm:
            block.curation = mechanism

    def modality_parameters(self, modality: str):
        yield from encoder_parameters(self.encoders, self.modalities, modality)
        yield from self.bypass_parameters(modality)

    def encode(self, curate: Optional[str] = None, **inputs) -> dict:
        check_modality_inputs(self.modalities, inputs)
        if curate is not None and curate not in self.modalities:
            raise KeyError(f"curate={curate!r} is not a modality of this model ({self.modalities})")
        parts = {m: _encoder_stages(self.encoders[m]) for m in self.modalities}
        hs = {m: parts[m][0](inputs[m]) for m in self.modalities}
        for i, block in enumerate(self.mmtm):
            hs = {m: parts[m][1][i](hs[m]) for m in self.modalities}
            hs = block(hs, curate)
        return {m: parts[m][2](hs[m]) for m in self.modalities}

    def forward(self, labels: Optional[torch.Tensor] = None, curate: Optional[str] = None, **inputs):
        return self.fuse(self.encode(curate=curate, **inputs), labels)


@register_architecture("mmtm")
def build_mmtm(model_cfg, modalities, input_shapes, num_classes) -> MMTMClassifier:
    if model_cfg.fusion not in ("concat", "sum", "film", "gated"):
        raise ValueError(f"model.fusion {model_cfg.fusion!r} is not a classifier fusion (concat, sum, film, gated)")
    return MMTMClassifier(MMTMConfig.from_recipe(model_cfg, modalities, input_shapes, num_classes))


register_auto(MMTMConfig, MMTMClassifier)
