"""Network helpers light enough for the driver (no torch, no Ray)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HEALTH_TIMEOUT_S = 5


def mlflow_unanswered(tracking_uri: str | None) -> str | None:
    """Why an MLflow server does not answer `GET /health` within a few seconds, or None: it does,
    or the store is no server (a sqlite file). Asked before MLflow's own client, which retries an
    unreachable server for minutes."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    import requests  # ~0.1 s: only when there is a server to ask

    try:
        response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException as error:
        return f"GET /health failed: {type(error).__name__}"
    return None if response.ok else f"GET /health answered {response.status_code}"
