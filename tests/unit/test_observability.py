"""What a run shows without services: attention maps and the pictures, MLflow lineage on a real
sqlite store, progress and `ptft status`, and `ptft explain` on a tiny model built here."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from components import console, explain, plots, registry
from components.finetune import confusion_matrix, macro_f1
from components.net import free_port
from components.schemas import FileSource, SyntheticSource
from components.stage import StageResult
from components.tracking import MlflowTracker, NullTracker
from pipelines import lineage, progress
from pipelines import manifest as mf
from pipelines.cli import main
from pipelines.driver_lock import LOCK_NAME, DriverLock
from pipelines.stages import NAMES as STAGE_NAMES
from tests.conftest import tiny_classifier

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("explain") / "model", seed=3)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """One sqlite store for the module (creating one takes seconds); tests use their own experiments."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def _experiment(client: MlflowClient, name: str) -> str:
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    artifacts = Path(client.tracking_uri.removeprefix("sqlite:///")).parent / name  # not ./mlruns
    return client.create_experiment(name, artifact_location=str(artifacts))


def _load(folder: Path):
    return AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


# --- attention maps and pictures -----------------------------------------------------------------


def test_attention_maps_are_heads_by_tokens_from_cls(classifier: Path) -> None:
    model, tokenizer = _load(classifier)
    maps = explain.attention_maps(model, tokenizer, ["the film was good .", "dull"], max_tokens=64)
    assert maps[0]["tokens"] == ["[CLS]", "the", "film", "was", "good", ".", "[SEP]"]
    assert maps[1]["tokens"] == ["[CLS]", "dull", "[SEP]"]  # the padding of the batch is left out
    for item in maps:
        assert len(item["attention"]) == model.config.num_attention_heads
        assert all(
            len(head) == len(item["tokens"]) and sum(head) == pytest.approx(1, abs=1e-3) for head in item["attention"]
        )
        assert item["query_token"] == "[CLS]" and item["layer"] == 1 and item["label"] in ("negative", "positive")
    with torch.inference_mode():
        probabilities = model(**tokenizer(["dull"], return_tensors="pt")).logits.softmax(-1)
    assert maps[1]["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)  # the prediction, not a copy
    assert model.config._attn_implementation == "sdpa"  # eager only for the call
    first_layer = explain.attention_maps(model, tokenizer, ["dull"], max_tokens=64, layer=0)[0]
    assert first_layer["layer"] == 0 and first_layer["attention"] != maps[1]["attention"]
    with pytest.raises(ValueError, match="2 layers"):
        explain.attention_maps(model, tokenizer, ["dull"], max_tokens=64, layer=2)


@pytest.mark.parametrize("cls_token", [None, "[CLS]"])  # ptft's own GPT-2 tokenizers have a [CLS]
def test_a_decoder_explains_from_its_last_token(cls_token: str | None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "the", "film", "was", "good", "[CLS]"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", cls_token=cls_token
    )
    assert (tokenizer.cls_token_id is None) == (cls_token is None)
    config = GPT2Config(
        vocab_size=len(words),
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        pad_token_id=0,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model = GPT2ForSequenceClassification(config).eval()
    maps = explain.attention_maps(model, tokenizer, ["the film was good", "good"], max_tokens=16)
    assert maps[0]["query_token"] == "good" and maps[0]["tokens"] == ["the", "film", "was", "good"]
    assert maps[1]["tokens"] == ["good"] and maps[1]["attention"] == [[1.0], [1.0]]  # causal: only itself


def test_confusion_matrix_and_macro_f1(classifier: Path) -> None:
    model, tokenizer = _load(classifier)
    texts = ["the film was good", "dull", "a superb plot", "tedious and bad", "moving"]
    encoded = tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
    split = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "label": torch.tensor([1, 0, 1, 0, 1]),
    }
    matrix = confusion_matrix(model, split, 2, batch_size=2)
    predicted = model(**{k: v for k, v in encoded.items() if k != "token_type_ids"}).logits.argmax(-1).tolist()
    expected = [[0, 0], [0, 0]]
    for true, guess in zip([1, 0, 1, 0, 1], predicted, strict=True):
        expected[true][guess] += 1
    assert matrix == expected and sum(map(sum, matrix)) == 5
    assert macro_f1([[5, 0], [0, 5]]) == 1.0
    assert macro_f1([[3, 1], [2, 4]]) == pytest.approx((2 * 3 / 9 + 2 * 4 / 11) / 2)
    assert macro_f1([[0, 4], [0, 4]]) == pytest.approx((0 + 2 * 4 / 12) / 2)  # a label never predicted scores 0


def test_pictures_are_pngs(classifier: Path, client: MlflowClient, tmp_path: Path) -> None:
    run_id = client.create_run(_experiment(client, "pictures")).info.run_id
    for step in range(1, 21):
        client.log_metric(run_id, "train/loss", 3 / step, step=step)
        client.log_metric(run_id, "train/learning_rate", 1e-3 * min(1, step / 5), step=step)
    for epoch, loss in ((1, 0.9), (2, 0.7)):
        client.log_metric(run_id, "eval/loss", loss, step=epoch)
    tracker = MlflowTracker(client.tracking_uri, run_id)
    curves = plots.training_curves(tracker, tmp_path / "plots", eval_key="eval/loss")
    assert [path.name for path in curves] == ["loss.png", "learning_rate.png"]
    model, tokenizer = _load(classifier)
    maps = explain.attention_maps(model, tokenizer, ["the film was good", "dull"], max_tokens=64)
    pictures = [
        *curves,
        plots.attention(maps, tmp_path / "attention.png"),
        plots.confusion_matrix([[3, 1], [0, 4]], ["negative", "positive"], tmp_path / "cm.png", title="t"),
    ]
    assert all(path.read_bytes()[:8] == PNG and path.stat().st_size > 5000 for path in pictures)
    plots.log(tracker, curves)
    logged = {item.path for item in client.list_artifacts(run_id, "plots")}
    assert logged == {"plots/loss.png", "plots/learning_rate.png"}
    empty = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    assert plots.training_curves(MlflowTracker(client.tracking_uri, empty), tmp_path / "none") == []  # nothing drawn
    assert plots.training_curves(NullTracker(), tmp_path / "untracked") == []  # a stage run without MLflow


# --- lineage -------------------------------------------------------------------------------------


def test_branches_reading_the_same_split_log_it_side_by_side(tmp_path: Path) -> None:
    """Two task branches of configs/demo_generation.yaml read the same synthetic splits and logged
    them at once from the driver's threads: MLflow adds a dataset new to the experiment with a
    check, then an insert, and the second branch's stage failed on a UNIQUE constraint."""
    import threading

    from tests.conftest import sqlite_store

    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    reads = [
        lineage.DatasetRead(split, SyntheticSource(split=split, num_examples=8), f"digest-{split}", split)
        for split in ("train", "validation", "test")
    ]
    # A dataset is new once per experiment: a race each round (one in two alone lost it here).
    experiments = [_experiment(client, f"branches-{round_}") for round_ in range(5)]
    runs = [client.create_run(experiment).info.run_id for experiment in experiments for _ in range(4)]
    start, failures = threading.Barrier(len(runs)), []

    def branch(run_id: str) -> None:
        start.wait()
        try:
            lineage.log_datasets(client, run_id, reads)
        except Exception as error:  # noqa: BLE001 - what a stage would have failed with
            failures.append(error)

    threads = [threading.Thread(target=branch, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    for run_id in runs:
        assert {item.dataset.name for item in client.get_run(run_id).inputs.dataset_inputs} == {
            "train",
            "validation",
            "test",
        }


def test_lineage_datasets_upstream_tags_and_model_description(client: MlflowClient, tmp_path: Path) -> None:
    experiment = _experiment(client, "lineage")
    runs = {
        stage: client.create_run(experiment, tags={"ptft.run_id": "pipe-1"}).info.run_id
        for stage in ("tokenize", "pretrain", "tune", "finetune")
    }
    data_file = tmp_path / "train.csv"
    data_file.write_text("text,label\na,b\n")
    lineage.log_datasets(
        client,
        runs["tokenize"],
        [
            lineage.DatasetRead("train", FileSource(path=str(data_file)), "abc123", "train"),
            lineage.DatasetRead("corpus", SyntheticSource(split="corpus", num_examples=10), "def456", "corpus"),
        ],
    )
    upstream = {stage: runs[stage] for stage in ("tokenize", "pretrain", "tune")}
    lineage.tag_upstream(client, runs["finetune"], upstream)
    inputs = client.get_run(runs["tokenize"]).inputs.dataset_inputs
    found = {item.dataset.name: item for item in inputs}
    assert found["train"].dataset.digest == "abc123" and str(data_file) in found["train"].dataset.source
    assert found["corpus"].dataset.source_type == "code" and found["corpus"].dataset.digest == "def456"
    assert {tag.value for tag in found["train"].tags} == {"train"}
    tags = client.get_run(runs["finetune"]).data.tags
    assert {stage: tags.get(f"ptft.upstream.{stage}") for stage in ("tokenize", "pretrain", "tune")} == {
        stage: runs[stage] for stage in ("tokenize", "pretrain", "tune")
    }
    name = f"m-{experiment}"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{runs['finetune']}/model", run_id=runs["finetune"]).version
    description, tags = lineage.model_version_lineage(
        runs, pipeline_run_id="pipe-1", experiment_id=experiment, tracking_uri="http://mlflow:5000"
    )
    registry.describe_version(client.tracking_uri, name, version, description, tags)
    described = client.get_model_version(name, version)
    for stage in ("pretrain", "tune", "finetune"):
        assert f"http://mlflow:5000/#/experiments/{experiment}/runs/{runs[stage]}" in described.description
        assert described.tags[f"ptft.{stage}_run_id"] == runs[stage]
    assert "pipe-1" in described.description


# --- progress and status -------------------------------------------------------------------------


def _manifest_with_running_pretrain(client: MlflowClient, storage: Path) -> mf.Manifest:
    experiment = _experiment(client, "progress")
    manifest = mf.Manifest.create(storage, "run-1", "demo", STAGE_NAMES, {"name": "demo"})
    manifest.tracking_uri, manifest.experiment_id = client.tracking_uri, experiment
    run_id = client.create_run(experiment).info.run_id
    manifest.stage_started("tokenize", "k0", client.create_run(experiment).info.run_id)
    manifest.stage_ended(
        "tokenize", mf.CACHED, cached_from="producer-run", cached_from_pipeline_run="20260101-000000-abc"
    )
    manifest.stage_started("pretrain", "k1", run_id)
    manifest.stages["pretrain"].started_at = time.time() - 30  # 30 s in
    manifest.save()
    client.log_metric(run_id, "progress/total_steps", 400, step=0)
    client.log_metric(run_id, "train/step", 100, step=100)
    return manifest


def test_snapshot_gives_steps_and_an_eta(client: MlflowClient, tmp_path: Path) -> None:
    manifest = _manifest_with_running_pretrain(client, tmp_path)
    state = progress.snapshot(manifest, client)
    stages = {stage["name"]: stage for stage in state["stages"]}
    assert [stage["name"] for stage in state["stages"]] == list(STAGE_NAMES)
    assert stages["tokenize"]["cached"] and stages["tokenize"]["cached_from_mlflow_run_id"] == "producer-run"
    assert stages["tokenize"]["cached_from_pipeline_run"] == "20260101-000000-abc"
    pretrain = stages["pretrain"]["progress"]
    assert pretrain["step"] == 100 and pretrain["total_steps"] == 400
    assert pretrain["eta_s"] == pytest.approx(90, rel=0.1)  # 100 steps in 30 s, 300 to go
    assert stages["tune"]["status"] == "pending" and "progress" not in stages["tune"]


def test_reporter_prints_transitions_and_step_progress(client: MlflowClient, tmp_path: Path) -> None:
    manifest = _manifest_with_running_pretrain(client, tmp_path)
    out = io.StringIO()
    reporter = progress.Reporter(manifest, client, every_s=1, stream=out)
    reporter.poll(progress=True)
    client.log_metric(manifest.stages["pretrain"].mlflow_run_id, "train/step", 200, step=200)
    reporter.poll(progress=True)
    manifest.stage_ended("pretrain", mf.SUCCEEDED)
    reporter.poll(progress=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[ptft] tokenize cache hit in 0s (produced by run 20260101-000000-abc)"
    assert lines[1] == "[ptft] pretrain started"
    assert "step 100/400 (25%)" in lines[2] and "ETA" not in lines[2]  # one observation: no rate yet
    assert "step 200/400 (50%)" in lines[3] and "steps/s" in lines[3] and "ETA" in lines[3]
    assert lines[4].startswith("[ptft] pretrain succeeded in")


def test_reporter_prints_the_start_of_a_stage_shorter_than_a_poll(client: MlflowClient, tmp_path: Path) -> None:
    manifest = _manifest_with_running_pretrain(client, tmp_path)
    out = io.StringIO()
    reporter = progress.Reporter(manifest, client, every_s=1, stream=out)
    reporter.poll(progress=False)  # tune is pending
    manifest.stage_started("tune", "key", manifest.stages["pretrain"].mlflow_run_id)
    manifest.stage_ended("tune", mf.SUCCEEDED)
    reporter.poll(progress=False)
    lines = out.getvalue().splitlines()
    assert lines[-2:] == ["[ptft] tune     started", lines[-1]] and lines[-1].startswith("[ptft] tune     succeeded in")
    assert not any(line.startswith("[ptft] finetune") for line in lines)  # still pending: no line


def test_a_cache_hit_without_its_pipeline_run_names_the_mlflow_run(client: MlflowClient, tmp_path: Path) -> None:
    """An output whose success file has no pipeline run (written by an older ptft) names its MLflow run."""
    manifest = _manifest_with_running_pretrain(client, tmp_path)
    manifest.stage_ended("tokenize", mf.CACHED, cached_from="producer-run")
    out = io.StringIO()
    progress.Reporter(manifest, client, every_s=60, stream=out).poll(progress=False)
    assert out.getvalue().splitlines()[0] == "[ptft] tokenize cache hit in 0s (produced by MLflow run producer-run)"


def test_an_ended_stage_is_one_line_with_its_output_and_metrics(client: MlflowClient, tmp_path: Path) -> None:
    """The manifest says a stage ended a moment before the runner hands over its result: the line
    waits for the result and says both, once; a stage whose result never came is said at the stop."""
    manifest = _manifest_with_running_pretrain(client, tmp_path)
    out = io.StringIO()
    reporter = progress.Reporter(manifest, client, every_s=60, stream=out, awaits_results=True)
    manifest.stage_ended("pretrain", mf.SUCCEEDED, output_uri="/store/pretrain/k1/model")
    reporter.poll(progress=False)
    assert out.getvalue() == ""  # neither the cache hit nor the success without their results
    reporter.stage_done("tokenize", StageResult("/store/tokenize/k0", {"corpus/rows": 6000.0}, cached=True))
    reporter.stage_done("pretrain", StageResult("/store/pretrain/k1/model", {"eval/perplexity": 52.3149}))
    reporter.poll(progress=False)
    manifest.stage_started("tune", "k2", manifest.stages["pretrain"].mlflow_run_id)
    manifest.stage_ended("tune", mf.SUCCEEDED)
    reporter.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[ptft] tokenize cache hit in")
    # The pipeline run, which `ptft status` takes, not the MLflow run id.
    assert lines[0].endswith("(produced by run 20260101-000000-abc): /store/tokenize/k0")
    assert lines[1].split() == ["corpus/rows=6000"]
    assert lines[2].startswith("[ptft] pretrain succeeded in") and lines[2].endswith(": /store/pretrain/k1/model")
    assert lines[3].split() == ["eval/perplexity=52.31"]
    assert lines[4:] == ["[ptft] tune     started", lines[-1]] and lines[-1].startswith("[ptft] tune     succeeded in")
    assert len(lines) == 6


def test_a_line_that_cannot_be_printed_fails_no_stage(client: MlflowClient, tmp_path: Path) -> None:
    """`ptft run | head` closes the pipe under the reporter; the runner's calls must not raise."""

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    manifest = _manifest_with_running_pretrain(client, tmp_path)
    with pytest.raises(BrokenPipeError):  # the failure is real, so surviving it below means something
        progress.Reporter(manifest, client, every_s=60, stream=ClosedPipe()).poll(progress=False)
    reporter = progress.Reporter(manifest, client, every_s=60, stream=ClosedPipe(), awaits_results=True)
    manifest.stage_ended("pretrain", mf.SUCCEEDED, output_uri="/store/pretrain/k1/model")
    reporter.stage_done("pretrain", StageResult("/store/pretrain/k1/model", {"eval/perplexity": 52.3}))
    reporter.stop()


def test_on_a_terminal_the_reporter_draws_live_bars(client: MlflowClient, tmp_path: Path) -> None:
    from rich.console import Console

    manifest = _manifest_with_running_pretrain(client, tmp_path)
    run_id = manifest.stages["pretrain"].mlflow_run_id
    screen = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    reporter = progress.Reporter(manifest, client, every_s=60)
    with console.live(screen):
        reporter.poll(progress=True)
        client.log_metric(run_id, "train/step", 200, step=200)
        client.log_metric(run_id, "train/loss", 2.5, step=200)
        reporter.poll(progress=True)
        drawn = screen.export_text(clear=False)
        manifest.stage_ended("pretrain", mf.SUCCEEDED)
        reporter.poll(progress=True)
    assert "[ptft] tokenize cache hit" in drawn and "[ptft] pretrain started" in drawn  # lines above the bars
    bar = [line for line in drawn.splitlines() if line.startswith("pretrain") and "200/400 steps" in line]
    assert bar and "loss 2.500" in bar[-1] and "steps/s" in bar[-1] and "ETA" in bar[-1], drawn
    assert "step 200/400 (50%)" not in drawn  # the plain progress line is for logs, not terminals
    assert "[ptft] pretrain succeeded in" in screen.export_text()
    assert not console.is_live()


def test_ptft_status_json_and_table(client: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _manifest_with_running_pretrain(client, tmp_path)
    lock = DriverLock.acquire(mf.Manifest.folder(tmp_path, "run-1"), "run-1")  # this process drives it
    try:
        assert main(["status", "--storage", str(tmp_path), "--json"]) == 0
        state = json.loads(capsys.readouterr().out)
        assert state["run_id"] == "run-1" and state["status"] == "running" and state["driver_gone"] is None
        assert state["stages"][1]["progress"]["step"] == 100
        assert main(["status", "run-1", "--storage", str(tmp_path)]) == 0
        table = capsys.readouterr().out
        assert "pretrain  running" in table and "step 100/400 (25%)" in table and "gone" not in table
        assert main(["runs", "--storage", str(tmp_path)]) == 0
        assert re.search(r"^run-1 +demo +running ", capsys.readouterr().out, re.MULTILINE)
    finally:
        lock.release()
    assert main(["status", "--storage", str(tmp_path / "empty")]) == 2


def test_ptft_status_answers_at_once_when_the_mlflow_server_does_not(
    client: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's client retried the progress query for four minutes before the table."""
    manifest = _manifest_with_running_pretrain(client, tmp_path)
    manifest.tracking_uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    manifest.save()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # so that without the check it fails fast
    assert main(["status", "run-1", "--storage", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(
        f"ptft: progress from MLflow unavailable: the server at {manifest.tracking_uri} does not answer (GET /health"
    )
    assert "pretrain  running" in captured.out and "step " not in captured.out


def test_ptft_status_says_when_a_running_runs_driver_is_gone(
    client: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A driver SIGKILLed (or out of memory, or its terminal closed) leaves its run `running`."""
    _manifest_with_running_pretrain(client, tmp_path)
    driver = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(driver.pid).create_time()
    driver.wait()
    manifest = mf.Manifest.load(tmp_path, "run-1")
    manifest.created_at -= 3600  # started an hour ago; its driver's last heartbeat 20 minutes in
    manifest.stages["pretrain"].started_at = manifest.created_at + 60
    manifest.save()
    last_beat = manifest.created_at + 1200
    owner = {"host": socket.gethostname(), "pid": driver.pid, "started_at": started, "heartbeat_at": last_beat}
    (mf.Manifest.folder(tmp_path, "run-1") / LOCK_NAME).write_text(json.dumps(owner))
    assert main(["status", "run-1", "--storage", str(tmp_path), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    # Its time stops at the driver's last sign of life, and nothing runs it: no ETA.
    assert state["elapsed_s"] == pytest.approx(1200) and state["driver_last_seen_at"] == last_beat
    pretrain = next(stage for stage in state["stages"] if stage["name"] == "pretrain")
    assert pretrain["seconds"] == pytest.approx(1140) and pretrain["progress"]["step"] == 100
    assert pretrain["progress"]["eta_s"] is None
    assert main(["status", "run-1", "--storage", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_beat))
    assert lines[0] == f"run-1 (demo): running, 20m00s until {seen}, its driver's last sign of life"
    assert lines[1].startswith(f"  but its driver, pid {driver.pid} on {socket.gethostname()} (heartbeat ")
    assert lines[1].endswith("is gone: nothing runs it. Go on with `ptft resume run-1`")
    assert main(["runs", "--storage", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"^run-1 +demo +no driver ", listed, re.MULTILINE) and "`ptft resume RUN_ID`" in listed
    (mf.Manifest.folder(tmp_path, "run-1") / LOCK_NAME).unlink()  # a driver killed before its lock
    assert main(["status", "run-1", "--storage", str(tmp_path), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["driver_gone"] == "no driver holds its lock"
    manifest_written = (mf.Manifest.folder(tmp_path, "run-1") / "manifest.json").stat().st_mtime
    assert state["driver_last_seen_at"] == manifest_written  # then the run's last manifest write


def test_ptft_runs_keeps_its_columns_aligned_whatever_the_pipelines_name(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A name longer than the header ('demo-generation-with-reviews') pushed its row's columns right."""
    for run_id, name in (
        ("20261201-000000-aaaaaa", "demo"),
        ("20261201-000001-bbbbbb", "demo-generation-with-reviews"),
    ):
        mf.Manifest.create(tmp_path, run_id, name, STAGE_NAMES, {"name": name}).save()
    assert main(["runs", "--storage", str(tmp_path)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()[:3]  # then why "no driver": no driver holds them
    for column, value in (("STATUS", "no driver"), ("STARTED", "20"), ("STAGES", "tokenize:")):
        at = header.index(column)
        assert all(row[at:].startswith(value) for row in rows), (column, header, rows)


def test_a_run_whose_manifest_does_not_read_is_named_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    mf.Manifest.create(tmp_path, "20261201-000000-aaaaaa", "demo", STAGE_NAMES, {"name": "demo"}).save()
    broken = mf.Manifest.create(tmp_path, "20261201-000001-bbbbbb", "demo", STAGE_NAMES, {"name": "demo"})
    path = mf.Manifest.folder(tmp_path, broken.run_id) / "manifest.json"
    path.write_text(path.read_text()[:100])  # cut short, as by a full disk or a hand edit
    assert main(["runs", "--storage", str(tmp_path)]) == 0
    assert "20261201-000000-aaaaaa" in capsys.readouterr().out and "cannot be read" in caplog.text
    for command in (["status", broken.run_id], ["report", broken.run_id], ["resume", broken.run_id]):
        assert main([*command, "--storage", str(tmp_path)]) == 2, command
        err = capsys.readouterr().err
        assert f"the manifest of run '{broken.run_id}'" in err and "JSONDecodeError" in err, err


def test_status_of_an_unknown_run_id_says_so_without_asking_a_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mf.Manifest.create(tmp_path, "20261201-000000-aaaaaa", "demo", STAGE_NAMES, {"name": "demo"}).save()
    assert main(["status", "20261201-999999-cccccc", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no pipeline run '20261201-999999-cccccc'" in err and "20261201-000000-aaaaaa" in err, err
    # Any ID, with --storage given: a run there (it asked a cluster at 127.0.0.1:8265 for a job of that name)
    assert main(["status", "my-run", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no pipeline run 'my-run'" in err and "Ray dashboard" not in err, err


# --- ptft explain --------------------------------------------------------------------------------


def test_ptft_explain_prints_draws_and_answers_json(
    classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    picture = tmp_path / "maps" / "attention.png"  # its folder is made
    assert main(["explain", str(classifier), "the film was good", "dull", "--output", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "'the film was good' ->" in out and "head 1:" in out and picture.read_bytes()[:8] == PNG
    assert main(["explain", str(classifier), "dull", "--json", "--layer", "0"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["explanations"][0]["tokens"] == ["[CLS]", "dull", "[SEP]"] and answer["explanations"][0]["layer"] == 0


def test_ptft_explain_needs_no_config_for_a_folder_or_with_tracking_uri(
    classifier: Path, client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Run from outside the repository, where configs/demo.yaml is not: it said `file not found`."""
    monkeypatch.chdir(tmp_path)
    assert main(["explain", str(classifier), "dull", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["explanations"][0]["tokens"] == ["[CLS]", "dull", "[SEP]"]
    assert main(["explain", "models:/nope@champion", "dull", "--tracking-uri", client.tracking_uri]) == 2
    assert "not in the registry" in capsys.readouterr().err
    assert main(["explain", "models:/nope@champion", "dull", "--tracking-uri", "bogus://registry"]) == 2
    assert "--tracking-uri = 'bogus://registry': Value error, MLflow has no tracking store" in capsys.readouterr().err
    assert main(["explain", "models:/nope@champion", "dull"]) == 2  # the default store: ./ptft-runs, not here
    assert "there is no MLflow store at" in capsys.readouterr().err and not list(tmp_path.rglob("*.db"))


@pytest.mark.parametrize(
    "args, says",
    [
        (["--layer", "5"], "--layer"),
        (["x"] * 8, "at most 8 texts"),
        (["--tracking-uri", "REGISTRY"], None),
        (["--output", "maps.txt"], "--output = 'maps.txt': ends in .txt, not one of .png"),  # before the model loads
        (["--output", "/"], "--output = '/': a folder"),
    ],
)
def test_ptft_explain_refuses_bad_input_with_exit_2(
    classifier: Path, client: MlflowClient, args: list[str], says: str | None, capsys: pytest.CaptureFixture
) -> None:
    model = str(classifier) if says else "models:/nope@champion"
    args = [client.tracking_uri if arg == "REGISTRY" else arg for arg in args]
    assert main(["explain", model, "dull", *args]) == 2
    err = capsys.readouterr().err
    assert (says or "not in the registry") in err


def test_a_stage_start_is_printed_when_the_runner_says_it_started(client: MlflowClient, tmp_path: Path) -> None:
    """Not at the next poll: a sweep printed its first table before the line that its stage started.
    The reporter's polling thread is not started, so only the runner's call can print the line."""
    manifest = _manifest_with_running_pretrain(client, tmp_path)
    out = io.StringIO()
    reporter = progress.Reporter(manifest, client, every_s=60, stream=out)
    reporter.poll(progress=False)
    manifest.stage_started("tune", "key", manifest.stages["pretrain"].mlflow_run_id)
    reporter.stage_started("tune")
    assert out.getvalue().splitlines()[-1] == "[ptft] tune     started"
