"""How fast and how polite is the Serve application? Closed-loop HTTP clients on 127.0.0.1 against

    (a) ptft's Ray Serve app (components.serve: FastAPI ingress, @serve.batch, limits), one replica
    (b) a bare FastAPI + uvicorn app scoring each request alone (no batching), one process

with the same model, the same scorer and the same torch threads, in the same run:

    1. p50/p99 latency and requests/s at concurrency 1, 8 and 64, for (a) and (b)
       targets at 8: p99(a) <= 1.5 x p99(b), rps(a) >= 0.7 x rps(b); no errors at nominal load
    2. (a) with batching on vs off (max_batch_size 16 vs 1) at concurrency 32: target >= 2x rps
    3. an overload burst of 10x (a)'s capacity (max_ongoing + max_queued requests): the share of
       fast 503s, p99 of the accepted requests, and the time until a probe is answered normally

    python benchmarks/serve_load.py [--model HF_FOLDER] [--seconds 10] [--json out.json]

Without --model it builds a 4-layer BERT classifier (hidden 256) with random weights: serving
cost does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp  # noqa: E402
import requests  # noqa: E402

from components import ingress  # noqa: E402
from components.net import free_port  # noqa: E402

TEXT = "the plot was dull but the film is moving and the acting very good , not tedious at all ."
THREADS = 1  # torch threads per scorer, in both apps


def build_model(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(TEXT.split()) | set("a superb great bad movie story".split()))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=128)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- (b) bare uvicorn

BARE_APP = """
import sys
from fastapi import FastAPI
from pydantic import BaseModel
from components.serve import Scorer

scorer = Scorer(sys.argv[1], None, threads=int(sys.argv[3]))
app = FastAPI()

class Body(BaseModel):
    texts: list[str]

@app.post("/predict")
def predict(body: Body) -> dict:
    return {"predictions": scorer(body.texts)}

import uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def start_bare(model: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", BARE_APP, str(model), str(port), str(THREADS)], env=env)
    wait_answering(f"http://127.0.0.1:{port}")
    return process


def wait_answering(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.post(f"{url}/predict", json={"texts": [TEXT]}, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer")


# --------------------------------------------------------------------------- (a) ptft on Ray Serve


def deploy_serve(model: Path, port: int, **settings) -> str:
    from components import serve
    from components.schemas import ServeConfig

    cfg = ServeConfig(app_name="bench", port=port, num_replicas=1, cpus_per_replica=THREADS, **settings)
    info = serve.ModelInfo(name="bench", version=str(time.time_ns()), model_uri=str(model))
    return serve.deploy(cfg, info, tracking_uri=None)


# --------------------------------------------------------------------------- load


async def closed_loop(url: str, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients, each sending its next request when the last is answered."""
    latencies, statuses = [], {}
    deadline = time.perf_counter() + seconds
    payload = {"texts": [TEXT]}

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/predict", json=payload) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as error:
                status = type(error).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summary(latencies, statuses, elapsed)


def percentile_ms(seconds: list[float], q: float, digits: int = 2) -> float | None:
    """The q-quantile (nearest rank) of durations in seconds, in milliseconds; None for none."""
    ordered = sorted(seconds)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], digits) if ordered else None


def summary(latencies: list[float], statuses: dict, elapsed: float) -> dict:
    def pct(q: float) -> float | None:
        return percentile_ms(latencies, q)

    errors = {str(status): count for status, count in statuses.items() if status != 200}
    return {
        "requests": sum(statuses.values()),
        "ok": len(latencies),
        "rps": round(len(latencies) / elapsed, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
    }


async def burst(url: str, requests_count: int) -> dict:
    """`requests_count` requests at once; then probes until one is answered within 2x a calm latency."""
    results = []

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        async with session.post(f"{url}/predict", json={"texts": [TEXT]}) as response:
            await response.read()
            results.append((response.status, time.perf_counter() - started))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        calm = await closed_loop(url, 1, 3)
        await asyncio.gather(*(one(session) for _ in range(requests_count)))
        ended = time.perf_counter()
        while True:
            started = time.perf_counter()
            async with session.post(f"{url}/predict", json={"texts": [TEXT]}) as response:
                await response.read()
                ok = response.status == 200 and time.perf_counter() - started <= 2 * calm["p50_ms"] / 1000
            if ok:
                break
            await asyncio.sleep(0.05)
        recovered_s = time.perf_counter() - ended
    rejected = sorted(seconds for status, seconds in results if status == 503)
    accepted = sorted(seconds for status, seconds in results if status == 200)
    return {
        "requests": requests_count,
        "accepted": len(accepted),
        "rejected_503": len(rejected),
        "other": sorted({status for status, _ in results} - {200, 503}),
        "share_503": round(len(rejected) / requests_count, 3),
        "share_503_under_100ms": round(sum(s < 0.1 for s in rejected) / max(1, len(rejected)), 3),
        "p50_503_ms": round(1000 * statistics.median(rejected), 2) if rejected else None,
        "p99_accepted_ms": percentile_ms(accepted, 0.99),
        "recovered_s": round(recovered_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Hugging Face classifier folder (default: build one)")
    parser.add_argument("--seconds", type=float, default=10, help="per measurement")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()
    import ray
    from ray import serve

    model = args.model or build_model(Path(tempfile.mkdtemp(prefix="serve-load-")) / "model")
    # Serve as on the clusters ptft starts: HAProxy (RAY_SERVE_ENABLE_HA_PROXY=0: the Python proxy),
    # request code on each replica's HTTP loop
    os.environ.update(ingress.local_cluster_env())
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve_port, bare_port = free_port(), free_port()
    bare = start_bare(model, bare_port)
    results: dict = {
        "model": str(model),
        "seconds": args.seconds,
        "threads": THREADS,
        "cpus": os.cpu_count(),
        "ingress": ingress.name(),
        "user_code_in_separate_thread": os.environ.get(ingress.USER_LOOP, "1"),
    }
    try:
        batched = deploy_serve(model, serve_port)
        wait_answering(batched)
        for concurrency in (1, 8, 64):
            for name, url in (("serve", batched), ("bare", f"http://127.0.0.1:{bare_port}")):
                asyncio.run(closed_loop(url, concurrency, 2))  # warm-up
                row = asyncio.run(closed_loop(url, concurrency, args.seconds))
                results[f"{name}_c{concurrency}"] = row
                print(f"{name:>6} c={concurrency:<3} {row}", flush=True)
        results["batching_on_c32"] = asyncio.run(closed_loop(batched, 32, args.seconds))
        unbatched = deploy_serve(model, serve_port, max_batch_size=1)
        asyncio.run(closed_loop(unbatched, 32, 2))
        results["batching_off_c32"] = asyncio.run(closed_loop(unbatched, 32, args.seconds))
        print(f"batching on  c=32 {results['batching_on_c32']}\nbatching off c=32 {results['batching_off_c32']}")
        small = deploy_serve(model, serve_port, max_ongoing_requests=16, max_queued_requests=16)
        capacity = 16 + 16
        results["overload"] = asyncio.run(burst(small, 10 * capacity))
        print(f"overload burst of {10 * capacity}: {results['overload']}", flush=True)
    finally:
        bare.terminate()
        serve.shutdown()
        ray.shutdown()
    c8s, c8b = results["serve_c8"], results["bare_c8"]
    on, off = results["batching_on_c32"], results["batching_off_c32"]
    results["ratios"] = {
        "p99_c8_serve_over_bare": round(c8s["p99_ms"] / c8b["p99_ms"], 3),
        "rps_c8_serve_over_bare": round(c8s["rps"] / c8b["rps"], 3),
        "rps_c32_batching_on_over_off": round(on["rps"] / off["rps"], 3),
        "errors_at_nominal": sum(sum(results[f"serve_c{c}"]["errors"].values()) for c in (1, 8)),
    }
    ratios = results["ratios"]
    print(
        f"\nc=8: p99 serve/bare {ratios['p99_c8_serve_over_bare']} (target <= 1.5), rps serve/bare "
        f"{ratios['rps_c8_serve_over_bare']} (target >= 0.7); batching on/off at c=32 "
        f"{ratios['rps_c32_batching_on_over_off']} (target >= 2); "
        f"errors at c=1,8: {ratios['errors_at_nominal']}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
