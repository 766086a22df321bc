"""Model builders: BERT-style encoders from size presets, masked-LM masking, classifiers."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from components.configs import ModelConfig


def build_bert_config(cfg: ModelConfig, *, vocab_size: int, pad_token_id: int) -> BertConfig:
    sizes = cfg.resolved()
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=sizes["max_positions"],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=pad_token_id,
    )


def build_mlm_model(config: BertConfig, *, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the non-special tokens as targets; of those, 80% become
    [MASK], 10% a random token, 10% stay. Returns (inputs, labels) with -100 on non-targets."""
    labels = input_ids.clone()
    special = torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = mask_token_id
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomize] = torch.randint(len(special_ids), vocab_size, input_ids.shape, generator=generator,
                                      dtype=input_ids.dtype)[randomize]
    return inputs, labels


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
