"""What does the pretrain stage cost on top of a bare training loop? In one run, on the same CPUs:

  - the stage itself (`components.pretrain.run`: a Ray Train TorchTrainer with ONE worker of
    `cpus_per_worker` CPUs, every step through a DeepSpeed ZeRO-0 fp32 engine, MLflow logging);
  - a bare single-process torch loop in this process, with the same thread count, the same model
    built the same way (models.build_lm, same seed), torch AdamW with the same parameter groups,
    LR and schedule, the same masking (models.mask_tokens, seeded as the stage's rank 0), the same
    batches in the same order (the tokenize stage's Parquet blocks, the stage's split and shuffle)
    and the same gradient clipping (clip_grad_norm_ 1.0, DeepSpeed's default here).

Steady-state step time: the stage logs `throughput/step_time_s` to MLflow every `log_every` steps
(the mean over the window; the first window leaves out step 1); the benchmark takes the median of
those windows, the first excluded, and times the bare loop's windows the same way. The bare loop
runs its first half before the stage and its second half after it (Ray idle but up both times),
so drift in the machine's load hits both sides. Ratio = stage / bare; target <= 1.10.

Start-up: `startup/worker_group_s` (driver launch -> worker loop entered), `startup/deepspeed_init_s`
(model + engine build) and `startup/first_step_s` (launch -> end of step 1), as the stage logs
them; target worker group + DeepSpeed init <= 15 s. Also the fixed cost of the whole
`pretrain.run` call: its wall time minus steps x steady step time (start-up, the final eval,
checkpoint, HF export and smoke test, Ray teardown).

    python benchmarks/pretrain_overhead.py [--steps 160] [--json out.json]   # from the repo root

Starts a private local Ray (`num_cpus` CPUs) and an sqlite MLflow store in a temp folder, writes a
synthetic corpus through the real tokenize stage; takes ~5 minutes with the defaults on 2 cores.
Both sides compute the same thing (their final train/loss agree), so the ratio is pure overhead, but
on a shared machine other load moves it: look at the window spread, or rerun when it is wide.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import ray.data  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from components import accelerator, models, pretrain, tokenize, training, vocab  # noqa: E402
from components.schemas import (  # noqa: E402
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    PretrainConfig,
    TokenizeConfig,
    WorkersConfig,
)
from components.stage import StageContext  # noqa: E402
from components.tracking import ensure_experiment, start_run  # noqa: E402

RATIO_TARGET = 1.10
STARTUP_TARGET_S = 15.0
STARTUP_KEYS = ("startup/worker_group_s", "startup/deepspeed_init_s", "startup/first_step_s")


# --------------------------------------------------------------------------- setup


class Tracking:
    """An sqlite MLflow store and the stage contexts of a hand-run chain, as the runner makes them."""

    def __init__(self, storage: Path):
        self.storage = storage
        self.uri = f"sqlite:///{storage / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.experiment_id = ensure_experiment(self.client, "pretrain-overhead", (storage / "mlartifacts").as_uri())
        self.parent = start_run(self.client, self.experiment_id, "pipeline")

    def context(self, stage: str, seed: int) -> StageContext:
        run_id = start_run(
            self.client, self.experiment_id, stage, parent_run_id=self.parent, tags={"ptft.stage": stage}
        )
        output = self.storage / "artifacts" / stage
        output.mkdir(parents=True)
        return StageContext(
            pipeline_run_id="overhead",
            stage=stage,
            output_dir=output,
            storage=self.storage,
            tracking_uri=self.uri,
            experiment_id=self.experiment_id,
            mlflow_run_id=run_id,
            seed=seed,
        )


def synthetic_data(examples: int) -> DataConfig:
    source = {"type": "synthetic"}
    return DataConfig.model_validate(
        {
            "corpus": {"source": {**source, "split": "corpus", "num_examples": examples}},
            "task": {name: {**source, "split": name, "num_examples": 32} for name in ("train", "validation", "test")},
        }
    )


# --------------------------------------------------------------------------- bare loop


class BareLoop:
    """The stage's training step without Ray, DeepSpeed or MLflow, timed in the stage's windows."""

    def __init__(self, cfg: PretrainConfig, tokenized: Path, seed: int, threads: int):
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(tokenized / "tokenizer")
        # the stage's split (pretrain._setup_data) and batch order (pretrain._batches), rank 0 of 1
        blocks = training.load_columns(tokenized / "pretrain_blocks", ["input_ids"])["input_ids"]
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
        self.train_ids = blocks[order[int(len(blocks) * cfg.eval_fraction) :]]
        shard = training.Shard(0, 1, cfg.batch_size_per_worker)
        self.batches = pretrain._batches(self.train_ids, shard, cfg.max_steps, seed)
        self.model = models.build_lm(
            cfg.model, vocab_size=len(self.tokenizer), special_ids=vocab.special_ids(self.tokenizer), seed=seed
        )
        if models.objective_for(cfg.model) == "mlm":
            models.score_targets_only(self.model)  # as the stage does (pretrain._setup_engine)
        self.model.train()
        # the stage's AdamW parameter groups (no decay on biases/LayerNorm) and LR schedule
        self.optimizer = torch.optim.AdamW(training._param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate)
        schedule = training.lr_schedule(cfg.deepspeed.lr_schedule, cfg.warmup_steps, cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.masker = torch.Generator().manual_seed(seed * 1000)  # pretrain._Targets of rank 0
        self.step = 0
        self.windows: dict[int, float] = {}  # last step of the window -> mean step time
        self.losses: dict[int, float] = {}
        self._window_start, self._window_steps = time.perf_counter(), 0

    def train_step(self, input_ids: torch.Tensor) -> float:
        inputs, labels = models.mask_tokens(
            input_ids,
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            special_ids=self.tokenizer.all_special_ids,
            probability=self.cfg.mlm_probability,
            generator=self.masker,
        )
        loss = self.model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.deepspeed.gradient_clipping)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, until: int) -> None:
        """Steps up to `until` (a window boundary), windows as Throughput in the stage: reset after step
        1, read every log_every; a window starts afresh when the loop resumes."""
        self._window_start, self._window_steps = time.perf_counter(), 0
        while self.step < min(until, self.cfg.max_steps):
            self.step += 1
            loss = self.train_step(self.train_ids[next(self.batches)].long())
            self._window_steps += 1
            if self.step == 1:
                self._window_start, self._window_steps = time.perf_counter(), 0
            elif self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                self.windows[self.step] = (time.perf_counter() - self._window_start) / self._window_steps
                self.losses[self.step] = loss
                self._window_start, self._window_steps = time.perf_counter(), 0


# --------------------------------------------------------------------------- the stage


def probed(loop, probe_path: str):
    """The stage's worker loop, recording the worker's threading set-up just before DeepSpeed is
    built (after the stage set torch's threads). Defined here, so Ray ships it by value."""

    def loop_with_probe(config: dict) -> None:
        from components import training as worker_training

        build_engine = worker_training.build_engine

        def build_engine_probed(*args, **kwargs):
            env = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR")}
            probe = {
                "torch_threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
                "cpu_affinity": len(os.sched_getaffinity(0)),
                "pid": os.getpid(),
                **env,
            }
            engine = build_engine(*args, **kwargs)
            probe["torch_threads_after_engine"] = torch.get_num_threads()
            Path(probe_path).write_text(json.dumps(probe))
            return engine

        worker_training.build_engine = build_engine_probed
        try:
            loop(config)
        finally:
            worker_training.build_engine = build_engine

    return loop_with_probe


def run_stage(cfg: PretrainConfig, tokenized: str, ctx: StageContext) -> tuple[float, float, dict[str, Any]]:
    """When `pretrain.run` was called (epoch s), its wall time, and the worker's threading probe."""
    probe_path = ctx.storage / "worker_probe.json"
    original = pretrain.train_loop_per_worker
    pretrain.train_loop_per_worker = probed(original, str(probe_path))
    try:
        launched, started = time.time(), time.perf_counter()
        pretrain.run(cfg, tokenized, ctx)
        wall = time.perf_counter() - started
    finally:
        pretrain.train_loop_per_worker = original
    return launched, wall, json.loads(probe_path.read_text()) if probe_path.is_file() else {}


# Ray Train (v2) milestones in its own logs (<session>/logs/train/ray-train-sys-*.log, JSON lines)
RAY_TRAIN_MARKERS = (
    ("controller actor up", "controller", ""),
    ("worker actor up", "controller", "worker actors created"),
    ("train context on the worker", "controller", "Train context initialized"),
    ("train fn unpickled (imports) and started", "worker", "Launching training function"),
)


def ray_train_logs() -> Path | None:
    """This Ray session's Ray Train log folder (a private Ray API: None if it moved)."""
    try:
        return Path(ray._private.worker._global_node.get_logs_dir_path()) / "train"
    except (AttributeError, TypeError):
        return None


def ray_train_phases(train_logs: Path | None, launched: float) -> dict[str, float]:
    """Best effort: seconds from the stage's launch to each Ray Train milestone (empty if not found)."""
    found: dict[str, float] = {}
    if train_logs is None:
        return found
    for name, role, text in RAY_TRAIN_MARKERS:
        for path in sorted(train_logs.glob(f"ray-train-sys-{role}-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    stamp = datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except (ValueError, KeyError, TypeError):
                    continue
                if text in record.get("message", "") and (name not in found or stamp - launched < found[name]):
                    found[name] = stamp - launched
                    break
    return found


def stage_metrics(client: MlflowClient, run_id: str) -> dict[str, Any]:
    history = {
        key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        for key in ("throughput/step_time_s", "train/loss", *STARTUP_KEYS)
    }
    windows = {m.step: m.value for m in history["throughput/step_time_s"]}
    # loop wall time per step from the MLflow timestamps of train/loss (logging and flushes included)
    logged = [m for m in history["train/loss"] if m.step >= 2 * min(windows)]
    per_step_wall = (
        (logged[-1].timestamp - logged[0].timestamp) / 1000 / (logged[-1].step - logged[0].step)
        if len(logged) > 1
        else float("nan")
    )
    return {
        "windows": windows,
        "losses": {m.step: m.value for m in history["train/loss"]},
        "per_step_wall_s": per_step_wall,
        "last_log_at": logged[-1].timestamp / 1000 if logged else float("nan"),
        **{key: history[key][0].value if history[key] else float("nan") for key in STARTUP_KEYS},
    }


def steady(windows: dict[int, float], log_every: int) -> float:
    """Median of the full windows after the first."""
    kept = [value for step, value in windows.items() if step > log_every and step % log_every == 0]
    return statistics.median(kept) if kept else float("nan")


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, cfg: PretrainConfig, r: dict[str, Any]) -> None:
    ratio = r["stage_step_s"] / r["bare_step_s"]
    startup = r["startup/worker_group_s"] + r["startup/deepspeed_init_s"]
    r.update(ratio=ratio, startup_s=startup, ratio_met=ratio <= RATIO_TARGET, startup_met=startup <= STARTUP_TARGET_S)
    sizes = cfg.model.resolved()
    print(
        f"model: {cfg.model.family} {cfg.model.preset} (hidden {sizes['hidden_size']}, {sizes['num_layers']} layers, "
        f"{r['parameters'] / 1e6:.2f}M parameters, vocab {r['vocab_size']}); seq_len {args.seq_len}, "
        f"micro-batch {cfg.batch_size_per_worker}, {cfg.max_steps} steps, log_every {cfg.log_every}"
    )
    print(
        f"data: {r['blocks']} training blocks from {args.examples} synthetic corpus rows; "
        f"ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}, 1 worker x {args.threads} CPUs; "
        f"bare loop: {args.threads} torch threads"
    )
    print(
        "load average (1 min) before / after the run: {:.2f} / {:.2f}; CPUs: {}".format(
            r["load_before"], r["load_after"], os.cpu_count()
        )
    )
    probe = r["worker_probe"]
    print(
        f"stage worker: torch threads {probe.get('torch_threads')} (after the engine build "
        f"{probe.get('torch_threads_after_engine')}), interop {probe.get('interop_threads')}, "
        f"OMP_NUM_THREADS={probe.get('OMP_NUM_THREADS')}, CPU affinity {probe.get('cpu_affinity')}"
    )
    print(f"windows of {cfg.log_every} steps (s/step), first excluded:")
    print("  stage: " + " ".join(f"{v:.3f}" for v in r["stage_windows"].values()))
    print("  bare:  " + " ".join(f"{v:.3f}" for v in r["bare_windows"].values()))

    def row(name: str, value: str, target: str = "", met: bool | None = None) -> None:
        verdict = "" if met is None else ("met" if met else "MISSED")
        print(f"{name:<52} {value:>12}  {target:<10} {verdict}")

    print()
    row("metric", "value", "target", None)
    row("-" * 52, "-" * 12, "-" * 10)
    row("stage steady step time (median window)", f"{r['stage_step_s']:.4f} s")
    row("bare loop steady step time (median window)", f"{r['bare_step_s']:.4f} s")
    row("step time ratio stage / bare", f"{ratio:.3f}", f"<= {RATIO_TARGET:.2f}", ratio <= RATIO_TARGET)
    fastest = r["fastest_window_ratio"] = min(r["stage_windows"].values()) / min(r["bare_windows"].values())
    row("ratio of the fastest windows (less load-sensitive)", f"{fastest:.3f}")
    row("stage loop wall per step (MLflow timestamps)", f"{r['stage_loop_wall_step_s']:.4f} s")
    row("startup/worker_group_s", f"{r['startup/worker_group_s']:.2f} s")
    row("startup/deepspeed_init_s", f"{r['startup/deepspeed_init_s']:.2f} s")
    row(
        "start-up: worker group + DeepSpeed init",
        f"{startup:.2f} s",
        f"<= {STARTUP_TARGET_S:.0f} s",
        startup <= STARTUP_TARGET_S,
    )
    row("startup/first_step_s", f"{r['startup/first_step_s']:.2f} s")
    milestones = {
        **r["ray_train_phases_s"],
        "worker loop entered": r["startup/worker_group_s"],
        "DeepSpeed engine built": startup,
        "first step done": r["startup/first_step_s"],
    }
    previous = 0.0
    for name, at in sorted(milestones.items(), key=lambda item: item[1]):
        row(f"  launch -> {name}", f"{at:.2f} s", f"(+{at - previous:.2f} s)")
        previous = at
    row("pretrain.run wall", f"{r['stage_wall_s']:.1f} s")
    row("fixed cost: wall - steps x steady step", f"{r['fixed_cost_s']:.1f} s")
    row("  of it after the last step (eval, export, teardown)", f"{r['after_loop_s']:.1f} s")
    row("final train/loss: stage | bare", f"{r['stage_final_loss']:.3f} | {r['bare_final_loss']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", help="BERT size preset (default mini: hidden 256, 4 layers)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--examples", type=int, default=12000, help="synthetic corpus rows")
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2, help="cpus_per_worker of the stage = bare torch threads")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cfg = PretrainConfig(
        model=ModelConfig(family="bert", preset=args.preset, max_positions=args.seq_len),
        max_steps=args.steps,
        batch_size_per_worker=args.batch,
        log_every=args.log_every,
        checkpoint_every=args.steps,  # no checkpoint inside the loop: only the final one
        workers=WorkersConfig(num_workers=1, cpus_per_worker=args.threads, max_failures=0),
        deepspeed=DeepSpeedConfig(zero_stage=0, precision="fp32"),
    )

    load_before = os.getloadavg()[0]
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": accelerator.deepspeed_env(False)},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_logs = ray_train_logs()
    try:
        with tempfile.TemporaryDirectory(prefix="ptft-pretrain-overhead-") as folder:
            tracking = Tracking(Path(folder))
            tok_cfg = TokenizeConfig(vocab_size=args.vocab_size, seq_len=args.seq_len)
            tokenized = tokenize.run(tok_cfg, synthetic_data(args.examples), tracking.context("tokenize", args.seed))
            bare = BareLoop(cfg, Path(tokenized.output_uri), args.seed, args.threads)
            bare.run(until=cfg.max_steps // 2 // cfg.log_every * cfg.log_every)
            ctx = tracking.context("pretrain", args.seed)
            launched, wall, probe = run_stage(cfg, tokenized.output_uri, ctx)
            torch.set_num_threads(args.threads)
            bare.run(until=cfg.max_steps)
            logged = stage_metrics(tracking.client, ctx.mlflow_run_id)
    finally:
        ray.shutdown()

    stage_step, bare_step = steady(logged["windows"], cfg.log_every), steady(bare.windows, cfg.log_every)
    first = {"stage": min(logged["windows"]), "bare": min(bare.windows)}
    results = {
        "config": {**vars(args), "json": str(args.json) if args.json else None},
        "model_sizes": cfg.model.resolved(),
        "parameters": models.count_parameters(bare.model),
        "vocab_size": len(bare.tokenizer),
        "blocks": len(bare.train_ids),
        "stage_step_s": stage_step,
        "bare_step_s": bare_step,
        "stage_windows": {k: v for k, v in logged["windows"].items() if k != first["stage"]},
        "bare_windows": {k: v for k, v in bare.windows.items() if k != first["bare"]},
        "stage_loop_wall_step_s": logged["per_step_wall_s"],
        **{key: logged[key] for key in STARTUP_KEYS},
        "stage_wall_s": wall,
        "fixed_cost_s": wall - cfg.max_steps * stage_step,
        "after_loop_s": launched + wall - logged["last_log_at"],
        "stage_final_loss": logged["losses"].get(cfg.max_steps, float("nan")),
        "bare_final_loss": bare.losses.get(cfg.max_steps, float("nan")),
        "worker_probe": probe,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "ray_train_phases_s": ray_train_phases(train_logs, launched),
    }
    report(args, cfg, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
