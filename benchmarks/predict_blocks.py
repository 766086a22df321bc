"""How fast does `ptft predict` answer a file, by how it cuts the file into Ray Data blocks? Runs
the batch-inference path (`components.batch_predict.predictions`: an actor pool, each actor one
model) on a local Ray over the same rows two ways, alternated: one block per batch (how it was
until 2026-12-07: a Ray task and object per `--batch-size` rows) and blocks of many batches
(`block_rows`, now). Prints each arm's rows/s and their ratio, and keeps the JSON.

    python benchmarks/predict_blocks.py [--rows 50000] [--batch-size 32] [--workers 2]

The model is `benchmarks/serve_load.py`'s 4-layer BERT classifier (hidden 256), the texts the
demo's synthetic reviews.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def reviews(rows: int):
    import pyarrow as pa

    from components import synthetic

    texts = [row["text"] for row in synthetic.generate("test", rows, seed=0)]
    return pa.table({"text": texts})


def answer_all(table, model: str, batch_size: int, workers: int) -> float:
    """Seconds to answer every row, in order (checked)."""
    from components.batch_predict import predictions

    started = time.perf_counter()
    answered = sum(
        len(batch)
        for batch in predictions(table, model, None, {"text": "text"}, batch_size=batch_size, workers=workers)
    )
    seconds = time.perf_counter() - started
    assert answered == table.num_rows, (answered, table.num_rows)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import ray

    from benchmarks.serve_load import build_model
    from components import batch_predict

    many_batches = batch_predict.block_rows
    arms = {
        "a block a batch (before)": lambda rows, batch_size, workers: batch_size,
        "blocks of many batches (now)": many_batches,
    }
    table = reviews(args.rows)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="ptft-predict-blocks-") as folder:
        model = str(build_model(Path(folder) / "model"))
        ray.init(
            address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for _ in range(args.repeats):
                for name, sizing in arms.items():
                    batch_predict.block_rows = sizing
                    seconds[name].append(answer_all(table, model, args.batch_size, args.workers))
                    print(
                        f"{name}: {args.rows / seconds[name][-1]:,.0f} rows/s ({seconds[name][-1]:.1f} s)", flush=True
                    )
        finally:
            batch_predict.block_rows = many_batches
            ray.shutdown()
    rates = {name: args.rows / statistics.median(values) for name, values in seconds.items()}
    before, now = rates.values()
    print(
        "median rows/s: "
        + ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items())
        + f"; ratio {now / before:.2f}"
    )
    if args.json:
        result = {"settings": vars(args), "seconds": seconds, "rows_per_s": rates, "ratio": now / before}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
