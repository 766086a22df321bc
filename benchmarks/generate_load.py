"""Served generation against the same model's `generate()` in-process, in the same run:

    (a) baseline: transformers' `model.generate()` on a batch of 8 prompts, sampling (temperature 1,
        top_p 0.9), up to `max_new_tokens` each (a row ends at the end token, as on the server), in
        this process, with the replica's torch threads
    (b) ptft's Serve app: 8 closed-loop HTTP clients on 127.0.0.1, each POSTing /generate with the
        same settings (whole answers), and again streamed (server-sent events); once per
        `serve.generation_decoder` (decoding in a process of its own, then in a replica thread)
        and per Serve ingress (HAProxy, as on the clusters ptft starts, then Serve's Python
        proxy), each ingress on a local Ray of its own

Reported: generated tokens per second of each, and (b)/(a); target >= 0.7. (a) runs before and
after (b), and (a) is their mean. Also the time to the first streamed token at 8 clients.

    python benchmarks/generate_load.py [--model HF_FOLDER] [--seconds 20] [--new-tokens 64] [--decoders process,thread]
        [--ingresses haproxy,proxy] [--json out.json]

Without --model it builds a 4-layer GPT-2 (hidden 256, 256 positions) with random weights on a
byte-level BPE tokenizer trained here: the cost of decoding does not depend on what was learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp  # noqa: E402

from benchmarks.serve_load import free_port, wait_answering  # noqa: E402
from components import ingress  # noqa: E402

PROMPT = "the plot was dull but the film is moving and the acting"
CLIENTS = 8
THREADS = 1  # torch threads: the replica's (cpus_per_replica 1) and the baseline's
SAMPLING = {"temperature": 1.0, "top_p": 0.9}


def build_model(folder: Path) -> Path:
    from components import models
    from components import tokenize as tok
    from components.schemas import ModelConfig, TokenizeConfig
    from components.vocab import special_ids

    corpus = [PROMPT, "a superb and moving film .", "the story is tedious and the cast is weak ."] * 50
    tokenizer = tok.train_tokenizer(corpus, TokenizeConfig(algorithm="bpe", vocab_size=2000, min_frequency=1))
    tokenizer.model_max_length = 256
    cfg = ModelConfig(family="gpt2", preset="mini", max_positions=256)
    model = models.build_lm(cfg, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def baseline(model_dir: Path, new_tokens: int, seconds: float) -> dict:
    """`generate()` on batches of CLIENTS prompts, back to back, for `seconds`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.generation import prompt_ids
    from components.vocab import separator_id

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt_ids(tokenizer, PROMPT)] * CLIENTS)
    options = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=separator_id(tokenizer),  # a row ends at the end token, as a served one does
        **SAMPLING,
    )
    with torch.inference_mode():
        model.generate(ids, **options)  # warm-up
        tokens, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            output = model.generate(ids, **options)[:, ids.shape[1] :]
            # the tokens each row made before its end token (after it: padding), as /generate counts them
            ended = (output == separator_id(tokenizer)).int().cumsum(-1) > 0
            tokens += int((~ended).sum())
        elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1)}


async def clients(url: str, new_tokens: int, seconds: float, stream: bool) -> dict:
    """CLIENTS closed-loop clients; counts the tokens of every answer."""
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "stream": stream, **SAMPLING}
    counts = {"tokens": 0, "requests": 0, "errors": 0}
    first_token_s: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(f"{url}/generate", json=body) as response:
                if response.status != 200:
                    counts["errors"] += 1
                    await response.read()
                    continue
                if not stream:
                    counts["tokens"] += (await response.json())["tokens"]
                else:
                    last = None
                    async for line in response.content:
                        if line.strip():
                            if last is None:
                                first_token_s.append(time.perf_counter() - started)
                            last = json.loads(line[len(b"data: ") :])
                    counts["tokens"] += last["tokens"]
            counts["requests"] += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - started
    result = {**counts, "seconds": round(elapsed, 2), "tokens_per_s": round(counts["tokens"] / elapsed, 1)}
    if first_token_s:
        result["p50_first_token_ms"] = round(1000 * statistics.median(first_token_s), 1)
    return result


def deploy(model_dir: Path, port: int, new_tokens: int, decoder: str, stream_interval_s: float | None) -> str:
    from components import serve
    from components.schemas import ServeConfig

    interval = {} if stream_interval_s is None else {"stream_interval_s": stream_interval_s}
    cfg = ServeConfig(
        app_name="bench",
        port=port,
        cpus_per_replica=THREADS,
        max_new_tokens=new_tokens,
        generation_decoder=decoder,
        **interval,
    )
    info = serve.ModelInfo(name="bench", version=str(time.time_ns()), model_uri=str(model_dir))
    return serve.deploy(cfg, info, tracking_uri=None)


# Serve's ingress per arm: the environment a local Ray starts with, given a folder for HAProxy's files.
INGRESSES = {
    "haproxy": ingress.haproxy_env,  # HAProxy, request code on a loop in a thread of the replica's own
    "proxy": lambda files: {ingress.ENABLE: "0"},  # Serve's Python proxy, request code as above
    # HAProxy, request code on the replica's main event loop: as on the clusters ptft starts
    "haproxy_user_loop": lambda files: ingress.cluster_env({}, files),
    # HAProxy plus Serve's other throughput settings (user code and router on the replica's loop,
    # buffered access logs, no logs to stderr, frozen GC after start-up)
    "haproxy_throughput": lambda files: {**ingress.haproxy_env(files), "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


def serve_arms(
    model: Path,
    way: str,
    decoders: list[str],
    new_tokens: int,
    seconds: float,
    stream_interval_s: float | None,
    tag: str,
) -> dict:
    """Each decoder's whole and streamed arms, through one Serve ingress on a local Ray of its own
    (Ray reads the ingress from the environment its processes start with), named after `tag`."""
    import ray
    from ray import serve

    saved = dict(os.environ)
    files = ingress.new_files_folder()
    os.environ.update(INGRESSES[way](files))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    results = {}
    try:
        port = free_port()
        for decoder in decoders:
            url = deploy(model, port, new_tokens, decoder, stream_interval_s)
            wait_answering(url)
            for stream in (False, True):
                asyncio.run(clients(url, new_tokens, 3, stream))  # warm-up
                name = f"{tag}_{decoder}_{'streamed' if stream else 'whole'}"
                results[name] = asyncio.run(clients(url, new_tokens, seconds, stream))
                print(f"{tag} ingress, decoder {decoder}, {'streamed' if stream else 'whole'}: {results[name]}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(files, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Hugging Face causal-LM folder (default: build one)")
    parser.add_argument("--seconds", type=float, default=20, help="per measurement")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--decoders", default="process,thread", help="serve.generation_decoder values to serve with, one after another"
    )
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "generate_load.json")
    parser.add_argument("--stream-interval", type=float, help="serve.stream_interval_s (default: the config's)")
    parser.add_argument(
        "--ingresses", default="haproxy,proxy", help=f"Serve ingresses, one after another, of {sorted(INGRESSES)}"
    )
    args = parser.parse_args()

    model = args.model or build_model(Path(tempfile.mkdtemp(prefix="generate-load-")) / "model")
    results: dict = {"model": str(model), "clients": CLIENTS, "new_tokens": args.new_tokens, "threads": THREADS}
    # The baseline before and after the served arms: this shared machine's speed drifts by more
    # than the gap measured, so each ratio is against the mean of the two.
    before = baseline(model, args.new_tokens, args.seconds)
    print(f"in-process generate() batch {CLIENTS}, before: {before}", flush=True)
    ways, decoders = args.ingresses.split(","), args.decoders.split(",")
    # An ingress named again is measured again (e.g. a,b,b,a against drift), its results tagged a#2.
    tags = [
        way if ways[:index].count(way) == 0 else f"{way}#{ways[:index].count(way) + 1}"
        for index, way in enumerate(ways)
    ]
    for way, tag in zip(ways, tags, strict=True):
        results.update(serve_arms(model, way, decoders, args.new_tokens, args.seconds, args.stream_interval, tag))
    after = baseline(model, args.new_tokens, args.seconds)
    print(f"in-process generate() batch {CLIENTS}, after: {after}", flush=True)
    base = round((before["tokens_per_s"] + after["tokens_per_s"]) / 2, 1)
    results["in_process_generate"] = {"before": before, "after": after, "mean_tokens_per_s": base}
    results["ratios"] = {
        f"{tag}_{decoder}_{how}_over_generate": round(results[f"{tag}_{decoder}_{how}"]["tokens_per_s"] / base, 3)
        for tag in tags
        for decoder in decoders
        for how in ("whole", "streamed")
    }
    print(json.dumps(results["ratios"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
