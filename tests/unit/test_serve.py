"""Serving without a cluster: the champion gate and the promotion history against a real MLflow
store (sqlite), request limits, truncation, serve config rules and model references."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from components import model_ref, registry, scoring, serve
from components.schemas import ServeConfig
from pipelines.pipeline_config import ConfigError, model_reference_problems, validate
from tests.conftest import POSITIONS, sqlite_store, tiny_classifier, tiny_config_dict


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    client.create_registered_model("m")
    return client


def _version(client: MlflowClient, accuracy: float, split: str = "s1") -> str:
    """A version of "m" whose files (an MLmodel) lie beside the client's sqlite store."""
    files = Path(client.tracking_uri.removeprefix("sqlite:///")).with_name(
        f"model-{len(client.search_model_versions())}"
    )
    files.mkdir()
    (files / "MLmodel").write_text("flavors: {}\n")
    version = client.create_model_version("m", source=str(files)).version
    client.set_model_version_tag("m", version, registry.ACCURACY_TAG, str(accuracy))
    client.set_model_version_tag("m", version, registry.TEST_SPLIT_TAG, split)
    return str(version)


def test_the_gate_needs_a_strictly_better_score_on_the_same_test_split(client: MlflowClient) -> None:
    assert registry._beats_champion(client, "m", 0.5, "s1")  # no champion yet
    registry.promote(client, "m", _version(client, 0.8))
    assert not registry._beats_champion(client, "m", 0.8, "s1")  # a tie does not beat it
    assert registry._beats_champion(client, "m", 0.81, "s1")
    assert not registry._beats_champion(client, "m", 0.99, "s2")  # other test data: not comparable


def test_promote_and_rollback_keep_the_history(client: MlflowClient) -> None:
    one, two, three = (_version(client, 0.5) for _ in range(3))
    assert registry.promote(client, "m", one) is None
    assert registry.promote(client, "m", two) == one
    assert registry.promote(client, "m", three) == two
    assert registry.champion_history(client, "m") == [one, two, three]
    assert registry.rollback(client, "m") == (three, two)
    assert str(client.get_model_version_by_alias("m", registry.CHAMPION).version) == two
    assert registry.rollback(client, "m") == (two, one)
    with pytest.raises(ValueError, match="no earlier champion"):
        registry.rollback(client, "m")
    with pytest.raises(Exception, match="(?i)not found|RESOURCE_DOES_NOT_EXIST"):
        registry.promote(client, "m", "99")


def test_a_version_whose_files_are_gone_is_neither_promoted_nor_rolled_back_to(client: MlflowClient) -> None:
    """The champion alias moved to such a version, and every app following it then failed to load."""
    one, two, three = (_version(client, 0.5) for _ in range(3))
    registry.promote(client, "m", one)
    registry.promote(client, "m", two)
    for version in (one, three):
        (Path(client.get_model_version_download_uri("m", version)) / "MLmodel").unlink()
    with pytest.raises(ValueError, match=f"'models:/m/{three}' \\(v{three}\\) is in the registry .* holds no MLmodel"):
        registry.promote(client, "m", three)
    with pytest.raises(ValueError, match=f"'models:/m/{one}' \\(v{one}\\) .* holds no MLmodel"):
        registry.rollback(client, "m")
    assert str(client.get_model_version_by_alias("m", registry.CHAMPION).version) == two
    assert registry.champion_history(client, "m") == [one, two]


def test_a_registered_version_whose_files_are_gone_is_named_before_serve_starts(tmp_path: Path) -> None:
    """An artifact store cleaned by hand left the registry pointing at nothing: `ptft serve` started
    Ray, Serve's replicas failed three times over (`No such artifact: 'MLmodel'`), and the deploy
    ended in a traceback after 31 s."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    client.create_registered_model("m")
    files = tmp_path / "artifacts" / "model"
    files.mkdir(parents=True)
    (files / "MLmodel").write_text("flavors: {}\n")
    client.create_model_version("m", source=str(files))
    assert serve.resolve_model("models:/m/1", uri).version == "1"
    (files / "MLmodel").unlink()
    with pytest.raises(ValueError) as gone:
        serve.resolve_model("models:/m/1", uri)
    assert f"'models:/m/1' (v1) is in the registry at {uri}, but its files are not: {files} holds no MLmodel" in str(
        gone.value
    )


def test_the_files_of_a_version_logged_to_a_run_are_looked_for_in_the_clients_store(tmp_path: Path) -> None:
    """A `runs:/` source is resolved against the registry's store, not the process's default one:
    with a tracking server, that made a ./mlflow.db in the working directory and found nothing to check."""
    import mlflow

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts")))
    client.log_text(run.info.run_id, "flavors: {}\n", "model/MLmodel")
    client.create_registered_model("m")
    for path in ("model", "no-model"):
        client.create_model_version("m", f"runs:/{run.info.run_id}/{path}", run.info.run_id)
    default = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # another store, as a default
    try:
        assert model_ref.lookup(uri, "m", version="1")["version"] == "1"
        with pytest.raises(ValueError, match="'models:/m/2' \\(v2\\) .* runs:/.*/no-model holds no MLmodel"):
            model_ref.lookup(uri, "m", version="2")
    finally:
        mlflow.set_tracking_uri(default)


@pytest.mark.parametrize(
    ("texts", "status", "words"),
    [
        ([], 422, "empty"),
        (["x"] * 5, 422, "max_texts=4"),
        (["ab", "é" * 6], 413, "texts.1 is 12 bytes"),
        ([{"question": "q", "context": "c"}] * 5, 422, "max_texts=4"),  # question answering pairs
        ([{"question": "why", "context": "abcdefghij"}], 413, "texts.0 is 13 bytes"),  # question + context
    ],
)
def test_request_limits(texts: list[str], status: int, words: str) -> None:
    cfg = ServeConfig(max_texts=4, max_text_bytes=10)
    with pytest.raises(serve.RequestError) as raised:
        serve.check_texts(texts, cfg)
    assert raised.value.status == status and words in raised.value.message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"texts": ["\\ud800"]}', "unpaired surrogate"),  # valid JSON, no text: the tokenizer would raise
        (b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),  # the parser would recurse out
        (b'{"texts": "\xff"}', "not JSON"),
        (b'{"prompt": "x", "temperature": NaN}', "NaN is no JSON number"),  # Python's parser reads it
        (b'{"prompt": "x", "top_p": -Infinity}', "-Infinity is no JSON number"),
    ],
    ids=["lone-surrogate", "deep", "not-utf8", "nan", "infinity"],
)
def test_a_body_that_is_no_json_text_gets_400(body: bytes, words: str) -> None:
    with pytest.raises(serve.RequestError) as raised:
        serve.json_of(body, hint="{}")
    assert raised.value.status == 400 and words in raised.value.message
    assert serve.json_of(b'{"texts": ["\\ud83d\\ude00 a pair"]}', hint="{}") == {"texts": ["\U0001f600 a pair"]}


@pytest.mark.parametrize(
    ("schema", "body", "field"),
    [
        (serve.GenerateRequest, {"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),  # was 1 token
        (serve.GenerateRequest, {"prompt": "x", "temperature": "0.5"}, "temperature"),
        (serve.GenerateRequest, {"prompt": "x", "stream": "yes"}, "stream"),
        (serve.ExplainRequest, {"texts": ["x"], "layer": False}, "layer"),  # was layer 0
    ],
)
def test_a_request_field_of_another_json_type_gets_422_naming_it(schema, body: dict, field: str) -> None:
    with pytest.raises(serve.RequestError) as raised:
        serve.parsed(body, schema, hint="{}")
    assert raised.value.status == 422 and raised.value.message.startswith(f"{field}: "), raised.value.message


def test_each_field_takes_the_json_type_it_declares() -> None:
    asked = {"prompt": "x", "max_new_tokens": 4, "temperature": 1, "seed": 7, "stream": True}  # an int temperature too
    assert serve.parsed(asked, serve.GenerateRequest, hint="{}").temperature == 1.0
    questions = {"texts": ["a text", {"question": "q", "context": "c"}]}
    assert serve.parsed(questions, serve.PredictRequest, hint="{}").texts[1].context == "c"


def test_scorer_truncates_long_texts_and_says_so(tmp_path: Path) -> None:
    scorer = scoring.Scorer(str(tiny_classifier(tmp_path / "model", seed=0)), tracking_uri=None)
    assert scorer.max_tokens == POSITIONS and scorer.labels == ["negative", "positive"]
    scored = scorer(["a good film", " ".join(["very"] * 100)])
    assert [item["truncated"] for item in scored] == [False, True]
    assert all(item["label"] in scorer.labels and 0.5 <= item["score"] <= 1 for item in scored)


def test_token_budget_parts_hold_at_most_the_budget_padded() -> None:
    lengths = [5, 40, 6, 38, 7, 100, 4]
    parts = scoring.token_budget_parts(lengths, budget=80)
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))  # every text, once
    for part in parts:
        assert len(part) == 1 or len(part) * max(lengths[i] for i in part) <= 80, part
    assert [5] in parts  # longer than the budget: alone
    assert [6, 0, 2, 4] in parts  # the short ones together (4 x 7 tokens)


def test_a_batch_over_the_token_budget_is_scored_in_parts_with_the_same_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = str(tiny_classifier(tmp_path / "model", seed=0))
    texts = [" ".join(["good"] * n) + " film" for n in (1, 30, 2, 25, 3)]
    whole = scoring.Scorer(folder, tracking_uri=None)(texts)
    budgeted = scoring.Scorer(folder, tracking_uri=None, max_batch_tokens=40)
    shapes = []
    predict = budgeted.task.predict

    def recording(model, tokenizer, part, max_tokens):
        shapes.append(len(part))
        return predict(model, tokenizer, part, max_tokens)

    monkeypatch.setattr(budgeted, "task", dataclasses.replace(budgeted.task, predict=recording))
    parted = budgeted(texts)
    assert [item["label"] for item in parted] == [item["label"] for item in whole]
    assert [item["score"] for item in parted] == pytest.approx([item["score"] for item in whole], abs=1e-5)
    assert len(shapes) > 1 and sum(shapes) == len(texts)


def test_serve_config_rules(tmp_path: Path) -> None:
    raw = tiny_config_dict(tmp_path)
    raw["serve"] = {
        "num_replicas": 2,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "max_batch_size": 64,
        "max_ongoing_requests": 8,
    }
    with pytest.raises(ConfigError) as raised:
        validate(raw, check_data=False)
    text = str(raised.value)
    assert "serve.num_replicas" in text and "serve.max_batch_size" in text
    raw["serve"] = {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}
    with pytest.raises(ConfigError, match="min_replicas"):
        validate(raw, check_data=False)


@pytest.mark.parametrize(
    "host, named",
    [("999.1.1.1", "not an IP address"), ("http://0.0.0.0", "a URL"), ("0.0.0.0:8000", "holds a port")],
)
def test_a_serve_host_that_cannot_be_bound_fails_validation(tmp_path: Path, host: str, named: str) -> None:
    raw = {**tiny_config_dict(tmp_path), "serve": {"host": host}}
    with pytest.raises(ConfigError, match=f"serve.host = '{re.escape(host)}': {named}"):
        validate(raw, check_data=False)
    for good in ("0.0.0.0", "::", "127.0.0.1", "head-node.cluster.local"):
        validate({**raw, "serve": {"host": good}}, check_data=False)


def test_route_prefixes_and_app_names_serve_refuses_fail_validation(tmp_path: Path) -> None:
    """The prefix rules are Ray Serve's own (checked against its validator), found before the training."""
    from ray.serve._private.utils import validate_route_prefix

    for prefix in ("/", "/api", "/a/b", "api", "/api/", "/{name}", "/a}"):
        try:
            validate_route_prefix(prefix)
            serve_takes = True
        except ValueError:
            serve_takes = False
        raw = {**tiny_config_dict(tmp_path), "serve": {"route_prefix": prefix}}
        if serve_takes:
            validate(raw, check_data=False)
        else:
            with pytest.raises(ConfigError, match=f"serve.route_prefix = '{re.escape(prefix)}'"):
                validate(raw, check_data=False)
    with pytest.raises(ConfigError, match="serve.app_name = '': empty"):
        validate({**tiny_config_dict(tmp_path), "serve": {"app_name": ""}}, check_data=False)


def test_model_references(tmp_path: Path) -> None:
    assert model_reference_problems("models:/demo@champion", "MODEL") == []
    assert model_reference_problems("models:/demo/3", "MODEL") == []
    assert "not a registered model reference" in model_reference_problems("models:/demo", "MODEL")[0].message
    assert "does not exist" in model_reference_problems(str(tmp_path / "nope"), "MODEL")[0].message
    assert "has no config.json" in model_reference_problems(str(tmp_path), "MODEL")[0].message
    folder = tiny_classifier(tmp_path / "model", seed=0)
    assert model_reference_problems(str(folder), "MODEL") == []
    model = serve.resolve_model(str(folder), None)
    assert (model.name, model.version, model.model_uri) == ("model", "local", str(folder))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda folder: (folder / "config.json").write_text("{}"), "without model_type"),
        (lambda folder: (folder / "config.json").write_text("{not json"), "does not read as JSON"),
        (lambda folder: _architectures(folder, ["BertModel"]), "holds a ['BertModel'] model: ptft serves"),
        (lambda folder: [path.unlink() for path in folder.glob("*.safetensors")], "no weights in safetensors"),
        (lambda folder: [path.unlink() for path in folder.glob("*token*") if path.is_file()], "no tokenizer files"),
    ],
)
def test_a_model_folder_that_cannot_load_is_named_before_ray_starts(tmp_path: Path, change, said: str) -> None:
    """`ptft serve` and `ptft explain` ended in a traceback (exit 1) for the first four."""
    folder = tiny_classifier(tmp_path / "model", seed=0)
    change(folder)
    (problem,) = model_reference_problems(str(folder), "MODEL")
    assert said in problem.message, problem.message


def _architectures(folder: Path, names: list[str]) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": names}))


def test_exported_serve_config_passes_rays_schema_and_the_builder_checks() -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeConfig(app_name="a", route_prefix="/a", num_replicas=3, max_queued_requests=10)
    document = serve.serve_config_file(cfg, "models:/m@champion", "http://mlflow:5000")
    ServeDeploySchema.model_validate(document)
    options, model_uri, _ = serve._parse_app_args(document["applications"][0]["args"])
    assert options == {"num_replicas": 3, "max_queued_requests": 10} and model_uri == "models:/m@champion"


def test_application_takes_replicas_autoscaling_and_overload_settings() -> None:
    model = serve.ModelInfo(name="m", version="1", model_uri="models:/m/1")
    fixed = serve.application(ServeConfig(num_replicas=3, max_ongoing_requests=20, max_queued_requests=5), model, None)
    config = fixed._bound_deployment._deployment_config
    assert (config.num_replicas, config.max_ongoing_requests, config.max_queued_requests) == (3, 20, 5)
    assert config.max_surge_percent == 100  # new replicas start before the old ones drain
    scaling = ServeConfig(
        autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6, "downscale_delay_s": 20}
    )
    config = serve.application(scaling, model, None)._bound_deployment._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 4)
    assert config.autoscaling_config.target_ongoing_requests == 6
    assert (config.autoscaling_config.upscale_delay_s, config.autoscaling_config.downscale_delay_s) == (30, 20)


class _ClosesFirstConnection(BaseHTTPRequestHandler):
    """Reads the first request and closes its connection with no answer (an ingress reloading as
    the request arrives); answers each later one with `status`."""

    protocol_version = "HTTP/1.1"
    status = 200
    received: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(self.path)
        if len(self.received) == 1:
            self.close_connection = True
            return
        body = json.dumps({"predictions": [{"label": "positive"}]} if self.status == 200 else {"detail": "no"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _server(status: int) -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_ClosesFirstConnection,), {"status": status, "received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.received
    finally:
        server.shutdown()
        server.server_close()


def test_the_client_sends_a_request_that_got_no_answer_once_more_and_an_error_status_never() -> None:
    with _server(200) as (url, received):
        assert serve.predict(url, ["a good film"]) == [{"label": "positive"}]
        assert received == ["/predict", "/predict"]
    with _server(500) as (url, received):
        with pytest.raises(requests.HTTPError, match="500"):
            serve.predict(url, ["a good film"])
        assert received == ["/predict", "/predict"]  # the unanswered one, then the 500 alone
