"""How much memory does `ptft predict`'s driver need to write its output? Writes N rows with a
classifier's answers in each output format two ways, each in a process of its own: every answer
held, then the file written in one go (how `ptft predict` wrote until 2026-12-07: the baseline),
and the answers written batch by batch as they come (how it writes now). Prints each arm's peak
memory above the input table's, their ratio, and the write times, and keeps the JSON.

    python benchmarks/predict_memory.py [--rows 1000000] [--json predict_memory.json]

No model and no Ray: the answers are made up (a label, a score, a flag per row, 32 rows a batch,
as `--batch-size` gives them), so the numbers are the writing's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = 32  # ptft predict's default --batch-size
FORMATS = (".jsonl", ".parquet", ".csv")


def input_table(rows: int):
    """The rows, made in Arrow (no Python list of them to inflate the peak): an id and a review."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(np.arange(rows))
    text = pc.binary_join_element_wise("review number ", pc.cast(ids, pa.string()), ": good, moving, then dull", "")
    return pa.table({"id": ids, "text": text})


def answers(first: int, rows: int) -> list[dict]:
    return [
        {"label": "positive" if i % 2 else "negative", "score": 0.5 + (i % 50) / 100, "truncated": False}
        for i in range(first, min(rows, first + BATCH))
    ]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def arm(rows: int, suffix: str, streamed: bool, folder: str) -> dict:
    """One write, in this process: the memory above the input table's at its peak, and its time."""
    sys.path.insert(0, str(REPO))
    from pipelines import predict

    table = input_table(rows)
    before = peak_mb()
    started = time.perf_counter()
    batches = (answers(first, rows) for first in range(0, rows, BATCH))
    if not streamed:  # every answer held first, then written as one batch
        batches = [[answer for batch in batches for answer in batch]]
    output = Path(folder) / f"{'streamed' if streamed else 'held'}{suffix}"
    predict._write(output, table, batches)
    return {
        "suffix": suffix,
        "streamed": streamed,
        "rows": rows,
        "table_mb": round(table.nbytes / 2**20, 1),
        "peak_above_table_mb": round(peak_mb() - before, 1),
        "write_s": round(time.perf_counter() - started, 2),
        "output_mb": round(output.stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--arm", nargs=3, metavar=("SUFFIX", "STREAMED", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        suffix, streamed, folder = args.arm
        print(json.dumps(arm(args.rows, suffix, streamed == "1", folder)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="ptft-predict-memory-") as folder:
        for suffix in FORMATS:
            pair = {}
            for streamed in (False, True):
                command = [
                    sys.executable,
                    __file__,
                    "--rows",
                    str(args.rows),
                    "--arm",
                    suffix,
                    str(int(streamed)),
                    folder,
                ]
                pair[streamed] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            held, streamed = pair[False], pair[True]
            ratio = streamed["peak_above_table_mb"] / held["peak_above_table_mb"] if held["peak_above_table_mb"] else 0
            print(
                f"{suffix:9} {args.rows:,} rows (table {held['table_mb']} MB, output {held['output_mb']} MB): "
                f"held then written {held['peak_above_table_mb']} MB above the table in {held['write_s']} s, "
                f"streamed {streamed['peak_above_table_mb']} MB in {streamed['write_s']} s; ratio {ratio:.2f}"
            )
            results.append({"held": held, "streamed": streamed, "peak_ratio": round(ratio, 3)})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
