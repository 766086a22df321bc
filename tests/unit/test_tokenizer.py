"""WordPiece training and the two batch functions Ray Data runs (packing, task tokenization)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from components import synthetic
from components.tokenize import (
    SPECIAL_TOKENS,
    TokenizeConfig,
    display_names,
    label_vocabulary,
    pack_blocks,
    tokenize_examples,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    texts = [row["text"] for row in synthetic.generate("corpus", 500)]
    train_tokenizer(texts, TokenizeConfig(vocab_size=300, seq_len=16)).save_pretrained(folder)
    return folder


def test_special_tokens_come_first(tokenizer_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    encoded = tokenizer("the film was superb .")["input_ids"]
    assert encoded[0] == tokenizer.cls_token_id and encoded[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in encoded  # every word of the corpus is covered


def test_pack_blocks_makes_full_blocks(tokenizer_dir: Path) -> None:
    batch = pa.table({"text": [row["text"] for row in synthetic.generate("corpus", 50)]})
    blocks = pack_blocks(batch, tokenizer_dir=str(tokenizer_dir), seq_len=16).column("input_ids").to_pylist()
    assert len(blocks) > 10
    assert all(len(block) == 16 and block[0] == 2 and block[-1] == 3 for block in blocks)  # [CLS] ... [SEP]


def test_tokenize_examples_pads_and_maps_labels(tokenizer_dir: Path) -> None:
    batch = pa.table({"text": ["a superb film .", "dull ."], "label": ["positive", "negative"]})
    out = tokenize_examples(batch, tokenizer_dir=str(tokenizer_dir), seq_len=16, label_values=["negative", "positive"])
    assert out.column("label").to_pylist() == [1, 0]
    assert all(len(ids) == 16 for ids in out.column("input_ids").to_pylist())
    assert sum(out.column("attention_mask").to_pylist()[1]) < 16  # the short one is padded


def test_unknown_label_is_an_error(tokenizer_dir: Path) -> None:
    batch = pa.table({"text": ["meh"], "label": ["neutral"]})
    with pytest.raises(ValueError, match="neutral"):
        tokenize_examples(batch, tokenizer_dir=str(tokenizer_dir), seq_len=16, label_values=["negative", "positive"])


def test_label_vocabulary_orders_ints_numerically() -> None:
    assert label_vocabulary(pa.table({"label": [10, 2, 1, 2]})) == ["1", "2", "10"]
    assert label_vocabulary(pa.table({"label": ["pos", "neg"]})) == ["neg", "pos"]


def test_display_names_replace_values_one_to_one() -> None:
    assert display_names(["0", "1"], None) == ["0", "1"]
    assert display_names(["0", "1"], ["negative", "positive"]) == ["negative", "positive"]
    with pytest.raises(ValueError, match="one name per label"):
        display_names(["0", "1", "2"], ["negative", "positive"])
