"""Named entities (token classification): a sentence as a list of words, one tag per word in IOB2
(`B-PER`, `I-PER`, `O`, as CoNLL-2003). Each word's tag is learned and predicted on its first
sub-word; later sub-words and special tokens carry IGNORE. Scored by entity with `seqeval`
(conlleval semantics: an entity counts when its type and both ends are right), over every word of
a sentence: one longer than `seq_len` sub-words is read in overlapping windows of whole words
(`sentence_windows`), cut alike in training, evaluation, `ptft predict` and serving."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from components.explain import attention_maps
from components.tasks.base import IGNORE, TaskType, expected_names, labelled_positions, sorted_labels, truncated

WINDOWS_PER_PASS = 64  # a very long text is tagged in several forward passes, not one huge tensor


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


class Window(NamedTuple):
    """A run of one sentence's words read in one forward pass: words `start`:`end`, of which it
    tags `own_start`:`own_end` (where neighbouring windows overlap, each word is tagged by the
    window in which it lies further from an edge: the middle of the overlap divides them)."""

    row: int
    start: int
    end: int
    own_start: int
    own_end: int


def word_windows(lengths: list[int], budget: int, shared: int) -> list[tuple[int, int, int, int]]:
    """Windows over words of these sub-word lengths, as (start, end, own_start, own_end): each holds
    at most `budget` sub-words (a longer word alone), the next begins where the last `shared` or
    fewer sub-words' worth of whole words of the previous begin and ends past it, and every word
    is owned once."""
    spans, start = [], 0
    while True:
        end, used = start, 0
        while end < len(lengths) and (end == start or used + lengths[end] <= budget):
            used, end = used + lengths[end], end + 1
        spans.append((start, end))
        if end >= len(lengths):
            break
        following, overlap = end, 0  # the shared words leave room for the next word: each window reaches further
        while following - 1 > start and overlap + lengths[following - 1] <= min(shared, budget - lengths[end]):
            following, overlap = following - 1, overlap + lengths[following - 1]
        start = following
    bounds = [0] + [(after[0] + before[1] + 1) // 2 for before, after in itertools.pairwise(spans)] + [len(lengths)]
    return [(start, end, bounds[i], bounds[i + 1]) for i, (start, end) in enumerate(spans)]


def sentence_windows(tokenizer, rows: list[list[str]], max_tokens: int, doc_stride: int | None) -> list[Window]:
    """Each sentence's windows of at most `max_tokens` tokens (special tokens included), sharing up
    to `doc_stride` sub-words (at most half a window; half without a `doc_stride`): a sentence
    longer than the model's positions is read whole, and training, evaluation, `ptft predict` and
    serving cut it alike."""
    budget = max(1, max_tokens - tokenizer.num_special_tokens_to_add(pair=False))
    shared = min(doc_stride or budget, budget // 2)
    encoded = tokenizer(rows, is_split_into_words=True, add_special_tokens=False) if rows else None
    windows = []
    for row, words in enumerate(rows):
        lengths = [0] * len(words)
        for word in encoded.word_ids(row):
            lengths[word] += 1
        windows += [Window(row, *span) for span in word_windows(lengths, budget, shared)]
    return windows


def encode_windows(tokenizer, rows: list[list[str]], windows: list[Window], max_tokens: int, **options):
    """The windows' words as the model reads them: with special tokens, cut at `max_tokens` (only a
    word longer than a whole window is), padded and typed as `options` say."""
    words = [rows[window.row][window.start : window.end] for window in windows]
    return tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_tokens, **options)


def first_sub_words(word_ids: list[int | None]) -> Iterator[tuple[int, int]]:
    """(position, word) of each word's first sub-word: where its tag is learned and read."""
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            yield position, word
        previous = word


def owned_words(window: Window, word_ids: list[int | None]) -> Iterator[tuple[int, int]]:
    """(position, word of the sentence) of the first sub-word of each word the window tags."""
    for position, word in first_sub_words(word_ids):
        if window.own_start <= window.start + word < window.own_end:
            yield position, window.start + word


def _tokenize(batch: pa.Table, tokenizer, seq_len: int, label_ids: dict[str, int], doc_stride=None, **_) -> dict:
    """One row per window of a sentence (`sentence_windows`), its owned words labelled on their
    first sub-words, and the sentence's `example` number, by which evaluation joins its windows."""
    words = [list(row or []) for row in batch.column("text").to_pylist()]
    tags = batch.column("label").to_pylist()
    examples = batch.column("example").to_pylist() if "example" in batch.column_names else range(len(words))
    windows = sentence_windows(tokenizer, words, seq_len, doc_stride)
    encoded = encode_windows(tokenizer, words, windows, seq_len, padding="max_length")
    labels = []
    for index, window in enumerate(windows):
        ids = [IGNORE] * len(encoded["input_ids"][index])
        for position, word in owned_words(window, encoded.word_ids(index)):
            ids[position] = label_ids[str(tags[window.row][word])]
        labels.append(ids)
    return {
        "input_ids": pa.array(encoded["input_ids"], type=pa.list_(pa.int32())),
        "attention_mask": pa.array(encoded["attention_mask"], type=pa.list_(pa.int8())),
        "label": pa.array(labels, type=pa.list_(pa.int64())),
        "example": pa.array([examples[window.row] for window in windows], type=pa.int64()),
    }


def _evaluated(labels, logits, kept, row: int) -> tuple[list, list]:
    """A window's row number then its gold ids, and its argmax ids, at its labelled positions."""
    gold, guess = labelled_positions(labels, logits, kept, row)
    return [row, *gold], guess


def _scores(
    gold: list[list[int]], predicted: list[list[int]], names: list[str], split_dir: str | None = None
) -> dict[str, float]:
    """Entity-level micro precision, recall and F1, F1 per entity type, and word accuracy, of whole
    sentences: the windows (each its row number, then its gold ids) of one sentence of the split
    under `split_dir` are joined in order (without a split, each row is a sentence)."""
    rows = sorted(zip(gold, predicted, strict=True), key=lambda pair: pair[0][0])
    sentence_of = _sentences(split_dir) if split_dir else None
    truth, guess, last = [], [], None
    for (row, *ids), guessed in rows:
        sentence = sentence_of[row] if sentence_of else row
        if sentence != last:
            truth.append([])
            guess.append([])
        truth[-1] += [names[tag] for tag in ids]
        guess[-1] += [names[tag] for tag in guessed]
        last = sentence
    return _tag_scores(truth, guess)


def _sentences(split_dir: str) -> list[int]:
    """Each tokenized row's sentence (its `example`)."""
    return pq.read_table(split_dir, columns=["example"]).column("example").to_pylist()


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
    """The tokens a text's forward pass holds: its own, or a whole window's per window."""
    words = bool(items) and isinstance(items[0], list)
    encoded = tokenizer(items, is_split_into_words=words)
    return [
        length if length <= max_tokens else max_tokens * -(-length // (max_tokens // 2))
        for length in map(len, encoded["input_ids"])
    ]


def _predict(model, tokenizer, items: list, max_tokens: int) -> list[dict]:
    """Each text's entities, or a list of words' tags (`_predict_words`)."""
    if items and isinstance(items[0], list):
        return _predict_words(model, tokenizer, items, max_tokens)
    return _predict_texts(model, tokenizer, items, max_tokens)


def _tag_words(model, tokenizer, rows: list[list[str]], max_tokens: int) -> list[dict]:
    """Each list of words tagged as evaluation tags it, in the windows the model was trained on
    (`sentence_windows`): a word's tag is its first sub-word's in the window that owns it.
    `tags` and `scores` (each tag's probability) have one value per word; `truncated` says that a
    word longer than a whole window was cut (its tag still read); `windows` are the row's."""
    import torch

    windows = sentence_windows(tokenizer, rows, max_tokens, getattr(model.config, "doc_stride", None))
    answers = [
        {"tags": ["O"] * len(words), "scores": [0.0] * len(words), "truncated": False, "windows": []} for words in rows
    ]
    for window in windows:
        answers[window.row]["windows"].append(window)
    for first in range(0, len(windows), WINDOWS_PER_PASS):
        part = windows[first : first + WINDOWS_PER_PASS]
        encoded = encode_windows(tokenizer, rows, part, max_tokens, padding=True, return_tensors="pt")
        with torch.inference_mode():
            scores, ids = model(**encoded).logits.float().softmax(-1).max(-1)
        for index, (window, cut) in enumerate(zip(part, truncated(encoded), strict=True)):
            answer = answers[window.row]
            answer["truncated"] |= cut
            for position, word in owned_words(window, encoded.word_ids(index)):
                answer["tags"][word] = model.config.id2label[int(ids[index, position])]
                answer["scores"][word] = float(scores[index, position])
    return answers


def _predict_words(model, tokenizer, rows: list[list[str]], max_tokens: int) -> list[dict]:
    """Each list of words tagged as evaluation tags it (`_tag_words`), the words as given (not the
    tokenizer's split of their text): `tags`, one per word, and `entities`, their spans
    `start`:`end` in words with the mean probability of their words' tags."""
    from seqeval.metrics.sequence_labeling import get_entities

    answers = []
    for words, tagged in zip(rows, _tag_words(model, tokenizer, rows, max_tokens), strict=True):
        entities = [
            {
                "type": kind,
                "text": " ".join(words[first : last + 1]),
                "start": first,
                "end": last + 1,
                "score": sum(tagged["scores"][first : last + 1]) / (last - first + 1),
            }
            for kind, first, last in get_entities(tagged["tags"])
        ]
        answers.append({"tags": tagged["tags"], "entities": entities, "truncated": tagged["truncated"]})
    return answers


def _predict_texts(model, tokenizer, texts: list[str], max_tokens: int) -> list[dict]:
    """Each text's entities: type, the text's characters start:end, and the mean probability of
    its words' tags. The words are the tokenizer's own pre-tokenization of the raw text, tagged
    as a list of words is (`_tag_words`)."""
    from seqeval.metrics.sequence_labeling import get_entities

    spans = _word_spans(tokenizer, texts)
    rows = [[text[start:end] for start, end in row] for text, row in zip(texts, spans, strict=True)]
    answers = []
    for text, row, tagged in zip(texts, spans, _tag_words(model, tokenizer, rows, max_tokens), strict=True):
        entities = []
        for kind, first, last in get_entities(tagged["tags"]):
            start, end = row[first][0], row[last][1]
            score = sum(tagged["scores"][first : last + 1]) / (last - first + 1)
            entities.append({"type": kind, "text": text[start:end], "start": start, "end": end, "score": score})
        answers.append({"entities": entities, "truncated": tagged["truncated"]})
    return answers


def _word_spans(tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    """Each text's words as the tokenizer pre-tokenizes it, as characters start:end (without the
    space a byte-level token may begin with)."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for row, text in enumerate(texts):
        words: dict[int, tuple[int, int]] = {}
        for word, (start, end) in zip(encoded.word_ids(row), encoded["offset_mapping"][row], strict=True):
            if word is not None:
                words[word] = (words[word][0] if word in words else start, end)
        row_spans = []
        for start, end in words.values():
            while start < end and text[start].isspace():
                start += 1
            row_spans.append((start, end))
        spans.append(row_spans)
    return spans


def _explain(model, tokenizer, texts: list[str], *, max_tokens: int, layer: int = -1) -> list[dict]:
    """Each text's attention map of its first word tagged as part of an entity as served (the first
    word when none is), in the window that tags it: a long text's later windows included."""
    spans = _word_spans(tokenizer, texts)
    rows = [[text[start:end] for start, end in row] for text, row in zip(texts, spans, strict=True)]
    shown, words = [], []
    for answer in _tag_words(model, tokenizer, rows, max_tokens):
        word = next((index for index, tag in enumerate(answer["tags"]) if tag != "O"), 0)
        window = next(w for w in answer["windows"] if w.own_start <= word < w.own_end or w.start == w.end)
        shown.append(window)
        words.append(word)
    encoded = encode_windows(tokenizer, rows, shown, max_tokens, padding=True, return_tensors="pt")
    firsts = [{word: position for position, word in owned_words(w, encoded.word_ids(i))} for i, w in enumerate(shown)]
    queries = [first.get(word) for first, word in zip(firsts, words, strict=True)]  # None (no word): [CLS]
    return attention_maps(
        model,
        tokenizer,
        texts,
        max_tokens=max_tokens,
        layer=layer,
        windows=(encoded, range(len(texts))),
        queries=queries,
    )


def _model_settings(task_dir: str, doc_stride: int | None = None, **_) -> dict:
    """The sub-words the windows of a long sentence shared in training: serving cuts it alike."""
    return {"doc_stride": doc_stride} if doc_stride else {}


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
    model_settings=_model_settings,
    explain=_explain,
)
