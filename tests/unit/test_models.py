"""Model families and presets, init from a checkpoint, masking, the DeepSpeed config builder, LR
schedules, the export smoke test, throughput and early stopping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from components import model_size, models, training
from components.schemas import OBJECTIVES, PRESETS, DeepSpeedConfig, ModelConfig


@pytest.mark.parametrize("family, preset", [(f, p) for f in PRESETS for p in PRESETS[f]])
def test_presets_build_configs(family: str, preset: str) -> None:
    config = models.build_config(
        ModelConfig(family=family, preset=preset), vocab_size=1000, special_ids={"pad": 0, "bos": 2, "eos": 3}
    )
    sizes = PRESETS[family][preset]
    assert config.model_type == family
    assert (config.hidden_size, config.num_hidden_layers) == (sizes["hidden_size"], sizes["num_layers"])


@pytest.mark.parametrize(
    "family, preset, vocab, millions",
    [
        ("bert", "base", 30522, 110),
        ("gpt2", "small", 50257, 124),
        ("t5", "small", 32128, 60),
        ("t5", "base", 32128, 223),
        ("bart", "base", 50265, 139),
    ],
)
def test_the_large_presets_have_their_published_sizes(family: str, preset: str, vocab: int, millions: int) -> None:
    config = models.build_config(ModelConfig(family=family, preset=preset), vocab_size=vocab, special_ids={"pad": 0})
    with torch.device("meta"):
        model = models.lm_class(OBJECTIVES[family]).from_config(config)
    assert abs(models.count_parameters(model) / 1e6 - millions) < 2


@pytest.mark.parametrize("family, preset", [(f, p) for f in PRESETS for p in PRESETS[f]])
def test_a_models_parameters_are_counted_exactly_before_it_is_built(family: str, preset: str) -> None:
    """What the runner checks the storage's room with (`components/model_size.py`), for every
    preset and for odd sizes of each family."""
    odd = {"hidden_size": 48, "num_layers": 3, "num_heads": 4, "intermediate_size": 80, "max_positions": 40}
    for cfg in (ModelConfig(family=family, preset=preset), ModelConfig(family=family, preset=preset, **odd)):
        with torch.device("meta"):
            model = models.build_lm(cfg, vocab_size=1234, special_ids={"pad": 0, "bos": 2, "eos": 3}, seed=0)
        assert model_size.parameters(family, cfg.resolved(), 1234) == models.count_parameters(model), cfg


def test_saved_parameters_and_vocabulary_are_read_without_loading(tmp_path: Path) -> None:
    from tests.conftest import tiny_classifier

    folder = tiny_classifier(tmp_path / "model", seed=0)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model_size.saved_parameters(folder) == models.count_parameters(loaded)
    assert model_size.vocabulary_size(folder) == len(AutoTokenizer.from_pretrained(folder))
    assert model_size.saved_parameters(tmp_path) is None  # no weights there


@pytest.mark.parametrize("family, objective", [("bert", "mlm"), ("gpt2", "clm"), ("t5", "span"), ("bart", "span")])
def test_each_family_trains_with_its_objective_on_sdpa(family: str, objective: str) -> None:
    cfg = ModelConfig(family=family, preset="tiny")
    assert cfg.objective == objective
    model = models.build_lm(cfg, vocab_size=300, special_ids={"pad": 0, "bos": 2, "eos": 3}, seed=0)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 300, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dropout_overrides_name_each_familys_keys() -> None:
    assert set(models.dropout_overrides("gpt2", 0.2)) == {"resid_pdrop", "embd_pdrop", "attn_pdrop"}
    assert models.dropout_overrides("bert", 0.2) == {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2}
    assert models.dropout_overrides("bert", 0.2, 0.05) == {
        "hidden_dropout_prob": 0.2,
        "attention_probs_dropout_prob": 0.05,
    }
    assert models.dropout_overrides("gpt2", 0.2, 0.0)["attn_pdrop"] == 0.0
    assert models.dropout_overrides("t5", 0.2) == {"dropout_rate": 0.2}
    assert models.dropout_overrides("bart", 0.2, 0.0) == {"dropout": 0.2, "attention_dropout": 0.0}


def test_init_from_a_folder_keeps_its_weights_and_adds_a_missing_head(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    encoder = BertModel(
        BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )  # a sentence encoder: no MLM head
    encoder.save_pretrained(tmp_path)
    model = models.build_lm(ModelConfig(init_from=str(tmp_path)), vocab_size=120, special_ids={"pad": 0}, seed=0)
    assert type(model).__name__ == "BertForMaskedLM"
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    """Weights load from safetensors only: a pickle (pytorch_model.bin) could run code on load."""
    from transformers import BertConfig, BertModel

    encoder = BertModel(
        BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    encoder.config.save_pretrained(tmp_path)
    torch.save(encoder.state_dict(), tmp_path / "pytorch_model.bin")  # the pickle format, the weights alone
    with pytest.raises(OSError, match="safetensors"):
        models.build_lm(ModelConfig(init_from=str(tmp_path)), vocab_size=120, special_ids={"pad": 0}, seed=0)


def test_overrides_beat_the_preset() -> None:
    config = models.build_config(
        ModelConfig(preset="tiny", num_layers=3, max_positions=64), vocab_size=100, special_ids={"pad": 0}
    )
    assert (config.num_hidden_layers, config.max_position_embeddings, config.hidden_size) == (3, 64, 64)


def test_tiny_model_is_small_and_runs() -> None:
    model = models.build_lm(ModelConfig(), vocab_size=300, special_ids={"pad": 0}, seed=0)
    assert models.count_parameters(model) < 200_000
    ids = torch.randint(5, 300, (2, 16))
    assert model(input_ids=ids, labels=ids).loss.item() > 0


def test_mask_tokens_respects_specials_and_rate() -> None:
    ids = torch.randint(5, 1000, (64, 128))
    ids[:, 0], ids[:, -1] = 2, 3
    inputs, labels = models.mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=1000,
        special_ids=[0, 1, 2, 3, 4],
        probability=0.15,
        generator=torch.Generator().manual_seed(0),
    )
    targets = labels != -100
    assert 0.13 < targets.float().mean() < 0.17
    assert not targets[:, 0].any() and not targets[:, -1].any()
    assert torch.equal(labels[targets], ids[targets])
    masked_share = (inputs[targets] == 4).float().mean()
    assert 0.75 < masked_share < 0.85
    assert torch.equal(inputs[~targets], ids[~targets])


def _corrupted(rows: int = 4, length: int = 64, seed: int = 0, sentinels: list[int] | None = None):
    ids = torch.arange(100, 100 + length).repeat(rows, 1)  # every token distinct within a row
    return ids, *models.corrupt_spans(
        ids,
        noise_density=0.15,
        mean_span_length=3.0,
        sentinel_ids=sentinels or list(range(10, 20)),
        eos_id=3,
        generator=torch.Generator().manual_seed(seed),
    )


def test_span_corruption_cuts_spans_out_and_the_targets_put_them_back() -> None:
    """64 tokens, 15% noise in spans of ~3: 10 corrupted tokens in 3 spans, kept tokens first."""
    ids, inputs, labels = _corrupted()
    assert inputs.shape == (4, 64 - 10 + 3 + 1) and labels.shape == (4, 10 + 3 + 1)
    assert (inputs[:, -1] == 3).all() and (labels[:, -1] == 3).all()
    for original, source, target in zip(ids, inputs, labels, strict=True):
        assert source[0] >= 100  # a kept run comes first
        assert [int(t) for t in source if 10 <= t < 20] == [10, 11, 12]  # one sentinel per span, in order
        assert [int(t) for t in target if 10 <= t < 20] == [10, 11, 12] and target[0] == 10
        # Each sentinel of the input, replaced by what follows the same sentinel in the target, gives the row back.
        spans = {}
        for token in target[:-1].tolist():
            if 10 <= token < 20:
                current = spans.setdefault(token, [])
            else:
                current.append(token)
        rebuilt = [piece for token in source[:-1].tolist() for piece in (spans[token] if token in spans else [token])]
        assert rebuilt == original.tolist()
        assert all(spans.values())  # no empty span
    assert not torch.equal(inputs[0], inputs[1])  # each row its own spans


def test_span_corruption_is_a_function_of_its_generator_and_needs_a_sentinel_per_span() -> None:
    assert all(torch.equal(a, b) for a, b in zip(_corrupted(seed=3), _corrupted(seed=3), strict=True))
    assert not torch.equal(_corrupted(seed=3)[1], _corrupted(seed=4)[1])
    with pytest.raises(ValueError, match="3 spans per block but the tokenizer has 2 sentinel"):
        _corrupted(sentinels=[10, 11])


def test_sentinels_are_found_in_their_numbers_order() -> None:
    from components import tokenize as tok
    from components.schemas import TokenizeConfig

    tokenizer = tok.train_tokenizer(["a few words of text"] * 20, TokenizeConfig(vocab_size=200, sentinels=12))
    ids = models.sentinel_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == [f"<extra_id_{n}>" for n in range(12)]
    assert tokenizer.tokenize("words <extra_id_11> text")[-2] == "<extra_id_11>"  # one token, never split
    assert set(ids) <= set(tokenizer.all_special_ids)  # so masked-LM never picks one as a target


def test_deepspeed_config_per_stage() -> None:
    zero3 = training.deepspeed_config(DeepSpeedConfig(zero_stage=3), micro_batch_size=8)
    assert zero3["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    bf16 = training.deepspeed_config(DeepSpeedConfig(precision="bf16"), micro_batch_size=8)
    assert bf16["bf16"] == {"enabled": True} and bf16["train_micro_batch_size_per_gpu"] == 8


def test_deepspeed_config_offload_accumulation_and_clipping() -> None:
    ds = DeepSpeedConfig(
        zero_stage=3,
        precision="bf16",
        offload_optimizer="cpu",
        offload_param="cpu",
        gradient_accumulation_steps=4,
        gradient_clipping=0.5,
        train_batch_size=64,
    )
    built = training.deepspeed_config(ds, micro_batch_size=8)
    zero = built["zero_optimization"]
    assert zero["offload_optimizer"] == zero["offload_param"] == {"pin_memory": True, "device": "cpu"}
    assert built["zero_force_ds_cpu_optimizer"] is False  # torch AdamW, a client optimizer, steps on the CPU
    assert (built["gradient_accumulation_steps"], built["gradient_clipping"]) == (4, 0.5)
    assert "train_batch_size" not in built  # DeepSpeed derives it from the world size it finds


def test_shards_are_disjoint_and_equal() -> None:
    shards = [training.Shard(rank, 2, 4) for rank in range(2)]
    batches = [shard.epoch_batches(37, epoch=1, seed=0) for shard in shards]
    assert len(batches[0]) == len(batches[1]) == 4  # 37 // (2 * 4)
    rows = torch.cat([torch.cat(b) for b in batches])
    assert len(set(rows.tolist())) == len(rows) == 32
    # Evaluation: every row once over the ranks (the 37th was dropped), in batches of the same
    # shapes on every rank, the shorter rank's last row a repeat that does not count.
    evaluated = [shard.eval_batches(37) for shard in shards]
    assert [[len(rows) for rows, _ in batches] for batches in evaluated] == [[4, 4, 4, 4, 3]] * 2
    counted = [row for batches in evaluated for rows, count in batches for row in rows[:count].tolist()]
    assert sorted(counted) == list(range(37))
    assert [shard.eval_batches(1) for shard in shards] == [[(torch.tensor([0]), 1)], [(torch.tensor([0]), 0)]]
    assert [shard.eval_batches(0) for shard in shards] == [[], []]  # no eval, no error


def test_a_corpus_too_small_for_one_step_is_refused_before_the_workers_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.pretrain import check_blocks_fill_a_step
    from components.schemas import PretrainConfig
    from components.stage import StageFailure

    pq.write_table(pa.table({"input_ids": [[1, 2, 3]] * 12}), tmp_path / "part-0.parquet")
    config = PretrainConfig(batch_size_per_worker=4, workers={"num_workers": 2}, eval_fraction=0.1)
    check_blocks_fill_a_step(config, str(tmp_path))  # 12 - 1 held out: 11 blocks, a step takes 8
    with pytest.raises(StageFailure, match="11 training blocks cannot fill one step of 2 workers x 6"):
        check_blocks_fill_a_step(config.model_copy(update={"batch_size_per_worker": 6}), str(tmp_path))
    assert "no eval loss" not in caplog.text
    check_blocks_fill_a_step(config.model_copy(update={"eval_fraction": 0.05}), str(tmp_path))  # 0.6 block
    assert "eval_fraction 0.05 of 12 blocks holds none out, so there is no eval loss" in caplog.text
    assert "set pretrain.eval_fraction to 0.09 or more" in caplog.text
    check_blocks_fill_a_step(config.model_copy(update={"eval_fraction": 0.09}), str(tmp_path))
    assert caplog.text.count("no eval loss") == 1  # 0.09 of 12 blocks holds one out


def test_linear_schedule_warms_up_then_decays() -> None:
    factor = training.lr_schedule("linear", warmup_steps=10, total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == 0.0


def test_cosine_schedule_warms_up_then_follows_half_a_cosine() -> None:
    factor = training.lr_schedule("cosine", warmup_steps=10, total_steps=110)
    assert factor(9) == pytest.approx(1.0)
    assert factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)
    assert factor(35) > training.lr_schedule("linear", 10, 110)(35)  # cosine decays slower early on


def test_smoke_test_loads_the_export_and_hashes_its_weights(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from components.schemas import TokenizeConfig
    from components.tokenize import train_tokenizer

    tokenizer = train_tokenizer(["a short sample text ."] * 50, TokenizeConfig(vocab_size=120, seq_len=16))
    model = models.build_lm(ModelConfig(family="gpt2"), vocab_size=len(tokenizer), special_ids={"pad": 0}, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    checked = models.smoke_test(tmp_path, "clm")
    assert checked["parameters"] == models.count_parameters(model) and len(checked["weights_sha256"]) == 64
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # tied to the embeddings: other weights, another hash
    model.save_pretrained(tmp_path)
    assert models.smoke_test(tmp_path, "clm")["weights_sha256"] != checked["weights_sha256"]
    assert isinstance(PreTrainedTokenizerFast.from_pretrained(tmp_path), PreTrainedTokenizerFast)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(RuntimeError, match="does not load"):
        models.smoke_test(tmp_path, "clm")


def test_throughput_reports_flops_from_tokens() -> None:
    from components import flops
    from components.throughput import Throughput

    model = models.build_lm(ModelConfig(), vocab_size=300, special_ids={"pad": 0}, seed=0)
    meter = Throughput(model, seq_len=32, world=2, precision="fp32", device_name="cpu")
    assert meter.read() == {}
    for _ in range(3):
        meter.add(samples=16)
    metrics = meter.read()
    params, layers, hidden = flops.model_shape(model)
    assert params == models.count_parameters(model) - 128 * 64  # without the position embeddings
    assert metrics["throughput/tokens_per_s"] == pytest.approx(metrics["throughput/samples_per_s"] * 32)
    assert metrics["throughput/tflops"] == pytest.approx(
        metrics["throughput/tokens_per_s"] * flops.flops_per_token(params, layers, hidden, 32) / 1e12
    )
    assert "throughput/mfu" not in metrics  # no peak for a CPU


def test_early_stopping_waits_patience_epochs_and_survives_a_restore() -> None:
    from components.finetune import EarlyStopping

    stopper = EarlyStopping(patience=2, min_delta=0.01, state={"epoch": 0})
    assert [stopper.update(loss) for loss in (1.0, 0.8, 0.795)] == [False, False, False]  # 0.795: not by 0.01
    restored = EarlyStopping(patience=2, min_delta=0.01, state={"epoch": 3, **stopper.state()})
    assert restored.update(0.9) is True and restored.best_epoch == 2
    assert not any(EarlyStopping(None, 0.0, {"epoch": 0}).update(1.0 + i) for i in range(5))


def _tiny_masked_lm(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(config).train()


@pytest.mark.parametrize("model_type", sorted(models.MLM_HEADS))
def test_scoring_only_the_targets_gives_the_full_heads_loss_and_gradients(model_type: str) -> None:
    full, targets_only = _tiny_masked_lm(model_type), _tiny_masked_lm(model_type)
    assert models.score_targets_only(targets_only)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 120, (4, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 18:] = 0  # a padded row
    labels = torch.where(torch.rand(input_ids.shape, generator=generator) < 0.15, input_ids, -100)
    labels[:, 3] = input_ids[:, 3]
    losses = []
    for model in (full, targets_only):
        torch.manual_seed(7)  # the same dropout draws: the encoder runs the same either way
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, expected), (_, got) in zip(full.named_parameters(), targets_only.named_parameters(), strict=True):
        assert torch.allclose(got.grad, expected.grad, atol=1e-6), name
    # Without labels (inference, the smoke test) it is the model's own forward: logits for every position.
    targets_only.eval()
    assert targets_only(input_ids=input_ids).logits.shape == (4, 24, 120)


def test_a_head_it_does_not_know_keeps_scoring_every_position() -> None:
    assert not models.score_targets_only(_tiny_masked_lm("distilbert"))
