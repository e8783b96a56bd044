"""Which parts of an HF multimodal LLM belong to which modality: module prefixes and token positions.

One :class:`ModalityMap` entry per architecture (keyed by ``config.model_type``) says

* the module prefixes of each modality's **tower**, of the **projector** and of the **language model**
  (paths as in ``model.named_modules()`` of the ``*ForConditionalGeneration`` class, transformers 5.x);
* the config attributes holding each modality's placeholder **token id**;
* the chat placeholder strings (``<image>``, ``<audio>``) and how many tokens each media item expands to.

Token positions map to modalities by the processor's ``mm_token_type_ids`` when the batch has it
(0 text, 1 image, 2 video, 3 audio: the transformers convention, reused here as :data:`MODALITY_IDS`),
else by comparing ``input_ids`` with the config's token ids. Media start/end markers
(``<|vision_start|>``, ``<|audio_bos|>``) count as text.

Public API (used by MokA, attribution and RollingQ)::

    mmap = get_modality_map(model_or_config)          # -> ModalityMap
    ids = token_modality_ids(batch, model_or_config)  # -> LongTensor [B, T] of MODALITY_IDS values
    masks = modality_masks(batch, model_or_config)    # -> {"text": BoolTensor[B,T], "image": ...}
    mmap.component_of("model.visual.merger.mlp.0.weight")  # -> "projector"

Adding an architecture is one :func:`register_modality_map` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

MODALITY_IDS: dict[str, int] = {"text": 0, "image": 1, "video": 2, "audio": 3}
MODALITY_NAMES: dict[int, str] = {v: k for k, v in MODALITY_IDS.items()}

# The 7 projections of a LLaMA/Qwen decoder block; MokA and LoRA recipes target these inside the LLM only.
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModalityMap:
    """Layout of one HF MLLM architecture. Prefixes are module paths from the top ``*ForConditionalGeneration``."""

    model_type: str
    model_class: str                              # transformers class name for loading a checkpoint
    modalities: tuple[str, ...]                   # non-text modalities the architecture accepts
    towers: Mapping[str, tuple[str, ...]]         # modality -> encoder prefixes
    projector: tuple[str, ...]                    # modality projector / merger prefixes
    language_model: tuple[str, ...]               # decoder prefixes (+ lm_head)
    token_id_attrs: Mapping[str, tuple[str, ...]]  # modality -> config attribute names, first present wins
    placeholders: Mapping[str, str] = field(default_factory=dict)  # modality -> chat placeholder string
    uses_mm_token_type_ids: bool = False  # forward takes mm_token_type_ids (Qwen2-VL in v5 refuses media without them)

    def token_ids(self, config: Any) -> dict[str, int]:
        """Modality -> placeholder token id, read from ``config`` (top-level or ``text_config``)."""
        out = {}
        for mod, attrs in self.token_id_attrs.items():
            for a in attrs:
                v = _cfg_get(config, a)
                if v is not None:
                    out[mod] = int(v)
                    break
        return out

    def components(self) -> dict[str, tuple[str, ...]]:
        """Component name -> prefixes: ``tower`` (all towers), ``<modality>_tower``, ``projector``, ``language_model``."""
        comps = {"projector": self.projector, "language_model": self.language_model,
                 "tower": tuple(p for ps in self.towers.values() for p in ps)}
        comps.update({f"{m}_tower": ps for m, ps in self.towers.items()})
        return comps

    def component_of(self, name: str) -> str | None:
        """Component of a parameter/module name (longest matching prefix wins, so a merger inside a tower
        counts as ``projector``). A ``base_model.model.`` prefix from peft is ignored."""
        name = _strip_peft_prefix(name)
        best, best_len = None, -1
        for comp in ("projector", "language_model", "tower"):
            for p in self.components()[comp]:
                if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                    best, best_len = comp, len(p)
        return best

    def target_modules_regex(self, projections: tuple[str, ...] = LM_PROJECTIONS) -> str:
        """A peft ``target_modules`` regex matching ``projections`` inside the language model only (the towers
        also have ``q_proj`` names, so a plain list would wrap them too)."""
        lm = "|".join(p.replace(".", r"\.") for p in self.language_model if p != "lm_head")
        return rf"(.*\.)?({lm})\..*\.({'|'.join(projections)})"


_REGISTRY: dict[str, ModalityMap] = {}


def register_modality_map(entry: ModalityMap, *aliases: str) -> ModalityMap:
    """Add (or replace) the entry for ``entry.model_type`` (and any alias model types)."""
    for key in (entry.model_type, *aliases):
        _REGISTRY[key] = entry
    return entry


register_modality_map(ModalityMap(
    model_type="llava", model_class="LlavaForConditionalGeneration", modalities=("image",),
    towers={"image": ("model.vision_tower",)}, projector=("model.multi_modal_projector",),
    language_model=("model.language_model", "lm_head"),
    token_id_attrs={"image": ("image_token_id", "image_token_index")}, placeholders={"image": "<image>"}))

_QWEN_VL = dict(
    modalities=("image", "video"), uses_mm_token_type_ids=True,
    towers={"image": ("model.visual",), "video": ("model.visual",)},
    projector=("model.visual.merger",), language_model=("model.language_model", "lm_head"),
    token_id_attrs={"image": ("image_token_id",), "video": ("video_token_id",)},
    placeholders={"image": "<|vision_start|><|image_pad|><|vision_end|>",
                  "video": "<|vision_start|><|video_pad|><|vision_end|>"})
register_modality_map(ModalityMap(model_type="qwen2_vl", model_class="Qwen2VLForConditionalGeneration",
                                  **_QWEN_VL))
register_modality_map(ModalityMap(model_type="qwen2_5_vl", model_class="Qwen2_5_VLForConditionalGeneration",
                                  **_QWEN_VL))
register_modality_map(ModalityMap(
    model_type="qwen2_audio", model_class="Qwen2AudioForConditionalGeneration", modalities=("audio",),
    towers={"audio": ("model.audio_tower",)}, projector=("model.multi_modal_projector",),
    language_model=("model.language_model", "lm_head"),
    token_id_attrs={"audio": ("audio_token_id", "audio_token_index")},
    placeholders={"audio": "<|audio_bos|><|AUDIO|><|audio_eos|>"}))
# Qwen2.5-Omni's thinker: prefixes checked on a tiny Qwen2_5OmniThinkerForConditionalGeneration (transformers
# 5.24); its multimodal forward is not exercised by the tiny twins, so no recipe ships for it.
register_modality_map(ModalityMap(
    model_type="qwen2_5_omni_thinker", model_class="Qwen2_5OmniThinkerForConditionalGeneration",
    modalities=("image", "video", "audio"),
    towers={"image": ("model.visual",), "video": ("model.visual",), "audio": ("model.audio_tower",)},
    projector=("model.visual.merger", "model.audio_tower.proj"),
    language_model=("model.language_model", "lm_head"),
    token_id_attrs={"image": ("image_token_id", "image_token_index"), "video": ("video_token_id", "video_token_index"),
                    "audio": ("audio_token_id", "audio_token_index")},
    placeholders={"image": "<|vision_bos|><|IMAGE|><|vision_eos|>", "audio": "<|audio_bos|><|AUDIO|><|audio_eos|>"}))


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def _strip_peft_prefix(name: str) -> str:
    for p in ("base_model.model.", "module."):
        while name.startswith(p):
            name = name[len(p):]
    return name


def _cfg_get(config: Any, attr: str):
    if isinstance(config, Mapping):
        v = config.get(attr)
        tc = config.get("text_config")
    else:
        v = getattr(config, attr, None)
        tc = getattr(config, "text_config", None)
    if v is None and tc is not None:  # some configs keep token ids on the text config
        v = tc.get(attr) if isinstance(tc, Mapping) else getattr(tc, attr, None)
    return v


def _config_of(model_or_config: Any):
    """Accept a model, a PeftModel, a config object or a config dict."""
    if isinstance(model_or_config, Mapping) or hasattr(model_or_config, "model_type"):
        return model_or_config
    cfg = getattr(model_or_config, "config", None)
    if cfg is None and hasattr(model_or_config, "get_base_model"):
        cfg = model_or_config.get_base_model().config
    if cfg is None:
        raise TypeError(f"expected an HF model or config, got {type(model_or_config).__name__}")
    return cfg


def get_modality_map(model_or_config: Any) -> ModalityMap:
    """The :class:`ModalityMap` of a model, PeftModel, config or config dict; clear error when unsupported."""
    cfg = _config_of(model_or_config)
    mt = cfg.get("model_type") if isinstance(cfg, Mapping) else getattr(cfg, "model_type", None)
    if mt not in _REGISTRY:
        raise ValueError(f"no modality map for model_type {mt!r}; supported: {', '.join(supported_model_types())} "
                         "(add one with mmbalance_llm.models.modality_map.register_modality_map)")
    return _REGISTRY[mt]


def model_class_for(model_or_config: Any):
    """The transformers class that loads checkpoints of this architecture."""
    import transformers

    return getattr(transformers, get_modality_map(model_or_config).model_class)


def token_modality_ids(batch: Mapping[str, Any], model_or_config: Any):
    """Per-position modality ids ``[B, T]`` (values of :data:`MODALITY_IDS`) for a model batch.

    Uses ``batch["mm_token_type_ids"]`` when present, else matches ``batch["input_ids"]`` against the config's
    media token ids. Positions not matched are text (padding included: combine with ``attention_mask``).
    """
    import torch

    mm = batch.get("mm_token_type_ids")
    if mm is not None:
        mm = torch.as_tensor(mm).long()
        if mm.numel() and int(mm.max()) > max(MODALITY_IDS.values()):
            raise ValueError(f"mm_token_type_ids has value {int(mm.max())}; expected 0..3 (text/image/video/audio)")
        return mm
    ids = batch.get("input_ids")
    if ids is None:
        raise ValueError("token_modality_ids needs 'input_ids' or 'mm_token_type_ids' in the batch")
    ids = torch.as_tensor(ids)
    out = torch.zeros_like(ids, dtype=torch.long)
    cfg = _config_of(model_or_config)
    for mod, tid in get_modality_map(cfg).token_ids(cfg).items():
        out[ids == tid] = MODALITY_IDS[mod]
    return out


def modality_masks(batch: Mapping[str, Any], model_or_config: Any, include_padding: bool = False) -> dict:
    """``{modality: BoolTensor[B,T]}`` for "text" and every modality of the architecture.

    Padding (``attention_mask == 0``) is in no mask unless ``include_padding``.
    """
    import torch

    ids = token_modality_ids(batch, model_or_config)
    valid = torch.ones_like(ids, dtype=torch.bool)
    if not include_padding and batch.get("attention_mask") is not None:
        valid = torch.as_tensor(batch["attention_mask"]).bool()
    mods = ("text",) + get_modality_map(model_or_config).modalities
    return {m: (ids == MODALITY_IDS[m]) & valid for m in mods}


def component_parameters(model: Any, component: str) -> list:
    """Parameters of ``component`` ("tower", "<modality>_tower", "projector", "language_model") of an HF MLLM."""
    mmap = get_modality_map(model)
    if component not in mmap.components():
        raise ValueError(f"unknown component {component!r}; choose from {', '.join(mmap.components())}")
    if component.endswith("_tower") and component != "tower":
        prefixes = mmap.components()[component]
        return [p for n, p in model.named_parameters()
                if any(_strip_peft_prefix(n).startswith(x + ".") for x in prefixes)
                and mmap.component_of(n) == "tower"]
    return [p for n, p in model.named_parameters() if mmap.component_of(n) == component]
