"""Batch predictions on Ray Data: a pool of actors, each holding one model, answering a table's rows
as `POST /predict` answers texts (components/scoring.py `Scorer`, the task type's `predict`)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa

PREDICTION = "prediction"  # the output's column: each row's answer


class BatchScorer:
    """One actor of the pool: the model loaded once, then one batch of rows at a time.

    `inputs` maps what the model reads to the table's columns: `{"text": "review"}`, or
    `{"question": ..., "context": ...}` for a question answering model.
    """

    def __init__(self, model_uri: str, tracking_uri: str | None, inputs: dict[str, str], threads: int = 1):
        from components.scoring import Scorer

        self.scorer = Scorer(model_uri, tracking_uri, threads=threads)
        self.inputs = inputs

    def __call__(self, batch: pa.Table) -> dict[str, list[str]]:
        columns = {name: batch.column(column).to_pylist() for name, column in self.inputs.items()}
        if set(columns) == {"text"}:
            items = columns["text"]
        else:  # question answering: {"question": ..., "context": ...} per row
            items = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        if problem := self.scorer.task.input_problem(items):
            raise ValueError(problem)  # the driver checked the columns; a model of another type says so here
        # JSON text: each batch's answers have one Arrow type however their lists and nulls fall.
        return {PREDICTION: [json.dumps(answer) for answer in self.scorer(items)]}


BLOCKS_PER_WORKER = 8  # enough that the workers finish close together
MOST_ROWS_A_BLOCK = 1024  # the driver's progress moves a block at a time


def block_rows(rows: int, batch_size: int, workers: int) -> int:
    """Rows a block of the dataset holds: whole batches (at least one), as many as leave each worker
    `BLOCKS_PER_WORKER` blocks, at most `MOST_ROWS_A_BLOCK` unless one batch is more. Each block
    costs Ray a task, an object and a scheduling round: one a batch cost more than small models'
    forward passes."""
    batches = -(-rows // (workers * BLOCKS_PER_WORKER * batch_size))
    return batch_size * max(1, min(batches, MOST_ROWS_A_BLOCK // batch_size))


def predictions(
    table: pa.Table,
    model_uri: str,
    tracking_uri: str | None,
    inputs: dict[str, str],
    *,
    batch_size: int,
    workers: int,
    cpus_per_worker: int = 1,
) -> Iterator[list[dict]]:
    """Every row's answer, batch by batch in the table's order, from `workers` actors on the
    connected Ray cluster, each taking `cpus_per_worker` CPUs and as many torch threads."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    needed = table.select(sorted(set(inputs.values())))
    rows = block_rows(needed.num_rows, batch_size, workers)
    blocks = [needed.slice(start, rows) for start in range(0, needed.num_rows, rows)]
    answered = ray.data.from_arrow(blocks).map_batches(
        BatchScorer,
        fn_constructor_args=(model_uri, tracking_uri, inputs, cpus_per_worker),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
    )
    for batch in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield [json.loads(answer) for answer in batch.column(PREDICTION).to_pylist()]
