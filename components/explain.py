"""Attention maps: where a classifier's heads look when it decides, and where a translation model's
decoder looks in the source for each word it writes (`cross_attention_maps`). One function computes them
(the finetune stage's picture, `POST /explain` and `ptft explain` all call it) for the token that
summarises the text: [CLS] for encoders, the last real token for decoders (GPT-2 classifies from it).
A token classifier (entities) decides per token: its map is of the token its task type picks (the
first word served as part of an entity, else the first word, in the window of a long text that
tags it), with that token's tag as the label. A question answering
model reads a question with its context, cut into windows: its map is of the most likely answer start
in the window its served answer comes from (the label `answer start`, its probability the score).
"""

from __future__ import annotations

import contextlib

from components.schemas import objective_of

MAX_EXPLAIN_TEXTS = 8  # attention maps are heads x tokens per text: keep answers small


def attention_maps(
    model,
    tokenizer,
    texts: list,
    *,
    max_tokens: int,
    layer: int = -1,
    windows: tuple | None = None,
    queries: list[int | None] | None = None,
) -> list[dict]:
    """Per text (or `{question, context}`): its tokens, the prediction, and `attention` as heads x
    tokens (the summary token's attention over the text in `layer`; -1 is the last). `windows`:
    the inputs already encoded and, per text, the row of them to show (how a question answering
    model's items and a long text for a tagger come, in the windows serving cut:
    components/tasks/); else each text cut at `max_tokens`. `queries`: for a tagger, per text the
    position whose tag to show (the entities type picks its first served entity's; None: the
    summary token)."""
    import torch  # here: the serving module imports this one, and its driver never needs torch

    if windows is not None:
        encoded, shown = windows
    else:
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        shown = range(len(texts))
    inputs = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    with _eager_attention(model), torch.inference_mode():
        output = model(**inputs, output_attentions=True)
    layers = len(output.attentions)
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer}: the model has {layers} layers (0..{layers - 1}, or -1 for the last)")
    weights = output.attentions[layer].float()  # batch x heads x query x key
    answers = "logits" not in output
    probabilities = _start_probabilities(encoded, output) if answers else output.logits.float().softmax(-1)
    labels = {0: "answer start"} if answers else model.config.id2label
    # The model's own kind, not its tokenizer's: ptft's GPT-2 tokenizers have a [CLS] too, which
    # the decoder reads first and so sees nothing else with.
    summary_is_first = objective_of(model.config.model_type) == "mlm"
    maps = []
    for index, (row, text) in enumerate(zip(shown, texts, strict=True)):
        kept = encoded["attention_mask"][row].nonzero().flatten()
        query = int(kept[0]) if summary_is_first else int(kept[-1])
        if answers:
            score, query = probabilities[row].max(-1)
            query, label = int(query), 0
        elif probabilities.dim() == 3:  # a tag per token: the token its task type chose (else the first)
            query = queries[index] if queries and queries[index] is not None else query
            score, label = probabilities[row, query].max(-1)
        else:
            score, label = probabilities[row].max(-1)
        query_token = tokenizer.convert_ids_to_tokens(int(encoded["input_ids"][row, query]))
        maps.append(
            {
                "text": text,
                "tokens": tokenizer.convert_ids_to_tokens(encoded["input_ids"][row, kept].tolist()),
                "label": labels[int(label)],
                "score": round(float(score), 6),
                "layer": layer % layers,
                "query_token": query_token,
                "attention": [[round(float(value), 5) for value in head] for head in weights[row, :, query, kept]],
            }
        )
    return maps


def cross_attention_maps(model, tokenizer, texts: list, *, max_tokens: int, layer: int = -1) -> list[dict]:
    """An encoder-decoder's view of its own translations: per text its source `tokens`, the
    `translation` (beam search, as served) and its `target_tokens`, and `attention` as target tokens
    x source tokens: for each target token, where the decoder's cross-attention looked when it chose
    it, in `layer` (-1 the last), the mean over heads."""
    import torch

    from components.tasks.translation import decode_ids, target_tokens

    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    budget = target_tokens(tokenizer)
    # Token ids, the decoder's start token first.
    generated = decode_ids(model, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=budget)
    with _eager_attention(model), torch.inference_mode():
        output = model(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            decoder_input_ids=generated[:, :-1],  # position p chooses token p + 1
            output_attentions=True,
        )
    layers = len(output.cross_attentions)
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer}: the decoder has {layers} layers (0..{layers - 1}, or -1 for the last)")
    weights = output.cross_attentions[layer].float().mean(1)  # batch x target x source
    ended = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}
    maps = []
    for row, text in enumerate(texts):
        source = encoded["attention_mask"][row].nonzero().flatten()
        target = generated[row, 1:].tolist()
        length = next((index + 1 for index, token in enumerate(target) if token in ended), len(target))
        maps.append(
            {
                "text": text,
                "tokens": tokenizer.convert_ids_to_tokens(encoded["input_ids"][row, source].tolist()),
                "translation": tokenizer.decode(target[:length], skip_special_tokens=True),
                "target_tokens": tokenizer.convert_ids_to_tokens(target[:length]),
                "layer": layer % layers,
                "attention": [[round(float(value), 5) for value in step] for step in weights[row, :length][:, source]],
            }
        )
    return maps


def _start_probabilities(encoded, output):
    """Each token's probability of starting the answer, over the context's tokens only."""
    import torch

    context = torch.tensor(
        [[sequence == 1 for sequence in encoded.sequence_ids(row)] for row in range(len(encoded["input_ids"]))]
    )
    return output.start_logits.float().masked_fill(~context, float("-inf")).softmax(-1)


@contextlib.contextmanager
def _eager_attention(model):
    """Fused attention kernels (SDPA, flash) return no weights: compute eagerly for this call."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)
