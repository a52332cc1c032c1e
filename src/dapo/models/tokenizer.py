"""Tokenizers: a checkpoint's tokenizer, its chat template applied, and the special token ids generation
and padding use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (transformers ``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def apply_chat_template(tokenizer: Any, messages: Sequence[Any]) -> list[int]:
    """Token ids of ``messages`` (dicts or objects with ``role`` and ``content``) under the tokenizer's chat
    template, ending with the assistant generation prompt."""
    return apply_chat_templates(tokenizer, [messages])[0]


def apply_chat_templates(tokenizer: Any, conversations: Sequence[Sequence[Any]]) -> list[list[int]]:
    """`apply_chat_template` of many conversations: each rendered, then all tokenized in one call (a data
    set's prompts at start-up)."""
    texts = [_render(tokenizer, messages) for messages in conversations]
    if not texts:
        return []
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids


def _render(tokenizer: Any, messages: Sequence[Any]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"tokenizer {name!r} has no chat template; use a plain prompt template instead")
    convo = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {i} needs string 'role' and 'content', got {m!r}")
        convo.append({"role": role, "content": content})
    text: str = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    return text


def pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The end-of-turn / end-of-sequence ids that end a response."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return tuple(sorted(i for i in ids if i is not None))
