"""Stages one by one on the shared real Ray cluster, tracked in the shared real MLflow server.

One module-scoped chain (tokenize -> pretrain under ZeRO-3 -> a two-trial sweep) feeds every
test here, so each stage runs once.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from components import pretrain, tokenize, tune
from components.schemas import (
    DataConfig,
    DeepSpeedConfig,
    Hyperparameters,
    ModelConfig,
    PretrainConfig,
    TokenizeConfig,
    TuneConfig,
)
from components.stage import StageContext, read_json
from components.tracking import ensure_experiment, start_run
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.integration


class Chain:
    """Creates MLflow runs and contexts for stages run by hand, as the pipeline runner would."""

    def __init__(self, storage: Path, tracking_uri: str):
        self.storage = storage
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, "integration-stages", None)
        self.parent = start_run(self.client, self.experiment_id, "pipeline")
        self.results: dict = {}
        self.contexts: dict[str, StageContext] = {}

    def context(self, stage: str) -> StageContext:
        run_id = start_run(
            self.client, self.experiment_id, stage, parent_run_id=self.parent, tags={"ptft.stage": stage}
        )
        output = self.storage / "artifacts" / stage
        output.mkdir(parents=True)
        ctx = StageContext(
            pipeline_run_id="itest",
            stage=stage,
            output_dir=output,
            storage=self.storage,
            tracking_uri=self.tracking_uri,
            experiment_id=self.experiment_id,
            mlflow_run_id=run_id,
            seed=0,
        )
        self.contexts[stage] = ctx
        return ctx


@pytest.fixture(scope="module")
def chain(ray_driver: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    chain = Chain(tmp_path_factory.mktemp("stages"), mlflow_server)
    data = DataConfig.model_validate(tiny_config_dict(chain.storage)["data"])
    tok_cfg = TokenizeConfig(vocab_size=200, seq_len=32)
    chain.results["tokenize"] = tokenize.run(tok_cfg, data, chain.context("tokenize"))
    pre_cfg = PretrainConfig(
        model=ModelConfig(preset="tiny", max_positions=32),
        max_steps=12,
        batch_size_per_worker=4,
        warmup_steps=2,
        log_every=2,
        checkpoint_every=6,
        deepspeed=DeepSpeedConfig(zero_stage=3),
    )
    chain.results["pretrain"] = pretrain.run(pre_cfg, chain.results["tokenize"].output_uri, chain.context("pretrain"))
    tune_cfg = TuneConfig(num_samples=2, max_epochs=2, grace_period=2, max_concurrent_trials=2)
    chain.results["tune"] = tune.run(
        tune_cfg,
        chain.results["pretrain"].output_uri,
        chain.results["tokenize"].output_uri,
        Hyperparameters(batch_size_per_worker=8),
        DeepSpeedConfig(zero_stage=1),
        chain.context("tune"),
    )
    return chain


def test_tokenize_writes_blocks_splits_and_tokenizer(chain: Chain) -> None:
    out = Path(chain.results["tokenize"].output_uri)
    blocks = pq.read_table(out / "pretrain_blocks").column("input_ids").to_pylist()
    assert len(blocks) > 20 and {len(block) for block in blocks} == {32}
    splits = {split: pq.read_table(out / "task" / split).num_rows for split in ("train", "validation", "test")}
    assert splits == {"train": 64, "validation": 32, "test": 32}
    assert read_json(out / "labels.json") == ["negative", "positive"]
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_pretrain_zero3_ends_with_a_loadable_hf_folder(chain: Chain) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model_dir = Path(chain.results["pretrain"].output_uri)
    assert (model_dir / "model.safetensors").is_file()
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)
    # ZeRO-3 partitions weights; a consolidated save has real (non-empty) embeddings
    assert model.bert.embeddings.word_embeddings.weight.abs().sum() > 0


def test_pretrain_reports_checkpoints_to_ray_train(chain: Chain) -> None:
    ctx = chain.contexts["pretrain"]
    checkpoints = sorted(p for p in Path(ctx.ray_storage(), ctx.ray_run_name()).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # step 6 and the final one (num_to_keep=2)
    assert (checkpoints[-1] / "hf" / "config.json").is_file()
    shards = list(checkpoints[-1].rglob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2  # one ZeRO-3 optimizer shard per worker


def test_pretrain_logs_batched_step_metrics(chain: Chain) -> None:
    run_id = chain.contexts["pretrain"].mlflow_run_id
    losses = chain.client.get_metric_history(run_id, "train/loss")
    steps = sorted({metric.step for metric in losses})
    assert steps == [2, 4, 6, 8, 10, 12]
    for key in ("train/learning_rate", "throughput/tokens_per_s", "eval/mlm_loss"):
        assert chain.client.get_metric_history(run_id, key), key
    first, last = losses[0].value, [m for m in losses if m.step == 12][0].value
    assert last < first  # it learns something in 12 steps


def test_tune_writes_best_config_and_tracks_trials(chain: Chain) -> None:
    out = Path(chain.results["tune"].output_uri)
    best = read_json(out / "best_config.json")
    assert set(best) == {"learning_rate", "weight_decay", "dropout"}
    trials = read_json(out / "trials.json")
    assert len(trials) == 2 and all(row["status"] == "completed" and row["epochs"] == 2 for row in trials)
    assert all("eval/accuracy" in row["metrics"] for row in trials)
    assert not [key for key in chain.results["tune"].metrics if key.startswith("best/config/")]  # best/<name> alone
    ctx = chain.contexts["tune"]
    children = chain.client.search_runs([ctx.experiment_id], f"tags.`mlflow.parentRunId` = '{ctx.mlflow_run_id}'")
    assert len(children) == 2
    assert {child.info.run_id for child in children} == {row["mlflow_run_id"] for row in trials}
    assert sorted(child.data.tags["ptft.best_trial"] for child in children) == ["false", "true"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["ptft.trial_status"] == "completed"
        assert {"learning_rate", "weight_decay", "dropout"} <= set(child.data.params)
        history = chain.client.get_metric_history(child.info.run_id, "eval/accuracy")
        assert [metric.step for metric in history] == [1, 2]  # one per epoch
