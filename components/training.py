"""Pieces every training loop shares: the DeepSpeed engine, the LR schedule, data sharding,
cross-rank averages and the consolidated HF export. Stage loops live in pretrain.py/finetune.py.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import random
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

from components import accelerator
from components.net import causes, free_port
from components.schemas import DeepSpeedConfig, WorkersConfig
from components.stage import StageContext, write_json


def deepspeed_config(cfg: DeepSpeedConfig, *, micro_batch_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for an engine built with a client optimizer and scheduler: the config
    file's pass-through settings, overlaid with what the pipeline config decides."""
    config = merge_dicts(
        cfg.file_settings,
        {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "gradient_clipping": cfg.gradient_clipping,
            "zero_optimization": {"stage": cfg.zero_stage},
            # torch's AdamW works at every ZeRO stage; DeepSpeed calls client optimizers "untested".
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        },
    )
    # train_batch_size is left out: DeepSpeed derives it from the world size it finds, and the
    # pipeline config check already compared the configured one against the workers.
    config.pop("train_batch_size", None)
    zero = config["zero_optimization"]
    if cfg.zero_stage == 3:
        # Gather the full weights on save so rank 0 can write a plain HF folder.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for kind, device in (("offload_optimizer", cfg.offload_optimizer), ("offload_param", cfg.offload_param)):
        if device != "none":
            zero[kind] = {"pin_memory": True, **zero.get(kind, {}), "device": device}
            # The step runs on torch's AdamW (a client optimizer), not DeepSpeedCPUAdam.
            config["zero_force_ds_cpu_optimizer"] = False
        else:
            zero.pop(kind, None)
    for precision in ("bf16", "fp16"):
        config.pop(precision, None)
    if cfg.precision in ("bf16", "fp16"):
        config[cfg.precision] = {"enabled": True}
    return config


def merge_dicts(base: dict, override: dict) -> dict:
    """`base` with `override` on top, nested dicts merged key by key (neither is modified)."""
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_engine(
    model: torch.nn.Module,
    *,
    ds: DeepSpeedConfig,
    micro_batch_size: int,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
):
    """Wrap the model, AdamW and a warmup + linear/cosine decay schedule in a DeepSpeed engine."""
    import deepspeed  # imported late: DS_ACCELERATOR must be set first (components.accelerator)

    # DeepSpeed gathers with torch.distributed.all_gather_into_tensor, which torch 2.13 deprecates:
    # a FutureWarning from every worker about a call that is DeepSpeed's, not ours.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning)

    if ds.activation_checkpointing:
        # Non-reentrant checkpointing works with every ZeRO stage and with frozen inputs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # from_pretrained returns a model in eval mode, and DeepSpeed does not switch it: without this the
    # first epoch of fine-tuning (and all of continued pre-training) would train without dropout.
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=learning_rate)
    schedule = lr_schedule(ds.lr_schedule, warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(ds, micro_batch_size=micro_batch_size),
    )
    return engine


def set_optimizer_hyperparameters(engine, *, learning_rate: float, weight_decay: float) -> None:
    """Give an engine whose optimizer and schedule came from a checkpoint made with other values
    (a PBT exploit) these peak LR and weight decay, at the schedule's current step."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    for group, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    # The first group is the one with decay (_param_groups): biases and norms keep none.
    scheduler.optimizer.param_groups[0]["weight_decay"] = weight_decay


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases and LayerNorm weights, as in BERT.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name or ".ln_" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warmup to 1, then linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def optimizer_step(engine) -> None:
    """`engine.step()`, first keeping the gradient norm where DeepSpeed keeps none (ZeRO-0: the
    gradients are averaged over ranks by now). A tensor, not a float: no device sync per step."""
    if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        norms = [
            torch.linalg.vector_norm(p.grad.detach().float()) for p in engine.module.parameters() if p.grad is not None
        ]
        engine.ptft_grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
    engine.step()


def grad_norm(engine) -> float | None:
    """The global gradient norm of the last optimizer step (before clipping), when known."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = getattr(engine, "ptft_grad_norm", None)
    if norm is None:
        return None
    value = float(norm.item() if hasattr(norm, "item") else norm)
    return value if math.isfinite(value) else None


class TorchTrainerWithoutDatasets(TorchTrainer):
    """A TorchTrainer without the two helper actors that Ray Train 2.60 starts for every run and
    ptft's loops never use, each a Python process of its own (`docs/performance.md`): a
    DatasetManager, datasets or not (the loops read their stage's files), and a preemption watcher,
    which tells a loop that asks (`ray.train.get_preemption_info`, ptft's do not) that its node
    drains. A lost worker still restarts the group from its last checkpoint."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]

    def fit(self) -> Result:
        # Read by the run's controller, which gets it from this process's environment. A user's
        # own setting wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        with signal_handlers_kept():
            return super().fit()

    def _register_sigint_handler(self, controller) -> None:
        """Ctrl-C stops the run and raises KeyboardInterrupt, so the stage ends KILLED and `ptft
        resume` continues it from its checkpoint. (Ray Train's own handler aborts the controller,
        after which `fit` fails with the controller's death, a FAILED stage, or the process exits 0.)"""
        previous = signal.getsignal(signal.SIGINT)

        def stop(signum, frame) -> None:
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C is not caught here
            controller.abort.remote()  # not waited on: the driver goes down with the interrupt
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, stop)


@contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Ray Train and Tune install their own SIGINT (Tune: and SIGUSR1) handlers when they run in
    the main thread and leave them installed after they return: a Ctrl-C in a later stage would go
    to a run that has ended (Tune's only logs a warning). Put back the handlers from before."""
    if threading.current_thread() is not threading.main_thread():
        yield  # neither installs a handler outside the main thread
        return
    kept = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


def fit_on_ray(
    loop: Callable[[dict], None],
    loop_config: dict,
    workers: WorkersConfig,
    ctx: StageContext,
    *,
    checkpoints_to_keep: int,
) -> Result:
    """Run a training loop on a Ray Train worker group; results and checkpoints go under the
    pipeline's Ray storage, named after the pipeline run and stage."""
    trainer = TorchTrainerWithoutDatasets(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers.num_workers,
            use_gpu=workers.use_gpu,
            resources_per_worker={"CPU": workers.cpus_per_worker},
            placement_strategy=workers.placement_strategy,
        ),
        run_config=RunConfig(
            storage_path=ctx.ray_storage(),
            name=ctx.ray_run_name(),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=workers.max_failures),
            worker_runtime_env={"env_vars": accelerator.deepspeed_env(workers.use_gpu)},
            callbacks=[NoRestartOnAFullDisk()],
        ),
    )
    return trainer.fit()


class NoRestartOnAFullDisk(UserCallback):
    """A worker that ran out of disk space ends the run instead of restarting the group: a restart
    trains again from the last checkpoint to the next one, which fails the same way until someone
    frees space (`max_failures` times over: minutes of pre-training each)."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        from components.tracking import out_of_space  # MLflow: only where the callback runs, the controller

        for rank, error in sorted(worker_exceptions.items()):
            if any(out_of_space(each) for each in causes(error)):
                raise OSError(errno.ENOSPC, f"rank {rank} ran out of disk space, so no restart: {error}") from error


class Diverged(RuntimeError):
    """The training loss stopped being a finite number: every later step would be wasted."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"the training loss is {loss} at step {step}")
        self.step, self.loss = step, loss


def stop_if_diverged(loss: float, step: int) -> None:
    """Raise Diverged on every rank when any rank's loss is NaN or infinite. The ranks decide
    together, so none is left waiting in a collective for one that stopped."""
    if all_reduce_sum([0.0 if math.isfinite(loss) else 1.0])[0]:
        raise Diverged(step, loss)


def report_divergence(error: Diverged, marker: str) -> None:
    """In a Ray Train worker: write the divergence to `marker` (a file in the stage's output
    folder, on the shared storage) and end the loop normally. Raising would make Ray Train restart
    the group from the last checkpoint, which diverges again at the same step; and a report without
    a checkpoint does not reach the driver's Result."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(marker), {"step": error.step, "loss": str(error.loss)})


def raise_if_diverged(result: Result, marker: Path, stage: str) -> None:
    """Fail the stage with the step and the last good checkpoint when its workers wrote `marker`."""
    if not marker.is_file():
        return
    diverged = json.loads(marker.read_text())
    last = result.checkpoint.path if result.checkpoint is not None else "none (it diverged before the first)"
    raise RuntimeError(
        f"{stage}: the training loss became {diverged['loss']} at step {diverged['step']}; stopped there. "
        f"Last good checkpoint: {last}. Fix: lower the learning rate or raise warmup_steps, "
        "or train in bf16/fp32 rather than fp16"
    )


def export_final_model(result: Result, output_dir: Path) -> tuple[Path, dict[str, float]]:
    """Copy the HF folder the final checkpoint carries to `output_dir/model`; write and return
    the final metrics."""
    model_dir = output_dir / "model"
    with result.checkpoint.as_directory() as checkpoint_dir:
        shutil.copytree(Path(checkpoint_dir) / "hf", model_dir, dirs_exist_ok=True)
    metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
    write_json(output_dir / "metrics.json", metrics)
    return model_dir, metrics


def save_rng(folder: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    """This rank's random states (torch, CUDA, numpy, Python and the loop's own generators), as
    tensors and plain values only, so that `restore_rng` can load them with `weights_only=True`."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / f"rng_rank{rank}.pt")


def restore_rng(folder: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    """Put back what `save_rng` saved for this rank; a checkpoint without it leaves the RNGs alone.
    Storage is data, never code: the file loads with `weights_only=True`, so a pickle that would
    run something on load is refused."""
    path = folder / f"rng_rank{rank}.pt"
    if not path.is_file():
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["name"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_columns(parquet_dir: str | Path, columns: list[str]) -> dict[str, torch.Tensor]:
    """Read a (small) Parquet folder into tensors, one per column."""
    table = pq.read_table(str(parquet_dir), columns=columns)
    tensors = {}
    for name in columns:
        values = table.column(name).to_numpy(zero_copy_only=False)
        # List columns (token ids) arrive as an array of arrays: stack them into a matrix.
        tensors[name] = torch.as_tensor(np.stack(values) if values.dtype == object else np.array(values))
    return tensors


@dataclass(frozen=True)
class Shard:
    """This rank's share of a dataset: equal batch counts on every rank."""

    rank: int
    world_size: int
    batch_size: int

    def batches_per_epoch(self, num_rows: int) -> int:
        # Drop the tail: DeepSpeed ranks must run the same number of steps.
        return num_rows // (self.world_size * self.batch_size)

    def epoch_batches(self, num_rows: int, *, epoch: int, seed: int) -> list[torch.Tensor]:
        """Row indices of each of this rank's batches in `epoch` (same permutation on all ranks)."""
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        count = self.batches_per_epoch(num_rows)
        mine = order[: count * self.world_size * self.batch_size].view(count, self.world_size, self.batch_size)
        return list(mine[:, self.rank])

    def eval_batches(self, num_rows: int) -> list[tuple[torch.Tensor, int]]:
        """This rank's evaluation batches, each with how many of its first rows count. Every row
        is evaluated once over the ranks, and every rank runs the same batches (ZeRO-3 forwards are
        collectives): a rank with a row fewer forwards row 0 in its place, outside the count."""
        mine = torch.arange(num_rows)[self.rank :: self.world_size]
        per_rank = -(-num_rows // self.world_size)
        padded = torch.cat([mine, torch.zeros(per_rank - len(mine), dtype=mine.dtype)])
        return [
            (padded[start : start + self.batch_size], max(0, min(self.batch_size, len(mine) - start)))
            for start in range(0, per_rank, self.batch_size)
        ]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum values over ranks (a no-op without a process group)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.to(_comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full model weights on rank 0 (a collective under ZeRO-3: call it on every rank)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if _rank() == 0 else None


def save_hf_folder(engine, tokenizer, out_dir: Path) -> None:
    """Rank 0 writes a plain HF folder (safetensors + config + tokenizer); others only join ZeRO-3's gather."""
    state = consolidated_state_dict(engine)
    if _rank() != 0:
        return
    state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}
    engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def ensure_process_group() -> bool:
    """A one-process gloo group for DeepSpeed outside Ray Train (e.g. a Tune trial).

    Returns True when this call created the group. Keep it for the process's life: DeepSpeed
    caches groups cloned from it (deepspeed.utils.groups), which a destroyed one would leave dead.
    """
    one_rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    if dist.is_initialized():
        if dist.get_world_size() == 1:  # the process's group, kept: DeepSpeed still reads these
            for key, value in one_rank.items():
                os.environ.setdefault(key, value)
        return False
    port = free_port()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **one_rank})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def steps_for(num_rows: int, shard: Shard, epochs: int) -> int:
    return max(1, shard.batches_per_epoch(num_rows)) * epochs


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def gather_rows(rows: list) -> list:
    """Every rank's rows, rank 0's first (a no-op without a process group): for scores that are not
    sums, such as entity F1."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


# DeepSpeed pickles a few of its own objects beside the tensors (its checkpoint engine loads them
# with weights_only=False); these, and only these, may be rebuilt from a checkpoint. Found by
# loading ZeRO 0-3 fp32 checkpoints (tests/unit/test_training_steps.py); fp16 (GPU) keeps its
# dynamic loss scaler in the ZeRO optimizer's state.
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class _WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose loads run `torch.load(weights_only=True)`: a file in the
    checkpoint folder that would run code on load is refused instead of executed."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def _deepspeed_globals() -> list:
    """The classes DEEPSPEED_CHECKPOINT_GLOBALS names (imported here: the driver never imports DeepSpeed)."""
    classes = []
    for dotted in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def load_deepspeed_checkpoint(engine, checkpoint_dir: Path) -> dict:
    """Model, optimizer and LR schedule from a folder `engine.save_checkpoint` wrote, loaded as
    data only; returns the client state saved with them."""
    saved_engine = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(saved_engine)
    try:
        load_path, client_state = engine.load_checkpoint(
            str(checkpoint_dir), load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        engine.checkpoint_engine = saved_engine
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {checkpoint_dir}")
    return client_state
