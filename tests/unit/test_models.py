"""Model presets, masking and the DeepSpeed config builder."""

from __future__ import annotations

import pytest
import torch

from components import models, training
from components.configs import PRESETS, DeepSpeedConfig, ModelConfig


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_configs(preset: str) -> None:
    config = models.build_bert_config(ModelConfig(preset=preset), vocab_size=1000, pad_token_id=0)
    sizes = PRESETS[preset]
    assert (config.hidden_size, config.num_hidden_layers) == (sizes["hidden_size"], sizes["num_layers"])


def test_overrides_beat_the_preset() -> None:
    config = models.build_bert_config(ModelConfig(preset="tiny", num_layers=3, max_positions=64),
                                      vocab_size=100, pad_token_id=0)  # fmt: skip
    assert (config.num_hidden_layers, config.max_position_embeddings, config.hidden_size) == (3, 64, 64)


def test_tiny_model_is_small_and_runs() -> None:
    config = models.build_bert_config(ModelConfig(), vocab_size=300, pad_token_id=0)
    model = models.build_mlm_model(config, seed=0)
    assert models.count_parameters(model) < 200_000
    ids = torch.randint(5, 300, (2, 16))
    assert model(input_ids=ids, labels=ids).loss.item() > 0


def test_mask_tokens_respects_specials_and_rate() -> None:
    ids = torch.randint(5, 1000, (64, 128))
    ids[:, 0], ids[:, -1] = 2, 3
    inputs, labels = models.mask_tokens(ids, mask_token_id=4, vocab_size=1000, special_ids=[0, 1, 2, 3, 4],
                                        probability=0.15, generator=torch.Generator().manual_seed(0))  # fmt: skip
    targets = labels != -100
    assert 0.13 < targets.float().mean() < 0.17
    assert not targets[:, 0].any() and not targets[:, -1].any()
    assert torch.equal(labels[targets], ids[targets])
    masked_share = (inputs[targets] == 4).float().mean()
    assert 0.75 < masked_share < 0.85
    assert torch.equal(inputs[~targets], ids[~targets])


def test_deepspeed_config_per_stage() -> None:
    zero3 = training.deepspeed_config(DeepSpeedConfig(zero_stage=3), micro_batch_size=8)
    assert zero3["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    bf16 = training.deepspeed_config(DeepSpeedConfig(precision="bf16"), micro_batch_size=8)
    assert bf16["bf16"] == {"enabled": True} and bf16["train_micro_batch_size_per_gpu"] == 8


def test_shards_are_disjoint_and_equal() -> None:
    shards = [training.Shard(rank, 2, 4) for rank in range(2)]
    batches = [shard.epoch_batches(37, epoch=1, seed=0) for shard in shards]
    assert len(batches[0]) == len(batches[1]) == 4  # 37 // (2 * 4)
    rows = torch.cat([torch.cat(b) for b in batches])
    assert len(set(rows.tolist())) == len(rows) == 32
    assert len(shards[0].eval_rows(37)) == len(shards[1].eval_rows(37)) == 18


def test_linear_schedule_warms_up_then_decays() -> None:
    factor = training.linear_schedule(warmup_steps=10, total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == 0.0
