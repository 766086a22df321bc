"""Named entities (token classification): a sentence as a list of words, one tag per word in IOB2
(`B-PER`, `I-PER`, `O`, as CoNLL-2003). Each word's tag is learned and predicted on its first
sub-word; later sub-words and special tokens carry IGNORE. Scored by entity with `seqeval`
(conlleval semantics: an entity counts when its type and both ends are right), over every word of
a sentence: the words past `seq_len` sub-words, which the model never sees, count as tagged `O`,
as `ptft predict` and serving tag them."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq

from components.tasks.base import IGNORE, TaskType, expected_names, labelled_positions, sorted_labels, truncated


def _check_rows(table: pa.Table, split: str) -> None:
    for column, holds in (("text", "words"), ("label", "tags")):
        if not pa.types.is_list(table.column(column).type):
            raise ValueError(
                f"the {split} split's {holds} column holds {table.column(column).type}, not lists: an entities "
                "task reads one list of words and one list of tags per row"
            )
    for row, (words, tags) in enumerate(
        zip(table.column("text").to_pylist(), table.column("label").to_pylist(), strict=True)
    ):
        if len(words or []) != len(tags or []):
            raise ValueError(
                f"row {row + 1} of the {split} split has {len(words or [])} words but {len(tags or [])} tags: "
                "give one tag per word"
            )


def _labels_of(table: pa.Table) -> list[str]:
    return [str(tag) for tags in table.column("label").to_pylist() for tag in tags or []]


def _label_values(train: pa.Table) -> list[str]:
    return sorted_labels(tag for row in train.column("label").to_pylist() for tag in row or [])


IOB_TAG = re.compile(r"O|[BIES]-.+")  # what seqeval's conlleval mode reads as entities


def _names_problem(names: list[str]) -> tuple[str, str] | None:
    """(why, fix) when the tags (or the names given to tag ids) cannot be scored by entity, else None."""
    others = [name for name in names if not IOB_TAG.fullmatch(name)]
    if not others:
        return None
    why = f"tags {', '.join(map(repr, others[:5]))} are not IOB2 (B-TYPE, I-TYPE, O): no entity could be scored"
    return why, "write the tags so, or name the tag ids in id order in data.task.label_names (e.g. O, B-PER, I-PER)"


def _tokenize(batch: pa.Table, tokenizer, seq_len: int, label_ids: dict[str, int], **options) -> dict:
    words = [list(row or []) for row in batch.column("text").to_pylist()]
    tags = batch.column("label").to_pylist()
    encoded = tokenizer(words, is_split_into_words=True, max_length=seq_len, truncation=True, padding="max_length")
    labels, unseen = [], []
    for row, row_tags in enumerate(tags):
        ids, previous = [], None
        for word in encoded.word_ids(row):
            ids.append(IGNORE if word is None or word == previous else label_ids[str(row_tags[word])])
            previous = word
        labels.append(ids)
        seen = max((word + 1 for word in encoded.word_ids(row) if word is not None), default=0)
        unseen.append([label_ids[str(tag)] for tag in row_tags[seen:]])
    return {
        "input_ids": pa.array(encoded["input_ids"], type=pa.list_(pa.int32())),
        "attention_mask": pa.array(encoded["attention_mask"], type=pa.list_(pa.int8())),
        "label": pa.array(labels, type=pa.list_(pa.int64())),
        "unseen": pa.array(unseen, type=pa.list_(pa.int64())),  # the tags of the words past seq_len
    }


def _evaluated(labels, logits, kept, row: int) -> tuple[list, list]:
    """A row's number then its gold ids, and its argmax ids, at its labelled positions."""
    gold, guess = labelled_positions(labels, logits, kept, row)
    return [row, *gold], guess


def _scores(
    gold: list[list[int]], predicted: list[list[int]], names: list[str], split_dir: str | None = None
) -> dict[str, float]:
    """Entity-level micro precision, recall and F1, F1 per entity type, and word accuracy, of whole
    sentences: each row (its number, then its gold ids) gets back the words past `seq_len` that
    the split under `split_dir` holds, tagged `O` (without a split, the words the model saw)."""
    unseen = _unseen_tags(split_dir) if split_dir else None
    truth, guess = [], []
    for (row, *ids), guessed in zip(gold, predicted, strict=True):
        tail = [names[tag] for tag in unseen[row]] if unseen else []
        truth.append([names[tag] for tag in ids] + tail)
        guess.append([names[tag] for tag in guessed] + ["O"] * len(tail))
    return _tag_scores(truth, guess)


def _unseen_tags(split_dir: str) -> list[list[int]]:
    """Each row's tags of the words past `seq_len`.

    Raises:
        ValueError: a split prepared before they were kept, which would score only the words seen.
    """
    if "unseen" not in pq.ParquetDataset(split_dir).schema.names:  # the schema only; the column is read below
        raise ValueError(
            f"the tokenized split {split_dir} has no `unseen` column (the tags of the words past seq_len): it was "
            "prepared by an older ptft; prepare it again (`ptft run` does, its prepare stage's version changed)"
        )
    return pq.read_table(split_dir, columns=["unseen"]).column("unseen").to_pylist()


def _score_answers(answers: list[dict], expected: list, labels: list[str]) -> dict[str, float]:
    """A list of words' answered tags against its expected ones (names, or tag ids in the model's
    label order, as CoNLL-2003's `ner_tags` in a Hugging Face export), scored as evaluation does."""
    return _tag_scores([expected_names(list(row), labels) for row in expected], [answer["tags"] for answer in answers])


def _tag_scores(truth: list[list[str]], guess: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import accuracy_score, classification_report

    report = classification_report(truth, guess, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    scores = {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "accuracy": float(accuracy_score(truth, guess)),
    }
    for kind, row in report.items():
        if not kind.endswith(" avg"):
            scores[f"f1/{kind}"] = float(row["f1-score"])
    return scores


def _input_problem(items: list) -> str | None:
    """Why inputs are neither texts nor lists of words (`ptft predict` reads a column of word lists,
    as CoNLL files hold them; `POST /predict` takes texts), or None."""
    for index, item in enumerate(items):
        if not isinstance(item, str) and not (isinstance(item, list) and all(isinstance(word, str) for word in item)):
            return f"texts.{index} is neither a string nor a list of words: this model tags texts or words"
    return None


def _token_lengths(tokenizer, items: list, max_tokens: int) -> list[int]:
    words = bool(items) and isinstance(items[0], list)
    encoded = tokenizer(items, is_split_into_words=words, truncation=True, max_length=max_tokens)
    return [len(ids) for ids in encoded["input_ids"]]


def _predict(model, tokenizer, items: list, max_tokens: int) -> list[dict]:
    """Each text's entities, or a list of words' tags (`_predict_words`)."""
    if items and isinstance(items[0], list):
        return _predict_words(model, tokenizer, items, max_tokens)
    return _predict_texts(model, tokenizer, items, max_tokens)


def _predict_words(model, tokenizer, rows: list[list[str]], max_tokens: int) -> list[dict]:
    """Each list of words tagged as evaluation tags it: a word's tag is its first sub-word's, the
    words as given (not the tokenizer's split of their text). `tags` has one tag per word (`O`
    for the words past `max_tokens`, which the model did not see: `truncated`); `entities` are
    their spans, `start`:`end` in words, with the mean probability of their words' tags."""
    import torch
    from seqeval.metrics.sequence_labeling import get_entities

    encoded = tokenizer(
        rows, is_split_into_words=True, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    with torch.inference_mode():
        probabilities = model(**encoded).logits.float().softmax(-1)
    scores, ids = probabilities.max(-1)
    answers = []
    for row, (words, cut) in enumerate(zip(rows, truncated(encoded), strict=True)):
        tags, confidence, previous = ["O"] * len(words), [0.0] * len(words), None
        for position, word in enumerate(encoded.word_ids(row)):
            if word is not None and word != previous:
                tags[word] = model.config.id2label[int(ids[row, position])]
                confidence[word] = float(scores[row, position])
            previous = word
        entities = [
            {
                "type": kind,
                "text": " ".join(words[first : last + 1]),
                "start": first,
                "end": last + 1,
                "score": sum(confidence[first : last + 1]) / (last - first + 1),
            }
            for kind, first, last in get_entities(tags)
        ]
        answers.append({"tags": tags, "entities": entities, "truncated": cut})
    return answers


def _predict_texts(model, tokenizer, texts: list[str], max_tokens: int) -> list[dict]:
    """Each text's entities: type, the text's characters start:end, and the mean probability of
    its words' tags. A word's tag is its first sub-word's, as in training; the words are the
    tokenizer's own pre-tokenization of the raw text."""
    import torch
    from seqeval.metrics.sequence_labeling import get_entities

    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt", return_offsets_mapping=True
    )
    offsets = encoded.pop("offset_mapping").tolist()
    with torch.inference_mode():
        probabilities = model(**encoded).logits.float().softmax(-1)
    scores, ids = probabilities.max(-1)
    answers = []
    for row, (text, cut) in enumerate(zip(texts, truncated(encoded), strict=True)):
        words: list[tuple[str, float, int, int]] = []  # tag, probability, first char, last char + 1
        previous = None
        for position, word in enumerate(encoded.word_ids(row)):
            start, end = offsets[row][position]
            if word is None:
                continue
            if word != previous:
                words.append((model.config.id2label[int(ids[row, position])], float(scores[row, position]), start, end))
            else:  # a later sub-word widens its word's span
                tag, score, first, _ = words[-1]
                words[-1] = (tag, score, first, end)
            previous = word
        entities = []
        for kind, first, last in get_entities([tag for tag, *_ in words]):
            start, end = words[first][2], words[last][3]
            score = sum(words[i][1] for i in range(first, last + 1)) / (last - first + 1)
            entities.append({"type": kind, "text": text[start:end], "start": start, "end": end, "score": score})
        answers.append({"entities": entities, "truncated": cut})
    return answers


TASK = TaskType(
    name="token_classification",
    model_noun="tagger",
    auto_model="AutoModelForTokenClassification",
    mlflow_task="token-classification",
    headline="f1",
    reports=("loss", "accuracy", "precision", "recall", "f1"),
    check_rows=_check_rows,
    label_values=_label_values,
    labels_of=_labels_of,
    tokenize=_tokenize,
    scores=_scores,
    evaluated=_evaluated,
    names_problem=_names_problem,
    example="EU rejects German call to boycott British lamb .",
    architecture="ForTokenClassification",
    predict=_predict,
    input_problem=_input_problem,
    token_lengths=_token_lengths,
    score_answers=_score_answers,
    reads_words=True,
)
