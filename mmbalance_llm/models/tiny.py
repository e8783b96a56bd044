"""Tiny random-weight twins of the supported HF multimodal LLM families, with a locally trained tokenizer.

Every real-checkpoint recipe has a tiny twin built here so that it runs on a CPU in CI, with no hub access:
the *real* HF model classes (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ...)
and real processors, only with small configs, random weights and a byte-level BPE tokenizer trained on
the synthetic instruction corpus (so the answer words are single tokens and a tiny model can learn them).

Build one on disk (recipes point at the folder)::

    python -m mmbalance_llm.models.tiny llava runs/tiny/llava
    python -m mmbalance_llm.models.tiny all runs/tiny          # one sub-folder per family

or in Python: ``build_tiny("llava", out_dir)`` (writes the folder) / ``tiny_model_and_processor("llava")``
(in memory, what the tests use).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen2_audio")
# twins with two non-text modalities (image + audio), for Fork-Merge Decoding (mmbalance_llm.decoding)
AV_FAMILIES = ("qwen2_5_omni_thinker",)
ALL_FAMILIES = FAMILIES + AV_FAMILIES

# Chat templates follow each family's real one closely enough that prompts look alike; the tiny tokenizer
# knows every special token used here.
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
    "{% else %}{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIALS = {
    "llava": ["<pad>", "<s>", "</s>", "<unk>", "<image>"],
    "qwen2_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"],
    "qwen2_audio": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"],
}
_SPECIALS["qwen2_5_vl"] = _SPECIALS["qwen2_vl"]
# Qwen2.5-Omni's thinker: image and audio placeholders as in its real template (<|IMAGE|>, <|AUDIO|>)
_SPECIALS["qwen2_5_omni_thinker"] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_bos|>", "<|vision_eos|>",
                             "<|IMAGE|>", "<|VIDEO|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"]
_OMNI_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Geometry of the tiny twins (see docs/moka.md): image 32 px, LLaVA patch 8 -> 16 image tokens;
# Qwen2-VL patch 4, merge 2 -> 16 tokens for a 32 px image; Qwen2-Audio 1 s clips, 100 mel frames -> 25 tokens.
IMAGE_SIZE = 32
AUDIO_SR = 16000
AUDIO_SECONDS = 1
OMNI_FEATURES_DIR = "feature_extractor"  # the Omni twin's Whisper config (MMProcessor.from_pretrained reads it)


def _corpus() -> list[str]:
    from mmbalance_llm.data.mm_synthetic import vocabulary_corpus

    return vocabulary_corpus()


def train_tokenizer(family: str, vocab_size: int = 1000):
    """Byte-level BPE trained on the synthetic corpus + chat-template words, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = _corpus() + ["USER: ASSISTANT: system user assistant You are a helpful assistant."] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer=trainer)
    if family == "llava":
        kw = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                  extra_special_tokens={"image_token": "<image>"})
    elif family == "qwen2_audio":
        kw = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>",
                  extra_special_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                                        "audio_eos_token": "<|audio_eos|>"})
    elif family == "qwen2_5_omni_thinker":
        kw = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>",
                  extra_special_tokens={"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
                                        "audio_token": "<|AUDIO|>", "vision_bos_token": "<|vision_bos|>",
                                        "vision_eos_token": "<|vision_eos|>", "audio_bos_token": "<|audio_bos|>",
                                        "audio_eos_token": "<|audio_eos|>"})
    else:
        kw = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>",
                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, padding_side="right", **kw)
    tok.chat_template = {"llava": _LLAVA_TEMPLATE, "qwen2_5_omni_thinker": _OMNI_TEMPLATE}.get(family, _QWEN_TEMPLATE)
    return tok


def _text_cfg(tok, **extra):
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id)
    cfg.update(extra)
    return cfg


def _build(family: str, seed: int, text_layers: int | None = None):
    import torch
    import transformers as T

    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(ALL_FAMILIES)}")
    if text_layers is not None and family != "qwen2_5_omni_thinker":
        raise ValueError(f"text_layers: only the qwen2_5_omni_thinker twin takes a decoder depth, not {family!r}")
    tok = train_tokenizer(family)
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    torch.manual_seed(seed)
    if family == "llava":
        vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=8, projection_dim=32)
        cfg = T.LlavaConfig(vision_config=vc, text_config=T.LlamaConfig(**_text_cfg(tok)),
                            image_token_index=ids("<image>"), image_seq_length=(IMAGE_SIZE // 8) ** 2,
                            vision_feature_select_strategy="default", vision_feature_layer=-2,
                            pad_token_id=tok.pad_token_id)
        model = T.LlavaForConditionalGeneration(cfg)
        ip = T.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                  crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                image_token="<image>", num_additional_image_tokens=1, chat_template=tok.chat_template)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text = _text_cfg(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [2, 3, 3]})
        tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                      vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                          temporal_patch_size=2, in_channels=3)
            cfg = T.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
            model = T.Qwen2VLForConditionalGeneration(cfg)
            proc_cls = T.Qwen2VLProcessor
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
            cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
            model = T.Qwen2_5_VLForConditionalGeneration(cfg)
            proc_cls = T.Qwen2_5_VLProcessor
        px = IMAGE_SIZE * IMAGE_SIZE
        ip = T.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                     size={"shortest_edge": px, "longest_edge": px})
        try:  # Qwen2VLProcessor insists on a video processor, and that needs torchvision
            vp = T.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": px, "longest_edge": px})
            proc = proc_cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
        except ImportError:
            from mmbalance_llm.data.chat import MMProcessor

            proc = MMProcessor(tokenizer=tok, image_processor=ip)
    elif family == "qwen2_5_omni_thinker":
        model, proc = _build_omni_thinker(tok, ids, text_layers or 2)
    else:  # qwen2_audio
        frames = AUDIO_SECONDS * AUDIO_SR // 160
        ac = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                  max_source_positions=frames // 2)
        cfg = T.Qwen2AudioConfig(audio_config=ac, text_config=dict(model_type="qwen2", **_text_cfg(tok)),
                                 audio_token_index=ids("<|AUDIO|>"))
        model = T.Qwen2AudioForConditionalGeneration(cfg)
        fe = T.WhisperFeatureExtractor(feature_size=16, sampling_rate=AUDIO_SR, hop_length=160,
                                       chunk_length=AUDIO_SECONDS, n_fft=400, return_attention_mask=True)
        proc = T.Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=tok.chat_template)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), proc


def _whisper_features():
    import transformers as T

    return T.WhisperFeatureExtractor(feature_size=16, sampling_rate=AUDIO_SR, hop_length=160,
                                     chunk_length=AUDIO_SECONDS, n_fft=400, return_attention_mask=True)


def _build_omni_thinker(tok, ids, text_layers: int = 2):
    """Qwen2.5-Omni's thinker (image + video + audio towers, Qwen2 decoder with 3-D M-RoPE), tiny sizes.

    Its HF processor needs a torchvision video processor, so the processor here is the toolkit's
    :class:`~mmbalance_llm.data.chat.MMProcessor` (tokenizer + Qwen2-VL image processor + Whisper features);
    the feature extractor is saved in ``feature_extractor/`` because both write ``preprocessor_config.json``.
    """
    import transformers as T

    from mmbalance_llm.data.chat import MMProcessor

    frames = AUDIO_SECONDS * AUDIO_SR // 160
    text = _text_cfg(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     num_hidden_layers=text_layers)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    audio = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                 max_source_positions=frames // 2, n_window=frames // 2, output_dim=64)
    cfg = T.Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=text, image_token_index=ids("<|IMAGE|>"),
        video_token_index=ids("<|VIDEO|>"), audio_token_index=ids("<|AUDIO|>"),
        vision_start_token_id=ids("<|vision_bos|>"), vision_end_token_id=ids("<|vision_eos|>"),
        audio_start_token_id=ids("<|audio_bos|>"), audio_end_token_id=ids("<|audio_eos|>"),
        user_token_id=ids("user") if ids("user") is not None else tok.pad_token_id, pad_token_id=tok.pad_token_id)
    model = T.Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    px = IMAGE_SIZE * IMAGE_SIZE
    ip = T.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                 size={"shortest_edge": px, "longest_edge": px})
    return model, MMProcessor(tokenizer=tok, image_processor=ip, feature_extractor=_whisper_features())


def tiny_model_and_processor(family: str, seed: int = 0, text_layers: int | None = None):
    """Return ``(model, processor)`` for a tiny random-weight twin of ``family`` (in memory, nothing written).
    ``text_layers``: decoder depth of the Qwen2.5-Omni thinker twin (default 2)."""
    return _build(family, seed, text_layers)


def build_tiny(family: str, out_dir: str | Path, seed: int = 0, text_layers: int | None = None) -> Path:
    """Build the tiny twin of ``family`` and save model (safetensors) + processor + tokenizer to ``out_dir``.

    ``AutoProcessor.from_pretrained(out_dir)`` and ``<ModelClass>.from_pretrained(out_dir)`` then load it offline.
    Returns the folder. ``family="all"`` writes one sub-folder per family and returns the parent.
    """
    out = Path(out_dir)
    if family == "all":
        for f in ALL_FAMILIES:
            build_tiny(f, out / f, seed)
        return out
    model, proc = _build(family, seed, text_layers)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if family == "qwen2_5_omni_thinker":  # its image processor and feature extractor share a config name
        proc.tokenizer.save_pretrained(out)
        proc.image_processor.save_pretrained(out)
        proc.feature_extractor.save_pretrained(out / OMNI_FEATURES_DIR)
        # names the real processor class, so AutoProcessor tries it (it needs torchvision) and load_processor
        # falls back to MMProcessor instead of returning the bare tokenizer
        (out / "processor_config.json").write_text('{"processor_class": "Qwen2_5OmniProcessor"}\n')
    else:
        proc.save_pretrained(out)
    return out


def load_tiny(path: str | Path, attn_implementation: str | None = None):
    """Load a folder written by :func:`build_tiny` (or any HF MLLM checkpoint) as ``(model, processor)``."""
    from transformers import AutoConfig

    from mmbalance_llm.data.chat import load_processor
    from mmbalance_llm.models.modality_map import model_class_for

    cfg = AutoConfig.from_pretrained(path)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = model_class_for(cfg).from_pretrained(path, **kw)
    return model, load_processor(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmbalance_llm.models.tiny",
                                description="Build a tiny random-weight MLLM twin (model + processor) on disk.")
    p.add_argument("family", choices=ALL_FAMILIES + ("all",))
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_tiny(a.family, a.out_dir, a.seed)
    print(f"wrote tiny {a.family} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
