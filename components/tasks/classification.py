"""Sentence classification: one text, one label (sentiment, topic, intent)."""

from __future__ import annotations

import pyarrow as pa

from components.tasks.base import TaskType, expected_names, sorted_labels, truncated


def _check_rows(table: pa.Table, split: str) -> None:
    if pa.types.is_list(table.column("text").type):
        raise ValueError(f"the {split} split's text column holds lists: a sentence classification task reads strings")
    kind = table.column("label").type
    if pa.types.is_nested(kind):  # a list of tags (entities) or answers (question answering), learned as one class
        raise ValueError(
            f"the {split} split's label column holds {kind}: a sentence classification task reads one label per "
            "row, a string or a number"
        )


def _labels_of(table: pa.Table) -> list[str]:
    return [str(label) for label in table.column("label").to_pylist()]


def _label_values(train: pa.Table) -> list[str]:
    return sorted_labels(train.column("label").to_pylist())


def _tokenize(batch: pa.Table, tokenizer, seq_len: int, label_ids: dict[str, int], **options) -> dict:
    encoded = tokenizer(batch.column("text").to_pylist(), max_length=seq_len, truncation=True, padding="max_length")
    return {
        "input_ids": pa.array(encoded["input_ids"], type=pa.list_(pa.int32())),
        "attention_mask": pa.array(encoded["attention_mask"], type=pa.list_(pa.int8())),
        "label": pa.array([label_ids[label] for label in _labels_of(batch)], type=pa.int64()),
    }


def _scores(
    gold: list[list[int]], predicted: list[list[int]], names: list[str], split_dir: str | None = None
) -> dict[str, float]:
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy

    truth = torch.tensor([row[0] for row in gold])
    guess = torch.tensor([row[0] for row in predicted])
    return {"accuracy": float(multiclass_accuracy(guess, truth, num_classes=max(len(names), 2), average="micro"))}


def _score_answers(answers: list[dict], expected: list, labels: list[str]) -> dict[str, float]:
    """Accuracy and macro F1 of the answered labels against the expected ones."""
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    expected = expected_names(expected, labels)
    names = sorted(set(labels) | set(expected) | {answer["label"] for answer in answers})
    index = {name: number for number, name in enumerate(names)}
    truth = torch.tensor([index[value] for value in expected])
    guess = torch.tensor([index[answer["label"]] for answer in answers])
    classes = max(len(names), 2)
    return {
        "accuracy": float(multiclass_accuracy(guess, truth, num_classes=classes, average="micro")),
        "f1_macro": float(multiclass_f1_score(guess, truth, num_classes=classes, average="macro")),
    }


def _predict(model, tokenizer, texts: list[str], max_tokens: int) -> list[dict]:
    """Each text's most probable label and its probability."""
    import torch

    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.inference_mode():
        probabilities = model(**encoded).logits.float().softmax(-1)
    scores, ids = probabilities.max(-1)
    return [
        {"label": model.config.id2label[int(i)], "score": float(s), "truncated": cut}
        for s, i, cut in zip(scores, ids, truncated(encoded), strict=True)
    ]


TASK = TaskType(
    name="sequence_classification",
    model_noun="classifier",
    auto_model="AutoModelForSequenceClassification",
    mlflow_task="text-classification",
    headline="accuracy",
    reports=("loss", "accuracy"),
    check_rows=_check_rows,
    label_values=_label_values,
    labels_of=_labels_of,
    tokenize=_tokenize,
    scores=_scores,
    example="a sample text to classify",
    architecture="ForSequenceClassification",
    predict=_predict,
    score_answers=_score_answers,
)
