"""WordPiece training and the two batch functions Ray Data runs (packing, task tokenization)."""

from __future__ import annotations

import json
import subprocess
import sys
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
from tests.conftest import REPO


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


# Trained in another process: the hash maps inside tokenizers' trainer are seeded per process.
VOCABULARY_OF_A_NEW_PROCESS = """
import json, sys
from components import synthetic
from components.tokenize import TokenizeConfig, train_tokenizer
texts = [row["text"] for row in synthetic.generate("corpus", 500)]
print(json.dumps(train_tokenizer(texts, TokenizeConfig(vocab_size=300, seq_len=16)).get_vocab()))
"""


def test_the_same_corpus_trains_the_same_vocabulary(tokenizer_dir: Path) -> None:
    """tokenizers' WordPiece trainer alone gives each process its own vocabulary (the tie-breaks
    between equally frequent merges follow hash-map order): the tokenize stage must not."""
    from transformers import PreTrainedTokenizerFast

    ours = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).get_vocab()
    command = [sys.executable, "-c", VOCABULARY_OF_A_NEW_PROCESS]
    trainings = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(3)]  # at once
    vocabularies = [json.loads(training.communicate(timeout=120)[0]) for training in trainings]
    assert all(training.returncode == 0 for training in trainings)
    assert all(vocabulary == ours for vocabulary in vocabularies)


def test_continuation_pieces_are_plain_vocabulary(tokenizer_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert set(tokenizer.all_special_tokens) == set(SPECIAL_TOKENS)
    pieces = tokenizer.tokenize("superbly")
    assert len(pieces) > 1 and all(piece.startswith("##") for piece in pieces[1:])
    assert tokenizer.decode(tokenizer("superbly")["input_ids"], skip_special_tokens=True) == "superbly"
    assert "##y" in tokenizer.get_vocab() and tokenizer.tokenize("##y") != ["##y"]  # not matched in raw text


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
    with pytest.raises(ValueError, match="2 names for the train split's 3 labels"):
        display_names(["0", "1", "2"], ["negative", "positive"])
