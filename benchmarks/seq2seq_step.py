"""A translation fine-tuning step as the translation task runs it now (decoder inputs from the
shifted labels, no `labels` into the model, no KV cache) against the way it ran before (`labels`
passed, so the model also computed its own loss over the whole vocabulary and, for BART, a cache),
interleaved in one process on the same batches:

    python benchmarks/seq2seq_step.py [--families bart,t5] [--steps 20] [--json out.json]

Model: the `mini` preset (hidden 256, 3 + 3 layers) over Multi30k's vocabulary size (8,000), batch
64 x 64 tokens as in configs/multi30k_en_de.yaml; forward, label-smoothed loss and backward, 1
torch thread. Checks first that both ways give the same loss (dropout off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from components import models  # noqa: E402
from components.finetune import task_loss  # noqa: E402
from components.schemas import ModelConfig  # noqa: E402
from components.tasks import task_type  # noqa: E402

VOCAB, BATCH, SEQ = 8000, 64, 64
SPECIAL = {"pad": 0, "bos": 1, "eos": 2}


def with_labels(model, batch: dict):
    """The translation task's forward before: the model given the labels."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


def batches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
        labels = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
        labels[:, SEQ // 2 :] = -100  # targets end halfway, as short captions do
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def step_s(model, forward, batch: dict) -> float:
    started = time.perf_counter()
    loss = task_loss(forward(model, batch).logits, batch["labels"], label_smoothing=0.1)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def measure(family: str, steps: int) -> dict:
    now = task_type("translation").forward
    model = models.build_lm(ModelConfig(family=family, preset="mini"), vocab_size=VOCAB, special_ids=SPECIAL, seed=0)
    data = batches(steps + 2)
    model.eval()
    with torch.no_grad():
        same = [task_loss(forward(model, data[0]).logits, data[0]["labels"]).item() for forward in (now, with_labels)]
    assert abs(same[0] - same[1]) < 1e-5, same
    model.train()
    for forward in (now, with_labels):
        step_s(model, forward, data[1])  # warm-up
    times: dict[str, list[float]] = {"now": [], "with_labels": []}
    for batch in data[2:]:
        times["now"].append(step_s(model, now, batch))
        times["with_labels"].append(step_s(model, with_labels, batch))
    result = {name: round(1000 * statistics.median(values), 1) for name, values in times.items()}
    result = {"median_step_ms": result, "now_over_before": round(result["now"] / result["with_labels"], 3)}
    print(f"{family}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="bart,t5")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "seq2seq_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {family: measure(family, args.steps) for family in args.families.split(",")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"batch": BATCH, "seq_len": SEQ, "vocab": VOCAB, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
