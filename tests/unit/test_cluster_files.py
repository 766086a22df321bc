"""The files in cluster/, checked offline against the schemas their tools apply: the `ray up` YAML
against Ray's autoscaler schema, the KubeRay manifests against the CRDs' OpenAPI schemas (in
../shared/schemas/kuberay), the DeepSpeed presets against DeepSpeed's own config parser, the
local-cluster script with `bash -n`; no manifest holds a secret; the RayService's Serve config
against Ray Serve's schema and `components.serve.app_builder`'s argument checks. Each check is
also shown to reject a broken copy."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, shared, sqlite_store

CLUSTER = REPO / "cluster"
RAY_UP = CLUSTER / "ray-up" / "gpu-cluster.yaml"
KUBERAY = CLUSTER / "kuberay"
MANIFESTS = {
    "RayCluster": KUBERAY / "raycluster.yaml",
    "RayJob": KUBERAY / "rayjob.yaml",
    "RayService": KUBERAY / "rayservice.yaml",
}
PRESETS = CLUSTER / "deepspeed"
# A name part (between underscores) that says secret: MLFLOW_TRACKING_TOKEN, AWS_SECRET_ACCESS_KEY, not
# TOKENIZERS_PARALLELISM.
SECRET_NAME = re.compile(r"(^|_)(TOKENS?|PASSWORDS?|PASSWD|SECRETS?|KEYS?|CREDENTIALS?)(_|$)", re.IGNORECASE)


def _yaml(path: Path) -> Any:
    # libyaml's loader where PyYAML has it: the KubeRay CRDs are 1-1.4 MB each (~10 s in pure Python).
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# --- ray up ------------------------------------------------------------------------------------


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_up_problems(config: dict) -> list[str]:
    """jsonschema against ray-schema.json, then Ray's own checks after it fills in the AWS defaults."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = [error.message for error in jsonschema.Draft7Validator(_ray_schema()).iter_errors(config)]
    if not problems:
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except (ValueError, jsonschema.ValidationError) as error:
            problems.append(str(error))
    return problems


def test_ray_up_yaml_is_valid() -> None:
    assert _ray_up_problems(_yaml(RAY_UP)) == []


@pytest.mark.parametrize("breakage", ["no provider type", "string min_workers", "unknown key", "head type"])
def test_ray_up_checks_reject_a_broken_copy(breakage: str) -> None:
    config = _yaml(RAY_UP)
    if breakage == "no provider type":
        del config["provider"]["type"]
    elif breakage == "string min_workers":
        config["available_node_types"]["gpu_worker"]["min_workers"] = "0"
    elif breakage == "unknown key":
        config["idle_timeout_minute"] = 5
    else:
        config["head_node_type"] = "no-such-type"
    assert _ray_up_problems(config)


def test_ray_up_installs_the_project_and_keeps_the_dashboard_local() -> None:
    config = _yaml(RAY_UP)
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(setup) if "-c constraints.txt -e ." in c)
    assert torch_at < project_at, "torch must be installed before the project so nothing pulls another build"
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "." in config["file_mounts"].values(), "the repository must be copied to every node"
    assert any("/mnt/ptft" in c for c in config["initialization_commands"]), "shared storage must be mounted"
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["min_workers"] == 0


# --- KubeRay -----------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as `kubectl apply` (field validation Strict) does;
    the API server's structural schema would otherwise drop a misspelled field silently."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@functools.cache  # read once per kind: several tests validate against the same CRD
def _crd_schema(kind: str) -> dict:
    files = {
        "RayCluster": "ray.io_rayclusters.yaml",
        "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml",
    }
    crd = _yaml(shared("schemas/kuberay") / files[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _closed(version["schema"]["openAPIV3Schema"])


def _crd_problems(manifest: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(_crd_schema(manifest["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_manifest_matches_its_crd(kind: str) -> None:
    manifest = _yaml(MANIFESTS[kind])
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    assert _crd_problems(manifest) == []


@pytest.mark.parametrize("breakage", ["misspelled field", "int start param", "no group name", "string replicas"])
def test_crd_schema_rejects_a_broken_copy(breakage: str) -> None:
    manifest = _yaml(MANIFESTS["RayCluster"])
    group = manifest["spec"]["workerGroupSpecs"][0]
    if breakage == "misspelled field":
        manifest["spec"]["headGroupSpec"]["rayStartParam"] = manifest["spec"]["headGroupSpec"].pop("rayStartParams")
    elif breakage == "int start param":
        group["rayStartParams"]["num-cpus"] = 2  # rayStartParams values must be strings
    elif breakage == "no group name":
        del group["groupName"]
    else:
        group["maxReplicas"] = "four"
    assert _crd_problems(manifest)


def _cluster_specs() -> dict[str, dict]:
    specs = {}
    for kind, path in MANIFESTS.items():
        spec = _yaml(path)["spec"]
        specs[kind] = {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig"),
        }[kind]
    return specs


def _groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_dashboard_binds_loopback_unless_the_operator_needs_it() -> None:
    hosts = {
        kind: spec["headGroupSpec"]["rayStartParams"].get("dashboard-host") for kind, spec in _cluster_specs().items()
    }
    # RayJob and RayService: the operator (and the RayJob submitter) talk to the head's dashboard
    # through its Service, so those two listen on the pod's interfaces, on purpose, behind token auth.
    assert hosts == {"RayCluster": "127.0.0.1", "RayJob": "0.0.0.0", "RayService": "0.0.0.0"}
    for spec in _cluster_specs().values():
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_kuberay_images_and_ray_version_match_the_project() -> None:
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)[1]
    ray_pin = re.search(r"^ray==(.+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)[1]
    for kind, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray_pin, kind
        for group in _groups(spec):
            for container in _containers(group):
                assert container["image"] in (f"ghcr.io/ptft/ptft:{version}", f"ghcr.io/ptft/ptft:{version}-gpu")
                gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
                # the GPU image on GPU pods only, and every GPU pod asks for its GPU
                assert bool(gpus) == container["image"].endswith("-gpu"), (kind, group.get("groupName"))
    assert any(
        _containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in _cluster_specs()["RayCluster"]["workerGroupSpecs"]
    ), "the RayCluster needs a GPU worker group"


def test_pods_that_train_mount_the_shared_volume() -> None:
    pvc = _yaml(KUBERAY / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind in ("RayCluster", "RayJob"):
        for group in _groups(_cluster_specs()[kind]):
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v]
            assert claims == [pvc["metadata"]["name"]], (kind, group.get("groupName"))
            mounts = {m["mountPath"] for c in _containers(group) for m in c.get("volumeMounts", [])}
            assert "/mnt/ptft" in mounts, (kind, group.get("groupName"))


def test_rayjob_entrypoint_is_a_valid_ptft_run() -> None:
    from pipelines.pipeline_config import load_config

    entrypoint = _yaml(MANIFESTS["RayJob"])["spec"]["entrypoint"]
    workdir, command = entrypoint.split(" && ")
    assert workdir == "cd /home/ray/ptft", "the image's WORKDIR (cluster/Dockerfile)"
    argv = shlex.split(command)
    assert argv[:3] == ["ptft", "run", "configs/demo.yaml"]
    config = load_config(REPO / argv[2], argv[3:], check_data=False)  # storage is the cluster's PVC
    assert config.storage == "/mnt/ptft/runs"
    assert config.tracking.uri == "http://mlflow.mlflow.svc.cluster.local:5000"


def test_dockerfile_copies_what_exists_and_the_context_lets_it_through() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /home/ray/ptft$", dockerfile, re.MULTILINE)
    sources = [s for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE) for s in line.split()]
    allowed = {
        line[1:].rstrip("/")
        for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert sources and set(sources) <= allowed
    assert all((REPO / source).exists() for source in sources)
    assert dockerfile.index("torch==${TORCH_VERSION}") < dockerfile.index("-c constraints.txt -e .")


# --- Serve config and app_builder --------------------------------------------------------------


def _serve_config() -> dict:
    return yaml.safe_load(_yaml(MANIFESTS["RayService"])["spec"]["serveConfigV2"])


def test_rayservice_serve_config_matches_ray_serve_schema() -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(_serve_config())
    broken = _serve_config()
    del broken["applications"][0]["import_path"]
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(broken)


def test_rayservice_args_pass_the_builder_checks() -> None:
    import importlib

    from components import serve

    (app,) = _serve_config()["applications"]
    module, _, attribute = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is serve.app_builder
    options, model_uri, _ = serve._parse_app_args(app["args"])
    assert model_uri == "models:/demo-classifier@champion" and options["num_replicas"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (None, "args must be a mapping"),
        ({"tracking_uri": "http://mlflow:5000"}, "args.model_uri=None"),
        ({"model_uri": "runs:/abc/model", "tracking_uri": "http://mlflow:5000"}, "use a registered model"),
        ({"model_uri": "models:/m@champion"}, "args.tracking_uri=None"),
        ({"model_uri": "models:/m/1", "tracking_uri": "x", "port": 9000}, "set http_options.port in the Serve config"),
        ({"model_uri": "models:/m/1", "tracking_uri": "x", "replicas": 2}, "args.replicas is not accepted"),
        ({"model_uri": "models:/m/1", "tracking_uri": "x", "num_replicas": 0}, "args.num_replicas=0"),
    ],
)
def test_app_builder_rejects_bad_args(args: Any, message: str) -> None:
    from components.serve import app_builder

    with pytest.raises(ValueError, match=re.escape(message)):
        app_builder(args)


def test_app_builder_pins_the_alias_to_a_version(tmp_path: Path) -> None:
    """Against a sqlite registry: the alias becomes a concrete version, bound with the given replicas."""
    from mlflow.tracking import MlflowClient

    from components.serve import app_builder, resolve_model

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    client.create_registered_model("demo-classifier")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")  # a registered version's files are looked for
    for _ in range(2):
        version = client.create_model_version("demo-classifier", source=str(tmp_path / "model")).version
    client.set_registered_model_alias("demo-classifier", "champion", "1")
    assert str(version) == "2"
    model = resolve_model("models:/demo-classifier@champion", uri)
    assert (model.version, model.model_uri, model.alias) == ("1", "models:/demo-classifier/1", "champion")
    app = app_builder({"model_uri": "models:/demo-classifier@champion", "tracking_uri": uri, "num_replicas": 3})
    assert app._bound_deployment.num_replicas == 3
    with pytest.raises(ValueError, match="not in the registry"):
        app_builder({"model_uri": "models:/demo-classifier@nope", "tracking_uri": uri})


# --- secrets -----------------------------------------------------------------------------------


def inline_secrets(document: Any, path: str = "") -> list[str]:
    """Paths of env entries whose name looks secret but whose value is written in the manifest, and
    of secret-looking names in Ray runtime_env env_vars (stored in the job table, shown in the dashboard)."""
    found = []
    if isinstance(document, dict):
        if isinstance(document.get("name"), str) and SECRET_NAME.search(document["name"]) and "value" in document:
            found.append(f"{path}: {document['name']} has an inline value (use valueFrom.secretKeyRef)")
        for key, value in document.items():
            if key == "env_vars" and isinstance(value, dict):
                found += [f"{path}.env_vars: {name}" for name in value if SECRET_NAME.search(name)]
            if key in ("serveConfigV2", "runtimeEnvYAML") and isinstance(value, str):
                value = yaml.safe_load(value)
            found += inline_secrets(value, f"{path}.{key}")
    elif isinstance(document, list):
        for index, item in enumerate(document):
            found += inline_secrets(item, f"{path}[{index}]")
    elif isinstance(document, str):
        # shell: NAME=literal, or `export NAME=literal`; NAME=$(...) or NAME="$t" reads it from elsewhere
        for name, value in re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)=(\S+)", document):
            if SECRET_NAME.search(name) and not value.lstrip("\"'").startswith("$"):
                found.append(f"{path}: {name}={value}")
    return found


def _all_manifests() -> dict[str, Any]:
    paths = [RAY_UP, *sorted(KUBERAY.glob("*.yaml"))]
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in paths}


def test_no_manifest_holds_a_secret() -> None:
    assert {name: inline_secrets(docs) for name, docs in _all_manifests().items() if inline_secrets(docs)} == {}


def test_secret_check_catches_inline_values() -> None:
    cluster = _yaml(MANIFESTS["RayCluster"])
    env = _containers(cluster["spec"]["headGroupSpec"])[0]["env"]
    env.append({"name": "MLFLOW_TRACKING_TOKEN", "value": "abc123"})
    assert inline_secrets(cluster) == [
        ".spec.headGroupSpec.template.spec.containers[0].env[1]: MLFLOW_TRACKING_TOKEN has an inline value "
        "(use valueFrom.secretKeyRef)"
    ]
    service = _yaml(MANIFESTS["RayService"])
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["runtime_env"] = {"env_vars": {"AWS_SECRET_ACCESS_KEY": "abc"}}
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert len(inline_secrets(service)) == 1
    ray_up = _yaml(RAY_UP)
    ray_up["worker_start_ray_commands"].append("export MLFLOW_TRACKING_TOKEN=abc123; ray start")
    assert inline_secrets(ray_up) == [".worker_start_ray_commands[2]: MLFLOW_TRACKING_TOKEN=abc123;"]


def test_pods_get_the_mlflow_token_from_a_secret() -> None:
    for kind, spec in _cluster_specs().items():
        for group in _groups(spec):
            env = {e["name"]: e for c in _containers(group) for e in c.get("env", [])}
            assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ptft-mlflow", kind


# --- DeepSpeed presets -------------------------------------------------------------------------

# What each preset stands for in pipeline-config terms.
PRESET_SETTINGS = {
    "zero2-cpu-fp32.json": (2, "fp32"),
    "zero2-bf16.json": (2, "bf16"),
    "zero3-bf16.json": (3, "bf16"),
    "zero3-offload-bf16.json": (3, "bf16"),
}


def _deepspeed_parse(config: dict, monkeypatch: pytest.MonkeyPatch) -> Any:
    # Before DeepSpeed's first import (it picks its accelerator then); the parser needs no GPU.
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(copy.deepcopy(config))


def _loaded(name: str, **explicit: Any):
    """The preset loaded through `deepspeed.config_file`, as a pipeline config would."""
    from components.schemas import DeepSpeedConfig

    return DeepSpeedConfig.model_validate({"config_file": str(PRESETS / name), **explicit})


def test_every_preset_is_listed() -> None:
    assert sorted(p.name for p in PRESETS.glob("*.json")) == sorted(PRESET_SETTINGS)


@pytest.mark.parametrize("name", sorted(PRESET_SETTINGS))
def test_preset_loads_through_config_file_and_deepspeed_accepts_the_result(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.schemas import DeepSpeedConfig
    from components.training import deepspeed_config

    preset = json.loads((PRESETS / name).read_text())
    loaded = _loaded(name)
    assert (loaded.zero_stage, loaded.precision) == PRESET_SETTINGS[name]
    built = deepspeed_config(loaded, micro_batch_size=16)
    parsed = _deepspeed_parse(built, monkeypatch)
    assert parsed.zero_optimization_stage == PRESET_SETTINGS[name][0]
    assert parsed.train_batch_size == 16  # the stage's micro-batch, one rank
    assert set(preset) - set(built) == set(), "every top-level key of the file reaches DeepSpeed"
    for key, value in preset["zero_optimization"].items():  # bucket sizes, offload, ... pass through
        assert built["zero_optimization"][key] == value, key
    if name == "zero2-cpu-fp32.json":
        plain = deepspeed_config(DeepSpeedConfig(zero_stage=2), micro_batch_size=16)
        assert built == plain, "the CPU preset is exactly what ptft builds for zero_stage=2"
    if "offload" in name:
        assert (loaded.offload_optimizer, loaded.offload_param) == ("cpu", "cpu")
        assert built["zero_force_ds_cpu_optimizer"] is False


def test_keys_set_in_the_block_win_over_the_file() -> None:
    loaded = _loaded("zero3-bf16.json", zero_stage=2, precision="fp32", gradient_clipping=0.5)
    assert (loaded.zero_stage, loaded.precision, loaded.gradient_clipping) == (2, "fp32", 0.5)
    assert loaded.file_settings["zero_optimization"]["overlap_comm"] is True  # the rest still comes from the file


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot be read"),
        ("{not json", "not valid JSON"),
        ('{"optimizer": {"type": "Adam"}}', "ptft builds AdamW"),
    ],
)
def test_a_bad_config_file_is_refused_with_the_reason(tmp_path: Path, content: str | None, message: str) -> None:
    from pydantic import ValidationError

    from components.schemas import DeepSpeedConfig

    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError, match=message):
        DeepSpeedConfig(config_file=str(path))


@pytest.mark.parametrize("breakage", ["auto micro batch", "bad offload device", "misspelled zero key", "both 16s"])
def test_deepspeed_parser_rejects_a_broken_preset(breakage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.training import deepspeed_config

    preset = deepspeed_config(_loaded("zero3-offload-bf16.json"), micro_batch_size=16)
    _deepspeed_parse(preset, monkeypatch)  # the unbroken one parses
    if breakage == "auto micro batch":
        preset["train_micro_batch_size_per_gpu"] = "auto"
    elif breakage == "bad offload device":
        preset["zero_optimization"]["offload_param"]["device"] = "gpu"
    elif breakage == "misspelled zero key":
        preset["zero_optimization"]["stage3_gather_16bit_weights_on_save"] = True
    else:
        preset["fp16"] = {"enabled": True}
    with pytest.raises(Exception):  # noqa: B017 - DeepSpeed raises pydantic, Type and Assertion errors
        _deepspeed_parse(preset, monkeypatch)


# --- local-cluster.sh --------------------------------------------------------------------------

SCRIPT = CLUSTER / "local-cluster.sh"


def test_local_cluster_script_parses_and_a_broken_copy_does_not(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    broken = tmp_path / "broken.sh"
    broken.write_text(SCRIPT.read_text().replace("esac", "", 1))
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


def test_local_cluster_script_usage_and_defaults() -> None:
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "start [WORKERS] [CPUS_PER_NODE] | status | stop" in result.stderr
    text = SCRIPT.read_text()
    assert "DASHBOARD_HOST=${DASHBOARD_HOST:-127.0.0.1}" in text and '--dashboard-host="$DASHBOARD_HOST"' in text
    assert '"$RAY" stop' not in text, "stop must end this script's nodes only, not every Ray process here"
