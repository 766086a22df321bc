"""Translation (sequence to sequence): a source text and its target text per row (Multi30k's en and
de: `text_column: en`, `label_column: de`), on an encoder-decoder (the t5 family, or an `init_from`
T5 checkpoint). Trained with teacher forcing: the decoder reads the target shifted right and is
taught each next target token (label smoothing from the hyperparameters). Evaluated by decoding:
beam search over the source, then corpus BLEU and chrF with sacrebleu against the untokenized
reference texts (sacrebleu's default `13a` tokenisation for BLEU, as its signature states)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from components.explain import cross_attention_maps
from components.tasks.base import IGNORE, TaskType, truncated
from components.vocab import separator_id

NUM_BEAMS = 4  # beam width of evaluation and serving
MAX_TARGET_TOKENS = 512  # for a tokenizer that names no length of its own


def _check_rows(table: pa.Table, split: str) -> None:
    for column, holds in (("text", "source"), ("label", "target")):
        kind = table.column(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(
                f"the {split} split's {holds} column holds {kind}, not texts: a translation task reads strings"
            )
    for row, (source, target) in enumerate(zip(*(table.column(c).to_pylist() for c in ("text", "label")), strict=True)):
        if not (source or "").strip() or not (target or "").strip():
            raise ValueError(f"row {row + 1} of the {split} split has an empty source or target text: drop it")


def _no_classes(table: pa.Table) -> list[str]:
    return []


def _tokenize(batch: pa.Table, tokenizer, seq_len: int, label_ids: dict[str, int], **options) -> dict:
    """The source with the tokenizer's specials; as labels the target's tokens and the end token,
    IGNORE after it. The untokenized target is kept as `reference` for BLEU."""
    sources, targets = batch.column("text").to_pylist(), batch.column("label").to_pylist()
    encoded = tokenizer(sources, max_length=seq_len, truncation=True, padding="max_length")
    end = separator_id(tokenizer)
    labels = []
    for ids in tokenizer(targets, add_special_tokens=False, max_length=seq_len - 1, truncation=True)["input_ids"]:
        row = [*ids, end]
        labels.append(row + [IGNORE] * (seq_len - len(row)))
    return {
        "input_ids": pa.array(encoded["input_ids"], type=pa.list_(pa.int32())),
        "attention_mask": pa.array(encoded["attention_mask"], type=pa.list_(pa.int8())),
        "label": pa.array(labels, type=pa.list_(pa.int64())),
        "reference": pa.array(targets, type=pa.string()),
    }


def _forward(model, batch: dict):
    """Teacher forcing: the labels shifted right are the decoder's inputs. No `labels` go in: the
    loss is the fine-tuning loop's (with label smoothing), and given labels the model would compute
    a second one over the whole vocabulary. No KV cache either (the model keeps one by default)."""
    module = getattr(model, "module", model)  # the model inside a DeepSpeed engine
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=module.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        use_cache=False,
    )


def target_tokens(tokenizer) -> int:
    """The most tokens a translation may take: the longest target the model was taught (the prepare
    stage cuts targets to `seq_len`, which the tokenizer keeps as its `model_max_length`). The same
    for every text: a budget from the batch's longest source made a text's translation depend on
    the texts batched with it, so evaluation, `ptft predict` and serving translated it differently."""
    return int(min(tokenizer.model_max_length, MAX_TARGET_TOKENS))


def decode_ids(model, input_ids, attention_mask, *, max_new_tokens: int, num_beams: int = NUM_BEAMS):
    """Beam-search translations of a batch of tokenized sources, as token ids (the decoder's start
    token first, padded after the end token)."""
    import torch

    with torch.inference_mode():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            early_stopping=True,
        )


def generate(model, tokenizer, input_ids, attention_mask, *, num_beams: int = NUM_BEAMS) -> list[str]:
    """Beam-search translations of a batch of tokenized sources, as texts."""
    output = decode_ids(model, input_ids, attention_mask, max_new_tokens=target_tokens(tokenizer), num_beams=num_beams)
    return tokenizer.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def _scores(gold: list, guessed: list[str], names: list[str], split_dir: str | None = None) -> dict[str, float]:
    """Corpus BLEU and chrF of the translations against the split's reference texts (`gold` holds
    each translated row's number in the split)."""
    references = pq.read_table(split_dir, columns=["reference"]).column("reference").to_pylist()
    return _bleu_and_chrf(guessed, [references[row] for row in gold])


def _bleu_and_chrf(translations: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu's default 13a tokenisation) and chrF, one reference per translation."""
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(translations, [references]).score,
        "chrf": sacrebleu.corpus_chrf(translations, [references]).score,
    }


def _predict(model, tokenizer, texts: list[str], max_tokens: int) -> list[dict]:
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    translations = generate(model, tokenizer, encoded["input_ids"], encoded["attention_mask"])
    return [{"translation": text, "truncated": cut} for text, cut in zip(translations, truncated(encoded), strict=True)]


def _score_answers(answers: list[dict], expected: list, labels: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF of the translations against each row's reference text."""
    return _bleu_and_chrf([answer["translation"] for answer in answers], [str(value) for value in expected])


def _test_samples(model, tokenizer, test_dir: str, count: int) -> list[dict]:
    """The first `count` test sources translated, beside their references."""
    import torch

    table = pq.read_table(test_dir, columns=["input_ids", "attention_mask", "reference"]).slice(0, count).to_pydict()
    ids, mask = torch.tensor(table["input_ids"]).long(), torch.tensor(table["attention_mask"]).long()
    outputs = generate(model, tokenizer, ids, mask)
    sources = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [
        {"source": source, "reference": reference, "output": output}
        for source, reference, output in zip(sources, table["reference"], outputs, strict=True)
    ]


def _output_example(model) -> list[dict]:
    return [{"translation": "ein Beispielsatz", "truncated": False}]


TASK = TaskType(
    name="translation",
    model_noun="translator",
    auto_model="AutoModelForSeq2SeqLM",
    mlflow_task=None,  # a pyfunc: ptft's own beam search and limits, whatever the model's language pair
    headline="bleu",
    reports=("loss", "bleu", "chrf"),
    check_rows=_check_rows,
    label_values=_no_classes,
    labels_of=_no_classes,
    tokenize=_tokenize,
    scores=_scores,
    example="A dog runs through the grass.",
    architecture="ForConditionalGeneration",
    predict=_predict,
    score_answers=_score_answers,
    has_classes=False,
    forward=_forward,
    target_sequence=True,
    generate=generate,
    output_example=_output_example,
    test_samples=_test_samples,
    explain=cross_attention_maps,
)
