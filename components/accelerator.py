"""Pick the accelerator DeepSpeed uses and prepare the process for it.

DeepSpeed chooses its accelerator when it is first imported, so `DS_ACCELERATOR` must be set
before that import in every process that trains (Ray workers included).
"""

from __future__ import annotations

import argparse
import os


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
    if num_threads:
        torch.set_num_threads(max(1, int(num_threads)))


def prebuild_cpu_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory collective once (it is cached under ~/.cache)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prebuild", action="store_true", help="compile DeepSpeed's CPU ops now")
    if parser.parse_args().prebuild:
        prebuild_cpu_ops()
