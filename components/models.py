"""Model builders: BERT-style encoders from size presets, masked-LM masking, classifiers."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import BertConfig, BertForMaskedLM

PRESETS: dict[str, dict[str, int]] = {
    # tiny runs on a laptop CPU in minutes; the others are the usual BERT sizes.
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "max_positions": 128},
    "mini": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024, "max_positions": 512},
    "small": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "intermediate_size": 2048, "max_positions": 512},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "max_positions": 512},
}


class ModelConfig(BaseModel):
    """A BERT-style encoder: a size preset, any field of which may be overridden."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["tiny", "mini", "small", "base"] = Field("tiny", description="size preset")
    hidden_size: int | None = Field(None, gt=0, description="overrides the preset's hidden size")
    num_layers: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    max_positions: int | None = Field(None, gt=0, description="longest sequence the model accepts")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    def resolved(self) -> dict[str, int]:
        """The preset with this config's overrides applied."""
        sizes = dict(PRESETS[self.preset])
        sizes.update({key: value for key in sizes if (value := getattr(self, key)) is not None})
        return sizes


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
