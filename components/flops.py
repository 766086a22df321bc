"""Training FLOPs and model FLOPs utilisation (MFU), as nanoGPT and PaLM count them.

No torch import: the GPU benchmark script and the training loops share these numbers.

FLOPs per trained token = 6 N + 12 L d T, where N is the parameter count without position
embeddings (forward 2N, backward 4N), and 12 L d T the attention score and value products of
L layers of width d over T tokens (PaLM, appendix B). MFU = achieved FLOP/s / the device's peak.
"""

from __future__ import annotations

# Dense peak TFLOP/s per device for bf16/fp16 tensor-core math (vendor data sheets, no sparsity).
# Matched by substring of the device name, most specific first.
PEAK_TFLOPS_HALF: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),  # before "L4", which is a substring of it
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def flops_per_token(non_embedding_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) for one token of a sequence of `seq_len` tokens."""
    return 6.0 * non_embedding_params + 12.0 * num_layers * hidden_size * seq_len


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s for `precision`, or None when unknown (CPU, fp32, unlisted GPU)."""
    if precision not in ("bf16", "fp16"):
        return None
    for name, tflops in PEAK_TFLOPS_HALF:
        if name.lower() in device_name.lower():
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, per_token: float, device_name: str, precision: str, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation over `num_devices` devices, or None when the peak is unknown."""
    peak = peak_flops(device_name, precision)
    if peak is None:
        return None
    return tokens_per_s * per_token / (peak * num_devices)


def model_shape(model) -> tuple[int, int, int]:
    """(parameters without position embeddings, layers, hidden size) of an HF model."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    params = 0
    for name, param in model.named_parameters():
        if "position_embeddings" not in name and ".wpe." not in name and not name.startswith("wpe."):
            params += getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions the tensor
    return params, layers, hidden
