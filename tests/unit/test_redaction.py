"""Credentials never leave in clear: URL shapes that naive splitting misses, what a run stores, the
resume that needs them back, and the Ray Job that must not carry them."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.redaction import CredentialsNeeded, connectable_uri, redact_text, redact_url, redacted_urls
from pipelines import jobs
from pipelines import manifest as mf
from pipelines.pipeline_config import ConfigError, Problem, validate
from tests.conftest import tiny_config_dict


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://alice:s3cr3t@mlflow.example.com", "https://***@mlflow.example.com"),
        # Raw "/", "@", "?", "#" in a password: database drivers accept them.
        ("postgresql://ptft:pa/ss@w0rd@db.internal:5432/mlflow", "postgresql://***@db.internal:5432/mlflow"),
        ("postgresql://ptft:pa?ss#x@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("mysql+pymysql://u:p@ss@db/mlflow", "mysql+pymysql://***@db/mlflow"),
        ("postgresql://ptft:p%2Fss%40w@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://token-only@host/x", "https://***@host/x"),
        # Credentials in the query: MLflow/Databricks tokens, Azure SAS and S3 presigned signatures.
        ("https://host/api?token=abc123&x=1", "https://host/api?token=***&x=1"),
        (
            "https://a.blob.core.windows.net/c?sv=2020&sig=AB%2Fc&se=2",
            "https://a.blob.core.windows.net/c?sv=2020&sig=***&se=2",
        ),
        (
            "https://s3/b/k?X-Amz-Signature=beef&X-Amz-Credential=AKIA/x",
            "https://s3/b/k?X-Amz-Signature=***&X-Amz-Credential=***",
        ),
        # Nothing to take out.
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://127.0.0.1:5000/#/experiments/1/runs/abc", "http://127.0.0.1:5000/#/experiments/1/runs/abc"),
        ("http://host:5000/users/bob@example.com", "http://host:5000/users/bob@example.com"),
        ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
        ("databricks://profile", "databricks://profile"),
        ("/abs/path/with@sign", "/abs/path/with@sign"),
    ],
)
def test_redact_url_takes_out_credentials_of_every_shape(uri: str, shown: str) -> None:
    assert redact_url(uri) == shown


def test_messages_and_stored_configs_lose_their_credentials() -> None:
    message = "API request to postgresql://u:pa/ss@w0rd@db/x failed; see https://h/a?token=t0k"
    assert redact_text(message) == "API request to postgresql://***@db/x failed; see https://h/a?token=***"
    tree = {"tracking": {"uri": "http://u:p@h:5000", "experiment": "e"}, "tags": ["https://h?sig=abc"], "n": 3}
    assert redacted_urls(tree) == {
        "tracking": {"uri": "http://***@h:5000", "experiment": "e"},
        "tags": ["https://h?sig=***"],
        "n": 3,
    }
    problem = Problem(
        "tracking.uri", "http://u:hunter2@h:5000", "does not answer (http://u:hunter2@h:5000/health)", "fix"
    )
    assert "hunter2" not in str(problem) and "http://***@h:5000" in str(problem)


def test_a_run_stores_its_tracking_uri_without_credentials_and_a_resume_needs_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_uri = "http://ptft:pa%2Fss%40w0rd@127.0.0.1:5000"
    config = {**tiny_config_dict(tmp_path), "tracking": {"uri": secret_uri}}
    manifest = mf.Manifest.create(tmp_path, "run-1", "demo", ("tokenize",), config)
    manifest.tracking_uri = secret_uri  # what the driver connects with stays in memory
    manifest.save()
    for name in ("manifest.json", "config.json"):
        stored = (tmp_path / "runs" / "run-1" / name).read_text()
        assert "pa%2Fss%40w0rd" not in stored and "http://***@127.0.0.1:5000" in stored, name
    assert mf.Manifest.load(tmp_path, "run-1").tracking_uri == "http://***@127.0.0.1:5000"

    recorded = {**manifest.config(), "storage": str(tmp_path)}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError) as refused:
        validate(recorded, "run run-1", check_data=False)
    assert "tracking.uri" in str(refused.value) and "MLFLOW_TRACKING_URI" in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ptft:other@127.0.0.1:9999")  # another server: not taken
    with pytest.raises(CredentialsNeeded):
        connectable_uri("http://***@127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    assert validate(recorded, "run run-1", check_data=False).tracking_uri() == secret_uri


def test_a_ray_job_is_never_given_credentials(tmp_path: Path) -> None:
    config = validate({**tiny_config_dict(tmp_path), "tracking": {"uri": "https://u:t0ps3cret@mlflow:5000"}})
    problems = jobs._credential_problems(config)
    assert [problem.key for problem in problems] == ["tracking.uri"]
    assert "t0ps3cret" not in str(problems[0]) and "MLFLOW_TRACKING_PASSWORD" in str(problems[0])
    plain = validate({**tiny_config_dict(tmp_path), "tracking": {"uri": "https://mlflow:5000"}})
    assert jobs._credential_problems(plain) == []
