"""How large a model is before it is built, and the least a training stage writes to storage for it.

No torch import: the runner checks a stage's room on the storage's disk before the stage starts
(`Stage.room`), so that a disk too small for one checkpoint fails the run in a line before hours
of training, not at the first checkpoint. The counts are exact for the families ptft builds
(`tests/unit/test_models.py` checks them against the models themselves).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Bytes a parameter takes at the least, whatever the precision: a training checkpoint holds the
# weights and Adam's two fp32 moments (fp32: 4 + 8; bf16/fp16: 2, an fp32 master copy 4, and 8),
# an exported model its weights (2 in bf16).
CHECKPOINT_BYTES = 12
MODEL_BYTES = 2
T5_RELATIVE_BUCKETS = 32  # T5Config's relative_attention_num_buckets, which ptft leaves as it is


def parameters(family: str, sizes: dict[str, int], vocab_size: int) -> int:
    """The parameters of the pre-training model ptft builds for `family` with `sizes` (those of
    `ModelConfig.resolved()`), tied embeddings counted once."""
    hidden, layers, heads = sizes["hidden_size"], sizes["num_layers"], sizes["num_heads"]
    inner, positions = sizes["intermediate_size"], sizes["max_positions"]
    embeddings = vocab_size * hidden
    # An attention block with biases and a two-layer MLP with biases, with two layer norms.
    biased_layer = 4 * hidden * hidden + 2 * hidden * inner + 9 * hidden + inner
    if family == "bert":
        head = hidden * hidden + 3 * hidden + vocab_size  # transform, its norm, the decoder's bias
        return embeddings + positions * hidden + 2 * hidden + 2 * hidden + layers * biased_layer + head
    if family == "gpt2":
        return embeddings + positions * hidden + layers * biased_layer + 2 * hidden
    if family == "t5":  # no biases, norms without a bias, relative positions in each stack's first layer
        relative = T5_RELATIVE_BUCKETS * heads
        encoder = layers * (4 * hidden * hidden + 2 * hidden * inner + 2 * hidden) + relative + hidden
        decoder = layers * (8 * hidden * hidden + 2 * hidden * inner + 3 * hidden) + relative + hidden
        return embeddings + encoder + decoder
    if family == "bart":  # learned positions (2 more), an embedding norm per stack
        cross_attention = 4 * hidden * hidden + 6 * hidden
        stacks = 2 * ((positions + 2) * hidden + 2 * hidden)
        return embeddings + stacks + layers * biased_layer + layers * (biased_layer + cross_attention)
    raise ValueError(f"no parameter count for the model family {family!r}")


def saved_parameters(folder: Path) -> int | None:
    """The parameters in a model folder's safetensors files (read from their headers, not loaded);
    None when it has none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    return sum(_numel(file) for file in files)


def _numel(file: Path) -> int:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    total = 0
    for name, tensor in header.items():
        if name != "__metadata__":
            count = 1
            for dimension in tensor["shape"]:
                count *= dimension
            total += count
    return total


def vocabulary_size(tokenizer_folder: Path) -> int:
    """`len(tokenizer)` of a saved fast tokenizer, from its `tokenizer.json`: one past its highest id."""
    spec = json.loads((Path(tokenizer_folder) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    ids = range(len(vocab)) if isinstance(vocab, list) else vocab.values()  # Unigram: a list of pieces
    return 1 + max([*ids, *(token["id"] for token in spec.get("added_tokens", []))])


def least_written(parameters: int, checkpoints: int = 1, models: int = 1) -> int:
    """The least bytes a training stage holds on storage at once: `checkpoints` training
    checkpoints and `models` exported models of `parameters` parameters."""
    return parameters * (checkpoints * CHECKPOINT_BYTES + models * MODEL_BYTES)
