"""Which special tokens play which part, for trained tokenizers ([CLS]/[SEP]/[PAD]/[MASK]) and
loaded ones alike (GPT-2 has only an end-of-text token)."""

from __future__ import annotations


def separator_id(tokenizer) -> int | None:
    """The token between packed documents and at the end of a block: [SEP], else end-of-text."""
    return tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


def start_id(tokenizer) -> int | None:
    """The token a packed block starts with: [CLS], else beginning-of-text, else none."""
    return tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id


def special_ids(tokenizer) -> dict[str, int | None]:
    """pad/bos/eos ids for a new model's config."""
    return {"pad": tokenizer.pad_token_id, "bos": start_id(tokenizer), "eos": separator_id(tokenizer)}
