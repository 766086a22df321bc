"""Pick the accelerator DeepSpeed uses and prepare the process for it.

DeepSpeed chooses its accelerator when it is first imported, so `DS_ACCELERATOR` must be set
before that import in every process that trains (Ray workers included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# `make setup` compiles DeepSpeed's CPU ops into the virtualenv rather than ~/.cache: the build is
# part of the install, so a fresh HOME (CI, a new user) finds it instead of compiling per worker.
PREBUILT_OPS = Path(sys.prefix) / "torch_extensions"
STALE_LOCK_S = 15 * 60  # the CPU op compiles in 1-2 minutes, on a busy 2-core machine too


def deepspeed_env(use_gpu: bool) -> dict[str, str]:
    """Environment variables a training process needs before DeepSpeed is imported."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def prepare_process(use_gpu: bool, num_threads: int | None = None) -> None:
    """Set DeepSpeed's accelerator and torch's thread count for this process."""
    import torch  # here, not at the top: the driver imports this module for deepspeed_env alone

    for key, value in deepspeed_env(use_gpu).items():
        os.environ.setdefault(key, value)
    if PREBUILT_OPS.is_dir():
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PREBUILT_OPS))
        clear_stale_build_locks(PREBUILT_OPS)
    if num_threads:
        torch.set_num_threads(max(1, int(num_threads)))


def clear_stale_build_locks(folder: Path, older_than_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove build locks no build can still hold. torch's extension loader makes `<op>/lock`
    while one process compiles and every other waits until it is gone, with no owner recorded: a
    build killed midway leaves it, and every later training process would wait forever."""
    stale = [
        lock for lock in folder.glob("*/lock") if lock.is_file() and time.time() - lock.stat().st_mtime > older_than_s
    ]
    for lock in stale:
        lock.unlink(missing_ok=True)
        print(f"ptft: removed {lock}, left by a DeepSpeed op build that was stopped", file=sys.stderr)
    return stale


def prebuild_cpu_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory collective once, into the virtualenv."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    PREBUILT_OPS.mkdir(exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PREBUILT_OPS))
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prebuild", action="store_true", help="compile DeepSpeed's CPU ops now")
    if parser.parse_args().prebuild:
        prebuild_cpu_ops()
