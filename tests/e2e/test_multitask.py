"""configs/demo_multitask.yaml through the CLI, shrunk: one pre-training, four task branches, three
task types (sentence classification for sentiment and topic, token classification for entities,
extractive question answering for answers).

It runs in the demo run's storage with the demo's corpus, tokenizer, pre-training and sweep
settings, and its sentiment task has the demo's data: tokenize, pretrain and the sentiment task's
prepare and tune are the demo's, reused from the cache (a config of one task and one of several
share them), while its models are registered under their own names.

The topic branch's fine-tuning is killed for real (SIGKILL of a Ray Train worker, no retries for
that task): the other branches still fine-tune and serve, the run ends failed, and `ptft resume`
reruns the topic branch's finetune and serve only. Then every task answers on its own route of the
one Serve instance: a label, a text's entities, or the span of a context that answers a question.
"""

from __future__ import annotations

import pytest
import requests

from components.stage import read_json
from tests.e2e.two_tasks import TASKS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def multitask(demo: dict, two_tasks) -> dict:
    """What the scenario (tests/e2e/two_tasks.py, started in the background by conftest) left."""
    return {
        **two_tasks.result(timeout=2400),
        "demo": read_json(demo["storage"] / "runs" / demo["run_id"] / "manifest.json"),
        "client": demo["client"],
    }


def test_the_killed_branch_failed_alone(multitask: dict) -> None:
    assert multitask["first_rc"] == 1, multitask["logs"][0][-4000:]
    statuses = {node: record["status"] for node, record in multitask["after_kill"]["stages"].items()}
    assert statuses == {
        "tokenize": "cached",
        "pretrain": "cached",
        "prepare.sentiment": "cached",
        "tune.sentiment": "cached",
        "finetune.sentiment": "succeeded",
        "serve.sentiment": "succeeded",
        **{f"{stage}.topic": "succeeded" for stage in ("prepare", "tune")},
        **{
            f"{stage}.{task}": "succeeded"
            for stage in ("prepare", "tune", "finetune", "serve")
            for task in ("entities", "answers")
        },
        "finetune.topic": "failed",
        "serve.topic": "skipped",
    }
    assert multitask["after_kill"]["status"] == "failed"
    # ... and the failed run said how to continue it
    run_id, storage = multitask["after_kill"]["run_id"], multitask["after_kill"]["storage"]
    assert (
        f"ptft: run {run_id} did not finish. To continue it as configured: ptft resume {run_id} --storage {storage}"
        in (multitask["logs"][0])
    )


def test_task_branches_ran_side_by_side(multitask: dict) -> None:
    """The cluster has room for more than one branch's node (ray.parallel_stages and the claims
    decide): some nodes of different tasks ran at the same time."""
    ran = {
        node: (record["started_at"], record["ended_at"])
        for node, record in multitask["after_kill"]["stages"].items()
        if record["status"] in ("succeeded", "failed") and "." in node
    }
    overlapping = [
        (first, second)
        for first, (start, end) in ran.items()
        for second, (other_start, other_end) in ran.items()
        if first.split(".")[1] < second.split(".")[1] and start < other_end and other_start < end
    ]
    assert overlapping, ran


def test_resume_reran_only_the_killed_branch(multitask: dict) -> None:
    final = multitask["final"]
    assert final["status"] == "succeeded" and final["attempts"] == 2
    attempts = {node: record["attempts"] for node, record in final["stages"].items()}
    assert attempts.pop("finetune.topic") == 2
    assert set(attempts.values()) == {1}, attempts  # serve.topic: skipped, then run once
    statuses = {node: record["status"] for node, record in final["stages"].items()}
    cached = ("tokenize", "pretrain", "prepare.sentiment", "tune.sentiment")
    assert {statuses.pop(node) for node in cached} == {"cached"}
    assert set(statuses.values()) == {"succeeded"}, statuses


def test_one_pretraining_and_a_model_per_task(multitask: dict) -> None:
    stages = multitask["final"]["stages"]
    assert [node for node in stages if node.startswith("pretrain")] == ["pretrain"]
    # The demo's pre-trained model and sweep, reused: same keys, same artifacts.
    demo = multitask["demo"]["stages"]
    assert stages["pretrain"]["output_uri"] == demo["pretrain"]["output_uri"]
    assert stages["tune.sentiment"]["output_uri"] == demo["tune"]["output_uri"]
    client = multitask["client"]
    for task in TASKS:
        version = client.get_model_version_by_alias(f"demo-multitask-{task}", "champion")
        assert version.run_id == stages[f"finetune.{task}"]["mlflow_run_id"]


def test_each_task_answers_on_its_own_route(multitask: dict) -> None:
    labels = {"sentiment": {"negative", "positive"}, "topic": {"story", "music", "acting", "craft"}}
    urls = {task: multitask["final"]["stages"][f"serve.{task}"]["output_uri"] for task in TASKS}
    assert all(urls[task].endswith(f"/multitask/{task}") for task in TASKS), urls
    text = "anna berg found the soundtrack superb ."
    question = {"question": "who wrote this review ?", "context": text}
    for task, url in urls.items():
        asked = question if task == "answers" else text
        answer = requests.post(f"{url}/predict", json={"texts": [asked]}, timeout=30)
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
        if task == "entities":  # token classification: the text's entities, where they are in it
            assert {"entities", "truncated"} == set(prediction), prediction
            for entity in prediction["entities"]:
                assert (
                    entity["type"] in {"PER", "POS", "NEG"} and text[entity["start"] : entity["end"]] == entity["text"]
                )
        elif task == "answers":  # a span of the context, where it is in it
            assert {"answer", "start", "end", "score", "truncated"} == set(prediction), prediction
            assert text[prediction["start"] : prediction["end"]] == prediction["answer"] != ""
        else:
            assert prediction["label"] in labels[task]
    # Bad questions get a 422 that says what is wrong, on the QA route only.
    bad = {
        "a text, not a question": "a plain text",
        "texts.0.question is empty": {"question": " ", "context": text},
        "texts.0.context is empty": {"question": "who wrote this review ?", "context": ""},
    }
    for problem, asked in bad.items():
        answer = requests.post(f"{urls['answers']}/predict", json={"texts": [asked]}, timeout=30)
        assert answer.status_code == 422, (problem, answer.status_code, answer.text)
        if problem.startswith("texts."):
            assert problem in answer.text, answer.text


def test_the_entities_task_is_swept_and_gated_on_entity_f1(multitask: dict) -> None:
    client, stages = multitask["client"], multitask["final"]["stages"]
    trials = client.search_runs(
        [client.get_run(stages["tune.entities"]["mlflow_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{stages['tune.entities']['mlflow_run_id']}'",
    )
    assert trials and all("eval/f1" in trial.data.metrics and "eval/f1/PER" in trial.data.metrics for trial in trials)
    finetune = client.get_run(stages["finetune.entities"]["mlflow_run_id"]).data.metrics
    assert 0 <= finetune["test/f1"] <= 1 and "test/precision" in finetune
    version = client.get_model_version_by_alias("demo-multitask-entities", "champion")
    assert float(version.tags["ptft.test_f1"]) == pytest.approx(finetune["test/f1"], abs=1e-6)
    assert version.tags["ptft.task_type"] == "token_classification"


def test_one_mlflow_tree_with_a_run_per_branch_stage(multitask: dict) -> None:
    client, final = multitask["client"], multitask["final"]
    parent = final["mlflow_run_id"]
    for node, record in final["stages"].items():
        run = client.get_run(record["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent, node
        assert run.info.run_name == node
        if "." in node:
            assert run.data.tags["ptft.task"] == node.split(".", 1)[1]
