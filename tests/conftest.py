"""Shared test helpers. Service fixtures (Ray cluster, MLflow server) live in tests/services.py
and are session-scoped: every integration and e2e test shares one of each."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent


def _hermetic_home() -> Path:
    """Point every per-user location at a fresh folder of this test run, before anything reads one.

    The suite must pass on a machine that never ran it and must not change the user's files: Ray's
    token (~/.ray/auth_token), Hugging Face, MLflow, matplotlib and XDG caches all live under the
    folder, which every subprocess (`ray start`, `ptft`, Chromium) inherits through the environment.
    The clusters run with token auth, so the run's own token is made here: Ray reads
    RAY_AUTH_TOKEN_PATH when it is imported, and clients send the token only in token mode.
    """
    if os.environ.get("PTFT_TEST_HOME"):  # an xdist worker: its controller made the folder
        return Path(os.environ["PTFT_TEST_HOME"])
    home = Path(tempfile.mkdtemp(prefix="ptft-test-home-"))
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(
        {
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "HF_HOME": str(home / ".cache" / "huggingface"),
            "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "DS_ACCELERATOR": "cpu",
            "PTFT_TEST_HOME": str(home),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    os.environ.pop("RAY_AUTH_TOKEN", None)
    return home


TEST_HOME = _hermetic_home()

pytest_plugins = ["tests.services"]

# Where MLflow writes the artifacts of an experiment made without an artifact location: the working
# directory. A test that does so fills the repository (or CI's clone); the session then fails.
STRAY_MLFLOW_ARTIFACTS = Path.cwd() / "mlruns"
_STRAY_BEFORE = STRAY_MLFLOW_ARTIFACTS.exists()  # an older checkout's are not this run's


# `make test` spreads the tests over pytest-xdist workers. A group of tests stays in one worker: a
# module (its module-scoped fixtures run once), or the whole e2e package (one demo run). Worker i
# starts with groups i and i+3 of this order, and takes the rest as it frees up; the pairs balance
# each worker's load (seconds per group in a 3-worker `.ci/run` on 2 cores, 2026-11-30: e2e 1098,
# cluster_submit 723, sweeps 687, resume_isolation 198, serving 404, faults 406, tracking_outage
# 395, training_matrix 239, all others 420 together).
LONGEST_FIRST = (
    "tests/e2e",
    "tests/integration/test_cluster_submit.py",
    "tests/integration/test_sweeps.py",
    "tests/integration/test_resume_isolation.py",
    "tests/integration/test_serving.py",
    "tests/integration/test_faults.py",
    "tests/integration/test_tracking_outage.py",
    "tests/integration/test_training_matrix.py",
)


def _group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "tests/e2e" if path.startswith("tests/e2e/") else path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {group: index for index, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable: collection order otherwise


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling with our groups as scopes (its loadgroup marks do not group under
    pytest 9.2: they rename `item._nodeid`, which pytest no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return GroupScheduling(config, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller stops the shared services once every worker is done
    from tests.services import stop_shared_services

    stop_shared_services()
    shutil.rmtree(TEST_HOME, ignore_errors=True)
    if STRAY_MLFLOW_ARTIFACTS.exists() and not _STRAY_BEFORE:
        why = f"tests wrote MLflow artifacts to {STRAY_MLFLOW_ARTIFACTS}: give each experiment an artifact_location"
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line("")  # after the progress line
        reporter.write_sep("=", why, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def tiny_config_dict(storage: Path) -> dict:
    """A complete, small pipeline config on synthetic data (for unit and integration tests)."""
    return {
        "name": "unit",
        "storage": str(storage),
        "data": {
            "corpus": {"source": {"type": "synthetic", "split": "corpus", "num_examples": 300}},
            "task": {
                "train": {"type": "synthetic", "split": "train", "num_examples": 64},
                "validation": {"type": "synthetic", "split": "validation", "num_examples": 32},
                "test": {"type": "synthetic", "split": "test", "num_examples": 32},
            },
        },
        "tokenize": {"vocab_size": 200, "seq_len": 32},
    }


def loop_context(tmp_path: Path, pipeline_run_id: str):
    """The context of a pre-training stage whose loop a test runs on Ray Train by itself: storage
    and a SQLite store under `tmp_path`, no MLflow run."""
    from components.stage import StageContext

    return StageContext(
        pipeline_run_id=pipeline_run_id,
        stage="pretrain",
        output_dir=tmp_path / "out",
        storage=tmp_path / "storage",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment_id="0",
        mlflow_run_id="none",
    )


def answers_ctrl_c() -> None:
    """`preexec_fn` of a process a test stops with Ctrl-C (SIGINT): as at a terminal, whatever the
    suite inherited. A suite started in the background (`make test &`) has SIGINT ignored, and the
    process would inherit that and run on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 300, poll_s: float = 0.2):
    """Poll `condition` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f}s")


POSITIONS = 64  # tiny_classifier reads 64 tokens: longer texts are truncated
WORDS = "the a film plot movie was is and but not very good bad great dull superb moving tedious".split()


def tiny_classifier(folder: Path, seed: int) -> Path:
    """A 2-layer BERT classifier with a word-level vocabulary, built here (no download)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(words)}, model_max_length=POSITIONS)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_MLFLOW_TEMPLATE: list[Path] = []  # this process's empty store, made once


def sqlite_store(path: Path) -> str:
    """The URI of a new, empty MLflow sqlite store at `path`: a copy of one that this process made
    once. Each new store runs MLflow's schema migrations, about a second (31 in the unit tier)."""
    if not _MLFLOW_TEMPLATE:
        from mlflow import MlflowClient

        template = Path(tempfile.mkdtemp(dir=TEST_HOME, prefix="mlflow-template-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates its tables
        _MLFLOW_TEMPLATE.append(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MLFLOW_TEMPLATE[0], path)
    return f"sqlite:///{path}"


def register_in_sqlite(folder: Path, store: Path, name: str, task, score: float, test_split: str) -> tuple[str, dict]:
    """`folder` registered as `name` in a new sqlite MLflow store under `store`, as the finetune stage
    registers it (in a run of its own, no lineage). Returns the tracking URI and the version."""
    from mlflow import MlflowClient

    from components import registry

    uri = sqlite_store(store / "mlflow.db")
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(name, artifact_location=str(store / "artifacts")))
    version = registry.register_classifier(
        folder,
        name=name,
        run_id=run.info.run_id,
        tracking_uri=uri,
        test_accuracy=score,
        test_split=test_split,
        lineage={},
        task=task,
    )
    return uri, version


def absent(message: str) -> NoReturn:
    """A test's dependency is missing here: skip it, or fail it where PTFT_NO_SKIPS is set (.ci/run
    sets it, so CI never passes by skipping what it was meant to run)."""
    if os.environ.get("PTFT_NO_SKIPS"):
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def small_disk(folder: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "2M") mounted at `folder`, a disk that fills up for real, or that
    refuses every write (needs root, as CI has, and mount(8))."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        absent("root and mount(8), to mount a small tmpfs for a full disk")
    folder.mkdir(parents=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def system_tool(name: str, package: str) -> str:
    """The path of a system program a test needs (Prometheus, Chromium), else `absent`."""
    path = shutil.which(name)
    if path:
        return path
    absent(f"{name} is not installed: apt-get install {package} (.ci/run installs it)")


def shared(relative: str) -> Path:
    """A path under ../shared (the real data sets and schemas beside the checkout), else `absent`."""
    path = REPO.parent / "shared" / relative
    if not path.exists():
        absent(f"{path} is absent: the real data sets and schemas are read from ../shared beside the checkout")
    return path
