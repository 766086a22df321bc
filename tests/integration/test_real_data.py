"""The real rt-polarity dataset from ../shared/data through the tokenize stage (JSONL files,
integer labels). Skips where ../shared is absent, and fails in CI."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components import tokenize
from components.stage import StageContext, read_json
from pipelines.config import load_config
from tests.conftest import REPO, shared

pytestmark = pytest.mark.integration


def test_rt_polarity_tokenizes_with_its_config(ray_driver: str, tmp_path: Path, monkeypatch) -> None:
    shared("data/rt-polarity")
    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repo root
    config = load_config(REPO / "configs" / "rt_polarity.yaml", [f"storage={tmp_path}"])
    ctx = StageContext(
        pipeline_run_id="real",
        stage="tokenize",
        output_dir=tmp_path / "tok",
        storage=tmp_path,
        tracking_uri="",
        experiment_id="",
        mlflow_run_id="",
    )
    result = tokenize.run(config.tokenize, config.data, ctx)
    assert read_json(ctx.output_dir / "labels.json") == ["negative", "positive"]  # data.task.label_names
    rows = {split: pq.read_table(ctx.output_dir / "task" / split).num_rows for split in ("train", "validation", "test")}
    assert rows == {"train": 8530, "validation": 1066, "test": 1066}
    assert result.metrics["tokenize/vocab_size"] > 5000
    test_labels = pq.read_table(ctx.output_dir / "task" / "test").column("label").to_pylist()
    assert sum(test_labels) == 533  # positives in test.jsonl, per the dataset's README
