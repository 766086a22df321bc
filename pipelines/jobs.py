"""`ptft submit / status / logs / stop`: a pipeline as a Ray Job on a cluster.

`submit` validates the config here, uploads the working dir (this checkout, minus `.venv`, `.git`
and local runs) and starts `python -m pipelines.cli run CONFIG OVERRIDES` as the job's entrypoint
on the head node; that driver joins the job's cluster (RAY_ADDRESS, set by Ray) and its training
workers go wherever `*.workers.placement_strategy` puts them.

Secrets never travel with the job: the runtime_env is stored in the cluster's job table and shown
in the dashboard. Put MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD and cloud
credentials in the cluster's own environment (the shell that runs `ray start`, or the pod spec
under KubeRay); the job's processes inherit it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components.redaction import redact_url
from pipelines import arguments, preflight
from pipelines.pipeline_config import ConfigError, PipelineConfig, Problem, data_problems, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_STORAGE = "./ptft-runs"  # the config's default storage, relative to where ptft runs
# Never uploaded: the venv and git history are large, local runs belong to this machine.
EXCLUDES = [".venv", ".git", "ptft-runs", "mlruns", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
PASSED_ENV = ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # ray.job_submission.JobStatus values that never change again
EXIT_FAILED, EXIT_USER_ERROR = 1, 2


class UnknownJobError(Exception):
    """The cluster has no job with this id."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `submit`, `status`, `logs` and `stop` on the `ptft` parser."""
    submit = commands.add_parser(
        "submit",
        help="run a pipeline as a Ray Job on a cluster; prints the job id",
        description="Validate CONFIG here, upload the working dir and run `ptft run CONFIG OVERRIDES` as a Ray "
        "Job. `storage` must be an absolute path that every node mounts (shared storage). Secrets such as "
        "MLFLOW_TRACKING_TOKEN are never sent with the job: set them in the cluster's environment.",
    )
    submit.add_argument("config", help="pipeline YAML inside the working dir, e.g. configs/demo.yaml")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. storage=/mnt/shared/ptft-runs")
    _add_address(submit)
    submit.add_argument(
        "--storage", metavar="PATH", help="the pipeline's storage, an absolute path every node mounts (= storage=PATH)"
    )
    submit.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir (default: .)")
    submit.add_argument("--python", default="python", help="interpreter on the cluster (default: python on PATH)")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    submit.add_argument(
        "--no-preflight", action="store_true", help="skip the MLflow and cluster-resource checks before submitting"
    )
    submit.set_defaults(handler=_submit)

    status = commands.add_parser(
        "status",
        help="status of a pipeline run (stages, progress, ETA) or of a submitted job",
        description="ID is a pipeline run id under --storage (default: the newest run there) or a Ray job id "
        "on the cluster at --address. --json prints the same as one JSON object, for scripts.",
    )
    status.add_argument("job_id", nargs="?", metavar="ID", help="pipeline run id or job id (default: newest run)")
    status.add_argument(
        "--storage", help="where pipeline runs live (default ./ptft-runs); given, ID is a pipeline run there"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    _add_address(status)
    status.set_defaults(handler=_status_of_run_or_job)

    logs = commands.add_parser("logs", help="logs of a submitted job")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 0 if it succeeded")
    _add_address(logs)
    logs.set_defaults(handler=_logs)

    stop = commands.add_parser("stop", help="stop a submitted job and wait until it has stopped")
    stop.add_argument("job_id")
    stop.add_argument(
        "--timeout", type=arguments.positive_seconds, default=120, help="seconds to wait for the job to stop"
    )
    _add_address(stop)
    stop.set_defaults(handler=_stop)


def _add_address(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("RAY_ADDRESS", "")
    default = default if default.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    parser.add_argument(
        "--address",
        type=arguments.dashboard_url,
        default=default,
        help=f"the cluster's dashboard URL (default: RAY_ADDRESS if http, else {DEFAULT_ADDRESS})",
    )


def _cluster_command(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An unknown job id is the user's error (exit 2); an unreachable or failing cluster is
    infrastructure (exit 1). Either way a message instead of a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ConfigError:
            raise  # ptft's own exit 2, with every problem listed
        except UnknownJobError as error:
            return _fail(
                f"no job {error} on the cluster at {args.address}; "
                f"list them with: ray job list --address {args.address}",
                EXIT_USER_ERROR,
            )
        except ConnectionError as error:
            return _fail(
                f"cannot reach the Ray dashboard at {args.address} ({error}); is the cluster up? "
                "pass --address http://HEAD:8265",
                EXIT_FAILED,
            )
        except RuntimeError as error:
            return _fail(f"the cluster at {args.address} refused: {error}", EXIT_FAILED)
        except Exception as error:
            from ray.exceptions import AuthenticationError  # loaded once the cluster has answered

            if not isinstance(error, AuthenticationError):
                raise
            return _fail(
                f"the cluster at {args.address} refused the credentials: {error}\n"
                "Clusters started with `ray start` use token auth: export RAY_AUTH_MODE=token (and "
                "RAY_AUTH_TOKEN, or the token file ~/.ray/auth_token, when not on the head)",
                EXIT_FAILED,
            )

    return run


def _fail(message: str, code: int) -> int:
    print(f"ptft: {message}", file=sys.stderr)
    return code


# --- submit ------------------------------------------------------------------------------------


@_cluster_command
def _submit(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides, check_data=False)  # storage is the cluster's, not ours
    working_dir = Path(args.working_dir).resolve()
    problems = submit_problems(args.config, config, working_dir)
    if problems:
        raise ConfigError(args.config, problems)
    client = _client(args.address)  # an unreachable cluster fails here, as infrastructure
    problems = [] if args.no_preflight else preflight.check_cluster(config, args.address)
    if problems:
        raise ConfigError(args.config, problems)
    spec = job_spec(config, args.config, args.overrides, working_dir, python=args.python)
    try:
        job_id = client.submit_job(**spec)
    except RuntimeError as error:
        if too_large := PACKAGE_TOO_LARGE.search(str(error)):
            raise ConfigError(args.config, [_package_problem(working_dir, spec, *too_large.groups())]) from None
        raise
    print(f"Submitted job {job_id} to {args.address} (pipeline {config.name!r}).")
    suffix = f"--address {args.address}"
    print(
        f"  follow: ptft logs {job_id} --follow {suffix}\n  status: ptft status {job_id} {suffix}\n"
        f"  stop:   ptft stop {job_id} {suffix}",
        flush=True,
    )
    return 0 if args.no_wait else _follow(client, job_id)


# What the dashboard answers (a 500 with its traceback) when the zipped working dir is over its limit.
PACKAGE_TOO_LARGE = re.compile(r"Package size \(([^)]+)\) exceeds the maximum size of ([\d.]+\s*\w+)")


def _package_problem(working_dir: Path, spec: dict, size: str, limit: str) -> Problem:
    """The working dir packs to more than the cluster takes: named with its largest files."""
    from rich.filesize import decimal

    largest = ", ".join(f"{path} ({decimal(bytes_)})" for path, bytes_ in _largest_uploads(working_dir, spec))
    return Problem(
        "--working-dir",
        str(working_dir),
        f"zipped, it is {size}, over the {limit} the cluster takes"
        + (f"; the largest files: {largest}" if largest else ""),
        "list what the job does not need in a .rayignore there (the syntax of .gitignore), or pass a smaller "
        "--working-dir; data belongs on shared storage, named in the config",
    )


def _largest_uploads(working_dir: Path, spec: dict, count: int = 3) -> list[tuple[str, int]]:
    """The largest files of what Ray would upload: its own walk, with the job's excludes and the
    folder's .gitignore and .rayignore files."""
    from ray._private.runtime_env import packaging

    sizes: list[tuple[str, int]] = []

    def note(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            sizes.append((path.relative_to(working_dir).as_posix(), path.stat().st_size))

    excludes = [packaging._get_excludes(working_dir, spec["runtime_env"]["excludes"])]
    gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"  # as Ray's job client reads it
    packaging._dir_travel(working_dir, excludes, note, include_gitignore=gitignore)
    return sorted(sizes, key=lambda item: -item[1])[:count]


def submit_problems(config_path: str, config: PipelineConfig, working_dir: Path) -> list[Problem]:
    """What would break once the job runs in a copy of `working_dir` on another machine."""
    if not working_dir.is_dir():
        why = "does not exist" if not working_dir.exists() else "is not a folder"
        return [Problem("--working-dir", str(working_dir), why, "pass the project folder the job should run in")]
    problems = []
    if not _inside(Path(config_path).resolve(), working_dir):
        problems.append(
            Problem(
                "CONFIG",
                config_path,
                f"outside the working dir {working_dir} that the job uploads",
                "run ptft submit from the project folder, or pass --working-dir",
            )
        )
    if not os.path.isabs(config.storage):
        problems.append(
            Problem(
                "storage",
                config.storage,
                "relative: it would land in the job's temporary working dir and be lost",
                "use an absolute path on shared storage, e.g. storage=/mnt/shared/ptft-runs",
            )
        )
    return problems + _credential_problems(config) + _data_problems(config, working_dir)


def _credential_problems(config: PipelineConfig) -> list[Problem]:
    """A job's entrypoint, metadata and uploaded working dir are readable by everyone who can open
    the cluster's dashboard: no credentials in the tracking URI it runs with."""
    uri = config.tracking.uri
    if not uri or redact_url(uri) == uri:
        return []
    return [
        Problem(
            "tracking.uri",
            redact_url(uri),
            "holds credentials, which a Ray Job would show to everyone who can open the cluster's dashboard",
            "give the URI without them and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) in the environment of the cluster's nodes",
        )
    ]


def _data_problems(config: PipelineConfig, working_dir: Path) -> list[Problem]:
    # The job resolves relative data paths against its copy of the working dir, so check them there.
    with _cwd(working_dir):
        found = data_problems({"data": config.data})
    # An absolute path missing here may exist on the cluster only; the job validates it there.
    problems = [p for p in found if not (p.key.endswith(".path") and os.path.isabs(str(p.value)))]
    flagged = {p.key for p in problems}
    for key, path in _file_paths(config):
        if f"{key}.path" not in flagged and not os.path.isabs(path) and not _inside(working_dir / path, working_dir):
            problems.append(
                Problem(
                    f"{key}.path",
                    path,
                    f"outside the working dir {working_dir} that the job uploads",
                    "use an absolute path every node sees, or keep the data under the working dir",
                )
            )
    return problems


def _file_paths(config: PipelineConfig) -> Iterator[tuple[str, str]]:
    sources = [("data.corpus.source", config.data.corpus.source), *config.task_sources()]
    for key, source in sources:
        path = getattr(source, "path", None)
        if path and "://" not in path:
            yield key, path


def job_spec(
    config: PipelineConfig, config_path: str, overrides: list[str], working_dir: Path, *, python: str = "python"
) -> dict[str, Any]:
    """Keyword arguments for `JobSubmissionClient.submit_job`."""
    relative = Path(config_path).resolve().relative_to(working_dir).as_posix()
    excludes = list(EXCLUDES)
    if _inside(config.storage_path(), working_dir):
        excludes.append(config.storage_path().relative_to(working_dir).as_posix())
    return {
        "entrypoint": shlex.join([*shlex.split(python), "-m", "pipelines.cli", "run", relative, *overrides]),
        "submission_id": _submission_id(config.name),
        "runtime_env": {"working_dir": str(working_dir), "excludes": excludes, "env_vars": job_env(config)},
        "metadata": {"ptft.pipeline": config.name, "ptft.config": relative, "ptft.overrides": shlex.join(overrides)},
    }


STOP_GRACE_S = 30


def job_env(config: PipelineConfig) -> dict[str, str]:
    """The job's environment variables: DeepSpeed's accelerator and tokenizer threading (the rule
    of components/accelerator.py, without importing torch here); this shell's values win."""
    use_gpu = config.uses_gpu()
    env = {"TOKENIZERS_PARALLELISM": "false", **({} if use_gpu else {"DS_ACCELERATOR": "cpu"})}
    env.update({name: os.environ[name] for name in PASSED_ENV if name in os.environ})
    # The runner's ray.init(runtime_env=...) sets the same keys; Ray refuses to merge a job's and
    # its driver's env_vars that share a key unless told that the driver's win.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    # `ptft stop` (Ray's job stop) sends SIGTERM, then SIGKILL after this many seconds; Ray's 3 s
    # default is shorter than a loaded driver needs to end its stage and MLflow runs KILLED. The
    # job's supervisor actor reads it from the job's env_vars.
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(STOP_GRACE_S)
    return env


def _submission_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "pipeline"
    return f"ptft-{slug}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


# --- status, logs, stop ------------------------------------------------------------------------


def _status_of_run_or_job(args: argparse.Namespace) -> int:
    """A pipeline run when --storage is given, ID names one under the storage, has a run id's
    shape, or no ID is given; else a cluster job."""
    from pipelines import manifest as mf

    storage, run_id = Path(args.storage or DEFAULT_STORAGE), args.job_id
    if args.storage or run_id is None or mf.looks_like_run_id(run_id) or mf.Manifest.folder(storage, run_id).is_dir():
        from pipelines import progress

        return progress.print_status(storage, run_id, as_json=args.json)
    return _status(args)


@_cluster_command
def _status(args: argparse.Namespace) -> int:
    info = _job_info(_client(args.address), args.job_id)
    if args.json:
        print(
            json.dumps(
                {
                    "job_id": args.job_id,
                    "status": _value(info.status),
                    "message": info.message,
                    "entrypoint": info.entrypoint,
                    "start_time_ms": info.start_time,
                    "end_time_ms": info.end_time,
                }
            )
        )
        return 0
    print(f"{args.job_id}: {_value(info.status)}")
    if info.message:
        print(f"  {info.message}")
    if _value(info.status) == "FAILED" and (hint := _missing_module_hint((info.message or "").splitlines())):
        print(f"  what to do: {hint}")
    print(f"  entrypoint: {info.entrypoint}")
    times = [f"{label} {_clock(ms)}" for label, ms in (("started", info.start_time), ("ended", info.end_time)) if ms]
    if times:
        print(f"  {', '.join(times)}")
    return 0


@_cluster_command
def _logs(args: argparse.Namespace) -> int:
    client = _client(args.address)
    _job_info(client, args.job_id)
    if args.follow:
        return _follow(client, args.job_id)
    print(client.get_job_logs(args.job_id), end="")
    return 0


@_cluster_command
def _stop(args: argparse.Namespace) -> int:
    client = _client(args.address)
    status = _value(_job_info(client, args.job_id).status)
    if status in TERMINAL:
        print(f"{args.job_id}: already {status}")
        return 0
    client.stop_job(args.job_id)
    status = _wait_until_terminal(client, args.job_id, args.timeout)
    if status not in TERMINAL:
        print(
            f"ptft: {args.job_id} is still {status} after {args.timeout:g}s; check with ptft status {args.job_id}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"{args.job_id}: {status}")
    return 0


def _follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 if it succeeded."""
    last: collections.deque[str] = collections.deque(maxlen=50)  # lines: what a failure's hint reads

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)
            last.extend(chunk.splitlines())

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nptft: stopped following; the job keeps running (ptft stop {job_id} ends it)", file=sys.stderr)
        return EXIT_FAILED
    # The log stream closes as the job ends; its status can trail by a moment.
    status = _wait_until_terminal(client, job_id, timeout_s=30)
    print(f"[ptft] job {job_id}: {status}", flush=True)
    if status == "FAILED" and (hint := _missing_module_hint(last)):
        print(f"ptft: {hint}", file=sys.stderr, flush=True)
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


def _missing_module_hint(lines: Iterable[str]) -> str | None:
    """What to do when the job's interpreter lacks ptft's dependencies: `python` on the head's PATH
    is often not the one `ray start` ran from (a venv not activated in that shell)."""
    found = [match.group(1) for line in lines if (match := MISSING_MODULE.search(line))]
    if not found:
        return None
    module = found[-1]
    if module.split(".")[0] in ("pipelines", "components"):  # ptft's own: not in the uploaded folder
        return (
            f"the job could not import {module!r}: its working dir is not a ptft checkout. Submit from the "
            "checkout, or pass it as --working-dir"
        )
    return (
        f"the job's Python could not import {module!r}: the interpreter on the head that runs the "
        "entrypoint needs ptft's dependencies. Pass it with --python (e.g. --python /opt/venv/bin/python, "
        "the one `ray start` runs from), or install them there (pip install -c constraints.txt -e .)"
    )


def _wait_until_terminal(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = _value(client.get_job_status(job_id))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1)


# --- talking to the cluster --------------------------------------------------------------------


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    with preflight.explicit_address():
        return JobSubmissionClient(address)


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        if "status code 404" in str(error):
            raise UnknownJobError(repr(job_id)) from None
        raise


def _value(status: Any) -> str:
    return getattr(status, "value", str(status))


def _clock(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@contextlib.contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
