"""Pick the accelerator DeepSpeed uses and prepare the process for it.

DeepSpeed chooses its accelerator when it is first imported, so `DS_ACCELERATOR` must be set
before that import in every process that trains (Ray workers included).
"""

from __future__ import annotations

import os

# DeepSpeed's CPU shared-memory all-reduce: `deepspeed.init_distributed` JIT-compiles and loads it
# in every process, but only `inference_all_reduce` (tensor-parallel inference) ever calls it;
# training all-reduces through torch.distributed. Loading it takes torch's extension build lock,
# which a worker killed while holding it leaves behind, and every later worker then waits on it
# forever; on a fresh machine it also costs a 1-2 minute compile. ptft never calls it: skip it.
INFERENCE_ONLY_CPU_OPS = ("deepspeed_shm_comm",)


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
    if not use_gpu:
        skip_inference_only_ops()
    if num_threads:
        torch.set_num_threads(max(1, int(num_threads)))


def skip_inference_only_ops() -> None:
    """Mark DeepSpeed's inference-only CPU ops unavailable, so `init_distributed` never builds them."""
    import deepspeed.ops

    for name in INFERENCE_ONLY_CPU_OPS:
        deepspeed.ops.__compatible_ops__[name] = False
