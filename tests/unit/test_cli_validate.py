"""`ptft validate` through the real console script: exit 2, a message naming the key, no traceback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, small_disk, tiny_config_dict

PTFT = str(Path(sys.executable).parent / "ptft")


def _validate(config_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PTFT, "validate", str(config_path), *overrides], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.fixture(scope="module")
def good_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "good.yaml"
    raw = tiny_config_dict(folder / "store")
    (folder / "reviews.csv").write_text("sentence,polarity\ngreat,positive\nbad,negative\n")  # train's labels
    raw["data"]["task"]["validation"] = {
        "type": "file",
        "path": str(folder / "reviews.csv"),
        "text_column": "sentence",
        "label_column": "polarity",
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_good_config_passes(good_config: Path) -> None:
    result = _validate(good_config)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


BAD = {
    "wrong type": (["pretrain.max_steps=twenty"], "pretrain.max_steps"),
    "unknown key": (["pretrain.learning_rat=0.1"], "pretrain.learning_rat"),
    "missing data file": (["data.task.test={type: file, path: /nonexistent/test.jsonl}"], "data.task.test.path"),
    "label column": (["data.task.validation.label_column=stars"], "data.task.validation.label_column"),
    "vocab too small": (["tokenize.vocab_size=4"], "tokenize.vocab_size"),
    "sequence over positions": (["tokenize.seq_len=4096"], "tokenize.seq_len"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_config_exits_2_naming_the_key(good_config: Path, case: str) -> None:
    overrides, key = BAD[case]
    result = _validate(good_config, *overrides)
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr
    assert "Fix:" in result.stderr
    assert "Traceback" not in result.stderr


def test_several_problems_in_one_message(good_config: Path) -> None:
    result = _validate(good_config, "pretrain.max_steps=x", "tokenize.vocab_size=4")
    assert result.returncode == 2
    assert "2 problems" in result.stderr


def test_run_rejects_a_bad_config_before_starting_ray(good_config: Path) -> None:
    result = subprocess.run(
        [PTFT, "run", str(good_config), "tokenize.seq_len=4096"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2
    assert "tokenize.seq_len" in result.stderr
    assert "Ray" not in result.stdout + result.stderr  # no local Ray instance was started


def test_run_names_every_unknown_rerun_before_starting_ray(good_config: Path) -> None:
    command = [PTFT, "run", str(good_config), "--rerun", "nope", "--rerun", "finetune", "--rerun", "tune.x"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "2 problems" in result.stderr and "'nope'" in result.stderr and "'tune.x'" in result.stderr
    assert "Ray" not in result.stdout + result.stderr


def test_version_names_ptft_and_the_stack_it_runs_on() -> None:
    from importlib.metadata import version

    result = subprocess.run([PTFT, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ptft {version('ptft')} (Python {sys.version.split()[0]}; ")
    for package in ("torch", "transformers", "deepspeed", "ray", "mlflow"):
        assert f"{package} {version(package)}" in result.stdout


def test_every_config_command_takes_the_storage_as_an_option(good_config: Path, tmp_path: Path) -> None:
    result = _validate(good_config, "--storage", str(tmp_path / "elsewhere"))
    assert result.returncode == 0, result.stderr
    assert f"storage {tmp_path / 'elsewhere'}," in result.stdout  # the same as the override storage=PATH
    for command in ("run", "sweep", "validate", "submit", "ui"):
        usage = subprocess.run([PTFT, command, "--help"], capture_output=True, text=True, timeout=60).stdout
        assert "--storage PATH" in usage, command


@pytest.mark.parametrize(
    ("command", "fix"),
    [
        (["status", "storage=/x"], "takes it as --storage /x"),
        (["report", "storage=/x"], "takes it as --storage /x"),
        (["resume", "pretrain.max_steps=3"], "ptft resume takes no overrides"),
        (["run", "storage=/x"], "the config file comes first: ptft run CONFIG storage=/x"),
    ],
)
def test_an_override_where_an_id_or_file_goes_says_what_to_write(command: list[str], fix: str) -> None:
    """`ptft status storage=/x` once asked a cluster for a job of that name and failed on its auth."""
    result = subprocess.run([PTFT, *command], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "looks like a config override" in result.stderr and fix in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr


@pytest.mark.parametrize(
    "argv, named",
    [
        (["ui", "--port", "99999"], "argument --port: 99999 is no TCP port"),
        (["ui", "--host", "http://0.0.0.0"], "argument --host: 'http://0.0.0.0': a URL"),
        (["runs", "--limit", "0"], "argument --limit: 0: use a whole number of at least 1"),
        (["stop", "job", "--timeout", "-1"], "argument --timeout: -1: use a number of seconds above 0"),
        (["run", "configs/demo.yaml", "--progress-every", "-1"], "argument --progress-every: -1: use a number"),
        (["stop", "job", "--timeout", "nan"], "argument --timeout: nan: use a finite number of seconds"),
        (["init", "data.csv", "--seed", "-1"], "argument --seed: -1: use a seed from 0 to"),
        (["init", "data.csv", "--name", "team/reviews"], "argument --name: 'team/reviews': holds '/', which MLflow"),
        (["logs", "job", "--address", "notaurl"], "argument --address: 'notaurl' is not the dashboard's URL"),
        (["status", "job", "--address", "head:8265"], "is not the dashboard's URL: use http://head:8265"),
        (["stop", "job", "--address", "http://127.0.0.1:99999"], "Port out of range"),
    ],
)
def test_an_option_value_that_cannot_work_is_a_usage_error(
    argv: list[str], named: str, capsys: pytest.CaptureFixture
) -> None:
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and named in capsys.readouterr().err


def test_submit_from_a_working_dir_that_does_not_exist_names_it(
    good_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pipelines.cli import main

    missing = tmp_path / "no-such-project"
    assert main(["submit", str(good_config), "--working-dir", str(missing), "--address", "http://127.0.0.1:1"]) == 2
    assert f"--working-dir = '{missing}': does not exist" in capsys.readouterr().err


def test_a_serve_config_exported_to_a_folder_is_refused_before_the_registry_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pipelines.cli import main

    assert main(["serve", "models:/demo@champion", "--export", str(tmp_path), "tracking.uri=http://127.0.0.1:1"]) == 2
    assert f"--export = '{tmp_path}': a folder" in capsys.readouterr().err


def test_ui_on_a_port_in_use_says_so_instead_of_starting(tmp_path: Path) -> None:
    """MLflow's server started, logged the bind error and went on with exit 0; and the URL ptft
    printed first pointed at whatever held the port. A subprocess: `ptft ui` replaces its process."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [PTFT, "ui", "configs/demo.yaml", "--port", str(port), f"storage={tmp_path}"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"127.0.0.1:{port} is in use" in result.stderr and "MLflow UI on" not in result.stdout


def test_serve_on_a_port_in_use_says_so_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve's ingress failed to bind, and `ptft serve` ended in a traceback (exit 1)."""
    from pipelines.cli import main
    from tests.conftest import tiny_classifier

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray: ptft starts Serve, on serve.port
    folder = tiny_classifier(tmp_path / "model", seed=0)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(folder), f"serve.port={port}", f"storage={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"serve.port = {port}: 127.0.0.1:{port} is in use by pid {os.getpid()} (" in err, err  # who holds it
    assert "Traceback" not in err


# `ptft` itself, telling which of the modules that serving needs it imported before it ended.
PTFT_TELLING_IMPORTS = (
    "import sys; from pipelines.cli import main; code = main(sys.argv[1:]); "
    "print('imported:', *[name for name in ('torch', 'ray.serve') if name in sys.modules]); sys.exit(code)"
)


@pytest.mark.parametrize("command", ["serve", "explain", "predict", "promote", "rollback"])
def test_a_registry_that_does_not_answer_exits_2_naming_the_tracking_uri(
    command: str, good_config: Path, tmp_path: Path
) -> None:
    """Not 'no such model': nothing listens on that port (a real refused connection). At once:
    MLflow's own client would retry for minutes, past the timeout here. And before torch and Ray
    Serve are imported: `ptft serve`, `explain` and `predict` took 4.4 s to say it, `promote` 1.6 s."""
    from components.net import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    model = {"promote": ["m", "1"], "rollback": ["m"]}.get(command, ["models:/m@champion"])
    (tmp_path / "rows.csv").write_text("text\na fine film\n")
    texts = {"explain": ["a text"], "predict": [str(tmp_path / "rows.csv")]}.get(command, [])
    output = ["--output", str(tmp_path / "out.jsonl")] if command == "predict" else []
    where = ["--tracking-uri", uri] if command == "explain" else [f"tracking.uri={uri}"]
    result = subprocess.run(
        [sys.executable, "-c", PTFT_TELLING_IMPORTS, command, *model, *texts, *output, "--config", str(good_config)]
        + where,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "GET /health failed: ConnectionError" in result.stderr and uri in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1] == "imported:", result.stdout


@pytest.mark.parametrize("command", ["serve", "explain", "predict", "promote", "rollback", "ui"])
def test_without_a_config_outside_the_project_a_missing_default_store_is_named_not_made(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config these commands read configs/demo.yaml, so anywhere but the project's folder
    they said `file not found` (`explain` only for a registered model). Now they read the defaults,
    the MLflow store in ./ptft-runs; where that is not, they say so rather than making an empty one
    and reporting the model unregistered."""
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("text\na fine film\n")
    model = {"promote": ["m", "1"], "rollback": ["m"], "ui": []}.get(command, ["models:/m@champion"])
    texts = {"explain": ["a text"], "predict": ["rows.csv", "--output", "out.jsonl"]}.get(command, [])
    assert main([command, *model, *texts]) == 2
    err = capsys.readouterr().err
    assert f"there is no MLflow store at {tmp_path / 'ptft-runs' / 'mlflow.db'}" in err, err
    assert "--config" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.db"))


def test_promote_and_rollback_without_a_config_use_the_store_in_ptft_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the project's folder, with the registry in ./ptft-runs as `ptft run` leaves it."""
    from mlflow import MlflowClient

    from pipelines.cli import main
    from tests.conftest import sqlite_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local `ptft serve` follows the alias itself
    client = MlflowClient(sqlite_store(tmp_path / "ptft-runs" / "mlflow.db"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", str(tmp_path / "model"))
    assert main(["promote", "m", "1"]) == 0 and main(["promote", "m", "2"]) == 0
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert main(["rollback", "m"]) == 0
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert "m: champion is back to v1 (was v2)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_tracking_server_that_does_not_answer_is_refused_at_once(
    command: str, good_config: Path, tmp_path: Path
) -> None:
    """`ptft run` on the local Ray waited four minutes in MLflow's own retries, past the timeout
    here, and then failed with a traceback (exit 1); `ptft validate` said OK. Now before Ray starts."""
    from components.net import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    where = [f"storage={tmp_path}", f"tracking.uri={uri}"]
    result = subprocess.run(
        [PTFT, command, str(good_config), *where], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"tracking.uri = '{uri}': the MLflow server does not answer" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_cluster_address_where_nothing_listens_fails_at_once(scheme: str, good_config: Path) -> None:
    """A refused connection, told in seconds: `ray.init` retried it for about two minutes, past the
    timeout here. (In a process of its own: a test process that holds a Ray connection uses it.)"""
    from components.net import free_port

    address = f"{scheme}127.0.0.1:{free_port()}"
    command = [PTFT, "validate", str(good_config), f"ray.address={address}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"ray.address = '{address}': cannot reach the Ray cluster ([Errno 111] Connection refused)" in result.stderr


def test_a_local_cluster_beyond_loopback_without_token_auth_is_refused(good_config: Path) -> None:
    """Ray's dashboard and client run code for whoever reaches them: a local cluster that listens
    beyond loopback keeps token auth, and an explicit RAY_AUTH_MODE=disabled is refused."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [PTFT, "validate", str(good_config)]
    exposed = subprocess.run(
        [*command, "ray.dashboard_host=0.0.0.0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert exposed.returncode == 2, exposed.stdout + exposed.stderr
    assert "ray.dashboard_host = '0.0.0.0'" in exposed.stderr and "RAY_AUTH_MODE" in exposed.stderr
    assert "Traceback" not in exposed.stderr
    loopback = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert loopback.returncode == 0, loopback.stdout + loopback.stderr


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_local_ray_without_room_for_its_session_is_refused_at_once(
    command: str, good_config: Path, tmp_path: Path
) -> None:
    """With 1 MB free in Ray's temp folder, `ptft run` waited 93 s for the local Ray to start and
    ended in a traceback (`The current node timed out during startup`) that gave no cause. (The
    local Ray's other needs: tests/unit/test_preflight.py.)"""
    short = Path(tempfile.mkdtemp(prefix="ptft-", dir="/tmp"))  # under the length Ray's sockets allow
    with small_disk(short / "tmp", "1M") as disk:
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local Ray
        result = subprocess.run(
            [PTFT, command, str(good_config), f"storage={tmp_path / 'store'}"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**env, "RAY_TMPDIR": str(disk)},
            timeout=60,
        )
    shutil.rmtree(short)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"RAY_TMPDIR = '{disk / 'ray'}': 1.0 MB free on its disk" in result.stderr
    assert "free space there, or set RAY_TMPDIR to a folder on a disk with room" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_disk_is_told_where_it_is_full(tmp_path: Path) -> None:
    """The disk a run filled is named from what failed: a write here (a real ENOSPC, from
    /dev/full; without a file named, the storage's disk), a worker's (its error's text), the SQLite
    store (its file) or a server's store (its URI: the disk here may have room)."""
    from pipelines.cli import _disk_full

    storage, sqlite = tmp_path / "store", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with pytest.raises(OSError) as written:
        with open("/dev/full", "wb") as full:
            full.write(b"\0" * 65536)
    assert f"), writing {storage}. Free space there" in _disk_full(written.value, storage, sqlite)  # no file named
    worker = RuntimeError(f"OSError: [Errno 28] No space left on device: '{tmp_path}/ckpt/model.pt'")
    assert f"), writing {tmp_path}/ckpt/model.pt. Free space there" in _disk_full(worker, storage, sqlite)
    store = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert f"), writing {tmp_path}/store/mlflow.db. Free space there" in _disk_full(store, storage, sqlite)
    told = _disk_full(store, storage, "http://mlflow.example:5000")
    assert told.startswith("the tracking store at http://mlflow.example:5000 is out of disk space ((sqlite3")
    assert _disk_full(RuntimeError("CUDA out of memory"), storage, sqlite) is None
