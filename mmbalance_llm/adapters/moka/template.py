"""The assistant header of a chat template as token ids, for ``MokaConfig.answer_marker_ids``.

TRL's ``SFTTrainer`` supervises every token of a ``messages`` sample (unless ``assistant_only_loss``), so labels
no longer say where the question ends. The header that opens the assistant's turn does: it is what
``add_generation_prompt=True`` appends to a rendered conversation.
"""
from __future__ import annotations

from typing import Any


def answer_marker_ids(processor: Any) -> list[int]:
    """Token ids of the text the chat template appends for ``add_generation_prompt=True``, as they are tokenised
    in context (BPE may merge the header with the text before it, so the two renderings are tokenised whole and
    the common prefix dropped)."""
    tok = getattr(processor, "tokenizer", processor)
    render = processor if hasattr(processor, "apply_chat_template") else tok
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Which one?"}]}]
    try:
        plain = render.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        with_header = render.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # no template, or one that rejects list content
        raise ValueError(f"answer_marker_ids: the processor's chat template could not be rendered ({e})") from e
    if with_header == plain or not with_header.startswith(plain):
        raise ValueError("answer_marker_ids: the chat template adds no generation prompt, so it has no assistant "
                         "header to find; mask the prompt in labels instead")
    a = tok(plain, add_special_tokens=False)["input_ids"]
    b = tok(with_header, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return [int(t) for t in b[k:]]
