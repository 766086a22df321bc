"""Training throughput over a window of steps: tokens/s, samples/s, step time, achieved FLOP/s
and, on a GPU with a known peak, MFU (components/flops.py)."""

from __future__ import annotations

import time

from components import flops


def device_name(use_gpu: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if use_gpu and torch.cuda.is_available() else "cpu"


class Throughput:
    """Counts the samples and tokens of the steps since the last `reset` (globally: pass them × world).
    A step's tokens are its rows × seq_len unless it says otherwise (a batch cut to its longest row)."""

    def __init__(self, model, *, seq_len: int, world: int, precision: str, device_name: str):
        params, layers, hidden = flops.model_shape(model)
        self.seq_len = seq_len
        self.world = world
        self.precision = precision
        self.device_name = device_name
        self.flops_per_token = flops.flops_per_token(params, layers, hidden, seq_len)
        self.reset()

    def reset(self) -> None:
        self.samples, self.tokens, self.steps, self.start = 0, 0, 0, time.perf_counter()

    def add(self, samples: int, tokens: int | None = None) -> None:
        self.samples += samples
        self.tokens += samples * self.seq_len if tokens is None else tokens
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Metrics of the window so far (empty before the first step)."""
        elapsed = time.perf_counter() - self.start
        if not self.steps or elapsed <= 0:
            return {}
        tokens_per_s = self.tokens / elapsed
        metrics = {
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/samples_per_s": self.samples / elapsed,
            "throughput/step_time_s": elapsed / self.steps,
            "throughput/tflops": tokens_per_s * self.flops_per_token / 1e12,
        }
        utilisation = flops.mfu(tokens_per_s, self.flops_per_token, self.device_name, self.precision, self.world)
        if utilisation is not None:
            metrics["throughput/mfu"] = utilisation
        return metrics
