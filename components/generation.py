"""Text generation from a causal LM: several prompts decoded together, one token per step, each with
its own sampling settings (temperature, nucleus `top_p`, seed), token budget and deadline.

transformers' `generate()` takes one set of settings per batch and stops only at the end; serving
wants requests with different settings batched together, each streamed token by token and cut off
at its own deadline, so the loop is ours: left-padded prompts, the KV cache, one forward per step.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import torch

from components.vocab import separator_id, start_id

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
    start = start_id(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([start] if start is not None else []) + ids


def nucleus_sample(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator]
) -> list[int]:
    """Each row's next token id from its next-token logits (rows x vocabulary), the rows in one
    pass: the argmax at temperature 0, else a draw with the row's own generator (one uniform number
    a step, so a seed gives the same text in any batch) from the smallest set of likeliest tokens
    whose probability reaches the row's `top_p`."""
    tokens = logits.argmax(-1)
    drawn = [row for row, temperature in enumerate(temperatures) if temperature > 0]
    if drawn:
        rows = torch.tensor(drawn)
        scale = torch.tensor([temperatures[row] for row in drawn])[:, None]
        probs = torch.softmax(logits[rows].float() / scale, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        top_p = torch.tensor([top_ps[row] for row in drawn])[:, None]
        before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens likelier than each
        sorted_probs[(before >= top_p) & (top_p < 1.0)] = 0.0  # the first token always stays
        cumulative = sorted_probs.cumsum(-1)
        uniform = torch.cat([torch.rand(1, generator=generators[row]) for row in drawn])
        picks = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
        tokens[rows] = order.gather(-1, picks.clamp(max=order.shape[-1] - 1)).squeeze(-1)
    return tokens.tolist()


class Decoding:
    """Prompts continued together. `step()` adds one token to every row still running and returns
    the rows that changed; a row ends at the end token, after `max_new_tokens`, or at its deadline."""

    def __init__(self, model, tokenizer, asks: list[Ask]) -> None:
        self.model, self.tokenizer, self.asks = model, tokenizer, asks
        self.rows = [Row() for _ in asks]
        self.end = separator_id(tokenizer)  # the end of a document: generation stops there
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
        now = time.monotonic()
        changed = [index for index, row in enumerate(self.rows) if row.finish_reason is None]
        for index in changed:
            if now > self.asks[index].deadline:
                self.rows[index].finish_reason = DEADLINE
        running = [index for index in changed if self.rows[index].finish_reason is None]
        drawn = nucleus_sample(
            output.logits[running, -1, :],
            [self.asks[index].temperature for index in running],
            [self.asks[index].top_p for index in running],
            [self.generators[index] for index in running],
        )
        chosen = [self.pad] * len(self.rows)
        for index, token in zip(running, drawn, strict=True):
            chosen[index] = self._advance(self.asks[index], self.rows[index], token)
        self.next_input = torch.tensor(chosen)[:, None]
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype)], dim=-1)
        self.positions = self.positions[:, -1:] + 1
        return changed

    def keep(self, indices: list[int]) -> None:
        """Drop every row but these (ended rows, between steps): the batch shrinks to what runs."""
        if indices == list(range(len(self.rows))):
            return
        chosen = torch.tensor(indices, dtype=torch.long)
        self.asks = [self.asks[i] for i in indices]
        self.rows = [self.rows[i] for i in indices]
        self.generators = [self.generators[i] for i in indices]
        self.mask, self.positions, self.next_input = self.mask[chosen], self.positions[chosen], self.next_input[chosen]
        self.cache.batch_select_indices(chosen)
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row reads
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]

    def absorb(self, other: Decoding) -> None:
        """Take in the rows of another decoding that has made its first step (its prompts read):
        both caches left-padded to one length and stacked, so the rows go on in one forward."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for decoding in (self, other):
            missing = width - decoding.mask.shape[1]
            if missing:
                decoding.mask = torch.nn.functional.pad(decoding.mask, (missing, 0))
                for layer in decoding.cache.layers:  # keys and values: (rows, heads, length, head size)
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_input = torch.cat([self.next_input, other.next_input])
        self.asks, self.rows = self.asks + other.asks, self.rows + other.rows
        self.generators = self.generators + other.generators

    def _advance(self, ask: Ask, row: Row, token: int) -> int:
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


async def paced(out: asyncio.Queue, interval_s: float = 0.0):
    """A row's events as its reader takes them from `out`: at most one every `interval_s` (and no
    faster than the reader reads), the tokens made meanwhile merged into one; an exception put
    there is raised; ends after the event with the finish_reason."""
    loop, sent = asyncio.get_running_loop(), float("-inf")
    while True:
        event = await out.get()
        if isinstance(event, dict) and "finish_reason" not in event and loop.time() < sent + interval_s:
            await asyncio.sleep(sent + interval_s - loop.time())
        while not isinstance(event, BaseException) and "finish_reason" not in event and not out.empty():
            later = out.get_nowait()
            event = later if isinstance(later, BaseException) else {**later, "token": event["token"] + later["token"]}
        if isinstance(event, BaseException):
            raise event
        yield event
        sent = loop.time()
        if "finish_reason" in event:
            return


def step_events(decoding: Decoding, readers: list) -> tuple[list[int], list[tuple]]:
    """After a step, the event of each reader `(key, whole, TextDelta)` of the decoding's rows, as
    `(key, event)`: the new text of a running row (unless `whole`), the whole answer of an ended
    one; and the indices of the rows still running."""
    kept, events = [], []
    for index, ((key, whole, delta), row) in enumerate(zip(readers, decoding.rows, strict=True)):
        if row.finish_reason is None:
            kept.append(index)
            if not whole:
                events.append((key, {"token": delta(row.text)}))
        else:
            answer = {"text": row.text, "tokens": len(row.ids), "finish_reason": row.finish_reason}
            events.append((key, {"token": delta(row.text), **answer}))
    return kept, events
