"""Pre-flight checks for a pipeline that runs on a Ray cluster, before it asks for a CPU:

1. every alive node sees `storage` at the same path and can write to it (a probe file written
   here, read and answered by a zero-CPU task pinned to each node);
2. an http(s) `tracking.uri` answers MLflow's `/health`;
3. the training worker groups, the Tune sweep and the Serve replicas fit the cluster's CPUs and
   GPUs; on the local Ray a run starts, only this (`local_problems`, once it is up), and before
   it starts, that it can save its auth token and has a writable temp folder with room
   (`local_ray_problems`).

`check_cluster` returns the problems found (empty: good to go), in the shape `ConfigError` reports.
With a dashboard address (`http://HEAD:8265`, what `ptft submit` talks to) only (2) and (3) run,
through Ray's state API; the storage probe needs a driver on the cluster.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from components.net import STORE_DOWN, listen_problem, mlflow_unanswered
from components.schemas import ServeConfig
from pipelines.pipeline_config import PipelineConfig, Problem

SHARED_STORAGE_FIX = "use shared storage (NFS/EFS/PVC) mounted at the same path on every node"
PROBE_TIMEOUT_S = 120  # a node starts a worker process for its first task: seconds on a busy machine
# A local Ray keeps its session in its temp folder: logs, sockets, spilled objects (2-3 MB for the
# tiny pipeline). With 1 MB free there its start timed out after 93 s, and the run ended in a
# traceback that gave no cause.
RAY_TEMP_ROOM = 64 * 10**6
# Ray's longest socket under its temp folder, for the longest pid; a Unix socket's path has at most
# 107 bytes (Linux), and a longer temp folder failed Ray's start with a traceback.
RAY_SOCKET_UNDER_TEMP = len("/session_2026-12-06_01-12-42_817275_4194304/sockets/plasma_store")
UNIX_SOCKET_PATH_MAX = 107


def check_cluster(config: PipelineConfig, address: str | None = None, *, tracking: bool = True) -> list[Problem]:
    """Every cluster problem at once: shared storage, MLflow reachability, resources.

    Args:
        config: a validated pipeline config.
        address: a dashboard URL (`http://HEAD:8265`: resource and MLflow checks only) or a
            cluster address for `ray.init` (`HOST:6379`, `auto`, `ray://HEAD:10001`); default
            `config.ray.address`. Uses the current Ray connection when there is one (inside a job).
        tracking: False where the MLflow server was asked already (a run asks before Ray starts).
    """
    problems = tracking_problems(config) if tracking else []
    address = address or config.ray.address
    if address and address.startswith(("http://", "https://")):
        nodes, error = _nodes_from_dashboard(address)
        return problems + (error or resource_problems(config, list(nodes.values())))
    import ray

    if not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        return problems  # a local Ray, started later: one node, nothing shared to check
    with _ray_connection(address) as error:
        if error:
            return problems + [error]
        nodes = alive_nodes()
        return problems + storage_problems_on_nodes(config, nodes) + resource_problems(config, list(nodes.values()))


def tracking_problems(config: PipelineConfig) -> list[Problem]:
    """An MLflow server named by `tracking.uri` must answer `/health` and a read of its store."""
    reason = mlflow_unanswered(config.tracking.uri)
    if reason is None:
        return []  # it answers, or the store is sqlite under storage, which the storage probe covers
    return [
        Problem(
            "tracking.uri",
            config.tracking.uri,
            f"the MLflow server does not answer ({reason})",
            "start the server or fix tracking.uri; a Ray Job's nodes must reach it too"
            if STORE_DOWN not in reason
            else "bring back the server's backend store (its database), then run the command again",
        )
    ]


# --- resources ---------------------------------------------------------------------------------


def resource_problems(config: PipelineConfig, nodes: list[dict[str, float]], *, rollouts: bool = True) -> list[Problem]:
    """Worker groups, the sweep and the served replicas against the alive nodes' total resources
    (`{"CPU": 2, ...}` each). `rollouts`: the cluster outlives the run, so its apps may be rolled
    over to new versions (a local Ray the run started and stops holds first deploys only)."""
    problems = _worker_problems("pretrain", config.pretrain.workers, nodes)
    views = _views(config)
    for prefix, view in views:
        problems += _worker_problems(f"{prefix}finetune", view.finetune.workers, nodes)
        if view.tune.enabled:
            problems += _tune_problems(view, nodes, prefix)
    if config.has_tasks():
        problems += serve_problems([(prefix, view.serve) for prefix, view in views], nodes, rollouts=rollouts)
    return problems


def _views(config: PipelineConfig) -> list[tuple[str, PipelineConfig]]:
    """Each task's view of the config, with the prefix of the keys that set its sections
    (`tasks.T.` with tasks)."""
    return [(f"tasks.{task}.", config.for_task(task)) for task in config.task_names()] or [("", config)]


def local_problems(config: PipelineConfig) -> list[Problem]:
    """The run's groups against the local Ray this process has just started: a worker group or
    Serve replicas it cannot place would wait without end, so a run asking for 8 workers of a
    2-CPU machine stopped at step 0 and stayed there. And the port its Serve will listen on."""
    problems = resource_problems(config, list(alive_nodes().values()), rollouts=False)
    if config.has_tasks():
        problems += port_problems([(prefix, view.serve) for prefix, view in _views(config)])
    return problems


def local_ray_problems() -> list[Problem]:
    """What a local Ray about to start needs: a place to save its auth token, and room for its
    session (RAY_TMPDIR, else TMPDIR, else /tmp) under a path short enough for its sockets."""
    return _auth_token_problems() + _temp_folder_problems()


def _auth_token_problems() -> list[Problem]:
    """A new local Ray has token auth unless RAY_AUTH_MODE says otherwise, and with no token given
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) it saves a new one at ~/.ray/auth_token: under a read-only
    HOME (a container's) the run ended in a traceback (`Read-only file system: '~/.ray'`)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return []
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return []
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        return []
    existing = next(path for path in token.parents if path.exists())
    if os.access(existing, os.W_OK):
        return []
    return [
        Problem(
            "HOME",
            str(Path.home()),
            f"a new local Ray saves its auth token at {token}, and {existing} is not writable",
            "set HOME to a writable folder, or RAY_AUTH_TOKEN_PATH to a file that holds a token "
            "(`openssl rand -hex 32 > FILE`)",
        )
    ]


def _temp_folder_problems() -> list[Problem]:
    from ray._common.utils import get_default_ray_temp_dir
    from rich.filesize import decimal

    folder = Path(get_default_ray_temp_dir())
    fix = "set RAY_TMPDIR to a folder on a disk with room"
    too_long = len(str(folder).encode()) + RAY_SOCKET_UNDER_TEMP - UNIX_SOCKET_PATH_MAX
    if too_long > 0:
        why = f"{too_long} bytes too long for the Unix sockets a local Ray makes under it"
        return [Problem("RAY_TMPDIR", str(folder), why, f"{fix} and a shorter path (e.g. /tmp)")]
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "not writable" if existing.is_dir() else "a file"
        why = f"{existing} is {what}: a local Ray keeps its session there"
        return [Problem("RAY_TMPDIR", str(folder), why, "set RAY_TMPDIR to a writable folder")]
    free = shutil.disk_usage(existing).free
    if free >= RAY_TEMP_ROOM:
        return []
    why = (
        f"{decimal(free)} free on its disk: a local Ray keeps its session there (logs, sockets, spilled "
        f"objects) and needs {decimal(RAY_TEMP_ROOM)}"
    )
    return [Problem("RAY_TMPDIR", str(folder), why, f"free space there, or {fix}")]


def port_problems(views: list[tuple[str, ServeConfig]]) -> list[Problem]:
    """A new Serve's HTTP address must be free: Serve's ingress failed to bind it, and the serve
    stage with it, after the training. Only where ptft starts Serve: a cluster's Serve, already up,
    holds its port itself."""
    problems, seen = [], set()
    for prefix, serve in views:
        if (serve.host, serve.port) in seen:
            continue
        seen.add((serve.host, serve.port))
        if why := listen_problem(serve.host, serve.port):
            fix = f"stop what listens there, or set {prefix}serve.port to a free port"
            problems.append(Problem(f"{prefix}serve.port", serve.port, why, fix))
    return problems


class _Replicas(NamedTuple):
    """One served task's replicas: those it deploys and those a rollout adds for a while."""

    key: str  # serve, or tasks.T.serve
    serve: ServeConfig
    count: int
    surge: int

    @property
    def field(self) -> str:
        return "autoscaling.min_replicas" if self.serve.autoscaling else "num_replicas"

    def cpus(self, rolling: bool) -> float:
        return (self.count + (self.surge if rolling else 0)) * self.serve.cpus_per_replica

    def said(self, rolling: bool, named: bool) -> str:
        rollout = f" (and {self.surge} more while a new version rolls out)" if rolling and self.surge else ""
        return f"{self.count} replica(s) of {self.serve.cpus_per_replica:g} CPU{rollout}" + (
            f" for {self.key}" if named else ""
        )


def serve_problems(
    views: list[tuple[str, ServeConfig]], nodes: list[dict[str, float]], *, rollouts: bool
) -> list[Problem]:
    """The replicas of every served task (`(key prefix, serve section)`, all on one Serve) against
    the cluster's CPUs. `serve.run` waits until every replica runs, and a rollout (`rollouts`) starts
    the new version's replicas, `rollout_surge_percent` more, before it stops the old ones; ptft
    rolls a run's apps over one at a time. A replica that never gets a CPU makes either wait
    without end, and without a word."""
    largest = max((node.get("CPU", 0) for node in nodes), default=0)
    total = sum(node.get("CPU", 0) for node in nodes)
    tasks = []
    for prefix, serve in views:
        key = f"{prefix}serve"
        if serve.cpus_per_replica > largest:
            why = f"a replica needs {serve.cpus_per_replica:g} CPUs but no node has that many (largest: {largest:g})"
            fix = f"set {key}.cpus_per_replica <= {largest:g}"
            return [Problem(f"{key}.cpus_per_replica", serve.cpus_per_replica, why, fix)]
        count = serve.autoscaling.min_replicas if serve.autoscaling else serve.num_replicas
        surge = math.ceil(serve.rollout_surge_percent * count / 100) if rollouts else 0  # Serve's rounding
        tasks.append(_Replicas(key, serve, count, surge))
    rolled = max(tasks, key=lambda task: task.cpus(True) - task.cpus(False))  # the costliest rollout
    cpus = sum(task.cpus(task is rolled) for task in tasks)
    if cpus <= total:
        return []
    biggest = max(tasks, key=lambda task: task.cpus(task is rolled))
    asks = " and ".join(task.said(task is rolled, len(tasks) > 1) for task in tasks)
    why = f"{asks} need {cpus:g} CPUs; the cluster has {total:g}: Serve would wait without end"
    key = biggest.key
    fix = f"lower {key}.{biggest.field} or {key}.cpus_per_replica"
    if biggest.surge:
        fix += f", set {key}.rollout_surge_percent=0"
    return [Problem(f"{key}.{biggest.field}", biggest.count, why, f"{fix}, or add nodes")]


def _worker_problems(stage: str, workers, nodes: list[dict[str, float]]) -> list[Problem]:
    key = f"{stage}.workers"
    per_worker = {"CPU": workers.cpus_per_worker, **({"GPU": 1} if workers.use_gpu else {})}
    for resource, amount in per_worker.items():
        largest = max((node.get(resource, 0) for node in nodes), default=0)
        total = sum(node.get(resource, 0) for node in nodes)
        field = "cpus_per_worker" if resource == "CPU" else "use_gpu"
        if amount > largest:
            return [
                Problem(
                    f"{key}.{field}",
                    getattr(workers, field),
                    f"a worker needs {amount:g} {resource} but no node has that many (largest: {largest:g})",
                    f"set {key}.cpus_per_worker <= {largest:g}"
                    if resource == "CPU"
                    else f"add GPU nodes or set {key}.use_gpu=false",
                )
            ]
        if workers.num_workers * amount > total:
            fit = int(total // amount)
            return [
                Problem(
                    f"{key}.num_workers",
                    workers.num_workers,
                    f"{workers.num_workers} workers x {amount:g} {resource} = "
                    f"{workers.num_workers * amount:g} {resource}, the cluster has {total:g}",
                    f"set {key}.num_workers <= {fit}, or add nodes",
                )
            ]
    return _placement_problems(key, workers, per_worker, nodes)


def _placement_problems(
    key: str, workers, per_worker: dict[str, float], nodes: list[dict[str, float]]
) -> list[Problem]:
    def fits(node: dict[str, float], count: int) -> bool:
        return all(node.get(resource, 0) >= count * amount for resource, amount in per_worker.items())

    strategy = workers.placement_strategy
    if strategy == "STRICT_PACK" and not any(fits(node, workers.num_workers) for node in nodes):
        return [
            Problem(
                f"{key}.placement_strategy",
                strategy,
                f"all {workers.num_workers} workers must share one node and none has room for them",
                f"set {key}.placement_strategy=PACK or fewer {key}.num_workers",
            )
        ]
    roomy = sum(fits(node, 1) for node in nodes)
    if strategy == "STRICT_SPREAD" and workers.num_workers > roomy:
        return [
            Problem(
                f"{key}.placement_strategy",
                strategy,
                f"{workers.num_workers} workers on distinct nodes, but only {roomy} nodes fit a worker",
                f"set {key}.placement_strategy=SPREAD or {key}.num_workers <= {roomy}",
            )
        ]
    return []


def _tune_problems(config: PipelineConfig, nodes: list[dict[str, float]], prefix: str = "") -> list[Problem]:
    """A trial's workers (`workers_per_trial` of `cpus_per_trial` and `gpus_per_trial` each), and
    `max_concurrent_trials` of them, against the cluster. A trial that cannot be placed at all
    leaves the sweep waiting without end."""
    tune, key = config.tune, f"{prefix}tune"
    workers = tune.workers_per_trial
    for resource, field in (("CPU", "cpus_per_trial"), ("GPU", "gpus_per_trial")):
        amount = getattr(tune, field)
        if not amount:
            continue
        largest = max((node.get(resource, 0) for node in nodes), default=0)
        total = sum(node.get(resource, 0) for node in nodes)
        if amount > largest:
            why = f"no node has {amount:g} {resource}s (largest: {largest:g})"
            limit = f" <= {largest:g}" if largest else "=0"
            more = "" if resource == "CPU" else ", or add GPU nodes"
            return [Problem(f"{key}.{field}", amount, why, f"set {key}.{field}{limit}{more}")]
        group = workers * amount
        if group > total:
            why = (
                f"one trial's {workers} workers x {amount:g} {resource}s = {group:g} {resource}s, the cluster has "
                f"{total:g}: the sweep would wait without end"
            )
            fix = f"set {key}.workers_per_trial <= {int(total // amount)} or lower {key}.{field}"
            return [Problem(f"{key}.workers_per_trial", workers, why, fix)]
        trials = tune.max_concurrent_trials
        if trials * group > total:
            each = f"{workers} workers x {amount:g} {resource}s" if workers > 1 else f"{amount:g} {resource}s"
            why = f"{trials} trials x {each} = {trials * group:g} {resource}s, the cluster has {total:g}"
            fix = f"set {key}.max_concurrent_trials <= {max(1, int(total // group))} or lower {key}.{field}"
            return [Problem(f"{key}.max_concurrent_trials", trials, why, fix)]
    return []


# --- shared storage ----------------------------------------------------------------------------


def storage_problems_on_nodes(config: PipelineConfig, nodes: dict[str, dict[str, float]]) -> list[Problem]:
    """Write a probe file under storage here; a task pinned to each node must see it and write beside it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe_dir = config.storage_path() / ".ptft-preflight" / uuid.uuid4().hex[:12]
    try:
        probe_dir.mkdir(parents=True)
        (probe_dir / "probe").write_text(probe_dir.name)
    except OSError as error:
        return [
            Problem(
                "storage",
                config.storage,
                f"not writable here ({error.strerror})",
                "point it at a writable folder on shared storage",
            )
        ]
    probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe())
    pending = {
        node_id: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
            str(probe_dir), probe_dir.name
        )
        for node_id in nodes
    }
    problems = []
    try:
        done, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
        for node_id, ref in pending.items():
            host, error = _probe_answer(ref, ref in done)
            if error:
                problems.append(
                    Problem("storage", config.storage, f"node {host} ({node_id[:8]}): {error}", SHARED_STORAGE_FIX)
                )
    finally:
        _remove_tree(probe_dir)
    return problems


def _probe_answer(ref, done: bool) -> tuple[str, str | None]:
    import ray

    if not done:
        ray.cancel(ref, force=True)
        return "?", f"the probe task did not answer in {PROBE_TIMEOUT_S}s"
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as failure:
        return "?", f"the probe task failed ({type(failure).__name__})"


def _node_probe() -> Callable[[str, str], tuple[str, str | None]]:
    # Defined in a closure so that Ray ships the function by value: a node needs no ptft install.
    def probe(folder: str, token: str) -> tuple[str, str | None]:
        import os
        import socket

        host = socket.gethostbyname(socket.gethostname())
        try:
            with open(os.path.join(folder, "probe")) as file:
                if file.read() != token:
                    return host, f"{folder} holds another probe: this is a different filesystem"
        except OSError as error:
            return host, f"cannot read the probe file under {folder} ({error.strerror})"
        try:
            written = os.path.join(folder, f"node-{os.getpid()}")
            with open(written, "w") as file:
                file.write(token)
            os.remove(written)
        except OSError as error:
            return host, f"cannot write under {folder} ({error.strerror})"
        return host, None

    return probe


def _remove_tree(folder: Path) -> None:
    for child in folder.iterdir():
        child.unlink(missing_ok=True)
    folder.rmdir()
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only when no other probe is running


# --- reaching the cluster ----------------------------------------------------------------------


@contextlib.contextmanager
def _ray_connection(address: str | None) -> Iterator[Problem | None]:
    """This process's Ray connection: the current one (inside a job), else one made here and
    closed on exit. Yields a problem instead when the cluster cannot be reached."""
    import ray

    if ray.is_initialized():
        yield None
        return
    if address and (refused := _refused(address)):  # ray.init would retry for minutes
        yield _unreachable("ray.address", address, refused)
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:
        yield _unreachable("ray.address", address, error)
        return
    try:
        yield None
    finally:
        ray.shutdown()


def alive_nodes() -> dict[str, dict[str, float]]:
    """Total resources of the alive nodes, by node id."""
    import ray

    return {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}


def _nodes_from_dashboard(address: str) -> tuple[dict[str, dict[str, float]], list[Problem]]:
    from ray.util.state import list_nodes
    from ray.util.state.common import RAY_MAX_LIMIT_FROM_API_SERVER

    try:
        with explicit_address():
            # The state API returns 100 entries unless asked for more: a bigger cluster's capacity
            # would be undercounted, and a job that fits refused.
            alive = [("state", "=", "ALIVE")]
            nodes = list_nodes(address=address, filters=alive, limit=RAY_MAX_LIMIT_FROM_API_SERVER, detail=True)
    except Exception as error:  # noqa: BLE001 - the state API raises several kinds; all mean "cannot ask"
        return {}, [_unreachable("--address", address, error)]
    return {node.node_id: node.resources_total for node in nodes}, []


def _refused(address: str, timeout_s: float = 5) -> OSError | None:
    """The error of a TCP connection to a cluster address's host and port (`HEAD:6379`,
    `ray://HEAD:10001`), or None: it connects, or the address names no port (`auto`)."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number: ray.init says what is wrong
        return None
    if not host or not port:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as error:
        return error


def _unreachable(key: str, address: str | None, error: Exception) -> Problem:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return Problem(
        key,
        address,
        f"cannot reach the Ray cluster ({first_line})",
        "start the cluster or fix the address; clusters started with `ray start` use token "
        "auth, so export RAY_AUTH_MODE=token here",
    )


@contextlib.contextmanager
def explicit_address() -> Iterator[None]:
    """Ray's job and state clients prefer RAY_ADDRESS / RAY_API_SERVER_ADDRESS from the environment
    over the address they are given; hide them so that an explicit address wins."""
    saved = {name: os.environ.pop(name) for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
