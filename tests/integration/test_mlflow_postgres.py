"""The test MLflow server really keeps its runs in PostgreSQL: what a client logs through the server
is found by querying the `postgres` fixture's database directly."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration


def test_runs_logged_through_the_server_are_rows_in_postgres(mlflow_server: str, postgres: str) -> None:
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"postgres-check-{uuid.uuid4().hex}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_param(run_id, "optimizer", "adamw")
    client.log_metric(run_id, "loss", 0.25, step=3)
    client.set_terminated(run_id)

    engine = sqlalchemy.create_engine(postgres)
    try:
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("SELECT version()")).scalar_one().startswith("PostgreSQL")
            stored_run = connection.execute(
                sqlalchemy.text("SELECT experiment_id, status FROM runs WHERE run_uuid = :run"), {"run": run_id}
            ).one()
            params = connection.execute(
                sqlalchemy.text("SELECT key, value FROM params WHERE run_uuid = :run"), {"run": run_id}
            ).all()
            metrics = connection.execute(
                sqlalchemy.text("SELECT key, value, step FROM metrics WHERE run_uuid = :run"), {"run": run_id}
            ).all()
    finally:
        engine.dispose()

    assert (str(stored_run.experiment_id), stored_run.status) == (experiment_id, "FINISHED")
    assert [tuple(row) for row in params] == [("optimizer", "adamw")]
    assert [tuple(row) for row in metrics] == [("loss", 0.25, 3)]
