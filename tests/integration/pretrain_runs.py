"""Pre-training through Ray Train on the shared cluster, as the fault tests run it: tokenize once,
then `pretrain` with one seed as often as a scenario needs, each run in its own MLflow run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from components import pretrain, tokenize
from components.schemas import DataConfig, ModelConfig, PretrainConfig, TokenizeConfig, WorkersConfig
from components.stage import StageContext
from components.tracking import ensure_experiment, start_run
from tests.conftest import tiny_config_dict

CHECKPOINT_EVERY = 25


class PretrainRuns:
    """Tokenize once, then pretrain (100 steps, 2 workers unless told, a checkpoint every 25) as
    often as a scenario needs, with the same seed each time."""

    def __init__(self, storage: Path, tracking_uri: str, experiment: str, workers: int = 2):
        self.storage = storage
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment, None)
        data = DataConfig.model_validate(tiny_config_dict(storage)["data"])
        self.tokenized = tokenize.run(TokenizeConfig(vocab_size=200, seq_len=32), data, self.context("tokenize"))
        self.config = PretrainConfig(
            model=ModelConfig(preset="tiny"),
            max_steps=100,
            warmup_steps=5,
            learning_rate=2e-3,
            batch_size_per_worker=8,
            log_every=1,
            checkpoint_every=CHECKPOINT_EVERY,
            workers=WorkersConfig(num_workers=workers, max_failures=2),
        )

    def context(self, name: str) -> StageContext:
        run_id = start_run(self.client, self.experiment_id, name, tags={"ptft.stage": name, "ptft.run_id": name})
        output = self.storage / "artifacts" / name
        output.mkdir(parents=True)
        return StageContext(
            pipeline_run_id=name,
            stage="pretrain",
            output_dir=output,
            storage=self.storage,
            tracking_uri=self.tracking_uri,
            experiment_id=self.experiment_id,
            mlflow_run_id=run_id,
            seed=7,
        )

    def run_id_of(self, name: str) -> str | None:
        found = self.client.search_runs([self.experiment_id], f"tags.`ptft.run_id` = '{name}'")
        return found[0].info.run_id if found else None

    def pretrain(self, name: str):
        ctx = self.context(name)
        return ctx, pretrain.run(self.config, self.tokenized.output_uri, ctx)
