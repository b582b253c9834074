"""Chat messages -> token ids with the tokenizer's chat template: one rendering shared by the
orchestrator (requests) and draft training (the prompts a draft learns from must look the same)."""

from __future__ import annotations


def chat_token_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Ids of `messages` ({role, content} dicts) rendered with the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
