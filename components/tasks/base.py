"""The task type declaration (see components/tasks/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from components.explain import attention_maps

IGNORE = -100  # a position without a label (special tokens, later sub-words): no loss, no score


def sorted_labels(values) -> list[str]:
    """Label values as the ids' order: numerically when all are integers (ids, as a Hugging Face
    export holds them, whose `label_names` are in id order), else by name."""
    values = set(values)
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        return [str(value) for value in sorted(values)]
    return sorted(map(str, values))


def display_names(values: list[str], names: list[str] | None) -> list[str]:
    """The names the model reports for label ids: the configured ones, else the values.

    Raises:
        ValueError: when the configured names do not match the train split's labels one to one.
    """
    if names is None:
        return values
    if len(names) != len(values):
        shown = ", ".join(values[:12]) + (", ..." if len(values) > 12 else "")
        raise ValueError(f"label_names has {len(names)} names for the train split's {len(values)} labels ({shown})")
    return list(names)


def expected_names(expected: list, labels: list[str]) -> list[str]:
    """Expected labels as the model names them: an integer is a label id (as a Hugging Face
    dataset's labels are) unless the model names a label so, any other value its text."""

    def name(value) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and str(value) not in labels:
            return labels[value] if 0 <= value < len(labels) else str(value)
        return str(value)

    return [name(value) for value in expected]


def output_logits(output):
    """The head's logits: (rows, classes) or (rows, tokens, classes)."""
    return output.logits


def labelled_positions(labels, logits, kept, row: int) -> tuple[list, list]:
    """A row's gold ids and argmax ids at its labelled positions."""
    return labels[kept].tolist(), logits.argmax(-1).reshape(labels.shape)[kept].tolist()


def encoder_forward(model, batch: dict):
    """The head's output for a batch of token ids (its labels are scored outside the model)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def texts_only(items: list) -> str | None:
    """Why served inputs are not plain texts, or None."""
    for index, item in enumerate(items):
        if not isinstance(item, str):
            return f"texts.{index} is not a string: this model reads texts"
    return None


def label_and_score(model) -> list[dict]:
    return [{"label": model.config.id2label[0], "score": 0.5}]


def token_lengths(tokenizer, items: list, max_tokens: int) -> list[int]:
    return [len(ids) for ids in tokenizer(items, truncation=True, max_length=max_tokens)["input_ids"]]


@dataclass(frozen=True)
class TaskType:
    """One kind of task, as every stage sees it.

    Rows are tables with the columns `text` and `label` (the configured columns, renamed), and
    `question` for question answering. What a row holds differs: a string and a label for sentence
    classification, a list of words and a list of tags for entities, a context and its answers for
    question answering. Tokenized, every row has `input_ids`, `attention_mask` and `label`, where
    `label` is one id per row or one id per labelled position (IGNORE where there is nothing to
    learn); the loss is cross-entropy of `logits(output)` at the labelled positions.
    """

    name: str
    model_noun: str  # what a fine-tuned model of this type is: the default registry name is <pipeline>-<noun>
    auto_model: str  # the transformers class that adds the head, e.g. AutoModelForTokenClassification
    mlflow_task: str | None  # the transformers pipeline task MLflow logs the model under; None: a pyfunc
    headline: str  # the metric the sweep optimises and the registry's champion gate compares, e.g. "f1"
    reports: tuple[str, ...]  # the metrics every evaluation gives (as eval/<name> and test/<name>)
    check_rows: Callable[[pa.Table, str], None]  # raises ValueError naming the problem in split `name`
    label_values: Callable[[pa.Table], list[str]]  # the label set of the train split, in id order
    labels_of: Callable[[pa.Table], list[str]]  # every label value of a split (for unseen-label errors)
    # (batch, tokenizer, seq_len, label_ids, **options) -> columns of the tokenized rows
    tokenize: Callable[..., dict]
    # (gold rows, guessed rows, label names, the split's tokenized folder) -> scores
    scores: Callable[..., dict[str, float]]
    example: object  # an input example for the registered model's signature
    architecture: str  # how the head's class names end (BertForTokenClassification): tells a saved model's type
    predict: Callable[..., list[dict]]  # (model, tokenizer, texts, max_tokens) -> the served answer per text
    logits: Callable = output_logits  # the model output -> logits whose last axis the labels index
    # (labels, logits, kept, row index) of one row -> what evaluation keeps of it: (gold, guess)
    evaluated: Callable[..., tuple[list, list]] = labelled_positions
    has_classes: bool = True  # labels are classes: train needs two, validation/test no unseen one
    input_problem: Callable[[list], str | None] = texts_only  # why served inputs do not fit, or None
    token_lengths: Callable[..., list[int]] = token_lengths  # (tokenizer, inputs, max_tokens) per input
    output_example: Callable = label_and_score  # the model -> an output example for its signature
    forward: Callable = encoder_forward  # (model, batch of input_ids, attention_mask, labels) -> output
    # labels are a sequence of their own (the decoder's target), not one per input position: a
    # batch cuts them after their own last label, not at the inputs' width
    target_sequence: bool = False
    # (model, tokenizer, input_ids, attention_mask) -> texts; evaluation then decodes instead of
    # taking each position's argmax, and `scores` gets each row's number and its decoded text
    generate: Callable | None = None
    # (model, tokenizer, the tokenized test split's folder, count) -> a few test rows' outputs beside
    # what was expected, logged with the run as plots/test_samples.json; None: the type logs none
    test_samples: Callable | None = None
    # (model, tokenizer, texts, max_tokens=, layer=) -> attention maps for /explain and ptft explain;
    # None: the type has none (a 404)
    explain: Callable | None = attention_maps
    # (the tokenized task folder, its tokenization options: seq_len, doc_stride) -> settings the
    # fine-tuned model's config keeps (what its data taught it that serving needs, e.g. that a
    # question may have no answer, and how its contexts were cut into windows)
    model_settings: Callable[..., dict] = lambda task_dir, **options: {}
    # (the names the model will report for its label ids) -> (why, fix) when they cannot be scored, or None
    names_problem: Callable[[list[str]], tuple[str, str] | None] = lambda names: None
    # (each row's served answer, each row's expected value from a data file, the model's label names
    # in id order) -> scores, as `ptft predict --label-column` reports them; None: not scored so
    score_answers: Callable[[list[dict], list, list[str]], dict[str, float]] | None = None
    # an input may be a list of words, answered with a tag per word (entities: `ptft predict` on a
    # CoNLL file's word column, scored against its tag column)
    reads_words: bool = False

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_model)


def truncated(encoded) -> list[bool]:
    """Per text: whether the (fast) tokenizer cut it at max_length."""
    return [bool(encoding.overflowing) for encoding in encoded.encodings]
