"""Extractive question answering (SQuAD): a question, a context, and answers that are spans of
the context (`{"text": [...], "answer_start": [...]}` in characters, as SQuAD and its Hugging Face
copy hold them). The question and the context are tokenized as a pair; a context longer than the
model reads is cut into overlapping windows (`doc_stride` tokens shared), each window labelled
with the first answer's start and end tokens, or position 0 ([CLS]) where the answer is not whole
inside it. The head scores every token as a start and as an end; the answer is the best span of
at most MAX_ANSWER_TOKENS over all windows of a context (n-best start/end pairs). Scored with the
official SQuAD normalisation (`torchmetrics`' `squad`: lower case, no punctuation or articles),
exact match and token F1 against the best of the reference answers, as fractions (0..1).

A question with no answer (an empty answers list, SQuAD 2.0's unanswerable questions) labels every
window [CLS]. A model trained on such questions (`model.config.unanswerable`) answers "" where
[CLS] as both start and end scores above every span, in the window where it scores lowest (as
Hugging Face's `version_2_with_negative` does); such a question's reference answer is "" when scored."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.explain import attention_maps
from components.tasks.base import TaskType

N_BEST = 20  # start and end candidates per window
MAX_ANSWER_TOKENS = 30
NOT_CONTEXT = -1  # the offset of a token that is not part of the context (question, special, padding)


def answers_of(value) -> list[tuple[str, int]]:
    """(text, answer_start) pairs, from SQuAD's list of {text, answer_start} or the columnar
    {text: [...], answer_start: [...]} of its Hugging Face copy."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(zip(value.get("text") or [], value.get("answer_start") or [], strict=False))
    return [(answer["text"], answer["answer_start"]) for answer in value]


def _check_rows(table: pa.Table, split: str) -> None:
    if "question" not in table.column_names:
        raise ValueError(
            f"the {split} split has no question column: a question answering task reads a question, a context "
            "(text_column) and answers (label_column); set the source's question_column"
        )
    for column, holds in (("question", "question"), ("text", "context")):
        if not pa.types.is_string(table.column(column).type):
            raise ValueError(f"the {split} split's {holds} column holds {table.column(column).type}, not text")
    for row, (context, answers) in enumerate(
        zip(table.column("text").to_pylist(), table.column("label").to_pylist(), strict=True)
    ):
        try:
            pairs = answers_of(answers)
        except (KeyError, TypeError):
            raise ValueError(
                f"row {row + 1} of the {split} split: answers {str(answers)[:80]} are neither "
                '[{"text", "answer_start"}] nor {"text": [...], "answer_start": [...]}'
            ) from None
        for text, start in pairs:  # none: the question is unanswerable (SQuAD 2.0)
            if context[start : start + len(text)] != text:
                raise ValueError(
                    f"row {row + 1} of the {split} split: the answer {text!r} is not at character {start} of its "
                    f"context (which has {context[start : start + len(text)]!r} there): fix answer_start"
                )


def _label_values(train: pa.Table) -> list[str]:
    return ["start", "end"]  # the head's two scores per token


def _labels_of(table: pa.Table) -> list[str]:
    return []  # spans, not classes


def _cut_questions(tokenizer, questions: list[str], limit: int) -> list[str]:
    """Questions of at most `limit` tokens (a longer one is cut), so a window keeps room for context."""
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [
        question if len(offsets) <= limit else question[: offsets[limit - 1][1]]
        for question, offsets in zip(questions, encoded["offset_mapping"], strict=True)
    ]


def windows(tokenizer, questions: list[str], contexts: list[str], max_length: int, stride: int, **padding):
    """Question + context pairs, the context cut into overlapping windows of `max_length` tokens."""
    questions = _cut_questions(tokenizer, questions, max_length // 2)
    longest = max((len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]), default=0)
    room = max_length - longest - 3  # special tokens of a pair: at most 3
    return tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=max(0, min(stride, room // 2)),
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        **padding,
    )


def served_window(model_config, max_tokens: int) -> tuple[int, int]:
    """The windows a served model reads, (length, tokens shared): those it was trained on (kept in
    its config), else `max_tokens` long with a quarter shared (a model from elsewhere)."""
    length = min(max_tokens, getattr(model_config, "window_tokens", None) or max_tokens)
    return length, getattr(model_config, "doc_stride", None) or length // 4


def context_offsets(encoded, window: int) -> list[tuple[int, int]]:
    """Each token's characters in the context, NOT_CONTEXT for the question's and special tokens."""
    return [
        (int(span[0]), int(span[1])) if sequence == 1 else (NOT_CONTEXT, NOT_CONTEXT)
        for span, sequence in zip(encoded["offset_mapping"][window], encoded.sequence_ids(window), strict=True)
    ]


def answer_positions(offsets: list[tuple[int, int]], start_char: int, end_char: int) -> tuple[int, int]:
    """The first and last token of characters start_char:end_char in a window; (0, 0) when the
    span is not whole inside the window's context."""
    inside = [position for position, (start, _) in enumerate(offsets) if start != NOT_CONTEXT]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return 0, 0
    first = max(p for p in inside if offsets[p][0] <= start_char)
    last = min(p for p in inside if offsets[p][1] >= end_char)
    return first, last


def _tokenize(batch: pa.Table, tokenizer, seq_len: int, label_ids: dict[str, int], doc_stride: int = 128, **_) -> dict:
    contexts = batch.column("text").to_pylist()
    answers = [answers_of(value) for value in batch.column("label").to_pylist()]
    examples = batch.column("example").to_pylist()
    encoded = windows(
        tokenizer, batch.column("question").to_pylist(), contexts, seq_len, doc_stride, padding="max_length"
    )
    columns = {name: [] for name in ("label", "example", "offsets", "context", "answers")}
    for window, row in enumerate(encoded["overflow_to_sample_mapping"]):
        offsets = context_offsets(encoded, window)
        text, start = answers[row][0] if answers[row] else ("", 0)
        columns["label"].append(answer_positions(offsets, start, start + len(text)) if text else (0, 0))
        columns["example"].append(examples[row])
        columns["offsets"].append([value for span in offsets for value in span])
        columns["context"].append(contexts[row])
        columns["answers"].append([answer for answer, _ in answers[row]])
    return {
        "input_ids": pa.array(encoded["input_ids"], type=pa.list_(pa.int32())),
        "attention_mask": pa.array(encoded["attention_mask"], type=pa.list_(pa.int8())),
        "label": pa.array([list(label) for label in columns["label"]], type=pa.list_(pa.int64())),
        "example": pa.array(columns["example"], type=pa.int64()),
        "offsets": pa.array(columns["offsets"], type=pa.list_(pa.int32())),
        "context": pa.array(columns["context"], type=pa.string()),
        "answers": pa.array(columns["answers"], type=pa.list_(pa.string())),
    }


def _start_end_logits(output):
    import torch

    return torch.stack([output.start_logits, output.end_logits], dim=1)  # (rows, 2, tokens): labels index tokens


def _evaluated(labels, logits, kept, row: int) -> tuple[list, list]:
    """A window's row number, and its N_BEST start and end candidates: [starts, their logits, ends,
    their logits], then the no-answer score ([CLS] as start and end)."""
    count = min(N_BEST, logits.shape[-1])
    values, positions = logits.float().topk(count, dim=-1)
    null = float(logits[0, 0] + logits[1, 0])
    return [row], [*positions[0].tolist(), *values[0].tolist(), *positions[1].tolist(), *values[1].tolist(), null]


def unanswerable(task_dir: str | Path) -> bool:
    """Whether the tokenized train split under `task_dir` holds questions without an answer."""
    return _has_unanswered(str(Path(task_dir).resolve()))


@functools.cache  # a tokenized folder never changes once written; scoring asks at every evaluation
def _has_unanswered(task_dir: str) -> bool:
    train = pq.read_table(Path(task_dir) / "train", columns=["answers"]).column("answers")
    return any(not answers for answers in train.to_pylist())


def _model_settings(task_dir: str, seq_len: int | None = None, doc_stride: int | None = None, **_) -> dict:
    """Whether a question may have no answer, and the windows the model read (their length and
    overlap): serving cuts a context as training did."""
    settings = {"unanswerable": True} if unanswerable(task_dir) else {}
    return settings | ({"window_tokens": seq_len, "doc_stride": doc_stride} if seq_len and doc_stride else {})


def answer_or_none(best: tuple[float, int, int] | None, null: float, may_have_none: bool):
    """The best span, or None (no answer) where there is none, or where the model may answer none
    and [CLS] outscores the span."""
    if best is None or (may_have_none and null > best[0]):
        return None
    return best


def best_spans(candidates: list[tuple], offsets: list[list[int]]) -> tuple[float, int, int] | None:
    """The best (score, first char, end char) over windows' (starts, start scores, ends, end scores),
    a span of context tokens of at most MAX_ANSWER_TOKENS; None when no pair is one."""
    best = None
    for (starts, start_scores, ends, end_scores), window in zip(candidates, offsets, strict=True):
        for start, start_score in zip(starts, start_scores, strict=True):
            for end, end_score in zip(ends, end_scores, strict=True):
                start, end = int(start), int(end)
                if not 0 <= end - start < MAX_ANSWER_TOKENS:
                    continue
                first, last = window[2 * start], window[2 * end + 1]
                if first == NOT_CONTEXT or last == NOT_CONTEXT:
                    continue
                score = float(start_score) + float(end_score)
                if best is None or score > best[0]:
                    best = (score, first, last)
    return best


def _scores(gold: list[list], guessed: list[list], names: list[str], split_dir: str | None = None) -> dict[str, float]:
    """SQuAD exact match and F1 of each context's best span over all of its windows."""
    from torchmetrics.functional.text import squad

    split = pq.read_table(split_dir, columns=["example", "offsets", "context", "answers"]).to_pydict()
    may_have_none = unanswerable(Path(split_dir).parent)  # what the model was trained on
    by_example: dict[int, list[int]] = {}
    candidates: dict[int, tuple] = {}
    nulls: dict[int, float] = {}
    for (row,), guess in zip(gold, guessed, strict=True):
        row = int(row)
        count = (len(guess) - 1) // 4
        candidates[row] = tuple(guess[i * count : (i + 1) * count] for i in range(4))
        nulls[row] = guess[-1]
        by_example.setdefault(split["example"][row], []).append(row)
    predictions, references = [], []
    for example, rows in by_example.items():
        best = best_spans([candidates[row] for row in rows], [split["offsets"][row] for row in rows])
        best = answer_or_none(best, min(nulls[row] for row in rows), may_have_none)
        context = split["context"][rows[0]]
        predictions.append({"id": str(example), "prediction_text": context[best[1] : best[2]] if best else ""})
        gold_texts = split["answers"][rows[0]] or [""]  # unanswerable: right only when answered with nothing
        references.append({"id": str(example), "answers": {"text": gold_texts, "answer_start": [0] * len(gold_texts)}})
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    scores = squad(predictions, references)
    return {"exact_match": float(scores["exact_match"]) / 100, "f1": float(scores["f1"]) / 100}


def _expected_texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return [text for text, _ in answers_of(value)]


def _score_answers(answers: list[dict], expected: list, labels: list[str]) -> dict[str, float]:
    """SQuAD exact match and F1 of the answered spans against each row's answers: SQuAD's list of
    {text, answer_start}, its columnar form, a list of texts or one text; none: no answer expected."""
    from torchmetrics.functional.text import squad

    predictions, references = [], []
    for row, (answer, value) in enumerate(zip(answers, expected, strict=True)):
        texts = _expected_texts(value)
        predictions.append({"id": str(row), "prediction_text": answer["answer"] or ""})
        references.append(
            {"id": str(row), "answers": {"text": texts or [""], "answer_start": [0] * max(len(texts), 1)}}
        )
    scores = squad(predictions, references)
    return {"exact_match": float(scores["exact_match"]) / 100, "f1": float(scores["f1"]) / 100}


def _input_problem(items: list) -> str | None:
    for index, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"question", "context"}:
            return f'texts.{index} is not {{"question": "...", "context": "..."}}: this model answers questions'
        for part in ("question", "context"):
            if not item[part].strip():
                return f"texts.{index}.{part} is empty: send a {part} with text in it"
    return None


def _token_lengths(tokenizer, items: list[dict], max_tokens: int) -> list[int]:
    encoded = tokenizer([item["question"] for item in items], [item["context"] for item in items])
    return [len(ids) for ids in encoded["input_ids"]]


def _output_example(model) -> list[str]:
    return ["a red ball"]


def _predict(model, tokenizer, items: list[dict], max_tokens: int) -> list[dict]:
    """Each question's answer: the best span of its context over all windows, picked by start plus
    end logit as evaluation picks it, its characters start:end in the context, and the probability
    of its start times that of its end in its window."""
    return _read(model, tokenizer, items, max_tokens)[0]


def _explain(model, tokenizer, items: list[dict], *, max_tokens: int, layer: int = -1) -> list[dict]:
    """Each question's attention map over the window its served answer comes from (for no answer,
    the window that scores none best), cut from the context as serving cuts it."""
    _, encoded, shown = _read(model, tokenizer, items, max_tokens)
    return attention_maps(model, tokenizer, items, max_tokens=max_tokens, layer=layer, windows=(encoded, shown))


def _read(model, tokenizer, items: list[dict], max_tokens: int) -> tuple[list[dict], object, list[int]]:
    """The answers (`_predict`), the windows read (encoded), and the window each answer comes from."""
    import torch

    questions, contexts = [item["question"] for item in items], [item["context"] for item in items]
    length, stride = served_window(model.config, max_tokens)
    encoded = windows(tokenizer, questions, contexts, length, stride, padding=True, return_tensors="pt")
    rows = encoded["overflow_to_sample_mapping"].tolist()
    offsets = [[value for span in context_offsets(encoded, window) for value in span] for window in range(len(rows))]
    inputs = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    with torch.inference_mode():
        output = model(**inputs)
    logits = _start_end_logits(output).float()
    # A span's log-probability in its window: its logits' sum plus this (each window's softmax differs,
    # so spans of different windows compare by logits, as in evaluation and Hugging Face's own QA).
    shifts = (-logits.logsumexp(-1).sum(-1)).tolist()
    values, positions = logits.topk(min(N_BEST, logits.shape[-1]), dim=-1)
    nulls = (logits[:, 0, 0] + logits[:, 1, 0]).tolist()
    may_have_none = bool(getattr(model.config, "unanswerable", False))
    answers, shown = [], []
    for item, (question, context) in enumerate(zip(questions, contexts, strict=True)):
        mine = [window for window, row in enumerate(rows) if row == item]
        spans = {
            w: best_spans(
                [(positions[w, 0].tolist(), values[w, 0].tolist(), positions[w, 1].tolist(), values[w, 1].tolist())],
                [offsets[w]],
            )
            for w in mine
        }
        picked = max((w for w in mine if spans[w]), key=lambda w: spans[w][0], default=None)
        no_answer = min(mine, key=lambda w: nulls[w])
        best = answer_or_none(spans[picked] if picked is not None else None, nulls[no_answer], may_have_none)
        if best is None:  # the probability of no answer where the model may give none
            score = math.exp(nulls[no_answer] + shifts[no_answer]) if may_have_none else 0.0
            answers.append({"answer": "", "start": 0, "end": 0, "score": score, "truncated": False})
            shown.append(no_answer)
            continue
        shown.append(picked)
        logit, start, end = best
        while start < end and context[start].isspace():  # byte-level BPE spans open with the space before a word
            start += 1
        answers.append(
            {
                "answer": context[start:end],
                "start": start,
                "end": end,
                "score": math.exp(logit + shifts[picked]),
                "truncated": len(_cut_questions(tokenizer, [question], length // 2)[0]) < len(question),
            }
        )
    return answers, encoded, shown


TASK = TaskType(
    name="question_answering",
    model_noun="reader",
    auto_model="AutoModelForQuestionAnswering",
    mlflow_task=None,  # transformers 5 dropped its question-answering pipeline: registry.TaskModel
    headline="f1",
    reports=("loss", "exact_match", "f1"),
    check_rows=_check_rows,
    label_values=_label_values,
    labels_of=_labels_of,
    tokenize=_tokenize,
    scores=_scores,
    example={"question": "What does the cat chase?", "context": "The cat chases a red ball in the garden."},
    architecture="ForQuestionAnswering",
    predict=_predict,
    explain=_explain,
    score_answers=_score_answers,
    logits=_start_end_logits,
    evaluated=_evaluated,
    has_classes=False,
    input_problem=_input_problem,
    token_lengths=_token_lengths,
    output_example=_output_example,
    model_settings=_model_settings,
)
