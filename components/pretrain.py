"""Stage 2, pretrain: masked-LM pre-training of a BERT-style model under Ray Train, every step
through a DeepSpeed engine. Ends with a plain HF folder (safetensors + config + tokenizer).

Output folder:
    model/           save_pretrained folder of the BertForMaskedLM, with the tokenizer
    metrics.json     final metrics
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray.train
import torch
from pydantic import BaseModel
from transformers import PreTrainedTokenizerFast

from components import accelerator, models, training
from components.configs import PretrainConfig
from components.stage import StageContext, StageResult
from components.tracking import open_tracker

log = logging.getLogger(__name__)


class _WorkerConfig(BaseModel):
    """Everything a worker needs, passed through Ray as a plain dict."""

    stage: PretrainConfig
    blocks_dir: str
    tokenizer_dir: str
    tracking_uri: str
    mlflow_run_id: str
    seed: int


def run(cfg: PretrainConfig, tokenized_uri: str, ctx: StageContext) -> StageResult:
    """Pre-train on `<tokenized_uri>/pretrain_blocks`; write the HF folder under ctx.output_dir/model."""
    worker_cfg = _WorkerConfig(
        stage=cfg, blocks_dir=f"{tokenized_uri}/pretrain_blocks", tokenizer_dir=f"{tokenized_uri}/tokenizer",
        tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id, seed=ctx.seed,
    )  # fmt: skip
    result = training.fit_on_ray(train_loop_per_worker, worker_cfg.model_dump(), cfg.workers, ctx,
                                 checkpoints_to_keep=2)  # fmt: skip
    model_dir, metrics = training.export_final_model(result, ctx.output_dir)
    return StageResult(output_uri=str(model_dir), metrics=metrics)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: MLM pre-training through DeepSpeed, checkpoints reported to Ray Train."""
    cfg = _WorkerConfig.model_validate(config)
    stage = cfg.stage
    accelerator.prepare_process(stage.workers.use_gpu, stage.workers.cpus_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.tokenizer_dir)
    train_ids, eval_ids = _setup_data(cfg)
    shard = training.Shard(rank, world, stage.batch_size_per_worker)
    engine = _setup_engine(stage, tokenizer, cfg.seed)
    tracker = open_tracker(cfg.tracking_uri, cfg.mlflow_run_id, rank=rank)
    tracker.log_params({"model.parameters": models.count_parameters(engine.module), "world_size": world})
    masker = _Masker(tokenizer, stage.mlm_probability, seed=cfg.seed * 1000 + rank)

    window_tokens, window_start, loss = 0, time.perf_counter(), float("nan")
    for step, rows in enumerate(_batches(train_ids, shard, stage.max_steps, cfg.seed), start=1):
        loss = _train_step(engine, masker, train_ids[rows].long())
        window_tokens += rows.numel() * train_ids.shape[1] * world
        if step % stage.log_every == 0 or step == stage.max_steps:
            elapsed = time.perf_counter() - window_start
            metrics = {"train/loss": training.all_reduce_sum([loss])[0] / world,
                       "train/learning_rate": engine.get_lr()[0],
                       "throughput/tokens_per_s": window_tokens / elapsed, "train/step": step}  # fmt: skip
            tracker.log_metrics(metrics, step)
            window_tokens, window_start = 0, time.perf_counter()
        if step % stage.checkpoint_every == 0 and step < stage.max_steps:
            _report(engine, tokenizer, {"train/loss": loss, "train/step": step}, with_hf=False)

    final = {"train/loss": loss, "train/step": stage.max_steps, **_evaluate(engine, masker, eval_ids, shard)}
    tracker.log_metrics(final, stage.max_steps)
    tracker.close()
    _report(engine, tokenizer, final, with_hf=True)


def _setup_data(cfg: _WorkerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = training.load_columns(cfg.blocks_dir, ["input_ids"])["input_ids"]
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.seed))
    held_out = int(len(blocks) * cfg.stage.eval_fraction)
    return blocks[order[held_out:]], blocks[order[:held_out]]


def _setup_engine(stage: PretrainConfig, tokenizer: PreTrainedTokenizerFast, seed: int):
    bert_config = models.build_bert_config(stage.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = models.build_mlm_model(bert_config, seed=seed)
    return training.build_engine(
        model, ds=stage.deepspeed, micro_batch_size=stage.batch_size_per_worker,
        learning_rate=stage.learning_rate, weight_decay=stage.weight_decay,
        warmup_steps=stage.warmup_steps, total_steps=stage.max_steps,
    )  # fmt: skip


def _batches(data: torch.Tensor, shard: training.Shard, max_steps: int, seed: int):
    """Row indices for `max_steps` steps, cycling through epochs."""
    if shard.batches_per_epoch(len(data)) == 0:
        raise ValueError(
            f"{len(data)} training blocks cannot fill one step of {shard.world_size} workers x "
            f"{shard.batch_size}: lower pretrain.batch_size_per_worker or add corpus text"
        )
    step, epoch = 0, 0
    while True:
        for rows in shard.epoch_batches(len(data), epoch=epoch, seed=seed):
            if step == max_steps:
                return
            step += 1
            yield rows
        epoch += 1


class _Masker:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, probability: float, seed: int):
        self.tokenizer = tokenizer
        self.probability = probability
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return models.mask_tokens(
            input_ids, mask_token_id=self.tokenizer.mask_token_id, vocab_size=len(self.tokenizer),
            special_ids=self.tokenizer.all_special_ids, probability=self.probability, generator=self.generator,
        )  # fmt: skip


def _train_step(engine, masker: _Masker, input_ids: torch.Tensor) -> float:
    inputs, labels = masker(input_ids)
    loss = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device)).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@torch.no_grad()
def _evaluate(engine, masker: _Masker, eval_ids: torch.Tensor, shard: training.Shard) -> dict[str, float]:
    """Masked-LM loss on the held-out blocks, token-weighted over all ranks."""
    engine.eval()
    loss_sum, targets = 0.0, 0.0
    mine = shard.eval_rows(len(eval_ids))
    for start in range(0, len(mine), shard.batch_size):
        rows = mine[start : start + shard.batch_size]
        inputs, labels = masker(eval_ids[rows].long())
        count = float((labels != -100).sum())
        loss = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device)).loss
        loss_sum, targets = loss_sum + loss.item() * count, targets + count
    engine.train()
    loss_sum, targets = training.all_reduce_sum([loss_sum, targets])
    if targets == 0:
        return {}
    return {"eval/mlm_loss": loss_sum / targets, "eval/perplexity": training.perplexity(loss_sum / targets)}


def _report(engine, tokenizer, metrics: dict, *, with_hf: bool) -> None:
    """Save a DeepSpeed checkpoint on every rank (ZeRO shards) and report it to Ray Train."""
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        engine.save_checkpoint(checkpoint_dir, client_state={"step": metrics["train/step"]})
        if with_hf:
            training.save_hf_folder(engine, tokenizer, Path(checkpoint_dir) / "hf")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
