"""Stage 5, serve: a Ray Serve deployment of a registered model version behind FastAPI.

    POST /predict  {"texts": [...]} -> {"predictions": [{"label", "score"}], "model": {...}}
    GET  /healthz   liveness
    GET  /metadata  model name, version, run id
    GET  /docs      OpenAPI

Malformed requests get FastAPI's 422 with a message naming the bad field; requests are batched
across callers with `@serve.batch`.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models defined in
# build_app as real classes, not as strings it would look up in this module.
import logging
import time
from typing import Annotated

import requests
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from ray import serve

from components.configs import ServeConfig
from components.stage import StageContext, StageResult, write_json

log = logging.getLogger(__name__)


class ModelInfo(BaseModel):
    name: str
    version: str
    model_uri: str
    run_id: str | None = None


def build_app(cfg: ServeConfig, model: ModelInfo, tracking_uri: str) -> FastAPI:
    """The FastAPI app with request limits taken from the config."""
    text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_text_chars)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[text] = Field(min_length=1, max_length=cfg.max_texts)

    class Prediction(BaseModel):
        label: str
        score: float

    class PredictResponse(BaseModel):
        predictions: list[Prediction]
        model: ModelInfo

    app = FastAPI(title="ptft classifier", version=model.version)

    @serve.deployment
    @serve.ingress(app)
    class Classifier:
        def __init__(self) -> None:
            self.scorer = _Scorer(model.model_uri, tracking_uri)
            self.predict_batch.set_max_batch_size(cfg.max_batch_size)
            self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

        @app.get("/healthz")
        def healthz(self) -> dict:
            return {"status": "ok"}

        @app.get("/metadata")
        def metadata(self) -> ModelInfo:
            return model

        @app.post("/predict")
        async def predict(self, request: PredictRequest) -> PredictResponse:
            predictions = await self.predict_batch(request.texts)
            return PredictResponse(predictions=predictions, model=model)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def predict_batch(self, requests_texts: list[list[str]]) -> list[list[dict]]:
            flat = [text for texts in requests_texts for text in texts]
            scored = iter(self.scorer(flat))
            return [[next(scored) for _ in texts] for texts in requests_texts]

    return Classifier


class _Scorer:
    """Tokenizer + classifier from the registry; scores a list of texts in one forward pass."""

    def __init__(self, model_uri: str, tracking_uri: str):
        import mlflow
        import torch

        mlflow.set_tracking_uri(tracking_uri)
        components = mlflow.transformers.load_model(model_uri, return_type="components")
        self.model = components["model"].eval()
        self.tokenizer = components["tokenizer"]
        self.torch = torch

    def __call__(self, texts: list[str]) -> list[dict]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with self.torch.no_grad():
            probabilities = self.model(**encoded).logits.softmax(-1)
        scores, ids = probabilities.max(-1)
        labels = self.model.config.id2label
        return [{"label": labels[int(i)], "score": float(s)} for s, i in zip(scores, ids, strict=True)]


def deploy(cfg: ServeConfig, model: ModelInfo, tracking_uri: str) -> str:
    """Deploy (or update) the application; returns its base URL once /healthz answers."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    deployment = build_app(cfg, model, tracking_uri).options(
        num_replicas=cfg.num_replicas, ray_actor_options={"num_cpus": cfg.cpus_per_replica}
    )
    serve.run(deployment.bind(), name=cfg.app_name, route_prefix=cfg.route_prefix)
    host, port = _http_address(cfg)
    url = f"http://{_client_host(host)}:{port}{cfg.route_prefix.rstrip('/')}"
    _wait_healthy(url)
    return url


def _http_address(cfg: ServeConfig) -> tuple[str, int]:
    """Where Serve really listens. A cluster has one Serve HTTP proxy per node with the options it
    was first started with; `serve.start` on a running Serve keeps them, so another app's port wins."""
    from ray.serve.context import _get_global_client  # no public API tells the running proxy's port

    try:
        http = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - fall back to what was asked for
        return cfg.host, cfg.port
    if (http.host, http.port) != (cfg.host, cfg.port):
        log.warning("serve: Serve already runs on this cluster at %s:%s; serve.host/serve.port (%s:%s) "
                    "do not apply to a running Serve", http.host, http.port, cfg.host, cfg.port)  # fmt: skip
    return http.host, http.port


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f}s")
        time.sleep(0.5)


def predict(url: str, texts: list[str]) -> list[dict]:
    """Client helper: POST /predict and return the predictions."""
    response = requests.post(f"{url}/predict", json={"texts": texts}, timeout=30)
    response.raise_for_status()
    return response.json()["predictions"]


def run(cfg: ServeConfig, registered: dict, ctx: StageContext) -> StageResult:
    """Deploy the registered version, send the sample texts, record the endpoint."""
    model = ModelInfo(name=registered["name"], version=registered["version"], model_uri=registered["model_uri"],
                      run_id=registered.get("run_id"))  # fmt: skip
    url = deploy(cfg, model, ctx.tracking_uri)
    started = time.perf_counter()
    predictions = predict(url, cfg.sample_texts) if cfg.sample_texts else []
    latency_ms = (time.perf_counter() - started) * 1000
    endpoint = {"url": url, "app_name": cfg.app_name, "model": model.model_dump(),
                "samples": [dict(text=t, **p) for t, p in zip(cfg.sample_texts, predictions, strict=True)]}  # fmt: skip
    write_json(ctx.output_dir / "endpoint.json", endpoint)
    return StageResult(output_uri=url, metrics={"serve/sample_latency_ms": latency_ms}, outputs=endpoint)


def ensure_deployed(cfg: ServeConfig, endpoint: dict, tracking_uri: str) -> bool:
    """Make sure the deployment an endpoint record describes is live; redeploy it if not.
    Returns True when it had to be deployed again (e.g. the local Ray that served it is gone)."""
    model = ModelInfo.model_validate(endpoint["model"])
    try:
        live = requests.get(f"{endpoint['url']}/metadata", timeout=3)
        if live.ok and live.json().get("version") == model.version and live.json().get("name") == model.name:
            return False
    except requests.RequestException:
        pass
    log.info("serve: %s v%s is not live at %s; deploying it", model.name, model.version, endpoint["url"])
    deploy(cfg, model, tracking_uri)
    return True


def shutdown() -> None:
    serve.shutdown()


def app_builder(args: dict) -> serve.Application:
    """Ray Serve application builder for config-file deploys (`serve run`, `serve deploy`, a KubeRay
    RayService): `import_path: components.serve:app_builder` with `args` such as

        model_uri: models:/demo-classifier@champion    # or models:/NAME/VERSION
        tracking_uri: http://mlflow.mlflow.svc:5000
        num_replicas: 2                                # optional: any of APP_ARGS

    An alias is resolved to its version once, here, so every replica loads the same version even if
    the alias moves during a rollout; redeploying the config picks up the new champion. Host, port,
    route prefix and app name come from the Serve config file itself (`http_options`, `route_prefix`,
    `name`), not from `args`.

    Raises:
        ValueError: `args` is malformed (missing or unknown key, bad value), or the registry has no
            such model version or alias.
    """
    options, model_uri, tracking_uri = _parse_app_args(args)
    cfg = ServeConfig(**options)
    model = _resolve_registered(model_uri, tracking_uri)
    deployment = build_app(cfg, model, tracking_uri).options(
        num_replicas=cfg.num_replicas, ray_actor_options={"num_cpus": cfg.cpus_per_replica}
    )
    return deployment.bind()



# ServeConfig fields a config-file deploy may set through `args`; the rest belong to the Serve config.
APP_ARGS = ("num_replicas", "cpus_per_replica", "max_batch_size", "batch_wait_timeout_s", "max_texts", "max_text_chars")
_SERVE_CONFIG_KEYS = {"host": "http_options.host", "port": "http_options.port", "route_prefix": "route_prefix",
                      "app_name": "name"}  # fmt: skip
_REGISTRY_URI = r"models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_-]+))"


def _parse_app_args(args: object) -> tuple[dict, str, str]:
    """Check `args` without touching the registry; every problem in one ValueError."""
    import re

    from pydantic import ValidationError

    if not isinstance(args, dict):
        raise ValueError(f"components.serve:app_builder: args must be a mapping, got {type(args).__name__}: {args!r}")
    model_uri, tracking_uri = args.get("model_uri"), args.get("tracking_uri")
    problems = []
    if not isinstance(model_uri, str) or not re.fullmatch(_REGISTRY_URI, model_uri):
        problems.append(f"args.model_uri={model_uri!r}: use a registered model, models:/NAME@ALIAS "
                        "(e.g. models:/demo-classifier@champion) or models:/NAME/VERSION")  # fmt: skip
    if not isinstance(tracking_uri, str) or not tracking_uri:
        problems.append(f"args.tracking_uri={tracking_uri!r}: give the MLflow tracking URI, e.g. http://mlflow:5000")
    for key in sorted(set(args) - {"model_uri", "tracking_uri", *APP_ARGS}):
        fix = (f"set {_SERVE_CONFIG_KEYS[key]} in the Serve config file instead" if key in _SERVE_CONFIG_KEYS
               else f"accepted: model_uri, tracking_uri, {', '.join(APP_ARGS)}")  # fmt: skip
        problems.append(f"args.{key} is not accepted; {fix}")
    options = {key: args[key] for key in APP_ARGS if key in args}
    try:
        ServeConfig(**options)
    except ValidationError as error:
        problems += [f"args.{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in error.errors()]
    if problems:
        raise ValueError("components.serve:app_builder: " + "; ".join(problems))
    return options, model_uri, tracking_uri


def _resolve_registered(model_uri: str, tracking_uri: str) -> ModelInfo:
    """The registry's version behind `models:/NAME@ALIAS` or `models:/NAME/VERSION`, pinned."""
    import re

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    parts = re.fullmatch(_REGISTRY_URI, model_uri)
    name, version, alias = parts["name"], parts["version"], parts["alias"]
    client = MlflowClient(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        raise ValueError(f"components.serve:app_builder: args.model_uri={model_uri!r}: not in the registry at "
                         f"{tracking_uri} ({error.message}); "
                         "the MLflow UI (ptft ui) lists registered models and their aliases") from error  # fmt: skip
    return ModelInfo(name=name, version=str(found.version), model_uri=f"models:/{name}/{found.version}",
                     run_id=found.run_id)  # fmt: skip
