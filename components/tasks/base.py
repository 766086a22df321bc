"""The task type declaration (see components/tasks/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

IGNORE = -100  # a position without a label (special tokens, later sub-words): no loss, no score


@dataclass(frozen=True)
class TaskType:
    """One kind of task, as every stage sees it.

    Rows are tables with the columns `text` and `label` (the configured columns, renamed). What a
    row holds differs: a string and a label for sentence classification, a list of words and a list
    of tags for entities. Tokenized, every row has `input_ids`, `attention_mask` and `label`, where
    `label` is one id per row or one id per token (IGNORE where there is nothing to learn).
    """

    name: str
    auto_model: str  # the transformers class that adds the head, e.g. AutoModelForTokenClassification
    mlflow_task: str  # the transformers pipeline task MLflow logs the model under
    headline: str  # the metric the sweep optimises and the registry's champion gate compares, e.g. "f1"
    reports: tuple[str, ...]  # the metrics every evaluation gives (as eval/<name> and test/<name>)
    check_rows: Callable[[pa.Table, str], None]  # raises ValueError naming the problem in split `name`
    label_values: Callable[[pa.Table], list[str]]  # the label set of the train split, in id order
    labels_of: Callable[[pa.Table], list[str]]  # every label value of a split (for unseen-label errors)
    tokenize: Callable[..., dict]  # (batch, tokenizer, seq_len, label_ids) -> columns of the tokenized rows
    scores: Callable[[list[list[int]], list[list[int]], list[str]], dict[str, float]]
    example: object  # an input example for the registered model's signature
    architecture: str  # how the head's class names end (BertForTokenClassification): tells a saved model's type
    predict: Callable[..., list[dict]]  # (model, tokenizer, texts, max_tokens) -> the served answer per text

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_model)


def truncated(encoded) -> list[bool]:
    """Per text: whether the (fast) tokenizer cut it at max_length."""
    return [bool(encoding.overflowing) for encoding in encoded.encodings]
