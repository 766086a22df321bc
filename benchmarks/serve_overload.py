"""Where does a 503 spend its time? The overload burst of `serve_load.py` (10x the capacity of an
application with `max_ongoing_requests` 16 and `max_queued_requests` 16: 320 requests at once from one
client process, 127.0.0.1), against arms that each start fresh, one after the other:

    floor             a bare uvicorn app that answers every request 503 at once: what the client,
                      TCP and one Python HTTP server cost per rejection on this machine
    serve             ptft's Serve application behind Serve's Python proxy
    serve_same_loop   the same, with the proxy's router on the proxy's own event loop
                      (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0: no thread hop per request)
    serve_quiet_proxy the same, without the proxy's access log and per-rejection warning
    serve_haproxy     the application behind an HAProxy ingress (components/ingress.py): the
                      replica's own HTTP server rejects; its request code on a loop in a thread apart
    serve_haproxy_user_loop  the same, request code on the replica's HTTP event loop: as on the
                      clusters ptft starts
    serve_haproxy_connections_open  the same, after 320 concurrent GET /healthz: HAProxy has its
                      connections to the replica open before the first burst (it reuses them),
                      as many as the replica answered with 200 (its JSON: "connections_first")

For each: the client's time to each 503 (median, p90, first and last tenth by arrival) and, for the
Serve arms, the proxy's own handling time per 503 from its access log, so that
(client time - proxy time) is the time a rejection waited before the proxy looked at it.

Two burst clients, in turn within each repeat (`--clients`):

    raw               connections opened first, then one prepared request written to each; a
                      request's time runs from its write to its whole response: the server's time
    aiohttp           one aiohttp session, each request timed from before it connects: the time a
                      caller in one Python process sees, the client's own event loop included

    python benchmarks/serve_overload.py [--model HF_FOLDER] [--repeats 3] [--arms floor,serve_haproxy]
        [--clients raw,aiohttp] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp  # noqa: E402
import requests  # noqa: E402
from serve_load import TEXT, build_model, deploy_serve, free_port, percentile_ms, wait_answering  # noqa: E402

from components import ingress  # noqa: E402

ONGOING, QUEUED = 16, 16
BURST = 10 * (ONGOING + QUEUED)
PYTHON_PROXY = {ingress.ENABLE: "0"}
# Each arm's environment, made when the arm starts (the HAProxy arms take free ports then), given
# a folder for HAProxy's files that goes with the arm.
ARMS = {
    "floor": lambda files: {},
    "serve": lambda files: PYTHON_PROXY,
    "serve_same_loop": lambda files: {**PYTHON_PROXY, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
    "serve_quiet_proxy": lambda files: PYTHON_PROXY,
    "serve_haproxy": ingress.haproxy_env,
    "serve_haproxy_user_loop": lambda files: ingress.cluster_env({}, files),  # as on the clusters ptft starts
    "serve_haproxy_connections_open": lambda files: ingress.cluster_env({}, files),
}
# Arms that open the ingress's connections to the replica before the measured bursts.
CONNECTIONS_FIRST = {"serve_haproxy_connections_open"}

FLOOR_APP = """
import sys
from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()

@app.post("/predict")
async def predict() -> JSONResponse:
    return JSONResponse({"detail": "overloaded"}, status_code=503)

@app.get("/ready")
async def ready() -> dict:
    return {}

import uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


async def aiohttp_burst(url: str, count: int) -> list[tuple[int, float, float]]:
    """`count` requests at once from one aiohttp session: (status, seconds to the answer, seconds
    from the burst's start to the request's start), in the order the client started them. Each
    request's clock starts before the client has connected or sent it, so the time includes the
    client's own event loop working through the other requests."""
    results: list[tuple[int, float, float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        origin = time.perf_counter()

        async def one() -> None:
            started = time.perf_counter()
            async with session.post(f"{url}/predict", json={"texts": [TEXT]}) as response:
                await response.read()
                results.append((response.status, time.perf_counter() - started, started - origin))

        await asyncio.gather(*(one() for _ in range(count)))
    return results


def raw_burst(url: str, count: int, request: bytes | None = None) -> list[tuple[int, float, float]]:
    """The same burst with the client's share taken out: `count` connections opened first, then one
    prepared request (`POST /predict` unless given) written to each in a tight loop; a request's
    clock starts as its write does and stops when its whole response has arrived (one `select`
    loop, no HTTP library).
    What remains is the server's time to answer, and the wait behind the burst's other requests."""
    address = urlsplit(url)
    if request is None:
        body = json.dumps({"texts": [TEXT]}).encode()
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        request = head.encode() + body
    connections = [socket.create_connection((address.hostname, address.port), timeout=30) for _ in range(count)]
    selector = selectors.DefaultSelector()
    try:
        for connection in connections:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = []
        origin = time.perf_counter()
        for connection in connections:
            sent.append(time.perf_counter())  # before the write: the server cannot have the request sooner
            connection.sendall(request)
        received = [b""] * count
        for index, connection in enumerate(connections):
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ, index)
        results: list[tuple[int, float, float]] = []
        deadline = time.monotonic() + 300
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                index = key.data
                try:
                    chunk = key.fileobj.recv(65536)
                except ConnectionError:
                    chunk = b""
                received[index] += chunk
                status = response_status(received[index], closed=not chunk)
                if status is None and not chunk:
                    status = 0  # closed before a whole response: counted apart, under "other"
                if status is not None:
                    results.append((status, time.perf_counter() - sent[index], sent[index] - origin))
                    selector.unregister(key.fileobj)
        if selector.get_map():
            raise TimeoutError(f"{len(selector.get_map())} of {count} responses never completed")
        return results
    finally:
        selector.close()
        for connection in connections:
            connection.close()


def response_status(data: bytes, closed: bool) -> int | None:
    """The status of a complete HTTP/1.1 response in `data`, or None while it is incomplete (a body
    by Content-Length, chunked, or up to the connection's close). Not h11: one loop reads all 320
    responses, so each one's parsing cost would add to the times of those read after it."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
    body = data[end + 4 :]
    if "content-length" in headers:
        complete = len(body) >= int(headers["content-length"])
    elif "chunked" in headers.get("transfer-encoding", ""):
        complete = body.endswith(b"0\r\n\r\n")
    else:
        complete = closed
    return status if complete else None


CLIENTS = {"raw": raw_burst, "aiohttp": lambda url, count: asyncio.run(aiohttp_burst(url, count))}


def summarise(results: list[tuple[int, float, float]]) -> dict:
    rejected = [seconds for status, seconds, _ in sorted(results, key=lambda row: row[2]) if status == 503]
    tenth = max(1, len(rejected) // 10)

    def ms(values: list[float], q: float = 0.5) -> float | None:
        return percentile_ms(values, q, digits=1)

    return {
        "requests": len(results),
        "accepted": sum(status == 200 for status, _, _ in results),
        "rejected_503": len(rejected),
        "other": sorted({status for status, _, _ in results} - {200, 503}),
        "p50_503_ms": ms(rejected),
        "p90_503_ms": ms(rejected, 0.9),
        "p50_503_first_tenth_ms": ms(rejected[:tenth]),
        "p50_503_last_tenth_ms": ms(rejected[-tenth:]),
        "p50_accepted_ms": ms([seconds for status, seconds, _ in results if status == 200]),
        "last_request_started_ms": round(1000 * max(started for _, _, started in results), 1),
    }


def proxy_times_ms(log_dir: Path) -> list[float]:
    """The proxy's own handling time of each 503, from Serve's access log lines ('... 503 1.2ms')."""
    times = []
    for path in log_dir.glob("session_latest/logs/serve/proxy_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if found := re.search(r" 503 (\d+(?:\.\d+)?)ms", line):
                times.append(float(found[1]))
    return times


def _ready(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def bursts(url: str, clients: list[str], repeats: int, drain_s: float) -> dict[str, list[dict]]:
    """`repeats` rounds, each a burst from every client in turn, with `drain_s` between bursts."""
    runs: dict[str, list[dict]] = {client: [] for client in clients}
    for _ in range(repeats):
        for client in clients:
            runs[client].append(summarise(CLIENTS[client](url, BURST)))
            time.sleep(drain_s)
    return runs


def run_floor(clients: list[str], repeats: int) -> dict:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _ready(f"{url}/ready"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the floor app at {url} did not start")
            time.sleep(0.2)
        return {"clients": bursts(url, clients, repeats, drain_s=0.5)}
    finally:
        process.terminate()


def open_connections(url: str, count: int = BURST) -> dict[int, int]:
    """`count` concurrent `GET /healthz` (no model, no rejection code of ptft's), written as a burst
    is: the ingress opens as many connections to the replica as a burst makes it open, and keeps
    those whose request was answered (not refused) for the bursts that follow. Returns how many of
    each status came back (0: closed before a whole response)."""
    get = f"GET /healthz HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n\r\n".encode()
    statuses = [status for status, _, _ in raw_burst(url, count, get)]
    return {status: statuses.count(status) for status in sorted(set(statuses))}


def run_serve(arm: str, model: Path, clients: list[str], repeats: int) -> dict:
    import ray
    from ray import serve

    temp = Path(tempfile.mkdtemp(prefix="ovl-", dir="/tmp"))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False, _temp_dir=str(temp))
    try:
        port = free_port()
        if arm == "serve_quiet_proxy":
            quiet = {"enable_access_log": False, "log_level": "ERROR"}
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        url = deploy_serve(model, port, max_ongoing_requests=ONGOING, max_queued_requests=QUEUED)
        wait_answering(url)
        opened = open_connections(url) if arm in CONNECTIONS_FIRST else None
        if opened:
            time.sleep(3)
        runs = bursts(url, clients, repeats, drain_s=3)  # the accepted ones drain
        proxy = proxy_times_ms(temp)
        return {
            "clients": runs,
            "connections_first": opened,
            "proxy_503_count": len(proxy),
            "proxy_p50_503_ms": round(statistics.median(proxy), 2) if proxy else None,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Hugging Face classifier folder (default: build one)")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per arm")
    parser.add_argument("--arm", choices=sorted(ARMS), help="run one arm in this process and print its JSON")
    parser.add_argument("--arms", default=",".join(ARMS), help="the arms to run, one after another")
    parser.add_argument(
        "--clients", default=",".join(CLIENTS), help="burst clients, in turn within each repeat: " + ", ".join(CLIENTS)
    )
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve_overload.json")
    args = parser.parse_args()
    clients = args.clients.split(",")
    if unknown := set(clients) - set(CLIENTS):
        parser.error(f"--clients: unknown {sorted(unknown)}; choose from {', '.join(CLIENTS)}")
    if args.arm:
        if args.arm == "floor":
            result = run_floor(clients, args.repeats)
        else:
            result = run_serve(args.arm, args.model, clients, args.repeats)
        print("ARM " + json.dumps(result), flush=True)
        return
    model = args.model or build_model(Path(tempfile.mkdtemp(prefix="serve-overload-")) / "model")
    results: dict = {"burst": BURST, "max_ongoing_requests": ONGOING, "max_queued_requests": QUEUED}
    for arm in args.arms.split(","):
        make_env = ARMS[arm]
        command = [sys.executable, __file__, "--arm", arm, "--model", str(model), "--repeats", str(args.repeats)]
        command += ["--clients", args.clients]
        files = ingress.new_files_folder()
        try:
            done = subprocess.run(command, env={**os.environ, **make_env(files)}, capture_output=True, text=True)
        finally:
            shutil.rmtree(files, ignore_errors=True)
        line = next((line for line in done.stdout.splitlines() if line.startswith("ARM ")), None)
        if line is None:
            raise SystemExit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
        results[arm] = json.loads(line[4:])
        for client, runs in results[arm]["clients"].items():
            medians = [run["p50_503_ms"] for run in runs]
            print(f"{arm:>24} {client:>7}: p50 503 ms per burst {medians}")
        if results[arm].get("proxy_p50_503_ms") is not None:  # the Python proxy arms
            print(f"{arm:>24}: the Python proxy's own p50 per 503 {results[arm]['proxy_p50_503_ms']} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
