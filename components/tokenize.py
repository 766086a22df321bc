"""Stage 1, tokenize: train a WordPiece or byte-level BPE tokenizer on the corpus (or load a
pre-trained one), then tokenize and pack the corpus into fixed-length blocks and tokenize the
task splits with Ray Data. Writes Parquet.

Output folder:
    tokenizer/            HF fast tokenizer (tokenizer.json + config)
    pretrain_blocks/      Parquet, column input_ids: [CLS] tokens... [SEP] (a loaded tokenizer's
                          own start/separator tokens), seq_len long
    task/{train,validation,test}/  Parquet: input_ids, attention_mask (padded to seq_len), label (and
                          what the task type's scores read, e.g. the windows' offsets for QA)
    labels.json           label names, index = label id
    stats.json            counts
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from components.data import load_corpus, load_source, missing_values
from components.schemas import SPECIAL_TOKENS, CorpusConfig, DataConfig, TaskConfig, TokenizeConfig
from components.stage import StageContext, StageResult, write_json
from components.tasks import task_type
from components.tasks.base import display_names
from components.vocab import separator_id, start_id

log = logging.getLogger(__name__)

TASK_SPLITS = ("train", "validation", "test")


def run_corpus(cfg: TokenizeConfig, corpus: CorpusConfig, ctx: StageContext) -> StageResult:
    """Train the tokenizer (or load it) and pack the corpus into blocks under ctx.output_dir."""
    table = load_corpus(corpus)
    tokenizer_dir = ctx.output_dir / "tokenizer"
    if cfg.pretrained:
        tokenizer = load_pretrained(cfg.pretrained, cfg.seq_len)
    else:
        tokenizer = train_tokenizer(table.column("text").to_pylist(), cfg)
    tokenizer.save_pretrained(tokenizer_dir)
    # Deterministic row order: the same inputs give the same blocks, hence the same training run.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    blocks = _pack_corpus(table, tokenizer_dir, cfg).materialize()
    blocks.write_parquet(str(ctx.output_dir / "pretrain_blocks"))
    stats = {"corpus/rows": table.num_rows, "tokenize/vocab_size": len(tokenizer), "corpus/blocks": blocks.count()}
    write_json(ctx.output_dir / "stats.json", stats)
    log.info("tokenize: %s", stats)
    return StageResult(output_uri=str(ctx.output_dir), metrics=stats)


def run(cfg: TokenizeConfig, data: DataConfig, ctx: StageContext) -> StageResult:
    """The corpus (`run_corpus`) and, given `data.task`, its splits into the same folder: one call
    for code that chains the stage functions in-process (the pipeline runs `prepare` for them)."""
    result = run_corpus(cfg, data.corpus, ctx)
    if data.task is not None:
        result.metrics.update(_write_task(data.task, ctx.output_dir / "tokenizer", cfg, ctx.output_dir))
        write_json(ctx.output_dir / "stats.json", result.metrics)
    return result


def run_task(cfg: TokenizeConfig, task: TaskConfig, tokenizer_dir: str, ctx: StageContext) -> StageResult:
    """Tokenize one task's splits with the pipeline's tokenizer (`labels.json`, `task/<split>/`)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    stats = _write_task(task, Path(tokenizer_dir), cfg, ctx.output_dir)
    write_json(ctx.output_dir / "stats.json", stats)
    log.info("tokenize task: %s", stats)
    return StageResult(output_uri=str(ctx.output_dir), metrics=stats)


def _write_task(task: TaskConfig, tokenizer_dir: Path, cfg: TokenizeConfig, output_dir: Path) -> dict[str, int]:
    kind = task_type(task.type)
    splits = {name: load_source(getattr(task, name), labelled=True) for name in TASK_SPLITS}
    for name, table in splits.items():
        if why := missing_values(table):  # a Hub split (a local file's are checked by validation)
            raise ValueError(f"the {name} split: {why}: complete or drop them")
        kind.check_rows(table, name)
    label_values = kind.label_values(splits["train"])
    write_json(output_dir / "labels.json", display_names(label_values, task.label_names))
    stats = {}
    for name, table in splits.items():
        table = with_row_numbers(table)
        tokenized = _tokenize_task(table, tokenizer_dir, label_values, cfg, task)
        tokenized.write_parquet(str(output_dir / "task" / name))
        stats[f"task/{name}_rows"] = table.num_rows
    return stats


def with_row_numbers(table: pa.Table) -> pa.Table:
    """The rows with their row number as `example`: the windows of one question answering row keep
    it, so that evaluation picks the best span over all of them."""
    return table.append_column("example", pa.array(range(table.num_rows), type=pa.int64()))


def train_tokenizer(texts: Sequence[str], cfg: TokenizeConfig) -> PreTrainedTokenizerFast:
    """Train a WordPiece (BERT-style) or byte-level BPE (GPT-2-style) tokenizer with the same special
    tokens, and wrap it as an HF fast tokenizer. The same texts give the same vocabulary."""
    sentinels = [f"<extra_id_{number}>" for number in range(cfg.sentinels)]
    if cfg.algorithm == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.normalizer = normalizers.Lowercase() if cfg.lowercase else None
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=[*SPECIAL_TOKENS, *sentinels],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,  # library code does not print (its bars were blank lines in `ptft init`)
        )
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        continuations = _continuation_pieces(tokenizer, texts)
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=[*SPECIAL_TOKENS, *sentinels, *continuations],
            show_progress=False,
        )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if cfg.algorithm != "bpe":
        tokenizer = _without_special(tokenizer, continuations)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=cfg.seq_len,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        extra_special_tokens=sentinels,  # span corruption's, never split or produced from text
    )


# tokenizers' WordPiece trainer numbers the `##` pieces it makes in hash-map order, and those
# numbers break ties between equally frequent merges: the same corpus gave a different vocabulary
# in each process (huggingface/tokenizers#1794). Handed in first, sorted, as special tokens, the
# pieces get fixed numbers; they then become plain vocabulary, as the trainer would have made them.
def _continuation_pieces(tokenizer: Tokenizer, texts: Sequence[str]) -> list[str]:
    """`##c` for every character that follows another inside a pre-tokenized word, sorted."""
    words: set[str] = set()  # pre-tokenized once per distinct word, not per occurrence: 2-3x faster
    for text in texts:
        words.update(tokenizer.normalizer.normalize_str(text).split())  # its whitespace is all spaces by then
    followers: set[str] = set()
    for word in words:
        for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(word):  # punctuation splits a word further
            followers.update(piece[1:])
    return [f"##{char}" for char in sorted(followers)]


def _without_special(tokenizer: Tokenizer, pieces: list[str]) -> Tokenizer:
    """The trained WordPiece tokenizer with `pieces` as plain vocabulary, not special tokens (those
    are matched in raw text and dropped when decoding)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    demoted = set(pieces)
    plain = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    plain.normalizer, plain.pre_tokenizer, plain.decoder = (
        tokenizer.normalizer,
        tokenizer.pre_tokenizer,
        tokenizer.decoder,
    )
    added = sorted(tokenizer.get_added_tokens_decoder().items())
    plain.add_special_tokens([token for _, token in added if token.content not in demoted])
    return plain


def load_pretrained(name_or_path: str, seq_len: int) -> PreTrainedTokenizerFast:
    """A checkpoint's own tokenizer (the model's vocabulary is its). One without a padding token
    (GPT-2) pads with its end-of-text token."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer {name_or_path!r} has no fast (Rust) version; ptft needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if separator_id(tokenizer) is None:
        raise ValueError(
            f"tokenizer {name_or_path!r} has neither a [SEP] nor an end-of-text token to separate "
            "documents in packed blocks"
        )
    tokenizer.model_max_length = seq_len
    return tokenizer


def label_vocabulary(train: pa.Table) -> list[str]:
    """A sentence classification train split's labels in id order (numeric when all are integers)."""
    return task_type("sequence_classification").label_values(train)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _dataset(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    # Several input blocks, so Ray Data can spread the batches over the cluster's CPUs.
    chunks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(chunks or [table])


def _pack_corpus(corpus: pa.Table, tokenizer_dir: Path, cfg: TokenizeConfig) -> ray.data.Dataset:
    return _dataset(corpus, cfg.batch_size).map_batches(
        pack_blocks,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer_dir": str(tokenizer_dir), "seq_len": cfg.seq_len},
    )


def pack_blocks(batch: pa.Table, *, tokenizer_dir: str, seq_len: int) -> pa.Table:
    """Concatenate the batch's texts ([SEP] between documents) and cut `[CLS] ... [SEP]` blocks
    (a loaded tokenizer's own start and separator tokens; no start token when it has none).

    The tail shorter than a block is dropped: every block has exactly `seq_len` tokens, so
    pre-training needs no padding.
    """
    tokenizer = _load_tokenizer(tokenizer_dir)
    sep, start = separator_id(tokenizer), start_id(tokenizer)
    encoded = tokenizer(batch.column("text").to_pylist(), add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(sep)
    body = seq_len - 1 - (start is not None)
    count = len(stream) // body
    chunks = np.asarray(stream[: count * body], dtype=np.int32).reshape(count, body)
    head = [np.full((count, 1), start, dtype=np.int32)] if start is not None else []
    blocks = np.concatenate([*head, chunks, np.full((count, 1), sep, dtype=np.int32)], axis=1)
    return pa.table({"input_ids": pa.array(list(blocks), type=pa.list_(pa.int32()))})


def _tokenize_task(table: pa.Table, tokenizer_dir: Path, label_values: list[str], cfg: TokenizeConfig, task):
    return _dataset(table, cfg.batch_size).map_batches(
        tokenize_examples,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        fn_kwargs={
            "tokenizer_dir": str(tokenizer_dir),
            "seq_len": cfg.seq_len,
            "label_values": label_values,
            "task": task.type,
            "doc_stride": task.doc_stride,
        },
    )


def tokenize_examples(
    batch: pa.Table,
    *,
    tokenizer_dir: str,
    seq_len: int,
    label_values: list[str],
    task: str = "sequence_classification",
    **options,
) -> pa.Table:
    """Tokenize labelled rows as their task type does, padded/truncated to `seq_len`, with labels
    mapped to ids (components/tasks/).

    Raises:
        ValueError: a label that the train split does not have.
    """
    kind = task_type(task)
    label_ids = {value: index for index, value in enumerate(label_values)}
    unknown = sorted(set(kind.labels_of(batch)) - set(label_ids))
    if unknown:
        raise ValueError(f"labels {unknown} do not occur in the train split (which has {label_values})")
    return pa.table(kind.tokenize(batch, _load_tokenizer(tokenizer_dir), seq_len, label_ids, **options))
