"""Where does a 503 spend its time? The overload burst of `serve_load.py` (10x the capacity of an
application with `max_ongoing_requests` 16 and `max_queued_requests` 16: 320 requests at once, one
aiohttp client process, 127.0.0.1), against arms that each start fresh, one after the other:

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

For each: the client's time to each 503 (median, p90, first and last tenth by arrival) and, for the
Serve arms, the proxy's own handling time per 503 from its access log, so that
(client time - proxy time) is the time a rejection waited before the proxy looked at it.

    python benchmarks/serve_overload.py [--model HF_FOLDER] [--repeats 3] [--arms floor,serve_haproxy] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
# Each arm's environment, made when the arm starts (the HAProxy arm takes free ports then).
ARMS = {
    "floor": dict,
    "serve": lambda: PYTHON_PROXY,
    "serve_same_loop": lambda: {**PYTHON_PROXY, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
    "serve_quiet_proxy": lambda: PYTHON_PROXY,
    "serve_haproxy": ingress.haproxy_env,
    "serve_haproxy_user_loop": lambda: ingress.cluster_env({}),  # as on the clusters ptft starts
}

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


async def burst(url: str, count: int) -> list[tuple[int, float, float]]:
    """`count` requests at once: (status, seconds to the answer, seconds from the burst's start to
    the request's start), in the order the client started them."""
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


def run_floor(repeats: int) -> dict:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _ready(f"{url}/ready"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the floor app at {url} did not start")
            time.sleep(0.2)
        return {"runs": [summarise(asyncio.run(burst(url, BURST))) for _ in range(repeats)]}
    finally:
        process.terminate()


def run_serve(arm: str, model: Path, repeats: int) -> dict:
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
        runs = []
        for _ in range(repeats):
            runs.append(summarise(asyncio.run(burst(url, BURST))))
            time.sleep(3)  # the accepted ones drain
        proxy = proxy_times_ms(temp)
        return {
            "runs": runs,
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
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve_overload.json")
    args = parser.parse_args()
    if args.arm:
        result = run_floor(args.repeats) if args.arm == "floor" else run_serve(args.arm, args.model, args.repeats)
        print("ARM " + json.dumps(result), flush=True)
        return
    model = args.model or build_model(Path(tempfile.mkdtemp(prefix="serve-overload-")) / "model")
    results: dict = {"burst": BURST, "max_ongoing_requests": ONGOING, "max_queued_requests": QUEUED}
    for arm in args.arms.split(","):
        make_env = ARMS[arm]
        command = [sys.executable, __file__, "--arm", arm, "--model", str(model), "--repeats", str(args.repeats)]
        done = subprocess.run(command, env={**os.environ, **make_env()}, capture_output=True, text=True)
        line = next((line for line in done.stdout.splitlines() if line.startswith("ARM ")), None)
        if line is None:
            raise SystemExit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
        results[arm] = json.loads(line[4:])
        medians = [run["p50_503_ms"] for run in results[arm]["runs"]]
        print(f"{arm:>18}: p50 503 ms per burst {medians}; proxy p50 {results[arm].get('proxy_p50_503_ms')}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
