"""Is Serve's autoscaling seen to work? ptft's Serve application with `serve.autoscaling` set, under a
load ramp of closed-loop HTTP clients (127.0.0.1): calm (1 client), busy (16 clients), calm again,
while a thread reads the running replicas from `serve.status()` every 0.5 s.

Reports the replicas over time, the p99 latency of each phase (before, during the busy phase before
and after the scale-out, after), the time from the start of the busy phase until the maximum runs
(scale-out) and from its end until one replica is left (scale-in).

    python benchmarks/serve_autoscale.py [--model HF_FOLDER] [--busy-s 60] [--json out.json]

The delays are short here (upscale 2 s, downscale 10 s) so that the whole ramp
fits in a few minutes; ptft's defaults are Serve's own (30 s and 600 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp  # noqa: E402
from serve_load import TEXT, build_model, deploy_serve, free_port, percentile_ms, wait_answering  # noqa: E402

from components import ingress  # noqa: E402

MAX_REPLICAS = 2
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": MAX_REPLICAS,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 2,
    "downscale_delay_s": 10,
}
BUSY_CLIENTS = 16


class ReplicaWatch(threading.Thread):
    """(seconds since start, running replicas, replicas in any state) every `every_s`."""

    def __init__(self, app: str, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.app, self.every_s, self.origin = app, every_s, time.perf_counter()
        self.samples: list[tuple[float, int, int]] = []
        self.stopped = threading.Event()

    def replicas(self) -> tuple[int, int]:
        from ray import serve

        states = [status.replica_states for status in serve.status().applications[self.app].deployments.values()]
        return sum(state.get("RUNNING", 0) for state in states), sum(sum(state.values()) for state in states)

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((round(time.perf_counter() - self.origin, 2), *self.replicas()))
            time.sleep(self.every_s)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def first(self, after_s: float, predicate, running: bool = True) -> float | None:
        """The first sample time at or after `after_s` whose replica count (running ones, or all
        of them, starting included) satisfies `predicate`."""
        return next((t for t, up, every in self.samples if t >= after_s and predicate(up if running else every)), None)


async def load(url: str, clients: int, seconds: float, clock: ReplicaWatch) -> list[tuple[float, float]]:
    """(start time on the watch's clock, latency) of every answered request."""
    answered: list[tuple[float, float]] = []
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            started, at = time.perf_counter(), clock.now()
            async with session.post(f"{url}/predict", json={"texts": [TEXT]}) as response:
                await response.read()
                if response.status == 200:
                    answered.append((at, time.perf_counter() - started))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return answered


def phase(rows: list[tuple[float, float]], start: float, end: float) -> dict:
    inside = [row for row in rows if start <= row[0] < end]
    latencies = [latency for _, latency in inside]
    rps = round(len(inside) / max(end - start, 1e-9), 1)
    return {"requests": len(inside), "p99_ms": percentile_ms(latencies, 0.99, digits=1), "rps": rps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Hugging Face classifier folder (default: build one)")
    parser.add_argument("--calm-s", type=float, default=15, help="1 client, before the busy phase")
    parser.add_argument("--busy-s", type=float, default=60, help=f"{BUSY_CLIENTS} clients")
    parser.add_argument("--after-s", type=float, default=40, help="1 client, after the busy phase")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve_autoscale.json")
    args = parser.parse_args()
    import ray
    from ray import serve

    model = args.model or build_model(Path(tempfile.mkdtemp(prefix="serve-autoscale-")) / "model")
    # Serve as on the clusters ptft starts: HAProxy (RAY_SERVE_ENABLE_HA_PROXY=0: the Python proxy),
    # request code on each replica's HTTP loop
    os.environ.update(ingress.local_cluster_env())
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        url = deploy_serve(model, free_port(), autoscaling=AUTOSCALING)
        wait_answering(url)
        watch = ReplicaWatch("bench")
        watch.start()
        before = asyncio.run(load(url, 1, args.calm_s, watch))
        busy_start = watch.now()
        busy = asyncio.run(load(url, BUSY_CLIENTS, args.busy_s, watch))
        busy_end = watch.now()
        after = asyncio.run(load(url, 1, args.after_s, watch))
        end = watch.now()
        time.sleep(1)
        watch.stopped.set()
        watch.join()
    finally:
        serve.shutdown()
        ray.shutdown()
    decided = watch.first(busy_start, lambda count: count >= MAX_REPLICAS, running=False)
    scaled_out = watch.first(busy_start, lambda count: count >= MAX_REPLICAS)
    scaled_in = watch.first(busy_end, lambda count: count <= 1)
    split = scaled_out if scaled_out is not None and scaled_out < busy_end else busy_end
    results = {
        "ingress": ingress.name(),
        "user_code_in_separate_thread": os.environ.get(ingress.USER_LOOP, "1"),
        "autoscaling": AUTOSCALING,
        "busy_clients": BUSY_CLIENTS,
        "phases_s": {"busy_start": round(busy_start, 2), "busy_end": round(busy_end, 2), "end": round(end, 2)},
        "max_replicas_seen": max(count for _, count, _ in watch.samples),
        "scale_out_decided_s": round(decided - busy_start, 2) if decided is not None else None,
        "scale_out_s": round(scaled_out - busy_start, 2) if scaled_out is not None else None,
        "scale_in_s": round(scaled_in - busy_end, 2) if scaled_in is not None else None,
        "before": phase(before, 0, busy_start),
        "busy_one_replica": phase(busy, busy_start, split),
        "busy_scaled_out": phase(busy, split, busy_end),
        "after": phase(after, busy_end, end),
        "replicas": watch.samples,
    }
    summary = {key: value for key, value in results.items() if key != "replicas"}
    print(json.dumps(summary, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
