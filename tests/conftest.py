"""Shared test helpers. Service fixtures (Ray cluster, MLflow server) live in tests/services.py
and are session-scoped: every integration and e2e test shares one of each."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# `ray start` (used by the cluster fixture) turns on token auth and writes the token to ~/.ray;
# clients, this process and the `ptft` subprocesses alike, send it only in token mode. Ray reads
# this when it is imported, so it is set before any test module imports Ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")

pytest_plugins = ["tests.services"]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def tiny_config_dict(storage: Path) -> dict:
    """A complete, small pipeline config on synthetic data (for unit and integration tests)."""
    return {
        "name": "unit",
        "storage": str(storage),
        "data": {
            "corpus": {"source": {"type": "synthetic", "split": "corpus", "num_examples": 300}},
            "task": {
                "train": {"type": "synthetic", "split": "train", "num_examples": 64},
                "validation": {"type": "synthetic", "split": "validation", "num_examples": 32},
                "test": {"type": "synthetic", "split": "test", "num_examples": 32},
            },
        },
        "tokenize": {"vocab_size": 200, "seq_len": 32},
    }


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 300, poll_s: float = 0.2):
    """Poll `condition` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f}s")


POSITIONS = 64  # tiny_classifier reads 64 tokens: longer texts are truncated
WORDS = "the a film plot movie was is and but not very good bad great dull superb moving tedious".split()


def tiny_classifier(folder: Path, seed: int) -> Path:
    """A 2-layer BERT classifier with a word-level vocabulary, built here (no download)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(words)}, model_max_length=POSITIONS)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=POSITIONS,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def system_tool(name: str, package: str) -> str:
    """The path of a system program a test needs (Prometheus, Chromium): skip with the install
    command when it is absent, or fail where PTFT_REQUIRE_SYSTEM_TOOLS is set (.ci/run sets it)."""
    import shutil

    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed: apt-get install {package} (.ci/run installs it)"
    if os.environ.get("PTFT_REQUIRE_SYSTEM_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)
