"""Text generation from a causal LM: several prompts decoded together, one token per step, each with
its own sampling settings (temperature, nucleus `top_p`, seed), token budget and deadline.

transformers' `generate()` takes one set of settings per batch and stops only at the end; serving
wants requests with different settings batched together, each streamed token by token and cut off
at its own deadline, so the loop is ours: left-padded prompts, the KV cache, one forward per step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

STOP, LENGTH, DEADLINE = "stop", "length", "deadline"  # why a row ended: end token, budget, deadline


@dataclass
class Ask:
    """One prompt to continue, with its settings."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed; the same seed and prompt give the same text
    deadline: float = float("inf")  # time.monotonic() past which the row stops


@dataclass
class Row:
    """What a row has produced so far."""

    ids: list[int] = field(default_factory=list)
    text: str = ""  # the decoded text of `ids`
    finish_reason: str | None = None


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as the model saw documents in pre-training: the start token (if the tokenizer has
    one) and the text's tokens, with no end token after it."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([start] if start is not None else []) + ids


def end_id(tokenizer) -> int | None:
    """The token that ends a document ([SEP], else end-of-text): generation stops there."""
    return tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from a row's next-token logits: the argmax at temperature 0, else a draw from
    the smallest set of likeliest tokens whose probability reaches `top_p`."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens likelier than each
        sorted_probs[before >= top_p] = 0.0  # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoding:
    """Prompts continued together. `step()` adds one token to every row still running and returns
    the rows that changed; a row ends at the end token, after `max_new_tokens`, or at its deadline."""

    def __init__(self, model, tokenizer, asks: list[Ask]) -> None:
        self.model, self.tokenizer, self.asks = model, tokenizer, asks
        self.rows = [Row() for _ in asks]
        self.end = end_id(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.end or 0)
        self.generators = [
            torch.Generator().manual_seed(ask.seed if ask.seed is not None else random.getrandbits(63)) for ask in asks
        ]
        longest = max(len(ask.prompt_ids) for ask in asks)
        # Left padding: every row's next token is at the last position.
        ids = [[pad] * (longest - len(ask.prompt_ids)) + ask.prompt_ids for ask in asks]
        mask = [[0] * (longest - len(ask.prompt_ids)) + [1] * len(ask.prompt_ids) for ask in asks]
        self.pad = pad
        self.mask = torch.tensor(mask)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None
        self.next_input = torch.tensor(ids)

    @property
    def done(self) -> bool:
        return all(row.finish_reason is not None for row in self.rows)

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One forward pass; returns the indices of the rows that got a token or ended."""
        output = self.model(
            input_ids=self.next_input,
            attention_mask=self.mask,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position's: the prompt's other logits are never read
        )
        self.cache = output.cache
        logits = output.logits[:, -1, :]
        now = time.monotonic()
        changed, chosen = [], []
        for index, (ask, row) in enumerate(zip(self.asks, self.rows, strict=True)):
            token = self.pad
            if row.finish_reason is None:
                changed.append(index)
                token = self._advance(ask, row, logits[index], self.generators[index], now)
            chosen.append(token)
        self.next_input = torch.tensor(chosen)[:, None]
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype)], dim=-1)
        self.positions = self.positions[:, -1:] + 1
        return changed

    def _advance(self, ask: Ask, row: Row, logits: torch.Tensor, generator: torch.Generator, now: float) -> int:
        if now > ask.deadline:
            row.finish_reason = DEADLINE
            return self.pad
        token = nucleus_sample(logits, ask.temperature, ask.top_p, generator)
        if token == self.end:
            row.finish_reason = STOP
            return token
        row.ids.append(token)
        decoded = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if len(row.ids) >= ask.max_new_tokens:
            row.finish_reason = LENGTH
        if row.finish_reason or not decoded.endswith("\ufffd"):  # a character's bytes not all out yet: wait
            row.text = decoded
        return token

    def run(self) -> list[Row]:
        """Every row to its end."""
        while not self.done:
            self.step()
        return self.rows


class TextDelta:
    """What a streamed row adds at each step: its text grows, and the client gets the new end."""

    def __init__(self) -> None:
        self.sent = ""

    def __call__(self, text: str) -> str:
        if not text.startswith(self.sent):  # a tokenizer that re-spaces earlier text: send nothing new
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
