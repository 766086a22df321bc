"""Stage 5, serve: a fine-tuned model on Ray Serve behind FastAPI, from the registry or a model folder.

    POST /predict  {"texts": [...]} -> {"predictions": [{"label", "score", "truncated"}], "model": {...}}
                   (an entities model: {"predictions": [{"entities": [{"type", "text", "start", "end",
                   "score"}], "truncated"}], ...})
    POST /translate the same as /predict, for a translation model ({"translation", "truncated"} per text)
    POST /generate {"prompt", "max_new_tokens", "temperature", "top_p", "seed", "stream"} -> {"text",
                   "tokens", "finish_reason", "model"}; with "stream": true, server-sent events, one per
                   token ({"token"}), the last also with {"text", "tokens", "finish_reason"} (a generation model)
    POST /explain  {"texts": [...], "layer": -1} -> {"explanations": [{"tokens", "attention" (heads x tokens),
                   "label", "score", ...}], "model": {...}} (a translation model: "translation",
                   "target_tokens" and "attention" as target x source tokens, the decoder's cross-attention)
    GET  /healthz   liveness
    GET  /metadata  model name, version, source, limits
    GET  /docs      OpenAPI

Every bad request is a 4xx with a message: 400 (not JSON), 413 (body or one text too large), 422
(wrong shape, empty, too many texts); 408 when the answer takes longer than `request_timeout_s`.
Overload is Serve's: each replica works on `max_ongoing_requests`, callers queue at most
`max_queued_requests` more, and the rest get a fast 503. Requests are batched across callers with
`@serve.batch` and scored under `torch.inference_mode`.

A new version reaches a running application through `deploy` again: Serve starts replicas with
the new model (`rollout_surge_percent` extra), and only then drains the old ones, so no request
is dropped. `follow_champion` does that for
an application that serves a registry alias after `ptft promote` / `ptft rollback` moved it.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models as real classes.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import ray.exceptions
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from components.decoder import Decoder, DecoderLost
from components.explain import MAX_EXPLAIN_TEXTS
from components.generation import DEADLINE, Ask, prompt_ids
from components.model_ref import ModelInfo, RegistryUnavailable, resolve_model
from components.net import causes, listen_problem
from components.redaction import redact_url
from components.schemas import REGISTRY_URI, ServeConfig
from components.scoring import Scorer
from components.stage import StageContext, StageFailure, StageResult, write_json

log = logging.getLogger(__name__)


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    context: str = Field(description="the text whose span answers it")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str | Question] = Field(
        description="texts to classify or tag; for a question answering model, questions with their contexts; "
        "limits in GET /metadata"
    )


class Prediction(BaseModel):
    label: str
    score: float = Field(description="the label's probability")
    truncated: bool = Field(description="the text was longer than the model's positions and was cut")


class Entity(BaseModel):
    type: str = Field(description="the entity type, e.g. PER")
    text: str = Field(description="the entity as written in the text")
    start: int = Field(description="its first character in the text")
    end: int = Field(description="one past its last character")
    score: float = Field(description="the mean probability of its words' tags")


class Entities(BaseModel):
    entities: list[Entity]
    truncated: bool = Field(description="the text was longer than the model's positions and was cut")


class Answer(BaseModel):
    answer: str = Field(description="the span of the context that answers the question ('' when none does)")
    start: int = Field(description="its first character in the context")
    end: int = Field(description="one past its last character")
    score: float = Field(description="the probability of its start times that of its end")
    truncated: bool = Field(description="the question was longer than half the model's positions and was cut")


class Translation(BaseModel):
    translation: str = Field(description="the text in the target language (beam search)")
    truncated: bool = Field(description="the text was longer than the model's positions and was cut")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description="the text to continue")
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="most tokens to add (default: as many as the model's positions leave room for, up to the "
        "limit in GET /metadata)",
    )
    temperature: float = Field(1.0, ge=0, le=10, description="0: the likeliest token each step (greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="draw from the likeliest tokens holding this much probability")
    seed: int | None = Field(
        None, ge=0, le=2**64 - 1, description="the same seed and prompt give the same text; none: random"
    )
    stream: bool = Field(False, description="send each token as it is made (server-sent events)")
    timeout_s: float | None = Field(
        None, gt=0, description="stop generating after this many seconds (at most request_timeout_s, the default)"
    )


class Generated(BaseModel):
    text: str = Field(description="what the model added to the prompt")
    tokens: int = Field(description="tokens added")
    finish_reason: str = Field(description="stop (the model ended the text), length (max_new_tokens) or deadline")
    model: ModelInfo


class Continuation(BaseModel):
    generated: str = Field(description="the text continued greedily (POST /generate takes settings)")
    truncated: bool = Field(description="the text was too long to continue and its start was cut")


class PredictResponse(BaseModel):
    predictions: list[Prediction] | list[Entities] | list[Answer] | list[Translation] | list[Continuation] = Field(
        description="per text: a label (sentence classification), its entities (token classification), "
        "the answer (question answering), its translation or its continuation (generation)"
    )
    model: ModelInfo
    max_tokens: int = Field(description="tokens the model reads per text; longer texts are truncated")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str | Question] = Field(
        description=f"texts (or questions with contexts) to explain, at most {MAX_EXPLAIN_TEXTS}"
    )
    layer: int = Field(-1, description="the layer whose attention to return: 0..layers-1, or -1 for the last")


class AttentionMap(BaseModel):
    text: str | Question
    tokens: list[str] = Field(description="the tokens the model read (truncated texts are cut)")
    label: str
    score: float
    layer: int
    query_token: str = Field(
        description="the token whose attention is shown: [CLS], a decoder's last token, the first tagged token "
        "(entities) or the likeliest answer start (question answering)"
    )
    attention: list[list[float]] = Field(description="heads x tokens: how much each head attends to each token")


class CrossAttentionMap(BaseModel):
    text: str
    tokens: list[str] = Field(description="the source tokens the encoder read")
    translation: str
    target_tokens: list[str] = Field(description="the tokens the decoder wrote (beam search), its end token last")
    layer: int
    attention: list[list[float]] = Field(
        description="target tokens x source tokens: where the decoder's cross-attention looked when it chose "
        "each target token (mean over heads)"
    )


class ExplainResponse(BaseModel):
    explanations: list[AttentionMap] | list[CrossAttentionMap]
    model: ModelInfo


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------- the application

app = FastAPI(title="ptft classifier", description="Text classification by a ptft fine-tuned model.")
ERRORS = {
    code: {"description": what}
    for code, what in (
        (400, "not JSON"),
        (408, "not answered in time"),
        (413, "body or a text too large"),
        (422, "wrong shape, empty or too many texts"),
        (503, "overloaded: retry later"),
    )
}


class ClassifierApp:
    """The replica's code. Kept importable under its own name (the deployment wraps it below), so
    Ray ships it by reference and replicas import this module rather than unpickling a copy.

    With a token (`token_digest`, the SHA-256 of the token set in PTFT_SERVE_TOKEN or the file
    PTFT_SERVE_TOKEN_FILE names where the app was deployed), every route but /healthz answers 401
    unless the request carries `Authorization: Bearer <token>`. Only the digest reaches Ray, and
    the comparison takes the same time whatever the token sent."""

    def __init__(self, model: dict, settings: dict, tracking_uri: str | None, token_digest: str | None = None) -> None:
        self.token_digest = token_digest
        self.model = ModelInfo.model_validate(model)
        self.cfg = ServeConfig.model_validate(settings)
        self.scorer = Scorer(
            self.model.model_uri,
            tracking_uri,
            threads=max(1, int(self.cfg.cpus_per_replica)),
            max_batch_tokens=self.cfg.max_batch_tokens,
        )
        # The type's example answered before the replica is ready: the first request (after each
        # rollout too) paid what a first call loads, an entities model's seqeval and scikit-learn
        # (a sample took 394 ms against 13-16 ms for the other types), and a version that cannot
        # answer fails its rollout instead of its requests.
        self.scorer([self.scorer.task.example])
        self.predict_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        # Every model call on one thread of its own: the event loop stays free for /healthz and for
        # parsing (and refusing) requests, and torch ran slower hopping between a pool's threads.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batcher = self._batcher()

    def _batcher(self) -> Decoder | None:
        """Continuous batching for /generate: decoding in a process of its own by default."""
        if self.scorer.task.name != "generation":
            return None
        return Decoder(
            self.scorer.model,
            self.scorer.tokenizer,
            threads=max(1, int(self.cfg.cpus_per_replica)),
            max_batch_size=self.cfg.max_batch_size,
            wait_s=self.cfg.generation_batch_wait_s,
            where=self.cfg.generation_decoder,
        )

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the bearer token (when the app has one)."""
        if self.token_digest is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" else ""
        if hmac.compare_digest(sent, self.token_digest):
            return None
        return JSONResponse(
            {
                "detail": "send the serving token: Authorization: Bearer <token> "
                "(PTFT_SERVE_TOKEN where it was deployed)"
            },
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/metadata")
    def metadata(self, request: Request):
        if refused := self._refused(request):
            return refused
        limits = {
            key: getattr(self.cfg, key)
            for key in (
                "max_texts",
                "max_text_bytes",
                "max_body_bytes",
                "request_timeout_s",
                "max_batch_size",
                "max_batch_tokens",
                "max_new_tokens",
            )
        }
        return {
            **self.model.model_dump(),
            "labels": self.scorer.labels,
            "max_tokens": self.scorer.max_tokens,
            "limits": limits,
        }

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(self, request: Request):
        if refused := self._refused(request):
            return refused
        try:
            texts = await self._texts(request)
            predictions = await asyncio.wait_for(self.predict_batch(texts), timeout=self.cfg.request_timeout_s)
        except RequestError as error:
            return JSONResponse({"detail": error.message}, status_code=error.status)
        except TimeoutError:
            return JSONResponse(
                {
                    "detail": f"not answered within request_timeout_s={self.cfg.request_timeout_s}s; "
                    "send fewer or shorter texts, or retry"
                },
                status_code=408,
            )
        return PredictResponse(predictions=predictions, model=self.model, max_tokens=self.scorer.max_tokens)

    @app.post("/translate", response_model=PredictResponse, responses=ERRORS)
    async def translate(self, request: Request):
        """/predict of a translation model, under the name its clients expect."""
        if self.scorer.task.name != "translation":
            detail = f"this application serves a {self.scorer.task.name} model: POST /predict"
            return JSONResponse({"detail": detail}, status_code=404)
        return await self.predict(request)

    @app.post(
        "/generate",
        response_model=Generated,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
            }
        },
    )
    async def generate(self, request: Request):
        """A prompt continued by a generation model, whole or streamed; requests that arrive together
        are decoded together, each with its own settings, and each stops at request_timeout_s."""
        if refused := self._refused(request):
            return refused
        try:
            if self.scorer.task.name != "generation":
                detail = f"this application serves a {self.scorer.task.name} model: POST /predict"
                raise RequestError(404, detail)
            asked = await self._parse(request, GenerateRequest, hint='{"prompt": "..."}')
            ask = self._ask(asked)
        except RequestError as error:
            return JSONResponse({"detail": error.message}, status_code=error.status)
        if asked.stream:
            return StreamingResponse(self._events(ask), media_type="text/event-stream")
        last = {}
        try:
            async for last in self.batcher.events(ask, whole=True):  # noqa: B007 - one event: the last
                pass
        except DecoderLost as error:
            return JSONResponse({"detail": str(error)}, status_code=503)
        if last["finish_reason"] == DEADLINE:
            detail = (
                f"not answered within {asked.timeout_s or self.cfg.request_timeout_s}s (request_timeout_s="
                f"{self.cfg.request_timeout_s}): stopped after {last['tokens']} tokens; ask for fewer "
                "max_new_tokens, stream, or retry"
            )
            return JSONResponse({"detail": detail}, status_code=408)
        return Generated(**last, model=self.model)

    def _ask(self, asked: "GenerateRequest") -> Ask:
        """The request as the decoding loop takes it, within the limits."""
        limit = self.cfg.max_new_tokens
        if asked.max_new_tokens is not None and asked.max_new_tokens > limit:
            raise RequestError(422, f"max_new_tokens={asked.max_new_tokens}; the limit is max_new_tokens={limit}")
        size = len(asked.prompt.encode("utf-8"))
        if size > self.cfg.max_text_bytes:
            raise RequestError(
                413, f"the prompt is {size} bytes (UTF-8); the limit is max_text_bytes={self.cfg.max_text_bytes}"
            )
        ids = prompt_ids(self.scorer.tokenizer, asked.prompt)
        room = self.scorer.max_tokens - len(ids)
        # Unasked, as many as fit: a fixed default (64) was a 413 for every prompt on a 32-position model.
        wanted = asked.max_new_tokens or min(limit, room)
        if not ids:  # a tokenizer without a start token, and a prompt of spaces
            raise RequestError(422, "the prompt has no tokens for this model (only spaces?): send some text")
        if room < 1 or wanted > room:
            asked_for = f" and max_new_tokens={asked.max_new_tokens}" if asked.max_new_tokens else ""
            fix = "shorten the prompt" + (f" or ask for at most {room} tokens" if room > 0 else "")
            raise RequestError(
                413,
                f"the prompt is {len(ids)} tokens{asked_for}; the model has {self.scorer.max_tokens} positions: {fix}",
            )
        deadline = time.monotonic() + min(asked.timeout_s or self.cfg.request_timeout_s, self.cfg.request_timeout_s)
        return Ask(ids, wanted, asked.temperature, asked.top_p, asked.seed, deadline)

    async def _events(self, ask: Ask):
        """Server-sent events: one per token as it comes, then the whole text and why it ended."""
        try:
            async for event in self.batcher.events(ask, self.cfg.stream_interval_s):
                yield f"data: {json.dumps(event)}\n\n"
        except DecoderLost as error:  # the status is sent: the last event says so
            yield f"data: {json.dumps({'error': str(error), 'finish_reason': 'error'})}\n\n"

    @app.post(
        "/explain",
        response_model=ExplainResponse,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ExplainRequest.model_json_schema()}},
            }
        },
    )
    async def explain(self, request: Request):
        """Attention maps of a few texts, not batched: in a worker thread like a batch, under the
        scorer's lock so it never runs beside one on the same model, and within the deadline."""
        if refused := self._refused(request):
            return refused
        try:
            asked = await self._parse(request, ExplainRequest)
            texts = self._items(asked.texts)
            if self.scorer.task.explain is None:
                raise RequestError(404, f"/explain: a {self.scorer.task.name} model has no attention map yet")
            if len(texts) > MAX_EXPLAIN_TEXTS:
                raise RequestError(422, f"{len(texts)} texts; /explain takes at most {MAX_EXPLAIN_TEXTS}: split it")
            explanations = await asyncio.wait_for(
                on_thread(self.model_thread, self.scorer.explain, texts, asked.layer),
                timeout=self.cfg.request_timeout_s,
            )
        except RequestError as error:
            return JSONResponse({"detail": error.message}, status_code=error.status)
        except TimeoutError:
            detail = f"not answered within request_timeout_s={self.cfg.request_timeout_s}s; send fewer texts, or retry"
            return JSONResponse({"detail": detail}, status_code=408)
        except ValueError as error:  # a layer the model does not have
            return JSONResponse({"detail": f"layer: {error}"}, status_code=422)
        return ExplainResponse(explanations=explanations, model=self.model)

    async def _texts(self, request: Request) -> list:
        return self._items((await self._parse(request, PredictRequest)).texts)

    def _items(self, asked: list) -> list:
        """Texts (or questions with contexts, as dicts) within the limits, as the model reads them."""
        items = check_texts([text.model_dump() if isinstance(text, Question) else text for text in asked], self.cfg)
        if problem := self.scorer.task.input_problem(items):
            raise RequestError(422, problem)
        return items

    async def _parse(self, request: Request, schema: type[BaseModel], hint: str = '{"texts": ["..."]}') -> BaseModel:
        return parsed(json_of(await read_body(request, self.cfg.max_body_bytes), hint), schema, hint)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, requests_texts: list[list[str]]) -> list[list[dict]]:
        flat = [text for texts in requests_texts for text in texts]
        scored = iter(await on_thread(self.model_thread, self.scorer, flat))
        return [[next(scored) for _ in texts] for texts in requests_texts]


Classifier = serve.deployment(serve.ingress(app)(ClassifierApp), name="Classifier")


def parsed(payload: object, schema: type[BaseModel], hint: str) -> BaseModel:
    """A request's JSON as `schema`, or a 422 naming each field that is wrong. Strict: JSON's own
    types are meant, so `true` is no number of tokens and `"0.5"` no temperature."""
    try:
        return schema.model_validate(payload, strict=True)
    except ValidationError as error:
        problems = "; ".join(dict.fromkeys(f"{_where(e['loc'])}: {e['msg']}" for e in error.errors()))
        raise RequestError(422, f"{problems}; send {hint}") from None


def _where(loc: tuple) -> str:
    """A validation error's place, without the union members pydantic names in it (`list[str]`,
    `Question`): `texts.0`, as the client wrote it."""
    named = [str(part) for part in loc if not (isinstance(part, str) and ("[" in part or part[:1].isupper()))]
    return ".".join(part for part in named if part != "str") or "body"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it is over `limit` bytes (before reading it when
    the client says its length)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {declared} bytes; the limit is max_body_bytes={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over max_body_bytes={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_number(constant: str) -> NoReturn:
    """Python's JSON parser reads NaN and Infinity, which JSON has not (RFC 8259): a NaN
    temperature was refused as "less than or equal to 10"."""
    raise ValueError(f"{constant} is no JSON number")


def json_of(body: bytes, hint: str) -> object:
    """A request body's JSON, or a 400 that says what is wrong with it."""
    try:
        payload = json.loads(body, parse_constant=_no_number)
        # An escaped lone surrogate ("\\ud800") is valid JSON but no text: tokenizers cannot take it.
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        why = "holds an unpaired surrogate (\\ud800-\\udfff), not text"
        raise RequestError(400, f"the body {why}; send {hint}") from None
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError, as _no_number's
        raise RequestError(400, f"the body is not JSON ({error}); send {hint}") from None
    except RecursionError:
        raise RequestError(400, f"the body's JSON is nested too deeply; send {hint}") from None
    return payload


def check_texts(texts: list, cfg: ServeConfig) -> list:
    """Texts (or questions with contexts) within the request limits."""
    if not texts:
        raise RequestError(422, "texts is empty; send at least one text")
    if len(texts) > cfg.max_texts:
        raise RequestError(422, f"{len(texts)} texts; one request takes at most max_texts={cfg.max_texts}: split it")
    for index, text in enumerate(texts):
        size = sum(len(part.encode("utf-8")) for part in (text.values() if isinstance(text, dict) else [text]))
        if size > cfg.max_text_bytes:
            raise RequestError(
                413, f"texts.{index} is {size} bytes (UTF-8); the limit is max_text_bytes={cfg.max_text_bytes}"
            )
    return texts


async def on_thread(thread: Executor, function, *args):
    """`function(*args)` run on `thread` (a one-worker executor), awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(thread, function, *args)


# --------------------------------------------------------------------------- deploying


def application(cfg: ServeConfig, model: ModelInfo, tracking_uri: str | None) -> serve.Application:
    options = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica},
        "max_surge_percent": cfg.rollout_surge_percent,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    token = serving_token()
    digest = hashlib.sha256(token.encode()).hexdigest() if token else None
    return Classifier.options(**options).bind(model.model_dump(), cfg.model_dump(mode="json"), tracking_uri, digest)


TOKEN_ENV, TOKEN_FILE_ENV = "PTFT_SERVE_TOKEN", "PTFT_SERVE_TOKEN_FILE"


def serving_token() -> str | None:
    """The bearer token the served app requires and its clients send: the environment variable
    PTFT_SERVE_TOKEN, or the first line of the file PTFT_SERVE_TOKEN_FILE names; None (no auth)
    without either. Never in the config, which is logged to MLflow."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    if path := os.environ.get(TOKEN_FILE_ENV):
        return Path(path).expanduser().read_text().strip() or None
    return None


def auth_headers() -> dict[str, str]:
    token = serving_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def deploy(cfg: ServeConfig, model: ModelInfo, tracking_uri: str | None) -> str:
    """Deploy the application, or roll a running one over to `model` (Serve starts the new
    replicas and drains the old). Returns its base URL once it answers with this version."""
    start(cfg)
    serve.run(application(cfg, model, tracking_uri), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = app_url(cfg)
    _wait_serving(url, model)
    log.info("serve: %s v%s at %s", model.name, model.version, url)
    return url


def start(cfg: ServeConfig) -> None:
    """Start Serve on the cluster, or connect to the Serve already running there.

    `serve.start` waits on the ingress actors it creates, while the controller replaces one that
    misses its readiness checks (HAProxy starting slowly on a busy node, or not binding a port one
    moment): the wait then fails with the replaced actor's death although Serve runs. Starting
    again connects to that Serve, whose controller brings up the new ingress; `deploy` then waits
    until the application answers through it."""
    http_options = {"host": cfg.host, "port": cfg.port}
    try:
        try:
            serve.start(http_options=http_options)
        except ray.exceptions.ActorDiedError as error:
            reason = str(error).partition("\n")[0]
            log.warning("serve: an ingress actor was replaced while Serve started (%s); connecting again", reason)
            serve.start(http_options=http_options)
    except Exception as error:
        if PORT_TAKEN not in "\n".join(str(each) for each in causes(error)):
            raise
        # Free when the run started (its pre-flight checks), taken since: another run's Serve, most often.
        taken = listen_problem(cfg.host, cfg.port) or f"{cfg.host}:{cfg.port} is in use"
        raise StageFailure(
            f"Serve cannot listen on {cfg.host}:{cfg.port}: {taken}. Fix: stop what listens there and continue "
            "with the `ptft resume` above, or run the config again with a free serve.port (what this run "
            "finished is reused from the cache)"
        ) from error


PORT_TAKEN = "Address already in use"  # the words of the ingress that could not bind (HAProxy's, or Python's)


def app_url(cfg: ServeConfig) -> str:
    host, port = _http_address(cfg)
    return f"http://{_client_host(host)}:{port}{cfg.route_prefix.rstrip('/')}"


def _http_address(cfg: ServeConfig) -> tuple[str, int]:
    """Where Serve really listens. A cluster has one Serve HTTP proxy per node with the options it
    was first started with; `serve.start` on a running Serve keeps them, so another app's port wins."""
    from ray.serve.context import _get_global_client  # no public API tells the running proxy's port

    try:
        http = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - fall back to what was asked for
        return cfg.host, cfg.port
    if (http.host, http.port) != (cfg.host, cfg.port):
        log.warning(
            "serve: Serve already runs on this cluster at %s:%s; serve.host/serve.port (%s:%s) "
            "do not apply to a running Serve",
            http.host,
            http.port,
            cfg.host,
            cfg.port,
        )
    return http.host, http.port


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _wait_serving(url: str, model: ModelInfo, timeout_s: float = 120.0) -> None:
    """Until /metadata answers with this model version (after a rollout, every replica does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = live_model(url)
        if live is not None and (live.name, live.version) == (model.name, model.version):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/metadata did not answer with {model.name} v{model.version} in {timeout_s:.0f}s")
        time.sleep(0.5)


def live_model(url: str) -> ModelInfo | None:
    """What the application at `url` serves, or None when nothing answers there."""
    try:
        response = requests.get(f"{url}/metadata", headers=auth_headers(), timeout=5)
        return ModelInfo.model_validate(response.json()) if response.ok else None
    except (requests.RequestException, ValueError):
        return None


def resending_session() -> requests.Session:
    """A client session that sends a request once more when no answer came (its connection closed
    under it, or the answer timed out): each rollout reloads the HAProxy ingress a few times, and
    once in CI one request of 1,821 got no answer during one (likely a keep-alive connection
    closing as the request went out). The routes change no state, so a repeat is safe; an answer
    with an error status is not repeated."""
    once = Retry(total=1, connect=1, read=1, status=0, other=0, allowed_methods=None, raise_on_status=False)
    session, adapter = requests.Session(), HTTPAdapter(max_retries=once)
    for scheme in ("http://", "https://"):
        session.mount(scheme, adapter)
    return session


def predict(url: str, texts: list[str]) -> list[dict]:
    """Client helper: POST /predict and return the predictions."""
    with resending_session() as session:
        response = session.post(f"{url}/predict", json={"texts": texts}, headers=auth_headers(), timeout=30)
    response.raise_for_status()
    return response.json()["predictions"]


# --------------------------------------------------------------------------- which model


def keep_following(cfg: ServeConfig, serving: ModelInfo, tracking_uri: str | None) -> tuple[ModelInfo, str | None]:
    """`follow_champion` for a long-lived `ptft serve`, which must never stop answering: a registry
    that does not answer, or a rollout that fails, leaves `serving` deployed (a failed rollout is
    rolled back to it). Returns what is served now and, when something failed, what to tell."""
    try:
        wanted = resolve_model(f"models:/{serving.name}@{serving.alias}", tracking_uri)
    except (RegistryUnavailable, ValueError) as error:  # down, or the alias deleted meanwhile
        return serving, f"{error}; v{serving.version} keeps answering"
    if wanted.version == serving.version:
        return serving, None
    try:
        deploy(cfg, wanted, tracking_uri)
    except Exception as error:  # noqa: BLE001 - any failed rollout: back to the version that answered
        log.warning("serve: rolling %r over to v%s failed: %s", cfg.app_name, wanted.version, error)
        deploy(cfg, serving, tracking_uri)
        return serving, f"rolling over to v{wanted.version} failed ({error}); back on v{serving.version}"
    return wanted, None


def follow_champion(
    cfg: ServeConfig, name: str, alias: str, tracking_uri: str | None, serving: ModelInfo | None = None
) -> ModelInfo | None:
    """Roll the application in `cfg` over to the version `models:/NAME@ALIAS` now names, if it
    follows that alias. `serving` is what it serves, when the caller deployed it; otherwise its
    /metadata says. Returns the model it now serves (None: no such application)."""
    live = serving or live_model(app_url(cfg))
    if live is None or (live.name, live.alias) != (name, alias):
        return None
    wanted = resolve_model(f"models:/{name}@{alias}", tracking_uri)
    if wanted.version == live.version:
        return live
    log.info(
        "serve: %s@%s moved to v%s; rolling %r over from v%s", name, alias, wanted.version, cfg.app_name, live.version
    )
    deploy(cfg, wanted, tracking_uri)
    return wanted


# --------------------------------------------------------------------------- the stage


def run(cfg: ServeConfig, registered: dict, ctx: StageContext) -> StageResult:
    """Deploy the registered model's champion (the version just registered when it beat the old
    one), send the sample texts, record the endpoint."""
    model = resolve_model(f"models:/{registered['name']}@champion", ctx.tracking_uri)
    url = deploy(cfg, model, ctx.tracking_uri)
    started = time.perf_counter()
    predictions = predict(url, cfg.sample_texts) if cfg.sample_texts else []
    latency_ms = (time.perf_counter() - started) * 1000
    endpoint = {
        "url": url,
        "app_name": cfg.app_name,
        "model": model.model_dump(),
        "samples": [dict(text=t, **p) for t, p in zip(cfg.sample_texts, predictions, strict=True)],
    }
    write_json(ctx.output_dir / "endpoint.json", endpoint)
    return StageResult(output_uri=url, metrics={"serve/sample_latency_ms": latency_ms}, outputs=endpoint)


def ensure_deployed(cfg: ServeConfig, endpoint: dict, tracking_uri: str) -> bool:
    """Make sure the deployment an endpoint record describes is live (for an alias: the version
    it names now); redeploy it if not. Returns True when it had to be deployed again (e.g. the
    local Ray that served it is gone)."""
    model = ModelInfo.model_validate(endpoint["model"])
    if model.alias:  # what the alias names now: a promote or rollback since then must stand
        model = resolve_model(f"models:/{model.name}@{model.alias}", tracking_uri)
    live = live_model(endpoint["url"])
    if live is not None and (live.name, live.version) == (model.name, model.version):
        return False
    log.info("serve: %s v%s is not live at %s; deploying it", model.name, model.version, endpoint["url"])
    deploy(cfg, model, tracking_uri)
    return True


def shutdown() -> None:
    serve.shutdown()


# --------------------------------------------------------------------------- Serve config files


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
    try:
        model = resolve_model(model_uri, tracking_uri)
    except ValueError as error:
        raise ValueError(f"components.serve:app_builder: args.model_uri={error}") from None
    return application(cfg, model, tracking_uri)


# ServeConfig fields a config-file deploy may set through `args`; the rest belong to the Serve config.
APP_ARGS = (
    "num_replicas",
    "autoscaling",
    "cpus_per_replica",
    "rollout_surge_percent",
    "max_batch_size",
    "batch_wait_timeout_s",
    "max_ongoing_requests",
    "max_queued_requests",
    "request_timeout_s",
    "max_texts",
    "max_text_bytes",
    "max_body_bytes",
    "max_new_tokens",
    "generation_batch_wait_s",
    "generation_decoder",
    "stream_interval_s",
)
_SERVE_CONFIG_KEYS = {
    "host": "http_options.host",
    "port": "http_options.port",
    "route_prefix": "route_prefix",
    "app_name": "name",
}


def _parse_app_args(args: object) -> tuple[dict, str, str]:
    """Check `args` without touching the registry; every problem in one ValueError."""
    if not isinstance(args, dict):
        raise ValueError(f"components.serve:app_builder: args must be a mapping, got {type(args).__name__}: {args!r}")
    model_uri, tracking_uri = args.get("model_uri"), args.get("tracking_uri")
    problems = []
    if not isinstance(model_uri, str) or not re.fullmatch(REGISTRY_URI, model_uri):
        problems.append(
            f"args.model_uri={model_uri!r}: use a registered model, models:/NAME@ALIAS "
            "(e.g. models:/demo-classifier@champion) or models:/NAME/VERSION"
        )
    if not isinstance(tracking_uri, str) or not tracking_uri:
        problems.append(
            f"args.tracking_uri={redact_url(tracking_uri)!r}: give the MLflow tracking URI, e.g. http://mlflow:5000"
        )
    for key in sorted(set(args) - {"model_uri", "tracking_uri", *APP_ARGS}):
        fix = (
            f"set {_SERVE_CONFIG_KEYS[key]} in the Serve config file instead"
            if key in _SERVE_CONFIG_KEYS
            else f"accepted: model_uri, tracking_uri, {', '.join(APP_ARGS)}"
        )
        problems.append(f"args.{key} is not accepted; {fix}")
    options = {key: args[key] for key in APP_ARGS if key in args}
    try:
        ServeConfig(**options)
    except ValidationError as error:
        problems += [f"args.{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in error.errors()]
    if problems:
        raise ValueError("components.serve:app_builder: " + "; ".join(problems))
    return options, model_uri, tracking_uri


def serve_config_file(cfg: ServeConfig, model_uri: str, tracking_uri: str) -> dict:
    """A Serve config file (`serve deploy FILE`, a RayService's serveConfigV2) for this app."""
    args = {"model_uri": model_uri, "tracking_uri": tracking_uri}
    defaults = ServeConfig()
    args.update(
        {
            key: getattr(cfg, key) if key != "autoscaling" else cfg.autoscaling.model_dump()
            for key in APP_ARGS
            if getattr(cfg, key) != getattr(defaults, key)
        }
    )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": "components.serve:app_builder",
                "args": args,
            }
        ],
    }
