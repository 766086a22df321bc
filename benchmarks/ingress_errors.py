"""What a client gets when the HAProxy ingress itself gives up on a request (not a benchmark: a
probe, for docs/serving.md). A local Ray with the environment ptft's clusters get
(components/ingress.py), HAProxy's server timeout lowered to 3 s, one deployment whose only
replica is then SIGSTOPped; each request's status, time and body are printed.

    python benchmarks/ingress_errors.py [--requests 4] [--timeout-server-s 3]

Measured 2026-12-04 (Ray 2.60): four requests, each `500 Internal Server Error` after 3.0 s, a
server timeout that HAProxy itself answers 504: Ray maps HAProxy's 502, 503 and 504 to one 500
error file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components import ingress  # noqa: E402
from components.net import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--timeout-server-s", type=int, default=3)
    args = parser.parse_args()
    # Serve reads these when it is imported (so Ray is imported below) and when it starts its ingress.
    os.environ.update(ingress.local_cluster_env())
    os.environ["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] = str(args.timeout_server_s)
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment
    class Pid:
        def __call__(self, request) -> dict:
            return {"pid": os.getpid()}

    serve.run(Pid.bind(), route_prefix="/pid", name="pid")
    url = f"http://127.0.0.1:{port}/pid"
    replica = _replica_pid(url)
    print(f"ingress {ingress.name()}; replica {replica}")
    os.kill(replica, signal.SIGSTOP)
    try:
        for _ in range(args.requests):
            started = time.monotonic()
            try:
                response = requests.get(url, timeout=args.timeout_server_s + 30)
                said = f"{response.status_code} {response.text[:60]!r}"
            except requests.RequestException as error:
                said = type(error).__name__
            print(f"replica stopped: {said} after {time.monotonic() - started:.1f} s")
    finally:
        os.kill(replica, signal.SIGCONT)
        serve.shutdown()
        ray.shutdown()


def _replica_pid(url: str) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=10)
            if response.status_code == 200:
                return response.json()["pid"]
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} never answered 200")


if __name__ == "__main__":
    main()
