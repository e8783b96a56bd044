"""Modality maps: component prefixes, token positions, LM-only target regex, on the tiny twins of each family."""
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from mmbalance_llm.data.chat import ChatCollator, load_conversations  # noqa: E402
from mmbalance_llm.data.mm_synthetic import write_instruction_set  # noqa: E402
from mmbalance_llm.models.modality_map import (  # noqa: E402
    MODALITY_IDS, ModalityMap, component_parameters, get_modality_map, modality_masks, register_modality_map,
    supported_model_types, token_modality_ids)
from mmbalance_llm.models.tiny import FAMILIES, tiny_model_and_processor  # noqa: E402

MEDIA = {"llava": "image", "qwen2_vl": "image", "qwen2_5_vl": "image", "qwen2_audio": "audio"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    write_instruction_set(root / "image", ("image",), 4, 1, 1, seed=3)
    write_instruction_set(root / "audio", ("audio",), 4, 1, 1, seed=4)
    out = {}
    for fam in FAMILIES:
        model, proc = tiny_model_and_processor(fam)
        recs = load_conversations(root / MEDIA[fam] / "train.json")
        out[fam] = (model, ChatCollator(proc, model.config)(recs[:2]))
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_components_partition_parameters(fam, built):
    model, _ = built[fam]
    mmap = get_modality_map(model)
    parts = {c: {id(p) for p in component_parameters(model, c)} for c in ("tower", "projector", "language_model")}
    all_ids = {id(p) for p in model.parameters()}
    assert set.union(*parts.values()) == all_ids  # every parameter belongs to one component...
    assert sum(len(v) for v in parts.values()) == len(all_ids)  # ...and only one
    assert all(parts.values())  # none is empty
    assert mmap.component_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.weight") == "language_model"


def test_qwen2_vl_merger_is_projector_not_tower(built):
    model, _ = built["qwen2_vl"]
    mmap = get_modality_map(model)
    assert mmap.component_of("model.visual.merger.mlp.0.weight") == "projector"
    assert mmap.component_of("model.visual.blocks.0.attn.qkv.weight") == "tower"


@pytest.mark.parametrize("fam", FAMILIES)
def test_target_regex_hits_only_language_model_projections(fam, built):
    model, _ = built[fam]
    rx = re.compile(get_modality_map(model).target_modules_regex())
    hits = [n for n, _ in model.named_modules() if rx.fullmatch(n)]
    assert len(hits) == 7 * model.config.text_config.num_hidden_layers
    assert all("language_model" in n for n in hits)
    # the towers do have q_proj-like names on some families; the regex must not take them
    towers = [n for n, _ in model.named_modules() if n.endswith("q_proj") and "language_model" not in n]
    assert not any(rx.fullmatch(n) for n in towers)


@pytest.mark.parametrize("fam", FAMILIES)
def test_token_positions_match_the_media_token_counts(fam, built):
    model, batch = built[fam]
    ids = token_modality_ids(batch, model)
    assert ids.shape == batch["input_ids"].shape
    media_id = MODALITY_IDS[MEDIA[fam]]
    tid = get_modality_map(model).token_ids(model.config)[MEDIA[fam]]
    assert torch.equal(ids == media_id, batch["input_ids"] == tid)
    per_sample = (ids == media_id).sum(1)
    expected = {"llava": 16, "qwen2_vl": 16, "qwen2_5_vl": 16, "qwen2_audio": 25}[fam]
    assert per_sample.tolist() == [expected] * 2
    masks = modality_masks(batch, model)
    assert not (masks["text"] & masks[MEDIA[fam]]).any()
    assert ((masks["text"] | masks[MEDIA[fam]]) == batch["attention_mask"].bool()).all()


def test_mm_token_type_ids_win_over_input_ids(built):
    model, batch = built["qwen2_vl"]
    b = dict(batch)
    b["mm_token_type_ids"] = torch.zeros_like(batch["input_ids"])
    b["mm_token_type_ids"][:, 0] = 2
    ids = token_modality_ids(b, model)
    assert (ids[:, 0] == 2).all() and (ids[:, 1:] == 0).all()
    b["mm_token_type_ids"][0, 0] = 9
    with pytest.raises(ValueError, match="mm_token_type_ids has value 9"):
        token_modality_ids(b, model)


def test_config_dict_and_unknown_architecture():
    assert get_modality_map({"model_type": "llava"}).modalities == ("image",)
    with pytest.raises(ValueError, match="no modality map for model_type 'bert'"):
        get_modality_map({"model_type": "bert"})
    for fam in FAMILIES + ("qwen2_5_omni_thinker",):
        assert fam in supported_model_types()


def test_register_new_architecture():
    entry = ModalityMap(model_type="my_mllm", model_class="X", modalities=("audio",), towers={"audio": ("enc",)},
                        projector=("proj",), language_model=("lm",), token_id_attrs={"audio": ("audio_token_id",)})
    register_modality_map(entry)
    ids = token_modality_ids({"input_ids": torch.tensor([[1, 7, 7, 2]])}, {"model_type": "my_mllm", "audio_token_id": 7})
    assert ids.tolist() == [[0, 3, 3, 0]]
    assert entry.component_of("enc.layers.0.w") == "tower" and entry.component_of("other") is None


def test_qwen2_5_omni_thinker_map_on_a_tiny_thinker():
    import transformers as T

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default"})
    cfg = T.Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                          output_dim=64, max_source_positions=50, n_window=10))
    model = T.Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    mmap = get_modality_map(model)
    assert set(mmap.token_ids(model.config)) == {"image", "video", "audio"}
    counts = {c: len(component_parameters(model, c)) for c in ("tower", "projector", "language_model")}
    assert all(counts.values()) and sum(counts.values()) == len(list(model.parameters()))
    rx = re.compile(mmap.target_modules_regex())
    assert sum(1 for n, _ in model.named_modules() if rx.fullmatch(n)) == 7 * 2
