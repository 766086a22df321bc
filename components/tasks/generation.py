"""Generation (domain adaptation): continued causal-LM training on a task's texts, on a decoder (the
gpt2 family, or an `init_from` GPT-2 checkpoint). A row is a text (`text_column`; there is no label:
the text is its own). Each text is one document as in pre-training, the start token, its tokens,
the end token, and the model learns every next token. Scored by next-token accuracy and loss
(perplexity is exp of `eval/loss`); served at POST /generate (components/generation.py)."""

from __future__ import annotations

import pyarrow as pa

from components.tasks.base import IGNORE, TaskType
from components.vocab import separator_id

PREDICT_NEW_TOKENS = 32  # what /predict and the registered pyfunc add to each text (greedy)


def _check_rows(table: pa.Table, split: str) -> None:
    kind = table.column("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"the {split} split's text column holds {kind}, not texts: a generation task reads strings")
    for row, text in enumerate(table.column("text").to_pylist()):
        if not (text or "").strip():
            raise ValueError(f"row {row + 1} of the {split} split has an empty text: drop it")


def _no_classes(table: pa.Table) -> list[str]:
    return []


def _tokenize(batch: pa.Table, tokenizer, seq_len: int, label_ids: dict[str, int], **options) -> dict:
    """Start token, the text (cut to fit), end token, padding; each position's label is the next
    token (IGNORE at the last token and on padding)."""
    from components.generation import prompt_ids  # here: it imports torch, which config work never needs

    end = separator_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    ids, masks, labels = [], [], []
    for text in batch.column("text").to_pylist():
        row = prompt_ids(tokenizer, text)[: seq_len - 1] + [end]
        padding = seq_len - len(row)
        ids.append(row + [pad] * padding)
        masks.append([1] * len(row) + [0] * padding)
        labels.append(row[1:] + [IGNORE] * (padding + 1))
    return {
        "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "attention_mask": pa.array(masks, type=pa.list_(pa.int8())),
        "label": pa.array(labels, type=pa.list_(pa.int64())),
    }


def _scores(gold: list[list[int]], guessed: list[list[int]], names: list[str], split_dir=None) -> dict[str, float]:
    """Next-token accuracy over every labelled position of the split."""
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy

    truth = torch.tensor([token for row in gold for token in row])
    guess = torch.tensor([token for row in guessed for token in row])
    classes = int(max(truth.max(), guess.max())) + 1 if len(truth) else 2
    return {"accuracy": float(multiclass_accuracy(guess, truth, num_classes=classes, average="micro"))}


def _predict(model, tokenizer, texts: list[str], max_tokens: int) -> list[dict]:
    """Each text continued greedily by up to PREDICT_NEW_TOKENS tokens (fewer if the model's
    positions run out); a text longer than its share of the positions keeps its last tokens."""
    from components.generation import Ask, Decoding, prompt_ids

    budget = max(1, min(PREDICT_NEW_TOKENS, max_tokens // 2))
    prompts = [prompt_ids(tokenizer, text) for text in texts]
    asks = [Ask(ids[-(max_tokens - budget) :], budget, temperature=0.0) for ids in prompts]
    rows = Decoding(model, tokenizer, asks).run()
    return [
        {"generated": row.text, "truncated": len(ids) > max_tokens - budget}
        for row, ids in zip(rows, prompts, strict=True)
    ]


def _output_example(model) -> list[dict]:
    return [{"generated": " and the rest of the story", "truncated": False}]


def _test_samples(model, tokenizer, test_dir: str, count: int) -> list[dict]:
    """The first `count` test texts cut in half: the first half continued greedily for as many
    tokens as the second half has, beside it."""
    import pyarrow.parquet as pq

    from components.generation import Ask, Decoding

    table = pq.read_table(test_dir, columns=["input_ids", "attention_mask"]).slice(0, count).to_pydict()
    samples = []
    for ids, mask in zip(table["input_ids"], table["attention_mask"], strict=True):
        document = ids[: sum(mask)]
        half = max(1, len(document) // 2)
        row = Decoding(model, tokenizer, [Ask(document[:half], len(document) - half, temperature=0.0)]).run()[0]
        samples.append(
            {
                "prompt": tokenizer.decode(document[:half], skip_special_tokens=True),
                "reference": tokenizer.decode(document[half:], skip_special_tokens=True),
                "output": row.text,
            }
        )
    return samples


TASK = TaskType(
    name="generation",
    model_noun="generator",
    auto_model="AutoModelForCausalLM",
    mlflow_task=None,  # a pyfunc: ptft's own decoding loop and limits
    headline="accuracy",
    reports=("loss", "accuracy"),
    check_rows=_check_rows,
    label_values=_no_classes,
    labels_of=_no_classes,
    tokenize=_tokenize,
    scores=_scores,
    example="The film opens with",
    architecture="LMHeadModel",  # GPT2LMHeadModel
    predict=_predict,
    has_classes=False,
    test_samples=_test_samples,
    output_example=_output_example,
    explain=None,  # not built yet: the last token's attention over the prompt would be the natural map
)
