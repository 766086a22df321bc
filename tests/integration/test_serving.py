"""Serving on the shared Ray cluster and MLflow server, over real HTTP.

Two tiny classifiers are registered (v1 becomes champion; v2 scores lower and stays candidate).
`ptft serve models:/NAME@champion` deploys two replicas; then: every bad request gets its 4xx and
the service stays up; long texts are truncated and say so; one replica killed under load costs
< 1% of requests (one client retry); `ptft promote` and `ptft rollback` roll the application over
under a constant request stream with no request answered with an error (one that got no answer
at all is sent again, as docs/serving.md tells clients). A second, deliberately small application
answers 408 past its deadline and a burst of 10x its capacity with fast 503s, and recovers.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from components import registry, scoring, serve
from components.net import free_port
from components.schemas import ServeConfig
from components.tasks import task_type
from tests.conftest import POSITIONS, REPO, WORDS, tiny_classifier, tiny_config_dict, wait_until

pytestmark = pytest.mark.integration

PTFT = str(Path(sys.executable).with_name("ptft"))
NAME = "serving-classifier"


@pytest.fixture(scope="module")
def registered(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"serving-{time.time_ns()}")
    versions = []
    for seed, accuracy in ((1, 0.75), (2, 0.5)):
        run_id = client.create_run(experiment).info.run_id
        folder = tiny_classifier(tmp_path_factory.mktemp("models") / f"seed{seed}", seed)
        versions.append(
            registry.register_classifier(
                folder,
                name=NAME,
                run_id=run_id,
                tracking_uri=mlflow_server,
                test_accuracy=accuracy,
                test_split="split-a",
                lineage={},
            )
        )
        client.set_terminated(run_id)
    return {"client": client, "versions": versions, "tracking_uri": mlflow_server}


def test_the_gate_keeps_a_worse_version_candidate(registered: dict) -> None:
    first, second = registered["versions"]
    assert first["aliases"] == ["candidate", "champion"] and second["aliases"] == ["candidate"]
    client = registered["client"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == first["version"]
    assert registry.champion_history(client, NAME) == [first["version"]]


def _tiny_question_answerer(folder: Path) -> Path:
    """tiny_classifier's network and vocabulary with a span head (a pyfunc in the registry)."""
    from transformers import AutoConfig, AutoTokenizer, BertForQuestionAnswering

    source = tiny_classifier(folder / "source", seed=3)
    BertForQuestionAnswering(AutoConfig.from_pretrained(source)).save_pretrained(folder / "qa")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder / "qa")
    return folder / "qa"


def test_loading_a_registered_model_leaves_no_copy_of_it_on_disk(
    registered: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica downloads its model from the server's proxied artifacts at every start. MLflow's
    loaders kept each download (and the MLmodel read before it) in the temp dir for good: with
    autoscaling and restarts, a copy of the model per replica start on the node's disk. Both kinds
    of registered model: the transformers flavor, and the pyfunc around a question answerer."""
    uri, client = registered["tracking_uri"], registered["client"]
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    answerer = registry.register_classifier(
        _tiny_question_answerer(tmp_path / "models"),
        name=f"{NAME}-qa",
        run_id=run_id,
        tracking_uri=uri,
        test_accuracy=0.5,
        test_split="split-a",
        lineage={},
        task=task_type("question_answering"),
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    classified = scoring.Scorer(registered["versions"][0]["model_uri"], uri)(["a good film"])
    assert classified[0]["label"] in ("negative", "positive")
    (answered,) = scoring.Scorer(answerer["model_uri"], uri)([{"question": "what film", "context": "a good film"}])
    assert set(answered) >= {"answer", "score"}, answered
    assert sorted(path.name for path in temp.iterdir()) == []


def _ptft(*args: str, overrides: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([PTFT, *args, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def app(registered: dict, ray_driver: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`ptft serve` deploys the champion with two replicas and exits (the app stays on the cluster)."""
    config = tmp_path_factory.mktemp("serving") / "serving.yaml"
    config.write_text(yaml.safe_dump({**tiny_config_dict(config.parent), "name": "serving"}))
    overrides = [
        f"tracking.uri={registered['tracking_uri']}",
        f"ray.address={ray_driver}",
        "serve.app_name=serving",
        "serve.route_prefix=/serving",
        "serve.num_replicas=2",
        "serve.cpus_per_replica=0.25",
        "serve.max_texts=8",
        "serve.max_text_bytes=2000",
        "serve.max_body_bytes=20000",
    ]
    done = _ptft("serve", f"models:/{NAME}@champion", "--config", str(config), overrides=overrides)
    url = done.stdout.split(" at ", 1)[1].split()[0]
    yield {"url": url, "config": str(config), "overrides": overrides, "stdout": done.stdout, **registered}
    from ray import serve as ray_serve

    ray_serve.delete("serving")


def test_serve_answers_with_labels_and_the_model(app: dict) -> None:
    response = requests.post(f"{app['url']}/predict", json={"texts": ["a superb film .", "dull"]}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["label"] in ("negative", "positive") for p in body["predictions"]] == [True, True]
    assert all(0.5 <= p["score"] <= 1.0 and p["truncated"] is False for p in body["predictions"])
    assert body["model"] == {
        **body["model"],
        "name": NAME,
        "version": app["versions"][0]["version"],
        "alias": "champion",
    }
    assert requests.get(f"{app['url']}/healthz", timeout=10).json() == {"status": "ok"}
    metadata = requests.get(f"{app['url']}/metadata", timeout=10).json()
    assert metadata["labels"] == ["negative", "positive"] and metadata["max_tokens"] == POSITIONS
    assert "/predict" in requests.get(f"{app['url']}/openapi.json", timeout=10).json()["paths"]


def test_the_ingress_is_haproxy_not_the_python_proxy(app: dict, ray_cluster: str) -> None:
    """The shared cluster starts as ptft starts one (components/ingress.py): each node's ingress is
    an HAProxy process that forwards to the replicas' own HTTP servers."""
    from ray.util.state import list_actors

    alive = [("state", "=", "ALIVE")]
    # The cluster named: with another Ray on the machine, autodetection refused to pick one.
    managers = list_actors(address=ray_cluster, filters=[("class_name", "=", "HAProxyManager"), *alive])
    assert len(managers) == 1, managers  # one node


def test_a_long_text_is_truncated_and_says_so(app: dict) -> None:
    long = " ".join(["very"] * 300)  # 300 tokens > 64 positions, 1499 bytes < 2000
    response = requests.post(f"{app['url']}/predict", json={"texts": [long, "good"]}, timeout=30)
    assert response.status_code == 200, response.text
    assert [p["truncated"] for p in response.json()["predictions"]] == [True, False]


def test_explain_answers_attention_maps_over_the_tokens(app: dict) -> None:
    response = requests.post(f"{app['url']}/explain", json={"texts": ["the film was good", "dull"]}, timeout=30)
    assert response.status_code == 200, response.text
    first, second = response.json()["explanations"]
    assert first["tokens"] == ["[CLS]", "the", "film", "was", "good", "[SEP]"] and first["query_token"] == "[CLS]"
    assert len(first["attention"]) == 2 and all(len(head) == 6 for head in first["attention"])  # 2 heads x 6 tokens
    assert all(sum(head) == pytest.approx(1.0, abs=1e-3) for head in first["attention"])  # a softmax over the text
    assert second["tokens"] == ["[CLS]", "dull", "[SEP]"] and first["layer"] == 1  # the last of 2 layers
    assert response.json()["model"]["version"] == app["versions"][0]["version"]
    assert "/explain" in requests.get(f"{app['url']}/openapi.json", timeout=10).json()["paths"]


@pytest.mark.parametrize(
    "payload, status, says",
    [
        ({"texts": ["good"], "layer": 7}, 422, "layer"),
        ({"texts": ["x"] * 9}, 422, "max_texts=8"),
        ({"texts": ["x"], "heads": 1}, 422, "heads"),
        ("{oops", 400, "not JSON"),
    ],
)
def test_bad_explain_requests_get_a_4xx_with_a_message(app: dict, payload, status: int, says: str) -> None:
    kwargs = {"data": payload} if isinstance(payload, str) else {"json": payload}
    response = requests.post(f"{app['url']}/explain", timeout=30, **kwargs)
    assert response.status_code == status and says in response.json()["detail"], response.text


BAD_REQUESTS = {
    "not-json": ("{not json", 400, "not JSON"),
    "not-utf8": (b"\xff\xfe", 400, "not JSON"),
    "lone-surrogate": ('{"texts": ["\\ud800"]}', 400, "unpaired surrogate"),
    "deeply-nested": ('{"texts": ' + "[" * 5000 + "]" * 5000 + "}", 400, "nested too deeply"),
    "wrong-field": ({"text": "x"}, 422, "texts"),
    "not-a-list": ({"texts": "one text"}, 422, "texts"),
    "not-strings": ({"texts": [1, 2]}, 422, "texts.0"),
    "nested": ({"texts": [["x"]]}, 422, "texts.0"),
    "top-level-list": (["x"], 422, "body"),
    "empty": ({"texts": []}, 422, "empty"),
    "too-many": ({"texts": ["x"] * 9}, 422, "max_texts=8"),
    "text-too-long": ({"texts": ["é" * 1001]}, 413, "max_text_bytes=2000"),
    "body-too-large": ({"texts": ["x"], "pad": "y" * 30000}, 413, "max_body_bytes=20000"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_a_message(app: dict, case: str) -> None:
    payload, status, words = BAD_REQUESTS[case]
    raw = payload if isinstance(payload, (str, bytes)) else None
    response = requests.post(
        f"{app['url']}/predict",
        json=None if raw else payload,
        data=raw,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert requests.post(f"{app['url']}/predict", json={"texts": ["good"]}, timeout=30).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(app: dict) -> None:
    """No content-length to refuse it by: the replica counts the chunks as they come."""

    def body():
        yield b'{"texts": ["x"], "pad": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}'

    response = requests.post(
        f"{app['url']}/predict", data=body(), headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 413 and "max_body_bytes=20000" in response.json()["detail"], response.text


def test_healthz_answers_within_a_second_while_batches_run(app: dict) -> None:
    """The forward pass runs beside the replica's event loop, not on it: liveness probes answer
    while long batches are scored."""
    slow = {"texts": [" ".join(["very"] * 300)] * 8}

    def call(_: int) -> float:
        started = time.perf_counter()
        assert requests.post(f"{app['url']}/predict", json=slow, timeout=120).status_code == 200
        return time.perf_counter() - started

    probes = []
    with ThreadPoolExecutor(8) as pool:
        batches = [pool.submit(call, index) for index in range(160)]
        while not all(batch.done() for batch in batches):
            started = time.perf_counter()
            assert requests.get(f"{app['url']}/healthz", timeout=30).status_code == 200
            probes.append(time.perf_counter() - started)
            time.sleep(0.05)
        answered = [batch.result() for batch in batches]
    p90 = sorted(probes)[int(0.9 * (len(probes) - 1))]
    print(
        f"healthz under load: median {median(probes):.3f} s, p90 {p90:.3f} s over {len(probes)} probes; "
        f"/predict median {median(answered):.3f} s"
    )
    assert len(probes) >= 5 and p90 < 1.0, probes
    assert median(probes) < median(answered), (probes, answered)


class Stream:
    """Closed-loop clients sending requests until stopped; counts outcomes after `retries`.
    `retry_answers=False` retries only a request that got no HTTP answer (its connection closed
    under it), never an error status. Each client pauses `pause_s` between requests: these tests
    count failed requests, not throughput, and an unpaced loop would take both cores from the
    tests running beside it."""

    def __init__(self, url: str, clients: int = 4, retries: int = 0, retry_answers: bool = True, pause_s: float = 0.05):
        self.url, self.retries, self.retry_answers, self.pause_s = url, retries, retry_answers, pause_s
        self.outcomes: Counter = Counter()
        self.versions: Counter = Counter()
        self.retried = 0  # requests sent more than once
        self.failures: list[str] = []  # the first few, whole: a failed assertion says what went wrong
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        wait_until(lambda: sum(self.outcomes.values()) >= 10, "the first requests", timeout_s=60)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            outcome, response = self._send(session)
            for _ in range(self.retries):
                if outcome == 200 or (isinstance(outcome, int) and not self.retry_answers):
                    break
                with self.lock:
                    self.retried += 1
                outcome, response = self._send(session)
            with self.lock:
                self.outcomes[outcome] += 1
                if outcome == 200:
                    self.versions[response.json()["model"]["version"]] += 1
            self.stop.wait(self.pause_s)

    def _send(self, session: requests.Session) -> tuple[int | str, requests.Response | None]:
        try:
            response = session.post(f"{self.url}/predict", json={"texts": ["a good film ."]}, timeout=60)
        except requests.RequestException as error:
            self._keep(f"{time.strftime('%X')} {error!r}")
            return type(error).__name__, None
        if response.status_code != 200:
            self._keep(f"{time.strftime('%X')} {response.status_code} {response.text[:200]}")
        return response.status_code, response

    def _keep(self, failure: str) -> None:
        with self.lock:
            if len(self.failures) < 5:
                self.failures.append(failure)

    def total(self) -> int:
        return sum(self.outcomes.values())


def _replica_actors(app_name: str) -> list:
    import ray

    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app_name}#")
    ]
    return [ray.get_actor(name, namespace="serve") for name in names]


def test_killing_one_of_two_replicas_under_load_loses_under_1_percent(app: dict) -> None:
    import ray

    with Stream(app["url"], retries=1) as stream:
        before = stream.total()
        replicas = _replica_actors("serving")
        assert len(replicas) == 2
        ray.kill(replicas[0], no_restart=True)
        wait_until(lambda: stream.total() >= before + 200, "200 requests after the kill", timeout_s=180)
    assert stream.outcomes[200] / stream.total() >= 0.99, stream.outcomes
    wait_until(lambda: len(_replica_actors("serving")) == 2, "Serve to replace the replica", timeout_s=120)


def test_promote_and_rollback_roll_over_without_a_failed_request(app: dict) -> None:
    """Every request is answered 200. Once, in CI, one request of 1,821 got no answer at all during a
    rollout (a ConnectionError; each rollout reloads HAProxy a few times, and a keep-alive
    connection closing as a request is sent on it is the likely race, but 32 rollouts, 29,000
    requests, idle or with the CPUs loaded, did not reproduce it). A request that got no answer is
    sent once more, as docs/serving.md tells clients; an error status never is."""
    first, second = (version["version"] for version in app["versions"])
    for move, version, words in (
        (("promote", NAME, second), second, f"serves {NAME} v{second}"),
        (("rollback", NAME), first, f"champion is back to v{first}"),
    ):
        with Stream(app["url"], retries=1, retry_answers=False) as stream:
            moved = _ptft(*move, "--config", app["config"], overrides=app["overrides"])
            assert words in moved.stdout
            wait_until(lambda v=version: stream.versions[v] >= 20, f"20 answers from v{version}", timeout_s=120)
        assert set(stream.outcomes) == {200}, (stream.outcomes, stream.failures)  # none failed in the rollout
        assert stream.retried <= stream.total() // 100, (stream.retried, stream.failures)
        assert stream.versions[first] and stream.versions[second]
    assert str(app["client"].get_model_version_by_alias(NAME, "champion").version) == first
    assert registry.champion_history(app["client"], NAME) == [first]


def test_export_writes_a_serve_config_that_serve_accepts(app: dict, tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    exported = tmp_path / "serve.yaml"
    _ptft(
        "serve",
        f"models:/{NAME}@champion",
        "--config",
        app["config"],
        "--export",
        str(exported),
        overrides=app["overrides"],
    )
    document = yaml.safe_load(exported.read_text())
    ServeDeploySchema.model_validate(document)
    (application,) = document["applications"]
    assert application["import_path"] == "components.serve:app_builder"
    assert application["args"]["num_replicas"] == 2 and application["route_prefix"] == "/serving"
    built = serve.app_builder(application["args"])  # what `serve deploy` calls on the cluster
    assert built._bound_deployment.num_replicas == 2


def test_a_bad_model_reference_exits_2_before_deploying(app: dict) -> None:
    for reference, words in (
        ("models:/nope@champion", "not in the registry"),
        ("/no/such/folder", "does not exist"),
        ("models:/bad/ref/x", "not a registered model reference"),
    ):
        done = subprocess.run(
            [PTFT, "serve", reference, "--config", app["config"], *app["overrides"]],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2 and words in done.stderr, done.stderr


def test_predict_answers_every_row_of_a_file_on_the_cluster_in_order(app: dict, tmp_path: Path) -> None:
    """`ptft predict` of a registered version over a file, on the shared cluster: two Ray Data actors
    answer batches of 2, two batches to a block; the output keeps the input's rows, order and
    columns, each row's prediction is what the model answers for it in-process, and the answers are
    scored against a label column (right on every other row, as ids: 0 and 1 for the model's two names)."""
    import pyarrow.parquet as pq

    # Every fifth text is cut at the model's 64 tokens: its `truncated` marks where each answer went.
    reviews = [
        f"the {word} film was {'good' if i % 3 else 'dull'} ." * (20 if i % 5 == 0 else 1)
        for i, word in enumerate(WORDS * 3)
    ]
    first = app["versions"][0]
    expected = scoring.Scorer(first["model_uri"], app["tracking_uri"])(reviews)
    ids = [["negative", "positive"].index(row["label"]) for row in expected]
    labels = [label if i % 2 == 0 else 1 - label for i, label in enumerate(ids)]
    source = tmp_path / "reviews.csv"
    rows = (f"{i},{review},{label}\n" for i, (review, label) in enumerate(zip(reviews, labels, strict=True)))
    source.write_text("id,review,label\n" + "".join(rows))
    output = tmp_path / "predicted.parquet"
    model = f"models:/{NAME}/{first['version']}"
    options = ["--output", str(output), "--text-column", "review", "--label-column", "label"]
    options += ["--batch-size", "2", "--workers", "2", "--config", app["config"]]
    done = _ptft("predict", model, str(source), *options, overrides=app["overrides"])
    assert f"Wrote {len(reviews)} predictions of {NAME} v{first['version']}" in done.stdout, done.stdout
    assert f"Scores against 'label' ({len(reviews)} rows): accuracy 0.5000" in done.stdout, done.stdout
    version = app["client"].get_model_version(NAME, first["version"])  # recorded beside its fine-tuning run
    experiment = app["client"].get_run(version.run_id).info.experiment_id
    (record,) = app["client"].search_runs([experiment], "tags.`ptft.kind` = 'predict'")
    where = f"{app['tracking_uri']}/#/experiments/{experiment}/runs/{record.info.run_id}"
    assert f"Recorded as MLflow run {record.info.run_id}: {where}" in done.stdout, done.stdout
    assert record.data.tags["ptft.model_run_id"] == version.run_id
    assert record.data.tags["ptft.model_version"] == first["version"] and record.data.metrics["predict/accuracy"] == 0.5
    table = pq.read_table(output)
    assert table.column("id").to_pylist() == list(range(len(reviews)))
    assert table.column("review").to_pylist() == reviews
    predicted = table.column("prediction").to_pylist()
    assert [row["truncated"] for row in predicted] == [i % 5 == 0 for i in range(len(reviews))]
    assert [row["label"] for row in predicted] == [row["label"] for row in expected]
    assert [row["score"] for row in predicted] == pytest.approx([row["score"] for row in expected], abs=1e-6)
    too_many = [PTFT, "predict", model, str(source), "--output", str(tmp_path / "more.jsonl"), "--workers", "1000"]
    too_many += ["--text-column", "review"]
    done = subprocess.run(
        [*too_many, "--config", app["config"], *app["overrides"]], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "--workers = 1000: the cluster's nodes hold" in done.stderr, done.stderr


# --- a small application: deadlines and overload --------------------------------------------------


@pytest.fixture(scope="module")
def small_app(registered: dict, ray_driver: str) -> ServeConfig:
    cfg = ServeConfig(
        app_name="serving-small",
        route_prefix="/serving-small",
        num_replicas=1,
        cpus_per_replica=0.25,
        max_batch_size=2,
        max_ongoing_requests=2,
        max_queued_requests=2,
    )
    yield cfg
    from ray import serve as ray_serve

    ray_serve.delete(cfg.app_name)


def test_a_request_past_its_deadline_gets_408_on_predict_and_explain(registered: dict, small_app: ServeConfig) -> None:
    model = serve.resolve_model(f"models:/{NAME}/1", registered["tracking_uri"])
    impatient = small_app.model_copy(update={"request_timeout_s": 0.001})  # shorter than the batch wait
    url = serve.deploy(impatient, model, registered["tracking_uri"])
    response = requests.post(f"{url}/predict", json={"texts": ["good"]}, timeout=30)
    assert response.status_code == 408 and "request_timeout_s=0.001" in response.json()["detail"]
    explained = requests.post(f"{url}/explain", json={"texts": ["good"]}, timeout=30)  # /explain too
    assert explained.status_code == 408 and "request_timeout_s=0.001" in explained.json()["detail"]


def test_a_burst_of_10x_capacity_gets_fast_503s_and_the_service_recovers(registered: dict, small_app) -> None:
    model = serve.resolve_model(f"models:/{NAME}/1", registered["tracking_uri"])
    url = serve.deploy(small_app, model, registered["tracking_uri"])
    capacity = small_app.max_ongoing_requests + small_app.max_queued_requests
    slow = {"texts": [" ".join(["very"] * 300)] * 32}

    def call(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        status = requests.post(f"{url}/predict", json=slow, timeout=60).status_code
        return status, time.perf_counter() - started

    with ThreadPoolExecutor(10 * capacity) as pool:
        results = list(pool.map(call, range(10 * capacity)))
    statuses = Counter(status for status, _ in results)
    assert set(statuses) <= {200, 503} and statuses[503] > 0 and statuses[200] >= capacity, statuses
    rejected = median(seconds for status, seconds in results if status == 503)
    answered = median(seconds for status, seconds in results if status == 200)
    print(f"burst: median 503 after {rejected:.3f} s, median 200 after {answered:.3f} s, {statuses}")
    # Relative, not a wall-clock bound: on a loaded machine both slow down, but a rejection that
    # waited behind the queue would take at least as long as the requests it was rejected for.
    assert rejected < answered, (rejected, answered)
    recovered = requests.post(f"{url}/predict", json={"texts": ["good"]}, timeout=30)
    assert recovered.status_code == 200, recovered.text


def test_a_serving_token_is_required_everywhere_but_healthz(
    registered: dict, small_app: ServeConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = "s3cr3t/with@odd+chars"
    (tmp_path / "token").write_text(token + "\n")
    monkeypatch.setenv("PTFT_SERVE_TOKEN_FILE", str(tmp_path / "token"))  # deploy and the client helpers read it
    cfg = small_app.model_copy(update={"app_name": "serving-auth", "route_prefix": "/serving-auth"})
    model = serve.resolve_model(f"models:/{NAME}/1", registered["tracking_uri"])
    url = serve.deploy(cfg, model, registered["tracking_uri"])  # waits on /metadata: with the token
    try:
        body = {"texts": ["good"]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            refused = requests.post(f"{url}/predict", json=body, headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", refused.text
            assert "Authorization: Bearer" in refused.json()["detail"]
        assert requests.get(f"{url}/metadata", timeout=30).status_code == 401
        assert requests.post(f"{url}/explain", json=body, timeout=30).status_code == 401
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # liveness probes need no token
        answered = requests.post(f"{url}/predict", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answered.status_code == 200 and answered.json()["predictions"][0]["label"]
        assert serve.predict(url, ["good"])[0]["label"]  # the client helper sends it
    finally:
        from ray import serve as ray_serve

        ray_serve.delete(cfg.app_name)


def test_a_registry_outage_or_a_failed_rollout_leaves_the_served_version_answering(
    registered: dict, small_app: ServeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ptft serve`'s follow loop (`serve.keep_following`) with real faults: the registry on a port
    where nothing listens, the alias moved to a version whose files are missing (not deployed), then
    to one whose files do not load (deployed, and rolled back)."""
    from ray import serve as ray_serve

    client, tracking_uri = registered["client"], registered["tracking_uri"]
    good = registered["versions"][0]["version"]
    client.set_registered_model_alias(NAME, "following", good)
    cfg = small_app.model_copy(update={"app_name": "serving-follow", "route_prefix": "/serving-follow"})
    serving = serve.resolve_model(f"models:/{NAME}@following", tracking_uri)
    url = serve.deploy(cfg, serving, tracking_uri)

    def answers_with(version: str) -> None:
        assert serve.live_model(url).version == version
        assert requests.post(f"{url}/predict", json={"texts": ["good"]}, timeout=30).status_code == 200

    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
        now, trouble = serve.keep_following(cfg, serving, f"http://127.0.0.1:{free_port()}")
        assert now == serving and "did not answer" in trouble and f"v{good} keeps answering" in trouble, trouble
        answers_with(good)

        run = client.create_run(client.get_run(client.get_model_version(NAME, good).run_id).info.experiment_id)
        empty = client.create_model_version(NAME, f"runs:/{run.info.run_id}/no-model", run.info.run_id)
        client.set_registered_model_alias(NAME, "following", empty.version)
        now, trouble = serve.keep_following(cfg, serving, tracking_uri)
        assert now == serving and "holds no MLmodel" in trouble and f"v{good} keeps answering" in trouble, trouble
        answers_with(good)

        client.log_text(run.info.run_id, "flavors: {}\n", "broken-model/MLmodel")  # there, and no model
        broken = client.create_model_version(NAME, f"runs:/{run.info.run_id}/broken-model", run.info.run_id)
        client.set_registered_model_alias(NAME, "following", broken.version)
        now, trouble = serve.keep_following(cfg, serving, tracking_uri)
        assert now == serving and f"rolling over to v{broken.version} failed" in trouble, trouble
        assert f"back on v{good}" in trouble
        answers_with(good)
    finally:
        ray_serve.delete(cfg.app_name)
