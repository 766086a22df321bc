"""components/flops.py: FLOPs per token, peak lookup, MFU and the parameter count it uses."""

from __future__ import annotations

import pytest

from components import flops


def test_flops_per_token_is_6n_plus_12ldt():
    assert flops.flops_per_token(1000, 2, 64, 128) == 6 * 1000 + 12 * 2 * 64 * 128
    assert flops.flops_per_token(0, 1, 1, 1) == 12.0
    # BERT-base at seq 512: N = 109,514,298 BertForMaskedLM parameters (decoder tied to the word
    # embeddings) less 512 x 768 position embeddings.
    n = 109_514_298 - 512 * 768
    assert flops.flops_per_token(n, 12, 768, 512) == pytest.approx(6 * n + 12 * 12 * 768 * 512)
    assert flops.flops_per_token(n, 12, 768, 512) == pytest.approx(7.1136e8, rel=1e-4)


def test_attention_term_grows_with_sequence_length():
    short = flops.flops_per_token(10**6, 12, 768, 128)
    long = flops.flops_per_token(10**6, 12, 768, 512)
    assert long - short == 12 * 12 * 768 * (512 - 128)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),  # SXM, as torch.cuda.get_device_name() reports it
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("nvidia h100 pcie", 756.0),  # case-insensitive
    ],
)
def test_peak_of_known_gpus(name, tflops):
    assert flops.peak_flops(name, "bf16") == pytest.approx(tflops * 1e12)
    assert flops.peak_flops(name, "fp16") == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    ("name", "precision"),
    [
        ("cpu", "bf16"),
        ("x86_64", "fp32"),
        ("NVIDIA H100 80GB HBM3", "fp32"),  # only half-precision tensor-core peaks are listed
        ("NVIDIA H100 80GB HBM3", "tf32"),
        ("Tesla T4", "fp16"),  # unlisted GPU
        ("", "bf16"),
    ],
)
def test_peak_unknown_is_none(name, precision):
    assert flops.peak_flops(name, precision) is None


def test_mfu_arithmetic():
    per_token = 7.0e8
    # 500k tokens/s x 7e8 FLOPs = 350 TFLOP/s of 989.4 on an H100 SXM.
    assert flops.mfu(500_000, per_token, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(350e12 / 989.4e12)
    assert flops.mfu(500_000, per_token, "NVIDIA H100 PCIe", "bf16") == pytest.approx(350e12 / 756e12)
    # Over 8 devices the same global rate is an eighth of the utilisation.
    assert flops.mfu(500_000, per_token, "NVIDIA H200", "bf16", num_devices=8) == pytest.approx(350e12 / (8 * 989.4e12))
    assert flops.mfu(0.0, per_token, "NVIDIA H200", "bf16") == 0.0


def test_mfu_none_without_a_peak():
    assert flops.mfu(1e6, 1e9, "cpu", "fp32") is None
    assert flops.mfu(1e6, 1e9, "NVIDIA H100 80GB HBM3", "fp32") is None
    assert flops.mfu(1e6, 1e9, "Tesla T4", "bf16") is None


def test_model_shape_of_tiny_bert_excludes_position_embeddings():
    from transformers import BertConfig, BertForMaskedLM

    hidden, layers, vocab, positions, inner = 32, 2, 100, 40, 64
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=inner,
            max_position_embeddings=positions,
        )
    )
    total = sum(p.numel() for p in model.parameters())  # tied decoder weight counted once
    params, got_layers, got_hidden = flops.model_shape(model)
    assert (got_layers, got_hidden) == (layers, hidden)
    assert params == total - positions * hidden

    # By hand: word + token-type embeddings and their LayerNorm, per layer Q/K/V/O, FFN and two
    # LayerNorms, the MLM head's transform and LayerNorm, and its output bias (decoder tied).
    embeddings = vocab * hidden + 2 * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + (hidden * inner + inner) + (inner * hidden + hidden) + 2 * 2 * hidden
    head = hidden * hidden + hidden + 2 * hidden + vocab
    assert params == embeddings + layers * layer + head


def test_model_shape_of_gpt2_style_config_and_parameters():
    """GPT-2 names: n_layer / n_embd, position embeddings in `transformer.wpe`."""
    import torch

    class Config:
        n_layer = 3
        n_embd = 8

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.wte = torch.nn.Embedding(50, 8)
            self.wpe = torch.nn.Embedding(16, 8)
            self.transformer = torch.nn.Module()
            self.transformer.wpe = torch.nn.Embedding(16, 8)
            self.head = torch.nn.Linear(8, 8)

    params, layers, hidden = flops.model_shape(Tiny())
    assert (layers, hidden) == (3, 8)
    assert params == 50 * 8 + 8 * 8 + 8


def test_model_shape_counts_zero3_partitioned_parameters_whole():
    import torch

    class Config:
        num_hidden_layers = 1
        hidden_size = 4

    class Partitioned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves on a rank
            self.weight.ds_numel = 4 * 4

    assert flops.model_shape(Partitioned()) == (16, 1, 4)
