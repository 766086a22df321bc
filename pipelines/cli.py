"""`ptft` command line: run, resume, sweep, serve, explain, predict, promote, rollback, runs, status,
report, validate, ui (and submit/status/logs/stop for Ray Jobs; `status` also shows pipeline runs).

Exit codes: 0 success, 1 a failure while running (infrastructure or a bug: traceback shown),
2 a user error in the config or data (a message, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from components import console, ingress
from components.net import listen_problem
from components.redaction import redact_text, redact_url
from pipelines import arguments, init, jobs, predict, preflight, report, stopping, storage_gc
from pipelines.pipeline_config import _MISSING as _MISSING_VALUE
from pipelines.pipeline_config import (
    DEFAULTS_SOURCE,
    ConfigError,
    Problem,
    command_config,
    load_config,
    missing_store_problems,
    validate,
)
from pipelines.scheduling import nodes_in_threads
from pipelines.stages import NAMES as STAGE_NAMES
from pipelines.stages import split_node
from pipelines.versions import STACK, versions

EXIT_USER_ERROR = 2
RUN_LOG = "ptft.log"  # in the run's folder: every log line that is not ptft's own (see components/console.py)
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `ptft ui` serves by default


def ui_url_of(tracking_uri: str) -> str:
    """Where a tracking store's MLflow UI is: the tracking server's own, or `ptft ui`'s for a file."""
    return redact_url(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


MAX_EXPLAIN_TEXTS = 8  # as components.explain (not imported here: `--help` stays free of torch)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options (`ptft serve MODEL --config X serve.port=8001`).
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    misplaced = _misplaced_override(args)
    if misplaced:
        print(f"ptft {args.command}: {misplaced}", file=sys.stderr)
        return EXIT_USER_ERROR
    if hasattr(args, "overrides") and getattr(args, "storage", None):
        # `--storage PATH` on a command that reads a config is the `storage=PATH` override.
        args.overrides = [*args.overrides, f"storage={args.storage}"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"ptft: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        again = AGAIN if args.command in RUN_COMMANDS else AGAIN_WITHOUT_RUN
        print(f"ptft {args.command}: {_out_of_disk_space(Path(error.filename or '.'), again)}", file=sys.stderr)
        return 1
    except FailureTold as error:  # the traceback is in the run's log; a run said how to resume
        print(f"ptft {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (a stopped job): a run said how to resume; no traceback
        signum = error.signum if isinstance(error, Signalled) else signal.SIGINT
        print(f"ptft {args.command}: stopped ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        # Free what still holds Arrow's background threads while Arrow is alive: left to the
        # interpreter's teardown they can abort an exit that had succeeded ("terminate called
        # without an active exception", SIGABRT; apache/arrow#34314). Seen once in CI on `ptft validate`.
        gc.collect()


# Positionals that name a config file, a run, a job or a model: never `key=value`.
NAMED_POSITIONALS = ("config", "run_id", "job_id", "model", "name", "version")
OVERRIDE = re.compile(r"(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*)")


def _misplaced_override(args: argparse.Namespace) -> str | None:
    """What to write instead, when a file, id or name positional looks like a config override
    (`ptft status storage=/x` would look for a job called that on a cluster)."""
    for dest in NAMED_POSITIONALS:
        value = getattr(args, dest, None)
        match = OVERRIDE.fullmatch(value) if isinstance(value, str) else None
        if match is None or (dest == "config" and Path(value).is_file()):
            continue
        looks = f"{value!r} looks like a config override"
        if dest == "config":
            return f"{looks}, but the config file comes first: ptft {args.command} CONFIG {value}"
        if match["key"] == "storage":
            return f"{looks}; this command takes it as --storage {match['value']}"
        return f"{looks}, but ptft {args.command} takes no overrides: see ptft {args.command} --help"
    return None


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", metavar="PATH", help="the pipeline's storage (runs, artifacts); same as the override storage=PATH"
    )


class _PrintVersions(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        help_text = f"print ptft's version and those of Python, {', '.join(STACK)}, then exit"
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help_text)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(versions())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptft", description="Pre-train -> fine-tune pipelines on Ray.")
    parser.add_argument("--version", action=_PrintVersions)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a pipeline end to end")
    run.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.max_steps=20")
    run.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the Serve deployment up until Ctrl-C (default: shut down a local Ray at the end)",
    )
    run.add_argument(
        "--rerun",
        metavar="STAGE",
        action="append",
        default=[],
        help=f"run this stage ({', '.join(STAGE_NAMES)}; one task's: finetune.TASK) and every later one again, "
        "ignoring their cache; give it more than once for several",
    )
    _add_progress_options(run)
    _add_storage(run)
    run.set_defaults(handler=_run)

    resume = commands.add_parser("resume", help="continue a failed or interrupted pipeline run")
    resume.add_argument("run_id", help="pipeline run id (see `ptft runs`)")
    resume.add_argument("--storage", default="./ptft-runs", help="the run's storage (default ./ptft-runs)")
    resume.add_argument("--keep-serving", action="store_true", help="as for run")
    _add_progress_options(resume)
    resume.set_defaults(handler=_resume)

    sweep = commands.add_parser(
        "sweep", help="run only the hyperparameter sweep (tokenize and pretrain from the cache, or run first)"
    )
    sweep.add_argument("config", nargs="?", help="pipeline YAML (not needed with --resume RUN_ID)")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=8")
    sweep.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_ID",
        help="continue an interrupted sweep: this run id, or the latest unfinished one",
    )
    sweep.add_argument("--force", action="store_true", help="sweep again even if this sweep is cached")
    _add_verbose(sweep)
    sweep.add_argument(
        "--storage", metavar="PATH", help="the pipeline's storage, where --resume finds the run (default: the config's)"
    )
    sweep.set_defaults(handler=_sweep)

    runs = commands.add_parser("runs", help="list pipeline runs and their stages")
    runs.add_argument("--storage", default="./ptft-runs", help="storage to list (default ./ptft-runs)")
    runs.add_argument("--limit", type=arguments.positive_int, default=20)
    runs.set_defaults(handler=_runs)

    validate = commands.add_parser("validate", help="check a config and its data; starts nothing")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*")
    _add_storage(validate)
    validate.set_defaults(handler=_validate)

    serve = commands.add_parser("serve", help="serve a model over HTTP (Ray Serve): registered or a folder")
    serve.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a Hugging Face model folder")
    serve.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.port=8001 serve.num_replicas=2")
    serve.add_argument(
        "--config",
        help="pipeline YAML whose serve, tracking and ray blocks apply (default: their defaults, "
        "storage ./ptft-runs and its MLflow store, as configs/demo.yaml sets)",
    )
    serve.add_argument(
        "--export",
        metavar="FILE",
        help="write a Serve config file (for `serve deploy` or a RayService) instead of deploying",
    )
    _add_verbose(serve)
    serve.set_defaults(handler=_serve)

    promote = commands.add_parser("promote", help="make a registered version the champion; a running app follows")
    promote.add_argument("name", help="registered model name, e.g. demo-classifier")
    promote.add_argument("version", help="the version to make champion")
    promote.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    promote.add_argument(
        "--config", help="config giving tracking, ray and serve (default: storage ./ptft-runs and its MLflow store)"
    )
    promote.set_defaults(handler=_promote)

    rollback = commands.add_parser("rollback", help="give the champion alias back to the previous champion")
    rollback.add_argument("name", help="registered model name")
    rollback.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    rollback.add_argument(
        "--config", help="config giving tracking, ray and serve (default: storage ./ptft-runs and its MLflow store)"
    )
    rollback.set_defaults(handler=_rollback)

    explain = commands.add_parser("explain", help="attention maps of texts: where the model's heads look")
    explain.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a Hugging Face model folder")
    explain.add_argument("texts", nargs="+", help="texts to explain, each quoted")
    explain.add_argument(
        "--config",
        help="config giving the tracking store (default: --tracking-uri, else the MLflow store in ./ptft-runs)",
    )
    explain.add_argument("--tracking-uri", help="the MLflow tracking URI (default: the config's)")
    explain.add_argument(
        "--context", help="for a question answering model: the context, and the texts are questions about it"
    )
    explain.add_argument("--layer", type=int, default=-1, help="layer to show: 0..layers-1, or -1 (the last)")
    explain.add_argument("--output", metavar="PNG", help="also draw the maps (heads x tokens) into this PNG file")
    explain.add_argument("--json", action="store_true", help="print the maps as JSON (what POST /explain answers)")
    explain.set_defaults(handler=_explain)

    init.add_parser(commands)

    ui = commands.add_parser("ui", help="open the MLflow UI on the config's tracking store")
    ui.add_argument("config", nargs="?", help="pipeline YAML (default: the MLflow store in ./ptft-runs)")
    ui.add_argument("overrides", nargs="*")
    ui.add_argument("--port", type=arguments.port, default=5000)
    ui.add_argument("--host", type=arguments.host, default="127.0.0.1")
    _add_storage(ui)
    ui.set_defaults(handler=_ui)
    jobs.add_commands(commands)
    report.add_commands(commands)
    storage_gc.add_commands(commands)
    predict.add_commands(commands)
    return parser


def _add_progress_options(parser: argparse.ArgumentParser) -> None:
    how_much = parser.add_mutually_exclusive_group()
    how_much.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only the summary at the end and warnings or errors (no stage lines, no progress)",
    )
    _add_verbose(how_much)
    parser.add_argument(
        "--progress-every",
        type=arguments.seconds_or_zero,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines of a running stage (default 10; 0: none, each stage's result as it ends)",
    )


def _add_verbose(parser) -> None:
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="stream the logs of Ray, MLflow, transformers, DeepSpeed and the workers to the console "
        f"(default: only ptft's lines; those logs go to the run's {RUN_LOG} under storage)",
    )


@contextlib.contextmanager
def logged_console(args: argparse.Namespace, log: Path) -> Iterator[Path | None]:
    """ptft's lines on the console and everyone else's output in `log`, unless --verbose."""
    if getattr(args, "verbose", False):
        yield None
        return
    # The Hub's progress bars only garble a log file. Ray Data sees a log file on stdout and logs
    # its progress as lines there by itself (disabling its bars would only add a warning).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with console.logs_to(log):
        try:
            yield log
        finally:
            _disconnect_ray()


def _disconnect_ray() -> None:
    """Leave Ray (a local one stops): it streams the workers' last lines as it goes, into the log.
    Not under stages that a stop left running in threads: their next call into Ray would end the
    process at once (exit 1, the stop's last lines unsaid) or start a new Ray; `exit_with_main` leaves Ray
    to the process's end instead."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if running := nodes_in_threads():
        logging.getLogger(__name__).warning("Ray left to the process's end: %s still run", ", ".join(running))
        return
    ray.shutdown()


def _run_id_and_log(config, how: dict) -> tuple[str, Path]:
    """The run's id (a new one unless resuming) and its log file, known before the run starts."""
    from pipelines import manifest as mf

    run_id = how.get("resume") or mf.new_run_id()
    return run_id, mf.Manifest.folder(config.storage_path(), run_id) / RUN_LOG


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if config.ray.address:  # a cluster: shared storage, MLflow and resources, checked from its nodes
        problems = preflight.check_cluster(config)
    else:  # the local Ray is started by the run; its MLflow server must answer already
        problems = preflight.tracking_problems(config) + preflight.local_ray_problems()
    if problems:
        raise ConfigError(args.config, problems)
    print(
        f"{args.config}: OK (pipeline {config.name!r}, storage {config.storage_path()}, "
        f"tracking {redact_url(config.tracking_uri())})"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.rerun:
        from pipelines.stages import graph

        known = list(dict.fromkeys(name for node in graph(config) for name in (node.stage.name, node.id)))
        problems = [
            Problem("--rerun", name, "not a stage of this pipeline", f"choose one of {', '.join(known)}")
            for name in args.rerun
            if name not in known
        ]
        if problems:
            raise ConfigError(args.config, problems)
    return _execute(config, args, rerun=tuple(args.rerun))


def _resume(args: argparse.Namespace) -> int:
    from pipelines.manifest import SUCCEEDED, Manifest, UnreadableManifest

    try:
        manifest = Manifest.load(Path(args.storage), args.run_id)
    except (FileNotFoundError, UnreadableManifest) as error:
        print(f"ptft: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if manifest.status == SUCCEEDED and not args.keep_serving:
        # Resuming it would start Ray only to deploy its model again and shut it down (~20 s).
        storage = shlex.quote(args.storage)
        print(
            f"Pipeline run {args.run_id} finished; nothing to resume. To serve its model again: "
            f"ptft resume {args.run_id} --storage {storage} --keep-serving; "
            f"its report: ptft report {args.run_id} --storage {storage}"
        )
        return 0
    config = _recorded_config(manifest)
    print(
        f"Resuming pipeline run {args.run_id} ({manifest.status}); stages: "
        + ", ".join(f"{name}={record.status}" for name, record in manifest.stages.items()),
        flush=True,
    )
    return _execute(config, args, resume=args.run_id)


def _sweep(args: argparse.Namespace) -> int:
    import pipelines

    if args.resume:
        config, run_id = _sweep_to_resume(args)
        how = {"resume": run_id}
    else:
        if not args.config:
            raise ConfigError(
                "ptft sweep",
                [Problem("CONFIG", _MISSING_VALUE, "no config given", "pass a pipeline YAML, or --resume RUN_ID")],
            )
        config = load_config(args.config, args.overrides)
        if not config.has_tasks():
            problem = Problem("data.task", None, "this config pre-trains only: no task to sweep for", "add a task")
            raise ConfigError(args.config, [problem])
        if not config.tune.enabled:
            raise ConfigError(
                args.config, [Problem("tune.enabled", False, "the config turns the sweep off", "set tune.enabled=true")]
            )
        how = {"rerun": ("tune",) if args.force else ()}
    _stop_on_signals()
    started = time.perf_counter()
    run_id, log_path = _run_id_and_log(config, how)
    with logged_console(args, log_path) as log:
        if log:
            console.say(f"[ptft] sweep of run {run_id}; logs of Ray, MLflow and the workers: {log}")
        with console.live(), _resume_hint(args.command, config.storage_path(), run_id):
            result = pipelines.run(config, until="tune", on_stage=_print_stage, run_id=run_id, **how)
        _print_sweep_summary(result, config, time.perf_counter() - started, _config_arguments(args, config, run_id))
    return 0


def _config_arguments(args: argparse.Namespace, config, run_id: str) -> str:
    """The config and overrides this sweep ran with, as the next command takes them: each stage's
    cache key holds them, so `ptft run` of the bare config would sweep again (or take an older
    sweep) rather than fine-tune with this one. A resumed sweep's: the run's resolved config."""
    if args.config:
        return shlex.join([args.config, *args.overrides])
    return shlex.quote(str(config.storage_path() / "runs" / run_id / "config.json"))


def _sweep_to_resume(args: argparse.Namespace):
    """The config and run id of the sweep to continue (the latest unfinished one for `--resume`)."""
    from pipelines.manifest import SUCCEEDED, Manifest, UnreadableManifest, list_runs

    if args.storage:
        storage = Path(args.storage)
    elif args.config:
        storage = load_config(args.config, args.overrides, check_data=False).storage_path()
    else:
        storage = Path("./ptft-runs")
    run_id = args.resume
    if run_id == "latest":
        unfinished = [
            run
            for run in list_runs(storage)
            if run.status != SUCCEEDED and any(split_node(node)[0] == "tune" for node in run.stages)
        ]
        if not unfinished:
            problem = Problem(
                "--resume", str(storage), "no unfinished sweep here", "pass the run id (see `ptft runs`) or --storage"
            )
            raise ConfigError("ptft sweep --resume", [problem])
        run_id = unfinished[0].run_id
    try:
        manifest = Manifest.load(storage, run_id)
    except (FileNotFoundError, UnreadableManifest) as error:
        problem = Problem("--resume", run_id, str(error), "pass a run id that `ptft runs` lists")
        raise ConfigError("ptft sweep --resume", [problem]) from None
    config = _recorded_config(manifest)
    print(f"Resuming sweep of pipeline run {run_id} ({manifest.status})", flush=True)
    return config, run_id


def _recorded_config(manifest):
    """The config a recorded run used, from its working dir (relative data paths in it mean what
    they meant then)."""
    if Path(manifest.working_dir).is_dir():
        os.chdir(manifest.working_dir)
    if manifest.moved_from:
        problem = Problem(
            "--storage",
            manifest.storage,
            f"run {manifest.run_id} was recorded under {manifest.moved_from}, and a run does not resume from "
            "another place: its MLflow store, checkpoints and sweep state record their paths",
            f"move (or link) the folder back to {manifest.moved_from} and resume there, or start a new run with "
            f"storage={manifest.storage}",
        )
        raise ConfigError(f"run {manifest.run_id}", [problem])
    try:
        recorded = manifest.config()
        if not isinstance(recorded, dict):
            raise TypeError(f"a JSON {type(recorded).__name__}, not an object")
    except (OSError, ValueError, TypeError) as error:  # JSON's errors are ValueErrors
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        problem = Problem(
            "config.json",
            str(manifest.config_path()),
            f"the config run {manifest.run_id} ran with cannot be read ({type(error).__name__}: {why})",
            "restore the file, or run the pipeline again with `ptft run CONFIG`: what this run finished is "
            "reused from the cache",
        )
        raise ConfigError(f"run {manifest.run_id}", [problem]) from None
    return validate({**recorded, "storage": manifest.storage}, f"run {manifest.run_id}")


def _print_sweep_summary(result, config, seconds: float, config_arguments: str) -> None:
    console.say(f"\nSweep of pipeline run {result.run_id} finished in {seconds:.0f}s.")
    sweeps = _results_of(result, "tune")
    for node_id, tune in sweeps:
        task = split_node(node_id)[1]
        metric = (config.for_task(task) if task else config).tune.metric
        if len(sweeps) > 1:
            console.say(f"\n{node_id}:")
        if tune.cached:
            console.say("Cached: run with --force to sweep again.")
        best_value = tune.metrics.get(f"best/{metric}")
        shown_value = "?" if best_value is None else console.number(best_value)
        console.say(f"Best trial: {tune.outputs.best_trial or '?'} with {metric} = {shown_value}")
        best = tune.outputs.best_config.items()
        shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best)
        console.say("Best config: " + ", ".join(shown))
        console.say(f"Trial table: {tune.output_uri}/trials.csv  plot: {tune.output_uri}/sweep.png")
    console.say(
        f"MLflow: experiment {config.experiment_name()!r} at {redact_url(result.tracking_uri)}: each tune run "
        f"(under the pipeline's run {result.mlflow_run_id}) has one child run per trial. Browse: ptft ui "
        f"{config_arguments}"
    )
    console.say(
        f"Fine-tune with it: ptft run {config_arguments} (finetune takes the best config; finetune.overrides win)"
    )


def _results_of(result, stage: str) -> list:
    """(node id, result) of a stage's nodes in a pipeline result: one, or one per task."""
    return [
        (node_id, stage_result) for node_id, stage_result in result.stages.items() if split_node(node_id)[0] == stage
    ]


def _execute(config, args: argparse.Namespace, **how) -> int:
    import pipelines  # heavy imports (Ray, MLflow) only once the config is known to be good

    _stop_on_signals()  # runs end KILLED, not stuck RUNNING
    quiet = args.quiet
    if quiet:
        _quiet_down(config)
    started = time.perf_counter()
    progress_every_s = None if quiet else args.progress_every
    run_id, log_path = _run_id_and_log(config, how)
    with logged_console(args, log_path) as log:
        if log and not quiet:
            console.say(f"[ptft] run {run_id}; logs of Ray, MLflow and the workers: {log}")
        with console.muted() if quiet else console.live():
            # The progress reporter prints each stage's transitions, results included; without it
            # (--progress-every 0) each stage's result is printed as the stage ends.
            on_stage = _print_stage if not quiet and not progress_every_s else None
            told = _failures_told(config.tracking_uri(), config.storage_path())
            with told, _resume_hint(args.command, config.storage_path(), run_id):
                result = pipelines.run(
                    config, on_stage=on_stage, progress_every_s=progress_every_s, run_id=run_id, **how
                )
        _print_summary(result, config, time.perf_counter() - started, log)
        if args.keep_serving:
            urls = ", ".join(served.output_uri for _, served in _results_of(result, "serve"))
            console.say(f"Serving at {urls} — Ctrl-C to stop.")
            _wait_forever()
        if _results_of(result, "serve") and (not config.cluster_address() or args.keep_serving):
            from components import serve

            serve.shutdown()
            console.say("Serve shut down.")
    return 0


@contextlib.contextmanager
def _resume_hint(command: str, storage: Path, run_id: str) -> Iterator[None]:
    """A run that opened and then failed or was stopped says how to continue it: the stages that
    finished are kept. (A run refused before it opened, by its pre-flight, has nothing to continue.)"""
    from pipelines import manifest as mf

    try:
        yield
    except BaseException:
        if (mf.Manifest.folder(storage, run_id) / "manifest.json").is_file():
            again = f"sweep --resume {run_id}" if command == "sweep" else f"resume {run_id}"
            console.warn(
                f"ptft: run {run_id} did not finish. To continue it as configured: ptft {again} --storage "
                f"{shlex.quote(str(storage))} (a run of a changed config reuses its finished stages from the cache)"
            )
        raise


def _quiet_down(config) -> None:
    """`--quiet`: no progress bars, no live sweep table (and `say` muted while the run goes)."""
    logging.getLogger().setLevel(logging.WARNING)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    config.tune.progress_every_s = 0


def _runs(args: argparse.Namespace) -> int:
    from pipelines import manifest as mf
    from pipelines.driver_lock import driver_gone

    runs = mf.list_runs(Path(args.storage))[: args.limit]
    if not runs:
        print(f"No pipeline runs under {args.storage}.")
        return 0
    rows, orphans = [("RUN ID", "PIPELINE", "STATUS", "STARTED", "SECONDS", "STAGES")], 0
    for run in runs:
        status = run.status
        if status == mf.RUNNING and driver_gone(mf.Manifest.folder(args.storage, run.run_id)):
            status, orphans = "no driver", orphans + 1
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created_at))
        seconds = f"{run.ended_at - run.created_at:.0f}" if run.ended_at else "-"
        stages = " ".join(f"{name}:{record.status}" for name, record in run.stages.items())
        rows.append((run.run_id, run.pipeline, status, started, seconds, stages))
    # Columns as wide as their longest value: a pipeline's name has no length limit.
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    seconds_width = max(len(row[4]) for row in rows)
    for row in rows:
        left = "  ".join(value.ljust(width) for value, width in zip(row[:4], widths, strict=True))
        print(f"{left}  {row[4]:>{seconds_width}}  {row[5]}")
    if orphans:
        print(
            "\nno driver: recorded running, but its driver is gone (killed, or its machine restarted); "
            "`ptft resume RUN_ID` goes on with it"
        )
    return 0


def _print_stage(stage: str, result) -> None:
    from pipelines.progress import result_text

    console.say(f"[ptft] {stage:<8} {'cached' if result.cached else 'done'}: {result_text(result)}")


def _print_summary(result, config, seconds: float, log: Path | None = None) -> None:
    console.say(f"\nPipeline run {result.run_id} finished in {seconds:.0f}s.")
    for _, served in _results_of(result, "serve"):
        endpoint = served.outputs
        console.say(f"Model {endpoint.model.name} v{endpoint.model.version} served at {endpoint.url}")
        for sample in endpoint.samples:
            console.say(f"  {sample.asked()!r:45} -> {sample.answer()}")
    from components.tracking import ui_links

    served_by_ptft_ui = not result.tracking_uri.startswith(("http://", "https://"))
    links = ui_links(ui_url_of(result.tracking_uri), result.experiment_id, result.mlflow_run_id)
    console.say(f"Runs: MLflow experiment {config.experiment_name()!r} at {redact_url(result.tracking_uri)}")
    console.say(f"  all runs: {links['runs']}\n  this run: {links['run']}")
    if served_by_ptft_ui:
        # The run's resolved config: right after a resume too, and with the overrides it ran with.
        console.say(
            f"  (served by: ptft ui {shlex.quote(str(config.storage_path() / 'runs' / result.run_id / 'config.json'))})"
        )
    console.say(f"Report: ptft report {result.run_id} --storage {shlex.quote(str(config.storage_path()))}")
    if log:
        console.say(f"Log (Ray, MLflow, workers): {log}")


def _ui(args: argparse.Namespace) -> int:
    config = command_config(args.config, args.overrides)
    if problem := listen_problem(args.host, args.port):
        print(f"ptft ui: {problem}; stop what listens there, or pick another --port", file=sys.stderr)
        return EXIT_USER_ERROR
    # A config names its store, which a run makes (the UI may open before it); without one, an
    # empty store would be made in whatever folder this ran from.
    if args.config is None and (problems := missing_store_problems(config.tracking_uri(), reading="run")):
        raise ConfigError(DEFAULTS_SOURCE, problems)
    # This interpreter's mlflow, whether or not the venv's bin/ is on PATH.
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        config.tracking_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {url} ({redact_url(config.tracking_uri())})", flush=True)
    for what, link in _newest_run_links(config, url, named=args.config is not None).items():
        print(f"  {what}: {link}", flush=True)
    # A UI for one person: one worker, and none of MLflow 3's job runner (seven huey consumer
    # processes for GenAI jobs ptft does not use; they made the UI take minutes on a busy machine).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    os.execve(command[0], command, env)
    return 0


def _newest_run_links(config, ui_url: str, *, named: bool = True) -> dict[str, str]:
    """The experiment's runs and its newest pipeline run under the storage in the UI ({} before
    any run). `named`: the config's experiment; else the newest run's, whichever pipeline it was.
    A storage may hold several pipelines' runs, and a run recorded elsewhere (another store)."""
    from mlflow.tracking import MlflowClient

    from components.tracking import ui_links
    from pipelines.manifest import list_runs

    store = redact_url(config.tracking_uri())
    runs = [
        run
        for run in list_runs(config.storage_path())
        if run.mlflow_run_id and run.experiment_id and redact_url(run.tracking_uri or "") == store
    ]
    if named:
        experiment = MlflowClient(config.tracking_uri()).get_experiment_by_name(config.experiment_name())
        if experiment is None:
            return {}
        experiment_id = experiment.experiment_id
        runs = [run for run in runs if run.experiment_id == experiment_id]
    elif runs:
        experiment_id = runs[0].experiment_id
    else:
        return {}
    newest = runs[0] if runs else None
    links = ui_links(ui_url, experiment_id, newest.mlflow_run_id if newest else None)
    return {"all runs": links["runs"], **({f"newest run {newest.run_id}": links["run"]} if newest else {})}


def _serve(args: argparse.Namespace) -> int:
    from pipelines.pipeline_config import model_reference_problems

    config = command_config(args.config, args.overrides)
    problems = model_reference_problems(args.model, "MODEL", config.tracking_uri())
    if args.export and not args.model.startswith("models:/"):
        problems.append(
            Problem(
                "MODEL",
                args.model,
                "a Serve config file loads models from the registry",
                "export a registered model: models:/NAME@ALIAS or models:/NAME/VERSION",
            )
        )
    if args.export:
        problems += arguments.output_file_problems("--export", args.export, "serve.yaml")
    if problems:
        raise ConfigError("ptft serve", problems)
    from components.model_ref import RegistryUnavailable, resolve_model

    tracking_uri = config.tracking_uri()
    try:
        model = resolve_model(args.model, tracking_uri)
    except RegistryUnavailable as error:
        problem = Problem(
            "tracking.uri",
            redact_url(tracking_uri),
            str(error),
            "start the MLflow server, or point at the one that is up",
        )
        raise ConfigError("ptft serve", [problem]) from None
    except ValueError as error:
        problem = Problem("MODEL", args.model, str(error), "register it, or check the name")
        raise ConfigError("ptft serve", [problem]) from None
    if args.export:
        from components import serve

        return _export_serve_config(serve.serve_config_file(config.serve, args.model, tracking_uri), args.export)
    if not config.cluster_address() and (
        problems := preflight.port_problems([("", config.serve)]) + preflight.local_ray_problems()
    ):
        raise ConfigError("ptft serve", problems)  # before a local Ray starts, and Serve fails to bind
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with logged_console(args, config.storage_path() / "logs" / f"serve-{config.serve.app_name}-{stamp}.log") as log:
        if log:
            console.say(f"[ptft] serve {model.name} v{model.version}; logs of Ray Serve and the replicas: {log}")
        return _serve_until_stopped(config, model, tracking_uri)


def _serve_until_stopped(config, model, tracking_uri: str | None) -> int:
    from components import serve
    from pipelines.runner import _init_ray

    with console.spinner(f"Starting Ray Serve for {model.name} v{model.version} ..."):
        _init_ray(config)
        # A rollout follows a promote (an alias), or the next deploy to a cluster that stays up.
        rollouts = bool(model.alias) or config.cluster_address() is not None
        nodes = list(preflight.alive_nodes().values())
        if problems := preflight.serve_problems([("", config.serve)], nodes, rollouts=rollouts):
            raise ConfigError("ptft serve", problems)
        url = serve.deploy(config.serve, model, tracking_uri)
    console.say(f"Serving {model.name} v{model.version} at {url}  (POST {url}/predict, docs at {url}/docs)")
    if config.cluster_address():
        console.say("The application stays up on the cluster; `ptft promote` / `ptft rollback` roll it over.")
        return 0
    following = f" Following models:/{model.name}@{model.alias}: a promote or rollback rolls it over."
    console.say("Ctrl-C to stop." + (following if model.alias else ""))
    _stop_on_signals()
    wait_s = FOLLOW_EVERY_S
    try:
        while True:
            stopping.sleep(wait_s)
            if not model.alias:
                continue
            now, trouble = serve.keep_following(config.serve, model, tracking_uri)
            if trouble:  # said each time, then looked at less often, up to once a minute
                wait_s = min(wait_s * 2, FOLLOW_AT_MOST_EVERY_S)
                console.say(f"[ptft] {model.name}@{model.alias}: {trouble}; trying again in {wait_s}s")
                continue
            wait_s = FOLLOW_EVERY_S
            if now.version != model.version:
                console.say(f"[ptft] {model.name}@{model.alias}: v{model.version} rolled over to v{now.version}")
            model = now
    except KeyboardInterrupt:
        pass
    console.say("Shutting Serve down (replicas finish what they hold)...")
    serve.shutdown()
    console.say("Serve shut down.")
    return 0


# How often a local `ptft serve` of an alias checks the registry for a new version.
FOLLOW_EVERY_S = 5
FOLLOW_AT_MOST_EVERY_S = 60  # while the registry does not answer


def _explain_tracking_uri(args: argparse.Namespace) -> str | None:
    """The store `ptft explain` reads: --tracking-uri, checked as a config's would be, else the
    config's. Without --config, neither is needed for a model folder (from any directory)."""
    if args.config is None and args.tracking_uri:
        from pydantic import ValidationError

        from pipelines.pipeline_config import TrackingConfig

        try:
            return TrackingConfig(uri=args.tracking_uri).uri
        except ValidationError as error:
            problem = Problem(
                "--tracking-uri",
                redact_url(args.tracking_uri),
                error.errors()[0]["msg"],
                "see tracking.uri in docs/config.md",
            )
            raise ConfigError("ptft explain", [problem]) from None
    if args.config is None and not args.model.startswith("models:/"):
        return None
    overrides = [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []
    return command_config(args.config, overrides).tracking_uri()


def _explain(args: argparse.Namespace) -> int:
    from pipelines.pipeline_config import model_reference_problems

    tracking_uri = _explain_tracking_uri(args)
    problems = model_reference_problems(args.model, "MODEL", tracking_uri)
    if len(args.texts) > MAX_EXPLAIN_TEXTS:
        problems.append(
            Problem(
                "TEXTS",
                len(args.texts),
                f"at most {MAX_EXPLAIN_TEXTS} texts at a time",
                "explain them in several calls",
            )
        )
    if args.output:
        from matplotlib.backend_bases import FigureCanvasBase

        images = sorted(f".{kind}" for kind in FigureCanvasBase.get_supported_filetypes() if kind != "png")
        problems += arguments.output_file_problems("--output", args.output, "attention.png", (".png", *images))
    if problems:
        raise ConfigError("ptft explain", problems)
    from components.model_ref import RegistryUnavailable, resolve_model

    try:
        model = resolve_model(args.model, tracking_uri)
    except RegistryUnavailable as error:
        problem = Problem(
            "--tracking-uri", redact_url(tracking_uri), str(error), "start the MLflow server, or name one"
        )
        raise ConfigError("ptft explain", [problem]) from None
    except ValueError as error:
        raise ConfigError("ptft explain", [Problem("MODEL", args.model, str(error), "check the name")]) from None
    from transformers.utils import logging as transformers_logging

    from components import plots, scoring

    # The maps are the output: no download or weight-loading bars around them.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    transformers_logging.disable_progress_bar()
    scorer = scoring.Scorer(model.model_uri, tracking_uri)
    if scorer.task.explain is None:
        why = f"a {scorer.task.name} model has no attention map yet"
        raise ConfigError("ptft explain", [Problem("MODEL", args.model, why, "explain a model of another task")])
    asked = [{"question": text, "context": args.context} for text in args.texts] if args.context else args.texts
    if problem := scorer.task.input_problem(asked):
        fix = "a question answering model: the questions as texts and --context TEXT; other models: texts only"
        raise ConfigError("ptft explain", [Problem("TEXTS", args.texts[0], problem, fix)])
    try:
        maps = scorer.explain(asked, args.layer)
    except ValueError as error:
        raise ConfigError("ptft explain", [Problem("--layer", args.layer, str(error), "pick a layer it has")]) from None
    if args.json:
        print(json.dumps({"explanations": maps, "model": model.model_dump()}, indent=1))
    else:
        print(f"{model.name} v{model.version}")
        for item in maps:
            _print_attention(item)
    if args.output:
        print(f"Attention maps drawn in {plots.attention(maps, Path(args.output))}")
    return 0


def _print_attention(item: dict, top: int = 3) -> None:
    """The prediction, then per head the tokens it attends to most (for a translation: per target
    token the source tokens the decoder looked at most)."""
    if "target_tokens" in item:
        print(f"\n{item['text']!r} -> {item['translation']!r}; layer {item['layer']}, cross-attention:")
        for token, weights in zip(item["target_tokens"], item["attention"], strict=True):
            ranked = sorted(zip(weights, item["tokens"], strict=True), reverse=True)[:top]
            print(f"  {token}: " + ", ".join(f"{source} {weight:.2f}" for weight, source in ranked))
        return
    print(
        f"\n{item['text']!r} -> {item['label']} ({item['score']:.3f}); layer {item['layer']}, "
        f"attention from {item['query_token']}:"
    )
    for head, weights in enumerate(item["attention"]):
        ranked = sorted(zip(weights, item["tokens"], strict=True), reverse=True)[:top]
        print(f"  head {head}: " + ", ".join(f"{token} {weight:.2f}" for weight, token in ranked))


def _export_serve_config(document: dict, path: str) -> int:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from components.stage import write_text_whole

    ServeDeploySchema.model_validate(document)  # what `serve deploy` checks
    write_text_whole(Path(path), yaml.safe_dump(document, sort_keys=False))
    print(f"Wrote {path}: deploy it with `serve deploy {path}` (or paste it into a RayService's serveConfigV2)")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from components import registry

    config = command_config(args.config, args.overrides)
    client = _registry_client(config, "ptft promote")
    try:
        previous = registry.promote(client, args.name, args.version)
    except Exception as error:  # noqa: BLE001 - MlflowException for an unknown model or version
        raise ConfigError(
            "ptft promote",
            [
                Problem(
                    "VERSION",
                    f"{args.name}/{args.version}",
                    _message(error),
                    "see the registered versions in `ptft ui`",
                )
            ],
        ) from None
    was = f"was v{previous}" if previous else "there was none"
    print(f"{args.name}: champion is now v{args.version} ({was})", flush=True)
    _roll_over(config, args.name)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from components import registry

    config = command_config(args.config, args.overrides)
    client = _registry_client(config, "ptft rollback")
    try:
        current, restored = registry.rollback(client, args.name)
    except Exception as error:  # noqa: BLE001 - ValueError (no history) or MlflowException (no model)
        raise ConfigError(
            "ptft rollback",
            [Problem("NAME", args.name, _message(error), "promote a version instead: ptft promote NAME VERSION")],
        ) from None
    print(f"{args.name}: champion is back to v{restored} (was v{current})", flush=True)
    _roll_over(config, args.name)
    return 0


def _registry_client(config, command: str):
    """A client of the config's registry, once its server answers (MLflow's own client retries an
    unreachable one for minutes)."""
    from mlflow.tracking import MlflowClient

    if problems := preflight.tracking_problems(config) or missing_store_problems(config.tracking_uri()):
        raise ConfigError(command, problems)
    return MlflowClient(config.tracking_uri())


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)


def _roll_over(config, name: str) -> None:
    """On a cluster, roll the config's Serve application over to the new champion now. A local
    `ptft serve` of the alias checks the registry itself."""
    if not config.cluster_address():
        print(f"A local `ptft serve models:/{name}@champion` follows it within {FOLLOW_EVERY_S}s.")
        return
    from components import serve
    from pipelines.runner import _init_ray

    _init_ray(config)
    model = serve.follow_champion(config.serve, name, "champion", config.tracking_uri())
    if model is None:
        print(
            f"No application following models:/{name}@champion at {serve.app_url(config.serve)}; nothing to roll over."
        )
    else:
        print(f"Application {config.serve.app_name!r} serves {name} v{model.version}.")


class FailureTold(RuntimeError):
    """A failure whose cause ptft knows, said in a line; its traceback is left in the run's log."""


# Ray's memory monitor, in the error of every task or actor it killed (wrapped by Ray Train or Tune).
RAY_OOM = "killed due to the node running low on memory"
NODE_MEMORY = re.compile(
    r"Memory on the node \(IP: (?P<ip>[^,)]+)[^)]*\) was (?P<used>\S+) used / (?P<limit>\S+) limit"
)
THRESHOLD = re.compile(r"exceeded threshold of \S+ \((?P<share>[\d.]+%) of")


@contextlib.contextmanager
def _failures_told(tracking_uri: str, storage: Path) -> Iterator[None]:
    """Failures with a known cause end in the cause and what to do, not in a traceback: out of
    memory (90 lines, Ray's process table and object store counters, the cause in one of them), a
    full disk (a chain of MLflow and SQLite tracebacks), an MLflow server that stopped answering (a
    chain of six tracebacks) and a stage's `StageFailure`."""
    try:
        yield
    except Exception as error:
        said = (
            _out_of_memory(error)
            or _disk_full(error, storage, tracking_uri)
            or _tracking_gone(error, tracking_uri)
            or _stage_said(error)
        )
        if said is None:
            raise
        logging.getLogger(__name__).error("%s", said, exc_info=error)  # the traceback, into the run's log
        raise FailureTold(said) from None


def _stage_said(error: Exception) -> str | None:
    """A stage's own failure with a known cause (`StageFailure`), raised in this process."""
    from components.net import causes
    from components.stage import StageFailure

    return next((str(each) for each in causes(error) if isinstance(each, StageFailure)), None)


def _out_of_memory(error: Exception) -> str | None:
    from components.net import causes

    report = "\n".join(str(each) for each in causes(error))
    if RAY_OOM not in report:
        return None
    node = NODE_MEMORY.search(report)
    past = f", past the monitor's {share['share']}" if (share := THRESHOLD.search(report)) else ""
    where = f" on node {node['ip']} ({node['used']} used of {node['limit']}{past})" if node else ""
    return (
        f"out of memory{where}: Ray's memory monitor killed the stage's processes. Fix: smaller "
        "batches (pretrain.batch_size_per_worker, finetune.batch_size_per_worker), a shorter "
        "tokenize.seq_len, fewer processes at once on the node (workers, tune.max_concurrent_trials) "
        "or more memory. Ray's report is in the run's log"
    )


# A worker's full disk reaches the driver as text: Python's OSError, with the file it wrote.
NO_SPACE_WRITING = re.compile(r"No space left on device: '(?P<path>[^']+)'")
AGAIN_WITHOUT_RUN = "run the command again"
AGAIN = f"{AGAIN_WITHOUT_RUN}; a run that had opened continues with the `ptft resume` above, its finished stages kept"
RUN_COMMANDS = ("run", "resume", "sweep")  # those that open a pipeline run, which `ptft resume` continues


def _disk_full(error: Exception, storage: Path, tracking_uri: str) -> str | None:
    """A full disk, wherever it stopped the run: a write here or in a worker (the file named, else
    the storage), or the tracking store's own (SQLite's "database or disk is full", a server's
    store), which the run's end then also failed to update: a chain of MLflow and SQLAlchemy
    tracebacks."""
    from components.net import causes
    from components.tracking import out_of_space
    from pipelines.pipeline_config import sqlite_file

    full = next((each for each in causes(error) if out_of_space(each)), None)
    if full is None:
        return None
    if isinstance(full, OSError) and full.errno == errno.ENOSPC:
        return _out_of_disk_space(Path(full.filename) if full.filename else storage)
    if found := NO_SPACE_WRITING.search(str(full)):
        return _out_of_disk_space(Path(found["path"]))
    if store := sqlite_file(tracking_uri):
        return _out_of_disk_space(store)
    return (
        f"the tracking store at {redact_url(tracking_uri)} is out of disk space ({redact_text(str(full))[:200]}). "
        f"Free space where it keeps its data, then {AGAIN}"
    )


def _out_of_disk_space(written: Path, again: str = AGAIN) -> str:
    from rich.filesize import decimal

    written = Path(os.path.abspath(written))  # a bare file name is the working directory's
    mount = written
    while not os.path.ismount(mount):
        mount = mount.parent
    usage = shutil.disk_usage(mount)
    return (
        f"out of disk space on {mount} ({decimal(usage.free)} free of {decimal(usage.total)} now), writing "
        f"{written}. Free space there, then {again}"
    )


def _tracking_gone(error: Exception, tracking_uri: str) -> str | None:
    from components.net import mlflow_unreachable

    if not mlflow_unreachable(error):
        return None
    return (
        f"the MLflow server at {redact_url(tracking_uri)} stopped answering (MLflow's client retried for "
        "minutes). Start it again, then continue the run with the `ptft resume` above: its finished "
        "stages are kept"
    )


class Signalled(KeyboardInterrupt):
    """A stop by a signal other than Ctrl-C's (SIGTERM: `ptft stop`, Ray's job stop, `kill`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise Signalled(signum)


def _stop_on_signals() -> None:
    """SIGTERM (`ptft stop`, a scheduler, `kill`) and SIGHUP (the terminal closed: a dropped ssh
    session) stop a command as Ctrl-C does; by default SIGHUP killed the process and left its run
    `running`. A SIGHUP ignored (`nohup ptft run ...`) stays ignored; tmux or screen keep the
    terminal, and the run, alive."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _terminal_closed)


def _terminal_closed(signum, frame) -> None:
    console.terminal_gone()  # the stop's last lines go to the run's log
    raise Signalled(signum)


def _wait_forever() -> None:
    try:
        while True:
            stopping.sleep(3600)
    except KeyboardInterrupt:
        pass


def exit_with_main() -> None:
    """The `ptft` command. A run stopped beside stages still running in threads ends here at once,
    its lines flushed: the interpreter's own exit would shut Ray down under them (Ray's exit hook).
    A local Ray then goes with its reaper, a cluster's job with its driver, as after a kill."""
    code = main()
    if nodes_in_threads():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        ingress.remove_own_folders_now()  # the exit handlers that would remove them do not run
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_with_main()
