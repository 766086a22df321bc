"""Stage 4, finetune: sequence classification from the pre-trained HF folder (BERT- or GPT-2-style)
with the best hyperparameters, under Ray Train + DeepSpeed, with optional early stopping on the
validation loss (the export keeps the best epoch by the sweep's ranking); evaluates on the test split;
loads the exported folder back as a smoke test; registers the model in the MLflow Model Registry.

`fit_classifier` is the one fine-tuning loop: Ray Train workers run it here, and every Tune
trial runs it too (components/tune.py imports it).

Output folder:
    model/           HF folder of the classifier (safetensors, config with id2label, tokenizer)
    metrics.json     validation and test metrics of the exported epoch (`model/epoch` with early stopping)
    registered.json  registered model name, version, aliases, model URI
    plots/           loss and learning-rate curves, the test split's confusion matrix, attention
                     maps of a few test texts (also in MLflow under plots/)
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import ray.train
import torch
from pydantic import BaseModel, Field
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from components import accelerator, explain, models, plots, registry, training
from components.metrics import training_progress
from components.ranking import Ranking
from components.schemas import DeepSpeedConfig, FinetuneConfig, Hyperparameters
from components.scratch import ScratchFolder
from components.stage import StageContext, StageResult, read_json, write_json
from components.tasks import IGNORE, TaskType, task_type
from components.throughput import Throughput, device_name
from components.tracking import node_system_metrics, open_tracker

log = logging.getLogger(__name__)

Report = Callable[[dict, str], None]
ATTENTION_SAMPLES = 3  # test texts whose attention maps the stage draws
SAMPLES = 8  # test rows whose outputs a generating task type logs beside their references
DIVERGED = "diverged.json"  # written by the workers when the loss became NaN/inf


class ClassifierRun(BaseModel):
    """One fine-tuning run as a plain dict for Ray: what `fit_classifier` needs."""

    pretrained_dir: str
    task_dir: str
    label_names: list[str]
    epochs: int
    hyper: Hyperparameters
    deepspeed: DeepSpeedConfig
    use_gpu: bool = False
    threads: int = 1
    log_every: int = 10
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    seed: int = 0
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    resumed: bool = Field(False, description="an earlier attempt may have logged to mlflow_run_id")
    export: bool = Field(False, description="evaluate on test and save the HF folder at the end")
    ranking: Ranking = Field(
        default_factory=lambda: Ranking(metric="eval/loss", mode="min"),
        description="with early stopping, how the exported epoch is picked: the sweep's rule",
    )
    stage: str = Field("finetune", description="the pipeline stage this run belongs to (labels its live metrics)")
    task_type: str = Field("sequence_classification", description="what the rows are and how they are scored")
    task_options: dict[str, int] = Field(
        default_factory=dict, description="how the task's rows were tokenized (seq_len, doc_stride): kept for serving"
    )
    divergence_marker: str = Field("", description="where Ray Train workers say that the loss became NaN/inf")


def run(
    cfg: FinetuneConfig,
    pretrained_uri: str,
    tokenized_uri: str,
    best_uri: str | None,
    ctx: StageContext,
    *,
    registered_model_name: str,
    test_split: str,
    task: str = "sequence_classification",
    ranking: Ranking | None = None,
    task_options: dict[str, int] | None = None,
) -> StageResult:
    """Fine-tune with the best hyperparameters, evaluate on test, register the model.
    `test_split` fingerprints the test data: the champion gate compares only like with like;
    `task` is the task type (components/tasks/); `ranking` picks the exported epoch under early
    stopping (default: the lowest validation loss); `task_options` say how the rows were
    tokenized (seq_len, doc_stride), which the model keeps where serving needs them."""
    hyper, sources = resolve_hyperparameters(cfg.defaults, best_uri, cfg.overrides)
    run_cfg = ClassifierRun(
        pretrained_dir=pretrained_uri,
        task_dir=f"{tokenized_uri}/task",
        label_names=read_json(Path(tokenized_uri) / "labels.json"),
        epochs=cfg.epochs,
        hyper=hyper,
        deepspeed=cfg.deepspeed,
        use_gpu=cfg.workers.use_gpu,
        threads=cfg.workers.cpus_per_worker,
        log_every=cfg.log_every,
        tracking_uri=ctx.tracking_uri,
        mlflow_run_id=ctx.mlflow_run_id,
        seed=ctx.seed,
        resumed=ctx.resumed,
        export=True,
        early_stopping_patience=cfg.early_stopping_patience,
        early_stopping_min_delta=cfg.early_stopping_min_delta,
        task_type=task,
        task_options=task_options or {},
        divergence_marker=str(ctx.output_dir / DIVERGED),
        **({"ranking": ranking} if ranking else {}),
    )
    tracker = open_tracker(ctx.tracking_uri, ctx.mlflow_run_id)
    tracker.log_params({f"hyper.{k}": v for k, v in hyper})
    tracker.log_params({f"hyper_source.{k}": source for k, source in sources.items()})
    (ctx.output_dir / DIVERGED).unlink(missing_ok=True)  # an earlier attempt's
    result = training.fit_on_ray(train_loop_per_worker, run_cfg.model_dump(), cfg.workers, ctx, checkpoints_to_keep=1)
    training.raise_if_diverged(result, ctx.output_dir / DIVERGED, "finetune")
    model_dir, metrics = training.export_final_model(result, ctx.output_dir)
    kind = task_type(task)
    checked = models.smoke_test(model_dir, kind.auto_model)
    open_tracker(ctx.tracking_uri, ctx.mlflow_run_id).set_tags({"ptft.weights_sha256": checked["weights_sha256"]})
    metrics.update(draw_pictures(model_dir, Path(tokenized_uri) / "task" / "test", ctx, kind))
    version = register(model_dir, metrics, ctx, name=registered_model_name, test_split=test_split, task=task)
    write_json(ctx.output_dir / "registered.json", version)
    return StageResult(
        output_uri=str(model_dir),
        metrics=metrics,
        outputs={"registered": version, "weights_sha256": checked["weights_sha256"]},
    )


def register(model_dir: Path, metrics: dict, ctx: StageContext, *, name: str, test_split: str, task: str) -> dict:
    """Register the model in ctx's MLflow run, tagged with the pipeline run and the key of the
    artifact it came from (how a later cache hit finds it in a registry). The champion gate
    compares the task type's headline test metric (accuracy, entity F1)."""
    kind = task_type(task)
    version = registry.register_classifier(
        model_dir,
        name=name,
        run_id=ctx.mlflow_run_id,
        tracking_uri=ctx.tracking_uri,
        test_accuracy=metrics[f"test/{kind.headline}"],
        test_split=test_split,
        lineage={"ptft.pipeline_run_id": ctx.pipeline_run_id, registry.CACHE_KEY_TAG: ctx.cache_key},
        task=kind,
    )
    return {**version, "run_id": ctx.mlflow_run_id}


def draw_pictures(model_dir: Path, test_dir: Path, ctx: StageContext, kind: TaskType) -> dict[str, float]:
    """Training curves; for a type that decodes (translation) its score by epoch; for a type that
    writes text (translation, generation) its outputs for a few test rows; for sentence
    classification the test split's confusion matrix and attention maps of a few test texts; from
    the exported model, into `plots/` and the stage's MLflow run. Returns a classifier's macro F1."""
    folder = ctx.output_dir / "plots"
    tracker = open_tracker(ctx.tracking_uri, ctx.mlflow_run_id)
    pictures = plots.training_curves(tracker, folder, eval_key="eval/loss")
    if kind.generate is not None:  # a decoded score (BLEU): by epoch
        pictures += plots.by_epoch(tracker, f"eval/{kind.headline}", folder / f"{kind.headline}.png")
    if kind.test_samples is not None:  # what it writes for a few test rows
        write_json(folder / "test_samples.json", sample_outputs(model_dir, test_dir, kind))
        pictures.append(folder / "test_samples.json")
    if kind.name != "sequence_classification":  # a per-text confusion matrix and attention maps are its own
        plots.log(tracker, pictures)
        return {}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = training.load_columns(test_dir, ["input_ids", "attention_mask", "label"])
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
    matrix = confusion_matrix(model, test, len(labels))
    pictures.append(
        plots.confusion_matrix(
            matrix, labels, folder / "confusion_matrix.png", title=f"test split ({len(test['label'])} examples)"
        )
    )
    texts = tokenizer.batch_decode(test["input_ids"][:ATTENTION_SAMPLES], skip_special_tokens=True)
    maps = explain.attention_maps(model, tokenizer, texts, max_tokens=test["input_ids"].shape[1])
    pictures.append(plots.attention(maps, folder / "attention.png"))
    write_json(folder / "confusion_matrix.json", {"labels": labels, "rows_true_columns_predicted": matrix})
    plots.log(tracker, [*pictures, folder / "confusion_matrix.json"])
    return {"test/macro_f1": macro_f1(matrix)}


def sample_outputs(model_dir: Path, test_dir: Path, kind: TaskType, count: int = SAMPLES) -> list[dict]:
    """The exported model's output for the first `count` test rows, beside what was expected."""
    model = kind.model_class().from_pretrained(model_dir, use_safetensors=True).eval()
    return kind.test_samples(model, AutoTokenizer.from_pretrained(model_dir), str(test_dir), count)


@torch.inference_mode()
def confusion_matrix(model, split: dict, num_labels: int, batch_size: int = 64) -> list[list[int]]:
    """Counts of (true label, predicted label) over a tokenized split."""
    matrix = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for start in range(0, len(split["label"]), batch_size):
        rows = slice(start, start + batch_size)
        inputs = {"input_ids": split["input_ids"][rows].long(), "attention_mask": split["attention_mask"][rows].long()}
        logits = model(**inputs).logits
        for true, predicted in zip(split["label"][rows].tolist(), logits.argmax(-1).tolist(), strict=True):
            matrix[true, predicted] += 1
    return matrix.tolist()


def macro_f1(matrix: list[list[int]]) -> float:
    """The mean over labels of F1 (a label never predicted nor present counts 0)."""
    scores = []
    for label, row in enumerate(matrix):
        hits, predicted = row[label], sum(other[label] for other in matrix)
        scores.append(2 * hits / (sum(row) + predicted) if sum(row) + predicted else 0.0)
    return sum(scores) / len(scores)


def resolve_hyperparameters(
    defaults: Hyperparameters, best_uri: str | None, overrides: dict[str, float] | None = None
) -> tuple[Hyperparameters, dict[str, str]]:
    """finetune.defaults, under the tune stage's best config, under finetune.overrides; and where
    each value came from: "default", "tune" or "override". Logs what was inherited and overridden."""
    best = read_json(Path(best_uri) / "best_config.json") if best_uri else {}
    overrides = dict(overrides or {})
    sources = {name: "default" for name in Hyperparameters.model_fields}
    sources.update({name: "tune" for name in best})
    sources.update({name: "override" for name in overrides})
    hyper = Hyperparameters.model_validate({**defaults.model_dump(), **best, **overrides})
    inherited = {name: value for name, value in best.items() if name not in overrides}
    overridden = {name: f"{best[name]} -> {value}" if name in best else value for name, value in overrides.items()}
    if best:
        log.info("finetune: inherited from the tune stage's best trial: %s", inherited or "nothing")
    if overridden:
        log.info("finetune: finetune.overrides win: %s", overridden)
    return hyper, sources


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry: the shared loop, reporting to Ray Train, restored from its checkpoint."""
    run = ClassifierRun.model_validate(config)
    with node_system_metrics(run.tracking_uri, run.mlflow_run_id):
        try:
            fit_classifier(run, report=_report_to_train, checkpoint=ray.train.get_checkpoint())
        except training.Diverged as error:
            training.report_divergence(error, run.divergence_marker)


def _report_to_train(metrics: dict, checkpoint_dir: str) -> None:
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def fit_classifier(
    cfg: ClassifierRun, report: Report, checkpoint: ray.train.Checkpoint | None = None
) -> dict[str, float]:
    """Fine-tune a classifier; `report(metrics, checkpoint_dir)` after every epoch. Returns the last metrics.

    Runs in any process with a torch.distributed group (Ray Train worker, or Tune trial with
    `training.ensure_process_group`). Given a checkpoint of an earlier attempt, it continues after
    that checkpoint's epoch with the model, optimizer, schedule and RNGs it saved.
    """
    accelerator.prepare_process(cfg.use_gpu, cfg.threads)
    kind = task_type(cfg.task_type)
    rank, world = _rank_and_world()
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained_dir)
    data = {
        split: training.load_columns(f"{cfg.task_dir}/{split}", ["input_ids", "attention_mask", "label"])
        for split in ("train", "validation", "test")
    }
    shard = training.Shard(rank, world, cfg.hyper.batch_size_per_worker)
    steps = training.steps_for(len(data["train"]["label"]), shard, cfg.epochs)
    engine = _setup_engine(cfg, tokenizer, steps, log_inherited=rank == 0)
    best = BestEpoch(rank, cfg.ranking) if cfg.export and cfg.early_stopping_patience is not None else None
    state = _restore(engine, checkpoint, rank, best)
    if checkpoint is not None:
        # A PBT exploit hands over another trial's checkpoint with new values; elsewhere they are equal.
        training.set_optimizer_hyperparameters(
            engine, learning_rate=cfg.hyper.learning_rate, weight_decay=cfg.hyper.weight_decay
        )
    tracker = open_tracker(
        cfg.tracking_uri, cfg.mlflow_run_id, rank=rank, resumed=checkpoint is not None or cfg.resumed
    )
    # Which process trains this run (the latest attempt's): for an operator, or a fault test, to find it.
    tracker.queue_tags({"ptft.rank0_pid": str(os.getpid()), "ptft.rank0_host": socket.gethostname()})
    done_epochs, step = state["epoch"], state["step"]
    if checkpoint is not None:
        tracker.log_metrics({"restore/loaded_epoch": done_epochs, "restore/first_epoch": done_epochs + 1}, done_epochs)
    tracker.log_metrics({"progress/total_steps": steps}, 0)  # `ptft run` and `ptft status` show step x of this
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta, state)
    meter = Throughput(
        engine.module,
        seq_len=data["train"]["input_ids"].shape[1],
        world=world,
        precision=cfg.deepspeed.precision,
        device_name=device_name(cfg.use_gpu),
    )
    metrics: dict[str, float] = {}
    reported: dict[str, float] = {}

    def evaluate_split(split: str, prefix: str = "eval") -> dict[str, float]:
        kwargs = {"kind": kind, "label_names": cfg.label_names, "split_dir": f"{cfg.task_dir}/{split}"}
        kwargs["tokenizer"] = tokenizer
        return evaluate(engine, data[split], shard, prefix=prefix, **kwargs)

    for epoch in range(done_epochs + 1, cfg.epochs + 1):
        train_loss, step = _train_epoch(engine, data["train"], shard, cfg, epoch, step, tracker, meter)
        validation = evaluate_split("validation")
        metrics = {"train/epoch_loss": train_loss, "epoch": epoch, **validation}
        stop = stopper.update(metrics["eval/loss"])
        last = epoch == cfg.epochs or stop
        if stop:
            metrics.update({"early_stop/epoch": epoch, "early_stop/lowest_loss_epoch": stopper.best_epoch})
            log.info(
                "early stopping after epoch %d: no lower validation loss since epoch %d", epoch, stopper.best_epoch
            )
        exported = last and cfg.export
        if best is not None and (best.improves(validation) or (exported and best.epoch is None)):
            best.keep(engine, tokenizer, epoch, {**validation, **evaluate_split("test", prefix="test")})
        if exported:  # test/* once, at the end: the exported model's
            metrics.update(best.test_metrics() if best is not None else evaluate_split("test", prefix="test"))
        tracker.log_metrics(metrics, epoch)  # this epoch's validation: the history stays true
        tracker.flush()
        reported = best.exported(metrics) if exported and best is not None else metrics
        with ScratchFolder("checkpoint") as checkpoint_dir:
            client_state = {"epoch": epoch, "step": step, **stopper.state(), **(best.state() if best else {})}
            engine.save_checkpoint(str(checkpoint_dir), client_state=client_state)
            training.save_rng(checkpoint_dir, rank, {})
            if best is not None:
                best.save_into(checkpoint_dir / "hf")
            elif exported:
                training.save_hf_folder(engine, tokenizer, checkpoint_dir / "hf")
            report(reported, checkpoint_dir)
        if stop:
            break
    tracker.close()
    if best is not None:
        best.close()
    return reported


class BestEpoch:
    """With early stopping, what the export keeps: the weights of the best epoch by `ranking` (the
    rule the sweep ranked its trials' epochs by), with its validation and test scores, rather than
    the last epoch's, which trained `patience` epochs past the lowest validation loss. Rank 0 holds
    the weights as an HF folder, and every later checkpoint carries them, so a run restored after
    the best epoch exports the same model."""

    def __init__(self, rank: int, ranking: Ranking):
        if ranking.tie_break is None and ranking.metric != "eval/loss":  # equal scores: the lower loss
            ranking = ranking.model_copy(update={"tie_break": "eval/loss"})
        self.rank, self.ranking = rank, ranking
        self.epoch: int | None = None
        self.metrics: dict[str, float] = {}
        self._folder = ScratchFolder("best-epoch")  # removed with it, on errors too
        self.folder = self._folder.path

    def keep(self, engine, tokenizer, epoch: int, metrics: dict[str, float]) -> None:
        shutil.rmtree(self.folder / "hf", ignore_errors=True)
        training.save_hf_folder(engine, tokenizer, self.folder / "hf")  # every rank joins ZeRO-3's gather
        self.epoch, self.metrics = epoch, metrics

    def improves(self, validation: dict[str, float]) -> bool:
        return self.ranking.better(validation, self.metrics if self.epoch is not None else None)

    def test_metrics(self) -> dict[str, float]:
        return {name: value for name, value in self.metrics.items() if name.startswith("test/")}

    def exported(self, last_epoch: dict[str, float]) -> dict[str, float]:
        """The run's final metrics: the last epoch's, with the exported epoch's scores over them."""
        return {**last_epoch, **self.metrics, "model/epoch": self.epoch}

    def state(self) -> dict:
        return {"best_model_epoch": self.epoch, "best_model_metrics": self.metrics}

    def save_into(self, hf_dir: Path) -> None:
        if self.rank == 0 and self.epoch is not None:
            shutil.copytree(self.folder / "hf", hf_dir)

    def restore(self, client_state: dict, checkpoint_dir: Path) -> None:
        self.epoch, self.metrics = client_state.get("best_model_epoch"), client_state.get("best_model_metrics", {})
        if self.rank == 0 and (checkpoint_dir / "hf").is_dir():
            shutil.copytree(checkpoint_dir / "hf", self.folder / "hf", dirs_exist_ok=True)

    def close(self) -> None:
        self._folder.cleanup()


class EarlyStopping:
    """Stop when the validation loss has not dropped by `min_delta` for `patience` epochs. Its state
    travels in the epoch checkpoint, so a restored run decides as an uninterrupted one would."""

    def __init__(self, patience: int | None, min_delta: float, state: dict):
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = float(state.get("best_loss", math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.epoch = int(state.get("epoch", 0))

    def update(self, loss: float) -> bool:
        """Record this epoch's validation loss; True when training should stop."""
        self.epoch += 1
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch = loss, self.epoch
        return self.patience is not None and self.epoch - self.best_epoch >= self.patience

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch}


def _restore(engine, checkpoint: ray.train.Checkpoint | None, rank: int, best: BestEpoch | None) -> dict:
    """The client state (epoch, optimizer steps, early-stopping state) after loading `checkpoint`,
    and the best epoch's model it carries into `best`; zeros without one."""
    if checkpoint is None:
        return {"epoch": 0, "step": 0}
    with checkpoint.as_directory() as checkpoint_dir:
        client_state = training.load_deepspeed_checkpoint(engine, Path(checkpoint_dir))
        training.restore_rng(Path(checkpoint_dir), rank, {})
        if best is not None:
            best.restore(client_state, Path(checkpoint_dir))
    log.info("rank %d: restored after epoch %d", rank, client_state["epoch"])
    return {**client_state, "epoch": int(client_state["epoch"]), "step": int(client_state["step"])}


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _setup_engine(cfg: ClassifierRun, tokenizer, micro_steps: int, *, log_inherited: bool):
    """The pre-trained encoder with a fresh classification head; architecture inherited, dropout overridden.
    The LR schedule runs over optimizer steps (micro-batches / gradient accumulation)."""
    optimizer_steps = math.ceil(micro_steps / cfg.deepspeed.gradient_accumulation_steps)
    pretrained = AutoConfig.from_pretrained(cfg.pretrained_dir)
    dropout = models.dropout_overrides(pretrained.model_type, cfg.hyper.dropout, cfg.hyper.attention_dropout)
    if log_inherited:
        log.info(
            "inherited %s model hidden_size=%s num_layers=%s vocab_size=%s from pretrain",
            pretrained.model_type,
            pretrained.hidden_size,
            pretrained.num_hidden_layers,
            pretrained.vocab_size,
        )
        log.info(
            "NOTE: dropout %s overrides the pretrained %s",
            dropout,
            {key: getattr(pretrained, key, None) for key in dropout},
        )
    torch.manual_seed(cfg.seed)
    kind = task_type(cfg.task_type)
    model = kind.model_class().from_pretrained(
        cfg.pretrained_dir,
        use_safetensors=True,
        num_labels=len(cfg.label_names),
        id2label=dict(enumerate(cfg.label_names)),
        label2id={name: i for i, name in enumerate(cfg.label_names)},
        # decoders classify from the last token that is not padding
        pad_token_id=pretrained.pad_token_id if pretrained.pad_token_id is not None else tokenizer.pad_token_id,
        **dropout,
    )
    for key, value in kind.model_settings(cfg.task_dir, **cfg.task_options).items():  # kept in its config.json
        setattr(model.config, key, value)
    return training.build_engine(
        model,
        ds=cfg.deepspeed,
        micro_batch_size=cfg.hyper.batch_size_per_worker,
        learning_rate=cfg.hyper.learning_rate,
        weight_decay=cfg.hyper.weight_decay,
        warmup_steps=int(cfg.hyper.warmup_ratio * optimizer_steps),
        total_steps=optimizer_steps,
    )


def _train_epoch(
    engine, train: dict, shard: training.Shard, cfg: ClassifierRun, epoch: int, step: int, tracker, meter: Throughput
):
    kind = task_type(cfg.task_type)
    losses = []
    meter.reset()
    for rows in shard.epoch_batches(len(train["label"]), epoch=epoch, seed=cfg.seed):
        batch = _batch(train, rows, engine.device, kind)
        output = kind.forward(engine, batch)
        loss = task_loss(kind.logits(output), batch["labels"], label_smoothing=cfg.hyper.label_smoothing)
        engine.backward(loss)
        training.optimizer_step(engine)
        step += 1
        losses.append(loss.item())
        training.stop_if_diverged(losses[-1], step)
        meter.add(samples=len(rows) * shard.world_size, tokens=batch["input_ids"].numel() * shard.world_size)
        if step % cfg.log_every == 0:
            metrics = {
                "train/loss": losses[-1],
                "train/learning_rate": engine.get_lr()[0],
                "train/step": step,
                **meter.read(),
            }
            if (norm := training.grad_norm(engine)) is not None:
                metrics["train/grad_norm"] = norm
            tracker.log_metrics(metrics, step)
            if shard.rank == 0:
                training_progress(
                    cfg.stage,
                    cfg.mlflow_run_id,
                    step=step,
                    loss=losses[-1],
                    tokens_per_s=metrics.get("throughput/tokens_per_s"),
                )
            meter.reset()
    mean = sum(losses) / max(1, len(losses))
    return training.all_reduce_sum([mean])[0] / shard.world_size, step


def task_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy at the labelled positions: one label per row, one per token (IGNORE where
    there is none), or a start and an end token per window (question answering): the same loss."""
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing
    )


def _batch(split: dict, rows: torch.Tensor, device, kind: TaskType) -> dict[str, torch.Tensor]:
    """The rows' columns, cut after the last position any of them uses. Rows are padded to the
    split's seq_len, and padding that every row of a batch has is work that changes no result:
    Multi30k's captions average 16 tokens of 64."""
    mask = split["attention_mask"][rows]
    width = _used_width(mask != 0)
    labels = split["label"][rows]
    if kind.target_sequence:
        labels = labels[:, : _used_width(labels != IGNORE)]
    elif labels.shape == mask.shape:  # one label per input position
        labels = labels[:, :width]
    return {
        "input_ids": split["input_ids"][rows][:, :width].long().to(device),
        "attention_mask": mask[:, :width].long().to(device),
        "labels": labels.long().contiguous().to(device),
    }


def _used_width(used: torch.Tensor) -> int:
    """One past the last column where any row is used (at least 1)."""
    columns = used.any(0).nonzero()
    return int(columns.max()) + 1 if len(columns) else 1


@torch.no_grad()
def evaluate(
    engine,
    split: dict,
    shard: training.Shard,
    *,
    kind: TaskType,
    label_names: list[str],
    prefix: str = "eval",
    split_dir: str | None = None,
    tokenizer=None,
) -> dict[str, float]:
    """Loss over the whole split's labelled positions (summed across ranks), and the task type's
    scores of every rank's predictions together: each position's most likely label, or for a task
    type that generates (translation) each row's decoded text, scored against the row's number."""
    engine.eval()
    loss_sum, count = 0.0, 0.0
    gold, guess = [], []
    for rows, counted in shard.eval_batches(len(split["label"])):
        # Every rank forwards (and generates) each batch; past `counted` are repeated rows.
        batch = _batch(split, rows, engine.device, kind)
        logits = kind.logits(kind.forward(engine, batch))[:counted]
        if kind.generate is not None:
            generated = kind.generate(engine.module, tokenizer, batch["input_ids"], batch["attention_mask"])
        if not counted:
            continue
        rows, targets = rows[:counted], batch["labels"][:counted]
        labels = targets.reshape(counted, -1)  # a row's labels: one, or one per position
        kept = labels != IGNORE
        loss_sum += task_loss(logits, targets).item() * float(kept.sum())
        count += float(kept.sum())
        if kind.generate is not None:
            gold += rows.tolist()
            guess += generated[:counted]
            continue
        for row, row_labels, row_logits, row_kept in zip(rows.tolist(), labels, logits, kept, strict=True):
            row_gold, row_guess = kind.evaluated(row_labels, row_logits, row_kept, row)
            gold.append(row_gold)
            guess.append(row_guess)
    engine.train()
    loss_sum, count = training.all_reduce_sum([loss_sum, count])
    scores = kind.scores(training.gather_rows(gold), training.gather_rows(guess), label_names, split_dir)
    return {f"{prefix}/loss": loss_sum / max(count, 1), **{f"{prefix}/{name}": value for name, value in scores.items()}}
