"""How close does BERT-base pre-training get to the GPU's peak, and what does DeepSpeed cost?
Masked-LM training of BERT-base (hidden 768, 12 layers, 12 heads, FFN 3072, vocab 30522) on
random tokens at sequence length 512, bf16, PyTorch SDPA attention, on one GPU:

1. the largest micro-batch that fits (tries 256, 192, 128, 96, 64, ... until one runs two full
   training steps within 90% of the GPU's memory);
2. plain torch at that micro-batch: fp32 master weights, `torch.autocast` bf16, fused AdamW,
   gradient clipping;
3. DeepSpeed ZeRO-1 with `bf16.enabled`, torch's AdamW as a client optimizer, on a one-process
   group, at the same micro-batch (the configuration ptft's pre-training uses on a GPU);
4. the same DeepSpeed loop under Ray Train, when `ray` imports (it is not in the GPU image).

Each run times a fixed number of steps after warm-up steps, with `torch.cuda.synchronize()` around
the timed window. Prints tokens/s, step time, achieved TFLOP/s and MFU (components/flops.py:
6N + 12·L·d·T FLOPs per token), a summary table, the DeepSpeed / plain torch tokens/s ratio, and
the targets: MFU >= 40%, DeepSpeed >= 0.97x plain torch.

    bash benchmarks/gpu_mfu.sh                          # on the GPU machine (installs DeepSpeed wheels)
    python benchmarks/gpu_mfu.py [--json PATH] [--micro-batch N] [--steps 20] [--warmup 5]
    python benchmarks/gpu_mfu.py --dry-run [--json PATH]  # CPU, tiny BERT, fp32, seconds

`--dry-run` runs the same code paths on CPU (DeepSpeed on its CPU accelerator over gloo) with a
tiny BERT; it prints achieved FLOP/s and MFU n/a (no peak is known for a CPU). On the GPU the
whole run takes a few minutes; `--time-budget` skips the phases that would start after it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Before torch's first CUDA allocation: fewer fragmentation OOMs in the micro-batch search.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from components.flops import flops_per_token, mfu, model_shape, peak_flops  # noqa: E402
from components.models import score_targets_only  # noqa: E402

TARGET_MFU = 0.40
TARGET_DS_RATIO = 0.97
MICRO_BATCH_CANDIDATES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)
MEMORY_MARGIN = 0.90  # a micro-batch fits when its peak reserved memory stays under this share
MASK_TOKEN_ID = 103  # BERT's [MASK] in bert-base-uncased; any id works for random data
TARGETS_ONLY = "_targets_only"  # the suffix of the runs whose MLM head scores only the targets


@dataclass(frozen=True)
class Settings:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    positions: int
    seq_len: int
    precision: str  # "bf16" or "fp32"
    warmup_steps: int
    timed_steps: int
    device: str  # "cuda" or "cpu"
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    gradient_clipping: float = 1.0
    compile_layers: bool = False  # each encoder layer through torch.compile (--compile-layers)


def gpu_settings(args: argparse.Namespace) -> Settings:
    return Settings(
        hidden=768,
        layers=12,
        heads=12,
        intermediate=3072,
        vocab=30522,
        positions=512,
        seq_len=512,
        precision="bf16",
        warmup_steps=args.warmup or 5,
        timed_steps=args.steps or 20,
        device="cuda",
    )


def dry_settings(args: argparse.Namespace) -> Settings:
    return Settings(
        hidden=64,
        layers=2,
        heads=2,
        intermediate=256,
        vocab=1024,
        positions=64,
        seq_len=64,
        precision="fp32",
        warmup_steps=args.warmup or 1,
        timed_steps=args.steps or 3,
        device="cpu",
    )


# --------------------------------------------------------------------------- model and data


def build_model(s: Settings) -> torch.nn.Module:
    """A freshly initialised BertForMaskedLM with SDPA attention, fp32 weights, on `s.device`."""
    from transformers import AutoModelForMaskedLM, BertConfig

    config = BertConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=s.positions,
    )
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.to(device=s.device, dtype=torch.float32).train()  # fp32 master weights


def compile_encoder_layers(model: torch.nn.Module) -> None:
    """torch.compile (Inductor) on each encoder layer, in place: the layers' elementwise work
    (LayerNorm, GELU, dropout, residual adds) fused into fewer kernels. The layers only: the
    targets-only head indexes a data-dependent number of positions, which would recompile."""
    for layer in model.base_model.encoder.layer:
        layer.compile()


def head_flops_saved_per_token(s: Settings, target_share: float) -> float:
    """Training FLOPs per token that scoring only the targets leaves out: the head's transform
    (hidden x hidden) and vocabulary projection (vocab x hidden, counted once in 6N through the tied
    embedding) on the (1 - target_share) of positions without a label."""
    return 6.0 * (s.hidden * s.hidden + s.vocab * s.hidden) * (1.0 - target_share)


def target_share(s: Settings) -> float:
    """The share of positions with a label in the benchmark's batches."""
    labels = torch.cat([labels.flatten() for _, labels in make_batches(s, 8)])
    return float((labels != -100).float().mean())


def make_batches(s: Settings, micro_batch: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random MLM batches on the device: ~15% of positions are targets (replaced by
    [MASK] in the input), the rest have label -100."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        tokens = torch.randint(
            MASK_TOKEN_ID + 1 if s.vocab > 2 * MASK_TOKEN_ID else 1,
            s.vocab,
            (micro_batch, s.seq_len),
            generator=generator,
        )
        masked = torch.rand(micro_batch, s.seq_len, generator=generator) < 0.15
        masked[:, 0] = True  # at least one target per row
        mask_id = MASK_TOKEN_ID if s.vocab > MASK_TOKEN_ID else 0
        inputs = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
        labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
        batches.append((inputs.to(s.device), labels.to(s.device)))
    return batches


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases and LayerNorm weights, as ptft's training (components/training.py)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    fused = s.device == "cuda"  # the fused CUDA kernel: one launch for all parameters
    return torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.learning_rate, fused=fused)


def synchronize(s: Settings) -> None:
    if s.device == "cuda":
        torch.cuda.synchronize()


def free_memory(s: Settings) -> None:
    gc.collect()
    if s.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(s: Settings) -> float | None:
    return torch.cuda.max_memory_reserved() / 2**30 if s.device == "cuda" else None


# --------------------------------------------------------------------------- training steps


class TorchLoop:
    """Plain torch mixed precision: fp32 master weights, bf16 autocast, fused AdamW, clipping."""

    name = "plain_torch"

    def __init__(self, s: Settings, compiled: bool = False, targets_only: bool = False):
        self.s = s
        self.model = build_model(s)
        self.optimizer = make_optimizer(self.model, s)
        if targets_only:
            score_targets_only(self.model)  # the pretrain stage's own: the MLM head on the targets only
        if s.compile_layers:
            compile_encoder_layers(self.model)
        if compiled:  # the same module, traced by torch.compile (Inductor) on its first steps
            self.model = torch.compile(self.model)
        self.autocast = s.precision == "bf16"

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.s.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=inputs, labels=labels).loss
        loss.backward()
        if self.s.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.gradient_clipping)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        del self.model, self.optimizer


def deepspeed_config(s: Settings, micro_batch: int) -> dict[str, Any]:
    """ZeRO-1, as components/training.py builds it for a GPU pre-training run."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": s.gradient_clipping,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as a client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if s.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_deepspeed_group(s: Settings) -> None:
    """A one-process group (nccl on the GPU, gloo on CPU) unless one exists (under Ray Train)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if s.device == "cuda" else "cpu")
    import deepspeed
    import torch.distributed as dist

    if s.device != "cuda":
        from components.accelerator import skip_inference_only_ops

        skip_inference_only_ops()  # as ptft's training processes do

    if dist.is_initialized():
        return
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }.items():
        os.environ[key] = value
    if s.device == "cuda":
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if s.device == "cuda" else "gloo", auto_mpi_discovery=False)


class DeepSpeedLoop:
    """DeepSpeed ZeRO-1 engine (bf16 weights and grads, fp32 master copy in the ZeRO optimizer)."""

    name = "deepspeed"

    def __init__(self, s: Settings, micro_batch: int, targets_only: bool = False):
        ensure_deepspeed_group(s)
        import deepspeed

        self.s = s
        model = build_model(s)
        optimizer = make_optimizer(model, s)
        if targets_only:
            score_targets_only(model)
        if s.compile_layers:
            compile_encoder_layers(model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(s, micro_batch)
        )

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.engine(input_ids=inputs, labels=labels).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        del self.engine


# --------------------------------------------------------------------------- measuring


def is_oom(error: BaseException) -> bool:
    """CUDA out of memory, or a cuBLAS/cuDNN workspace allocation that failed for the same reason."""
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def timed_run(loop, s: Settings, micro_batch: int, per_token: float, device_name: str) -> dict[str, Any]:
    """Warm-up steps, then `timed_steps` steps between two synchronisations."""
    batches = make_batches(s, micro_batch)
    for i in range(s.warmup_steps):
        loop.step(*batches[i % len(batches)])
    synchronize(s)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(s.timed_steps):
        loss = loop.step(*batches[i % len(batches)])
    synchronize(s)
    elapsed = time.perf_counter() - started
    final_loss = float(loss)
    tokens_per_s = micro_batch * s.seq_len * s.timed_steps / elapsed
    achieved = tokens_per_s * per_token
    utilisation = mfu(tokens_per_s, per_token, device_name, s.precision)
    return {
        "micro_batch": micro_batch,
        "seq_len": s.seq_len,
        "warmup_steps": s.warmup_steps,
        "timed_steps": s.timed_steps,
        "elapsed_s": elapsed,
        "step_time_s": elapsed / s.timed_steps,
        "tokens_per_s": tokens_per_s,
        "samples_per_s": micro_batch * s.timed_steps / elapsed,
        "achieved_flops": achieved,
        "achieved_tflops": achieved / 1e12,
        "mfu": utilisation,
        "final_loss": final_loss,
        "loss_finite": math.isfinite(final_loss),
        "peak_memory_gib": peak_memory_gib(s),
    }


def run_phase(kind: str, s: Settings, micro_batch: int, per_token: float, device_name: str) -> dict[str, Any]:
    targets_only = kind.endswith(TARGETS_ONLY)
    if kind.startswith("plain_torch"):
        loop = TorchLoop(s, compiled=kind == "plain_torch_compiled", targets_only=targets_only)
    else:
        loop = DeepSpeedLoop(s, micro_batch, targets_only=targets_only)
    try:
        return timed_run(loop, s, micro_batch, per_token, device_name)
    finally:
        loop.close()
        del loop
        free_memory(s)


def run_phase_unless_oom(kind: str, s: Settings, micro_batch: int, per_token: float, device_name: str) -> dict:
    """`run_phase`, or a skipped entry when the micro-batch asked for does not fit on the GPU: the
    other phases still run and the summary is still written."""
    try:
        return run_phase(kind, s, micro_batch, per_token, device_name)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        if s.device != "cuda" or not is_oom(error):
            raise
    free_memory(s)  # outside the except block: its traceback no longer holds tensors
    return {"skipped": f"out of memory at micro-batch {micro_batch}"}


def probe(loop: TorchLoop, s: Settings, micro_batch: int, total: int) -> dict[str, Any]:
    """Two full plain-torch steps at `micro_batch` (the second with optimizer state allocated)."""
    started = time.perf_counter()
    oom, failure = False, None
    try:
        batches = make_batches(s, micro_batch, count=1)
        for _ in range(2):
            loop.step(*batches[0])
        synchronize(s)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        # Anything else a size can raise (e.g. a kernel's 2**31-element limit) rules it out too;
        # a real bug then fails every size, and the search reports its message.
        oom, failure = is_oom(error), None if is_oom(error) else f"{type(error).__name__}: {str(error)[:300]}"
    # Outside the except block: the exception's frames no longer hold the activations.
    batches = None
    loop.optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_reserved()
    free_memory(s)
    ran = not oom and failure is None
    return {
        "micro_batch": micro_batch,
        "oom": oom,
        "error": failure,
        "peak_reserved_gib": peak / 2**30 if ran else None,
        "fits": ran and peak <= MEMORY_MARGIN * total,
        "seconds": time.perf_counter() - started,
    }


def find_micro_batch(s: Settings, candidates: tuple[int, ...]) -> tuple[int, list[dict[str, Any]]]:
    """The largest candidate whose two plain-torch steps run within MEMORY_MARGIN of the GPU."""
    total = torch.cuda.get_device_properties(0).total_memory
    loop = TorchLoop(s)
    tries = []
    try:
        for micro_batch in candidates:
            result = probe(loop, s, micro_batch, total)
            tries.append(result)
            peak = "OOM" if result["oom"] else result["error"] or f"peak {result['peak_reserved_gib']:.1f} GiB"
            print(
                f"  micro-batch {micro_batch:>4}: {peak} of {total / 2**30:.1f} GiB -> "
                f"{'fits' if result['fits'] else 'too big'} ({result['seconds']:.1f} s)",
                flush=True,
            )
            if result["fits"]:
                return micro_batch, tries
    finally:
        loop.close()
        del loop
        free_memory(s)
    raise SystemExit(f"no micro-batch fits on this GPU: {tries}")


def ray_phase(s: Settings, micro_batch: int, per_token: float, device_name: str, mode: str) -> dict[str, Any]:
    """The DeepSpeed loop inside a one-worker Ray Train TorchTrainer, when Ray imports."""
    if mode == "off":
        return {"skipped": "--ray off" + (" (the --dry-run default)" if s.device == "cpu" else "")}
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as error:
        reason = (
            f"ray is not importable ({error}); its wheel (~70 MB) is over the device tool's 64 MiB "
            "carry limit, so the GPU image runs without it"
        )
        if mode == "on":
            raise SystemExit(f"--ray on: {reason}") from error
        return {"skipped": reason}

    def loop_per_worker(config: dict) -> None:
        import ray.train

        sys.path.insert(0, config["repo"])
        settings = Settings(**config["settings"])
        result = run_phase("deepspeed", settings, config["micro_batch"], config["per_token"], config["device_name"])
        # Ray Train (v2) keeps a report's metrics with its checkpoint only: the result travels as one.
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "result.json").write_text(json.dumps(result))
            metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and v is not None}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    use_gpu = s.device == "cuda"
    env = {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}
    started = ray.is_initialized()
    if not started:
        # address="local": a new cluster of this process, never one that /tmp/ray or RAY_ADDRESS points to.
        ray.init(
            address="local",
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            runtime_env={"env_vars": env},
        )
    try:
        with tempfile.TemporaryDirectory(prefix="ptft-gpu-mfu-ray-") as storage:
            trainer = TorchTrainer(
                loop_per_worker,
                train_loop_config={
                    "repo": str(REPO),
                    "settings": asdict(s),
                    "micro_batch": micro_batch,
                    "per_token": per_token,
                    "device_name": device_name,
                },
                scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(storage_path=storage, name="gpu_mfu"),
            )
            fitted = trainer.fit()
            if fitted.error is not None:
                raise RuntimeError(f"Ray Train run failed: {fitted.error}")
            with fitted.checkpoint.as_directory() as folder:
                return json.loads(Path(folder, "result.json").read_text())
    finally:
        if not started:
            ray.shutdown()


# --------------------------------------------------------------------------- report


def describe(name: str, result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"[{name}] skipped: {result['skipped']}"
    utilisation = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    memory = "" if result.get("peak_memory_gib") is None else f" peak_mem={result['peak_memory_gib']:.1f}GiB"
    return (
        f"[{name}] micro_batch={result['micro_batch']} steps={result['timed_steps']} "
        f"step_time={1000 * result['step_time_s']:.2f}ms tokens/s={result['tokens_per_s']:.1f} "
        f"achieved={result['achieved_flops']:.4e} FLOP/s ({result['achieved_tflops']:.3f} TFLOP/s) "
        f"MFU={utilisation} loss={result['final_loss']:.3f}{memory}"
    )


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def summary(report: dict[str, Any]) -> str:
    lines = [
        "",
        f"== summary: {report['model']['name']} seq {report['model']['seq_len']}, {report['precision']}, "
        f"{report['device']['name']}",
        f"{'run':<28} {'micro-batch':>11} {'step (ms)':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} "
        f"{'MFU >= 40%':>10}",
    ]
    for name, result in report["runs"].items():
        if "skipped" in result:
            lines.append(f"{name:<28} skipped: {result['skipped']}")
            continue
        utilisation = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
        ok = None if result["mfu"] is None else result["mfu"] >= TARGET_MFU
        lines.append(
            f"{name:<28} {result['micro_batch']:>11} {1000 * result['step_time_s']:>10.2f} "
            f"{result['tokens_per_s']:>12.1f} {result['achieved_tflops']:>9.3f} {utilisation:>7} "
            f"{verdict(ok):>10}"
        )
    peak_text = "n/a" if report["peak_flops"] is None else f"{report['peak_flops'] / 1e12:.1f} TFLOP/s"
    ratio = report["deepspeed_vs_torch"]
    if ratio is None:
        lines.append("DeepSpeed / plain torch tokens/s: n/a")
    else:
        ok = None if report["dry_run"] else ratio >= TARGET_DS_RATIO  # a tiny model on CPU says nothing
        lines.append(f"DeepSpeed / plain torch tokens/s: {ratio:.3f}  (target >= {TARGET_DS_RATIO}: {verdict(ok)})")
    for kind, ratio in report["targets_only_vs_full_head"].items():
        lines.append(f"{kind}: MLM head on the targets only / on every position, tokens/s: {ratio:.3f}")
    lines.append(
        f"FLOPs per token: {report['flops_per_token']:.6e} (6N + 12·L·d·T, N = "
        f"{report['model']['non_embedding_params']:,} without position embeddings); "
        f"peak {peak_text}; {report['flops_per_token_targets_only']:.6e} with the head on the "
        f"{100 * report['target_share']:.1f}% target positions only"
    )
    return "\n".join(lines)


def device_info(s: Settings) -> dict[str, Any]:
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {
            "name": torch.cuda.get_device_name(0),
            "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return {"name": "cpu", "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "ray"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny BERT, fp32, a few steps")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--micro-batch", type=int, help="skip the search and use this micro-batch")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 20; dry run 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 5; dry run 1)")
    parser.add_argument(
        "--ray",
        choices=("auto", "on", "off"),
        default=None,
        help="the Ray Train run: auto (when ray imports; the default on the GPU), on, off (the --dry-run default)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=420.0,
        help="seconds: phases that would start later are skipped (default 420)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time plain torch with torch.compile (after the others)"
    )
    parser.add_argument(
        "--targets-only",
        action="store_true",
        help="only the runs whose MLM head scores the target positions (they fit larger micro-batches)",
    )
    parser.add_argument(
        "--compile-layers",
        action="store_true",
        help="every run with each encoder layer compiled by torch.compile (fused elementwise kernels)",
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()

    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
        s = dry_settings(args)
        torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared CPU
        ray_mode = args.ray or "off"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or pass --dry-run")
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
        s = gpu_settings(args)
        ray_mode = args.ray or "auto"
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True

    s = replace(s, compile_layers=args.compile_layers)
    device = device_info(s)
    print(f"== gpu_mfu: device {device['name']}, precision {s.precision}, versions {versions()}", flush=True)
    shape_model = build_model(s)
    params, layers, hidden = model_shape(shape_model)
    del shape_model
    free_memory(s)
    per_token = flops_per_token(params, layers, hidden, s.seq_len)
    peak = peak_flops(device["name"], s.precision)
    print(
        f"== BERT hidden {s.hidden}, {layers} layers, {s.heads} heads, FFN {s.intermediate}, vocab {s.vocab}, "
        f"seq {s.seq_len}: {params:,} parameters without position embeddings, "
        f"{per_token:.4e} training FLOPs per token",
        flush=True,
    )

    search: list[dict[str, Any]] = []
    if args.micro_batch:
        micro_batch = args.micro_batch
    elif s.device == "cpu":
        micro_batch = 4
    else:
        print("== micro-batch search (two plain-torch steps each)", flush=True)
        micro_batch, search = find_micro_batch(s, MICRO_BATCH_CANDIDATES)
        print(f"== micro-batch {micro_batch}", flush=True)

    def out_of_time(phase: str) -> dict[str, Any] | None:
        spent = time.perf_counter() - began
        if spent > args.time_budget:
            return {"skipped": f"time budget: {spent:.0f} s spent of {args.time_budget:.0f} s before {phase}"}
        return None

    runs: dict[str, dict[str, Any]] = {}
    if args.targets_only:
        not_asked = {"skipped": "--targets-only"}
        runs.update(plain_torch=not_asked, deepspeed=not_asked, ray_train=not_asked)
    else:
        print("== plain torch", flush=True)
        runs["plain_torch"] = out_of_time("plain torch") or run_phase(
            "plain_torch", s, micro_batch, per_token, device["name"]
        )
        print(describe("plain_torch", runs["plain_torch"]), flush=True)

        print("== DeepSpeed ZeRO-1", flush=True)
        runs["deepspeed"] = out_of_time("DeepSpeed") or run_deepspeed(s, micro_batch, per_token, device["name"], runs)
        print(describe("deepspeed", runs["deepspeed"]), flush=True)

        print("== Ray Train (DeepSpeed loop in a one-worker TorchTrainer)", flush=True)
        runs["ray_train"] = out_of_time("Ray Train") or ray_phase(
            s, runs["deepspeed"].get("micro_batch", micro_batch), per_token, device["name"], ray_mode
        )
        print(describe("ray_train", runs["ray_train"]), flush=True)

    # The same two loops with the MLM head on the target positions only; their FLOPs per token
    # leave out what that head no longer computes, so their MFU counts only work done.
    share = target_share(s)
    per_token_targets = per_token - head_flops_saved_per_token(s, share)
    for kind in ("plain_torch", "deepspeed"):
        name = kind + TARGETS_ONLY
        print(f"== {kind}, MLM head on the targets only ({100 * share:.1f}% of positions)", flush=True)
        runs[name] = out_of_time(name) or run_phase_unless_oom(
            name, s, runs[kind].get("micro_batch", micro_batch), per_token_targets, device["name"]
        )
        print(describe(name, runs[name]), flush=True)

    if args.compile:
        print("== plain torch, torch.compile", flush=True)
        runs["plain_torch_compiled"] = out_of_time("torch.compile") or run_phase(
            "plain_torch_compiled", s, micro_batch, per_token, device["name"]
        )
        print(describe("plain_torch_compiled", runs["plain_torch_compiled"]), flush=True)

    torch_tps = runs["plain_torch"].get("tokens_per_s")
    ds_tps = runs["deepspeed"].get("tokens_per_s")
    report = {
        "benchmark": "gpu_mfu",
        "dry_run": s.device == "cpu",
        "device": device,
        "versions": versions(),
        "precision": s.precision,
        "compile_layers": s.compile_layers,
        "model": {
            "name": "bert-base" if not args.dry_run else "tiny-bert",
            "hidden": s.hidden,
            "layers": layers,
            "heads": s.heads,
            "intermediate": s.intermediate,
            "vocab": s.vocab,
            "seq_len": s.seq_len,
            "non_embedding_params": params,
            "attention": "sdpa",
        },
        "flops_per_token": per_token,
        "target_share": share,
        "flops_per_token_targets_only": per_token_targets,
        "peak_flops": peak,
        "micro_batch": micro_batch,
        "micro_batch_search": search,
        "runs": runs,
        "deepspeed_vs_torch": ds_tps / torch_tps if torch_tps and ds_tps else None,
        "targets_only_vs_full_head": {
            kind: runs[kind + TARGETS_ONLY]["tokens_per_s"] / runs[kind]["tokens_per_s"]
            for kind in ("plain_torch", "deepspeed")
            if runs[kind].get("tokens_per_s") and runs[kind + TARGETS_ONLY].get("tokens_per_s")
        },
        "targets": {"mfu": TARGET_MFU, "deepspeed_vs_torch": TARGET_DS_RATIO},
        "wall_s": time.perf_counter() - began,
    }
    print(summary(report), flush=True)
    print(f"== done in {report['wall_s']:.1f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"== results written to {args.json}", flush=True)
    finish_distributed()
    return 0


def run_deepspeed(
    s: Settings, micro_batch: int, per_token: float, device_name: str, runs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """DeepSpeed at the plain-torch micro-batch; if it runs out of memory there, the next smaller
    candidate, and plain torch is timed again at that one so the ratio compares equal batches."""
    smaller = [m for m in MICRO_BATCH_CANDIDATES if m < micro_batch]
    for candidate in [micro_batch, *smaller]:
        result = run_phase_unless_oom("deepspeed", s, candidate, per_token, device_name)
        if "skipped" in result:
            print(f"  DeepSpeed ran out of memory at micro-batch {candidate}", flush=True)
            continue
        if candidate != micro_batch:
            runs["plain_torch_at_search_micro_batch"] = runs["plain_torch"]
            runs["plain_torch"] = run_phase("plain_torch", s, candidate, per_token, device_name)
            print(describe("plain_torch", runs["plain_torch"]), flush=True)
        return result
    raise SystemExit("DeepSpeed runs out of memory at every micro-batch")


def finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
