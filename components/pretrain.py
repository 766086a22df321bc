"""Stage 2, pretrain: masked-LM (BERT-style), causal-LM (GPT-2-style) or span-corruption (T5-style
encoder-decoder) pre-training under Ray Train, every step through a DeepSpeed engine, from random
weights or a checkpoint (`init_from`). Ends with a plain HF folder (safetensors + config +
tokenizer), loaded back and run once as a smoke test, its weights hash recorded in MLflow.

Output folder:
    model/           save_pretrained folder of the *ForMaskedLM / *ForCausalLM / *ForConditionalGeneration,
                     with the tokenizer
    metrics.json     final metrics
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import ray.train
import torch
from pydantic import BaseModel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from components import accelerator, models, plots, training
from components.metrics import training_progress
from components.schemas import PretrainConfig
from components.scratch import ScratchFolder
from components.stage import StageContext, StageFailure, StageResult
from components.throughput import Throughput, device_name
from components.tracking import node_system_metrics, open_tracker
from components.vocab import separator_id, special_ids

log = logging.getLogger(__name__)


DIVERGED = "diverged.json"


class _WorkerConfig(BaseModel):
    """Everything a worker needs, passed through Ray as a plain dict."""

    stage: PretrainConfig
    blocks_dir: str
    tokenizer_dir: str
    tracking_uri: str
    mlflow_run_id: str
    seed: int
    objective: str
    launched_at: float
    resumed: bool = False
    divergence_marker: str = ""  # where the workers say that the loss became NaN/inf


def run(cfg: PretrainConfig, tokenized_uri: str, ctx: StageContext) -> StageResult:
    """Pre-train on `<tokenized_uri>/pretrain_blocks`; write the HF folder under ctx.output_dir/model."""
    objective = models.objective_for(cfg.model)
    worker_cfg = _WorkerConfig(
        stage=cfg,
        blocks_dir=f"{tokenized_uri}/pretrain_blocks",
        tokenizer_dir=f"{tokenized_uri}/tokenizer",
        tracking_uri=ctx.tracking_uri,
        mlflow_run_id=ctx.mlflow_run_id,
        seed=ctx.seed,
        objective=objective,
        launched_at=time.time(),
        resumed=ctx.resumed,
        divergence_marker=str(ctx.output_dir / DIVERGED),
    )
    check_blocks_fill_a_step(cfg, worker_cfg.blocks_dir)  # here, before a worker group starts
    tracker = open_tracker(ctx.tracking_uri, ctx.mlflow_run_id, resumed=ctx.resumed)
    tracker.log_metrics({"progress/total_steps": cfg.max_steps}, 0)  # `ptft run` and `ptft status` show step x of this
    tracker.flush()
    (ctx.output_dir / DIVERGED).unlink(missing_ok=True)  # an earlier attempt's
    result = training.fit_on_ray(
        train_loop_per_worker, worker_cfg.model_dump(), cfg.workers, ctx, checkpoints_to_keep=2
    )
    training.raise_if_diverged(result, ctx.output_dir / DIVERGED, "pretrain")
    model_dir, metrics = training.export_final_model(result, ctx.output_dir)
    checked = models.smoke_test(model_dir, objective)
    log.info("pretrain: %s loads and runs; weights sha256 %s", model_dir, checked["weights_sha256"])
    tracker.set_tags({"ptft.weights_sha256": checked["weights_sha256"], "ptft.objective": objective})
    plots.log(tracker, plots.training_curves(tracker, ctx.output_dir / "plots"))
    return StageResult(output_uri=str(model_dir), metrics=metrics, outputs=checked)


def check_blocks_fill_a_step(cfg: PretrainConfig, blocks_dir: str) -> None:
    """Raise when the training blocks (those not held out for the eval loss) cannot fill one
    step of every worker's micro-batch, the condition `_batches` would meet in the workers; warn
    when eval_fraction of the blocks rounds down to none held out."""
    import pyarrow.dataset as pads

    blocks = pads.dataset(blocks_dir, format="parquet").count_rows()
    held_out = _held_out(blocks, cfg.eval_fraction)
    if cfg.eval_fraction > 0 and held_out == 0 and blocks:
        log.warning(
            "pretrain: eval_fraction %g of %d blocks holds none out, so there is no eval loss; "
            "set pretrain.eval_fraction to %g or more, or add corpus text",
            cfg.eval_fraction,
            blocks,
            math.ceil(100 / blocks) / 100,  # rounded up: it holds out at least one block
        )
    training_blocks = blocks - held_out
    any_rank = training.Shard(0, cfg.workers.num_workers, cfg.batch_size_per_worker)
    if any_rank.batches_per_epoch(training_blocks) == 0:
        raise StageFailure(_too_few_blocks(training_blocks, any_rank.world_size, any_rank.batch_size))


def _held_out(blocks: int, eval_fraction: float) -> int:
    """How many of the blocks the eval loss reads (none of them are trained on)."""
    return int(blocks * eval_fraction)


def _too_few_blocks(training_blocks: int, workers: int, batch_size: int) -> str:
    return (
        f"{training_blocks} training blocks cannot fill one step of {workers} workers x "
        f"{batch_size}: lower pretrain.batch_size_per_worker or add corpus text"
    )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: masked-LM, causal-LM or span-corruption pre-training through DeepSpeed, checkpoints reported
    to Ray Train, throughput and start-up times logged by rank 0.

    After a failure (Ray Train restarts the worker group) or a resumed pipeline run, the loop
    continues from the last reported checkpoint: model, optimizer, LR schedule, every RNG and the
    data position (the step) come back, so the run ends as an uninterrupted one would.
    """
    cfg = _WorkerConfig.model_validate(config)
    with node_system_metrics(cfg.tracking_uri, cfg.mlflow_run_id):
        try:
            _pretrain(cfg)
        except training.Diverged as error:
            training.report_divergence(error, cfg.divergence_marker)


def _pretrain(cfg: _WorkerConfig) -> None:
    stage = cfg.stage
    accelerator.prepare_process(stage.workers.use_gpu, stage.workers.cpus_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    group_ready = time.time()
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    train_ids, eval_ids = _setup_data(cfg)
    shard = training.Shard(rank, world, stage.batch_size_per_worker)
    engine = _setup_engine(stage, tokenizer, cfg.seed)
    engine_ready = time.time()
    masker = _Targets(
        tokenizer,
        cfg.objective,
        stage.mlm_probability,
        seed=cfg.seed * 1000 + rank,
        noise_density=stage.noise_density,
        mean_span_length=stage.mean_span_length,
    )
    loaded_step, loss = _restore(engine, masker, rank)
    resumed = loaded_step is not None or cfg.resumed
    tracker = open_tracker(cfg.tracking_uri, cfg.mlflow_run_id, rank=rank, resumed=resumed)
    start = loaded_step or 0
    if loaded_step is None:
        tracker.queue_params({"model.parameters": models.count_parameters(engine.module), "world_size": world})
    else:
        _log_restore(tracker, loaded_step, first_step=start + 1)

    meter = Throughput(
        engine.module,
        seq_len=train_ids.shape[1],
        world=world,
        precision=stage.deepspeed.precision,
        device_name=device_name(stage.workers.use_gpu),
    )
    accumulation = stage.deepspeed.gradient_accumulation_steps
    micro_batches = _batches(train_ids, shard, stage.max_steps * accumulation, cfg.seed, start=start * accumulation)
    for step in range(start + 1, stage.max_steps + 1):
        # one optimizer step: DeepSpeed accumulates gradients until the last micro-batch's engine.step()
        losses = [_train_step(engine, masker, train_ids[next(micro_batches)].long()) for _ in range(accumulation)]
        loss = sum(losses) / accumulation
        training.stop_if_diverged(loss, step)
        meter.add(samples=shard.batch_size * accumulation * world)
        if step == start + 1 and loaded_step is None:
            tracker.log_metrics(
                {
                    "startup/worker_group_s": group_ready - cfg.launched_at,
                    "startup/deepspeed_init_s": engine_ready - group_ready,
                    "startup/first_step_s": time.time() - cfg.launched_at,
                },
                step,
            )
        if step == start + 1:
            meter.reset()  # the first step pays one-off costs; throughput is the steady state
        if step % stage.log_every == 0 or step == stage.max_steps:
            metrics = {
                "train/loss": training.all_reduce_sum([loss])[0] / world,
                "train/learning_rate": engine.get_lr()[0],
                "train/step": step,
                **meter.read(),
            }
            if (norm := training.grad_norm(engine)) is not None:
                metrics["train/grad_norm"] = norm
            tracker.log_metrics(metrics, step)
            if rank == 0:  # the loss is already averaged over ranks; one series per run
                training_progress(
                    "pretrain",
                    cfg.mlflow_run_id,
                    step=step,
                    loss=metrics["train/loss"],
                    tokens_per_s=metrics.get("throughput/tokens_per_s"),
                )
            meter.reset()
        if step % stage.checkpoint_every == 0 and step < stage.max_steps:
            tracker.flush()  # what a checkpoint covers is in MLflow before it
            _report(engine, masker, tokenizer, {"train/loss": loss, "train/step": step}, with_hf=False)

    final = {
        "train/loss": loss,
        "train/step": stage.max_steps,
        **_evaluate(engine, masker, eval_ids, shard, cfg.objective),
    }
    tracker.log_metrics(final, stage.max_steps)
    tracker.close()
    _report(engine, masker, tokenizer, final, with_hf=True)


def _restore(engine, masker: _Targets, rank: int) -> tuple[int | None, float]:
    """Load the last reported checkpoint, if any: (its step, its loss), or (None, nan)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, float("nan")
    with checkpoint.as_directory() as checkpoint_dir:
        step, loss = _load_checkpoint(engine, masker, Path(checkpoint_dir), rank)
    log.info("rank %d: restored from the checkpoint of step %d", rank, step)
    return step, loss


def _load_checkpoint(engine, masker: _Targets, checkpoint_dir: Path, rank: int) -> tuple[int, float]:
    """Model, optimizer, LR schedule and this rank's RNGs from a folder `_save_checkpoint` wrote:
    (its step, its loss)."""
    client_state = training.load_deepspeed_checkpoint(engine, checkpoint_dir)
    training.restore_rng(checkpoint_dir, rank, {"masker": masker.generator})
    return int(client_state["step"]), float(client_state.get("loss", float("nan")))


def _log_restore(tracker, loaded_step: int, *, first_step: int) -> None:
    """What a restore cost, in MLflow: the step loaded and the steps done again."""
    done_before = max(loaded_step, tracker.logged_through("train/step"))
    tracker.log_metrics(
        {
            "restore/loaded_step": loaded_step,
            "restore/first_step": first_step,
            "restore/steps_recomputed": max(0, done_before - loaded_step),
        },
        loaded_step,
    )
    tracker.flush()


def _setup_data(cfg: _WorkerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = training.load_columns(cfg.blocks_dir, ["input_ids"])["input_ids"]
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.seed))
    held_out = _held_out(len(blocks), cfg.stage.eval_fraction)
    return blocks[order[held_out:]], blocks[order[:held_out]]


def _setup_engine(stage: PretrainConfig, tokenizer: PreTrainedTokenizerFast, seed: int):
    model = models.build_lm(stage.model, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), seed=seed)
    if models.objective_for(stage.model) == "mlm":
        models.score_targets_only(model)  # the head over the ~15% targets, not every position
    return training.build_engine(
        model,
        ds=stage.deepspeed,
        micro_batch_size=stage.batch_size_per_worker,
        learning_rate=stage.learning_rate,
        weight_decay=stage.weight_decay,
        warmup_steps=stage.warmup_steps,
        total_steps=stage.max_steps,
    )


def _batches(data: torch.Tensor, shard: training.Shard, max_steps: int, seed: int, *, start: int = 0):
    """Row indices for micro-batches start+1 .. max_steps, cycling through epochs: the data position
    is a function of the step, so a restored run sees the batches an uninterrupted one would."""
    per_epoch = shard.batches_per_epoch(len(data))
    if per_epoch == 0:  # the driver checked already (check_blocks_fill_a_step); in-process callers did not
        raise ValueError(_too_few_blocks(len(data), shard.world_size, shard.batch_size))
    step = start
    epoch, offset = divmod(start, per_epoch)
    while step < max_steps:
        for rows in shard.epoch_batches(len(data), epoch=epoch, seed=seed)[offset:]:
            if step == max_steps:
                return
            step += 1
            yield rows
        epoch, offset = epoch + 1, 0


class _Targets:
    """(inputs, labels) of a batch for the objective: masked-LM masks tokens, span corruption cuts
    spans out (the generator of either is part of the checkpoint); causal-LM predicts every next
    token (the model shifts the labels)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        objective: str,
        probability: float,
        seed: int,
        *,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
    ):
        if objective == "mlm" and tokenizer.mask_token_id is None:
            raise ValueError(
                "masked-LM pre-training needs a tokenizer with a mask token; this one has none "
                "(a GPT-style tokenizer?): use a causal-LM model family or another tokenizer"
            )
        self.sentinels = models.sentinel_ids(tokenizer)
        if objective == "span" and not self.sentinels:
            raise ValueError(
                "span-corruption pre-training needs sentinel tokens <extra_id_N>; this tokenizer has "
                "none: set tokenize.sentinels (or leave it 0 with the t5 family)"
            )
        self.tokenizer = tokenizer
        self.objective = objective
        self.probability = probability
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.objective == "clm":
            return input_ids, input_ids
        if self.objective == "span":
            return models.corrupt_spans(
                input_ids,
                noise_density=self.noise_density,
                mean_span_length=self.mean_span_length,
                sentinel_ids=self.sentinels,
                eos_id=separator_id(self.tokenizer),
                generator=self.generator,
            )
        return models.mask_tokens(
            input_ids,
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            special_ids=self.tokenizer.all_special_ids,
            probability=self.probability,
            generator=self.generator,
        )


def _train_step(engine, masker: _Targets, input_ids: torch.Tensor) -> float:
    inputs, labels = masker(input_ids)
    loss = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device)).loss
    engine.backward(loss)
    training.optimizer_step(engine)
    return loss.item()


@torch.no_grad()
def _evaluate(
    engine, masker: _Targets, eval_ids: torch.Tensor, shard: training.Shard, objective: str
) -> dict[str, float]:
    """The objective's loss on the held-out blocks (eval/mlm_loss, eval/clm_loss or eval/span_loss),
    token-weighted over all ranks."""
    engine.eval()
    loss_sum, targets = 0.0, 0.0
    for rows, counted in shard.eval_batches(len(eval_ids)):
        inputs, labels = masker(eval_ids[rows].long())
        # A repeated row is forwarded beside the others and not counted. A new tensor: a causal
        # LM's labels are its inputs.
        labels = labels.masked_fill(torch.arange(len(labels)).unsqueeze(1) >= counted, -100)
        # causal-LM predicts every token but the first of each block
        count = float((labels[:, 1:] if objective == "clm" else labels).ne(-100).sum())
        loss = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device)).loss
        if count:
            loss_sum, targets = loss_sum + loss.item() * count, targets + count
    engine.train()
    loss_sum, targets = training.all_reduce_sum([loss_sum, targets])
    if targets == 0:
        return {}
    return {f"eval/{objective}_loss": loss_sum / targets, "eval/perplexity": training.perplexity(loss_sum / targets)}


def _report(engine, masker: _Targets, tokenizer, metrics: dict, *, with_hf: bool) -> None:
    """Save a DeepSpeed checkpoint on every rank (ZeRO shards, plus this rank's RNG states) and
    report it to Ray Train."""
    rank = ray.train.get_context().get_world_rank()
    with ScratchFolder("checkpoint") as checkpoint_dir:
        _save_checkpoint(engine, masker, checkpoint_dir, rank, step=metrics["train/step"], loss=metrics["train/loss"])
        if with_hf:
            training.save_hf_folder(engine, tokenizer, checkpoint_dir / "hf")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def _save_checkpoint(engine, masker: _Targets, checkpoint_dir: Path, rank: int, *, step: int, loss: float) -> None:
    """This rank's part of a DeepSpeed checkpoint (its ZeRO shards; the step and loss as client
    state) and its RNG states, the masker's generator included."""
    engine.save_checkpoint(str(checkpoint_dir), client_state={"step": step, "loss": loss})
    training.save_rng(checkpoint_dir, rank, {"masker": masker.generator})
