"""benchmarks/gpu_mfu.sh --dry-run: the GPU benchmark's code paths (plain torch, DeepSpeed ZeRO-1)
on CPU with a tiny BERT, as a real subprocess through the shell script the GPU machine runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from components.flops import flops_per_token

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu-mfu") / "result.json"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's python3 first
    env.pop("PTFT_DRY_RUN", None)
    env.pop("OUT", None)
    process = subprocess.run(
        ["bash", "benchmarks/gpu_mfu.sh", "--dry-run", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # ~10 s alone; a 2-core machine running the rest of the suite is far slower
    )
    assert process.returncode == 0, f"rc {process.returncode}\n{process.stdout[-4000:]}\n{process.stderr[-4000:]}"
    return process, json.loads(out.read_text())


def printed(stdout: str, run: str) -> dict[str, float]:
    """The numbers of a run's `[run] ... tokens/s=X achieved=Y FLOP/s ...` line."""
    match = re.search(
        rf"^\[{run}\] .*?tokens/s=(?P<tps>[\d.]+) achieved=(?P<flops>[\d.e+-]+) FLOP/s .*MFU=(?P<mfu>\S+)",
        stdout,
        re.MULTILINE,
    )
    assert match, f"no [{run}] result line in:\n{stdout[-3000:]}"
    return {"tokens_per_s": float(match["tps"]), "achieved_flops": float(match["flops"]), "mfu": match["mfu"]}


def test_prints_tokens_per_s_for_torch_and_deepspeed(dry_run):
    process, _ = dry_run
    for run in ("plain_torch", "deepspeed"):
        line = printed(process.stdout, run)
        assert line["tokens_per_s"] > 0
        assert line["mfu"] == "n/a"
    assert "nvidia-smi" not in process.stdout + process.stderr  # no GPU query, no wheel install
    assert "installing" not in process.stdout
    assert "DeepSpeed / plain torch tokens/s:" in process.stdout
    assert re.search(r"^ray_train\s+skipped", process.stdout, re.MULTILINE)


def test_json_has_both_runs_with_null_mfu_on_cpu(dry_run):
    _, report = dry_run
    assert report["dry_run"] is True
    assert report["device"]["name"] == "cpu"
    assert report["peak_flops"] is None
    for run in ("plain_torch", "deepspeed"):
        result = report["runs"][run]
        assert result["tokens_per_s"] > 0
        assert result["mfu"] is None
        assert result["loss_finite"] is True
        assert result["micro_batch"] == report["micro_batch"]
        assert result["tokens_per_s"] == pytest.approx(
            result["micro_batch"] * result["seq_len"] * result["timed_steps"] / result["elapsed_s"]
        )
    assert report["deepspeed_vs_torch"] == pytest.approx(
        report["runs"]["deepspeed"]["tokens_per_s"] / report["runs"]["plain_torch"]["tokens_per_s"]
    )
    assert "skipped" in report["runs"]["ray_train"]


def test_achieved_flops_is_tokens_per_s_times_flops_per_token(dry_run):
    process, report = dry_run
    model = report["model"]
    per_token = flops_per_token(model["non_embedding_params"], model["layers"], model["hidden"], model["seq_len"])
    assert report["flops_per_token"] == pytest.approx(per_token)
    for run in ("plain_torch", "deepspeed"):
        result = report["runs"][run]
        assert result["achieved_flops"] == pytest.approx(result["tokens_per_s"] * per_token, rel=1e-9)
        assert result["achieved_tflops"] == pytest.approx(result["achieved_flops"] / 1e12)
        # The printed numbers are rounded: tokens/s to 0.1, FLOP/s to 5 significant digits.
        line = printed(process.stdout, run)
        assert line["tokens_per_s"] == pytest.approx(result["tokens_per_s"], abs=0.051)
        assert line["achieved_flops"] == pytest.approx(result["tokens_per_s"] * per_token, rel=1e-4)


def test_scoring_only_the_targets_gives_the_same_loss_and_counts_fewer_flops(dry_run):
    """The MLM head on the target positions only: the same loss as on every position (same
    weights, batches and dropout draws), and MFU counts only the FLOPs it still does."""
    process, report = dry_run
    share = report["target_share"]
    assert 0.15 <= share < 0.2  # ~15% masked, plus the first position of each row
    assert report["flops_per_token_targets_only"] < report["flops_per_token"]
    for kind in ("plain_torch", "deepspeed"):
        full, targets_only = report["runs"][kind], report["runs"][f"{kind}_targets_only"]
        assert targets_only["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5)
        assert targets_only["achieved_flops"] == pytest.approx(
            targets_only["tokens_per_s"] * report["flops_per_token_targets_only"]
        )
        assert report["targets_only_vs_full_head"][kind] == pytest.approx(
            targets_only["tokens_per_s"] / full["tokens_per_s"]
        )
        assert printed(process.stdout, f"{kind}_targets_only")["tokens_per_s"] > 0
