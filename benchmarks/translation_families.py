"""The two encoder-decoder families from random weights on Multi30k English -> German, in this
process, for the same wall time each, one after the other in one run:

    (a) baseline: `t5` (pre-norm, relative positions, embeddings at N(0, 1))
    (b) `bart` (post-norm, learned positions, embeddings x sqrt(hidden))

Both at the same sizes (hidden 256, 3 + 3 layers, 4 heads, MLP 1024, 128 positions), on the same 8,000-token
cased WordPiece over both languages (components.tokenize), rows tokenized as the translation task
does and batches cut as fine-tuning cuts them; AdamW at 1e-3, 400 warmup steps then linear decay
over `--epochs`, batch 64, label smoothing 0.1, clipping 1.0. Every `--eval-every` steps: greedy
corpus BLEU (sacrebleu, default 13a) on the first 300 validation pairs. No pre-training: this
compares how fast each layout learns the task, not the pipeline.

    python benchmarks/translation_families.py [--minutes 20] [--families t5,bart] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import sacrebleu  # noqa: E402
import torch  # noqa: E402

from components import finetune, models  # noqa: E402
from components.schemas import ModelConfig, TokenizeConfig  # noqa: E402
from components.tasks import IGNORE, task_type  # noqa: E402
from components.tokenize import train_tokenizer  # noqa: E402
from components.vocab import special_ids  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "multi30k"
SIZES = {"hidden_size": 256, "num_layers": 3, "num_heads": 4, "intermediate_size": 1024, "max_positions": 128}
TRANSLATION = task_type("translation")
SEQ_LEN, BATCH, WARMUP, EVAL_ROWS = 64, 64, 400, 300


def _pairs(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _tokenized(tokenizer, pairs: list[dict]) -> dict[str, torch.Tensor]:
    table = pa.table({"text": [row["en"] for row in pairs], "label": [row["de"] for row in pairs]})
    columns = TRANSLATION.tokenize(table, tokenizer, SEQ_LEN, {})
    return {name: torch.tensor(columns[name].to_pylist()) for name in ("input_ids", "attention_mask", "label")}


def _bleu(model, tokenizer, validation: dict, references: list[str]) -> float:
    model.eval()
    guesses = []
    for start in range(0, EVAL_ROWS, 100):
        batch = finetune._batch(validation, torch.arange(start, start + 100), "cpu", TRANSLATION)
        guesses += TRANSLATION.generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], num_beams=1)
    model.train()
    return sacrebleu.corpus_bleu(guesses, [references]).score


def train_family(family: str, tokenizer, train: dict, validation: dict, references: list[str], args) -> dict:
    torch.manual_seed(0)
    model = models.build_lm(
        ModelConfig(family=family, dropout=0.1, **SIZES),
        vocab_size=len(tokenizer),
        special_ids=special_ids(tokenizer),
        seed=0,
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    total = args.epochs * (len(train["label"]) // BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / WARMUP, max(0.0, (total - step) / (total - WARMUP)))
    )
    points, step, start = [], 0, time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    while time.perf_counter() - start < args.minutes * 60:
        order = torch.randperm(len(train["label"]), generator=generator)
        for first in range(0, len(order) - BATCH + 1, BATCH):
            batch = finetune._batch(train, order[first : first + BATCH], "cpu", TRANSLATION)
            logits = TRANSLATION.forward(model, batch).logits
            loss = finetune.task_loss(logits, batch["labels"], label_smoothing=0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            out_of_time = time.perf_counter() - start >= args.minutes * 60
            if step % args.eval_every == 0 or out_of_time:
                elapsed = time.perf_counter() - start
                point = {"step": step, "epoch": step * BATCH / len(order), "seconds": elapsed, "loss": loss.item()}
                point["bleu"] = _bleu(model, tokenizer, validation, references)
                points.append(point)
                print(f"{family}: {json.dumps(point)}", flush=True)
            if out_of_time:
                break
    return {"family": family, "parameters": models.count_parameters(model), "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall time per family")
    parser.add_argument("--families", default="t5,bart")
    parser.add_argument("--epochs", type=int, default=8, help="the LR schedule's length")
    parser.add_argument("--eval-every", type=int, default=450, help="steps between BLEU evaluations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "translation_families.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_pairs, validation_pairs = _pairs("train"), _pairs("validation")[:EVAL_ROWS]
    texts = [row[side] for row in train_pairs for side in ("en", "de")]
    tokenizer = train_tokenizer(texts, TokenizeConfig(vocab_size=8000, lowercase=False, seq_len=SEQ_LEN))
    train, validation = _tokenized(tokenizer, train_pairs), _tokenized(tokenizer, validation_pairs)
    references = [row["de"] for row in validation_pairs]
    used = float((train["label"] != IGNORE).sum(1).float().mean())
    print(f"{len(train_pairs)} pairs, target tokens per row {used:.1f} of {SEQ_LEN}", flush=True)
    results = [
        train_family(family, tokenizer, train, validation, references, args) for family in args.families.split(",")
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"minutes": args.minutes, "sizes": SIZES, "results": results}, indent=2))
    for result in results:
        last = result["points"][-1] if result["points"] else {}
        print(f"{result['family']}: {result['parameters'] / 1e6:.1f}M parameters, last point {last}")


if __name__ == "__main__":
    main()
