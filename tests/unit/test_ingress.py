"""The environment a cluster ptft starts gets for Serve's HAProxy ingress (components/ingress.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from components import ingress
from tests.conftest import REPO


def test_a_new_cluster_gets_haproxy_on_ports_of_its_own() -> None:
    env = ingress.cluster_env({})
    assert env[ingress.ENABLE] == "1" and float(env[ingress.DRAIN]) < 30  # Ray's default holds a rollout 30 s
    assert env[ingress.USER_LOOP] == "0"  # request code on the replica's main event loop
    assert float(env[ingress.READY]) * 3 >= 60  # an ingress has the minute `serve.start` waits, not 15 s
    ports = [int(env[name]) for name in ingress.PORTS]
    assert len(set(ports)) == len(ports) and all(1024 < port < 65536 for port in ports)
    assert not set(ports) & {8404, 9101, 8500, 9500}  # Ray's fixed defaults: two clusters would collide


def test_what_the_environment_sets_wins() -> None:
    assert ingress.cluster_env({ingress.ENABLE: "0"}) == {ingress.USER_LOOP: "0", ingress.READY: ingress.READY_S}
    env = ingress.cluster_env({"RAY_SERVE_HAPROXY_STATS_PORT": "18404"})
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env and env[ingress.ENABLE] == "1"
    expected = {*ingress.PORTS, ingress.DRAIN, ingress.USER_LOOP, ingress.READY}
    assert ingress.cluster_env({ingress.ENABLE: "1"}).keys() == expected
    assert ingress.USER_LOOP not in ingress.cluster_env({ingress.USER_LOOP: "1"})  # Ray's thread, if asked for


def test_the_ingress_is_named_from_the_environment_a_cluster_starts_with() -> None:
    assert ingress.name(ingress.cluster_env({})) == "haproxy"
    assert ingress.name({ingress.ENABLE: "0"}) == "proxy" and ingress.name({}) == "proxy"  # Ray's default


def test_haproxy_s_files_go_to_the_folder_a_cluster_is_given(tmp_path) -> None:
    files = "/tmp/ptft-hap-abcdefgh"  # as `local_cluster_env` and the suite's clusters make them
    env = ingress.cluster_env({}, files)
    assert {env[name] for name in ingress.FILES} == {
        f"{files}/{name}" for name in ("haproxy.cfg", "admin.sock", "metrics.sock", "server-state", "")
    }
    assert "RAY_SERVE_HAPROXY_SOCKET_PATH" not in ingress.cluster_env({})  # Ray's default, for clusters by hand
    with pytest.raises(ValueError, match="too long a folder"):
        ingress.cluster_env({}, str(tmp_path / ("x" * 40)))  # the sockets would not bind


def test_a_local_cluster_s_folder_is_short_enough_and_removed_at_exit() -> None:
    code = (
        "import os; from components import ingress; env = ingress.local_cluster_env({}); "
        "folder = os.path.dirname(env['RAY_SERVE_HAPROXY_SOCKET_PATH']); "
        "print(folder, os.path.isdir(folder), ingress.longest_socket_path(folder) <= ingress.SOCKET_PATH_MAX)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    folder, existed, fits = done.stdout.split()
    assert done.returncode == 0 and existed == "True" and fits == "True", done.stderr
    assert not os.path.exists(folder)


def test_a_command_that_ends_at_once_beside_running_stages_removes_its_folder() -> None:
    # `cli.exit_with_main` ends with `os._exit` while stages still run in threads: no exit handlers.
    code = (
        "import os; from components import ingress; from pipelines import cli; "
        "env = ingress.local_cluster_env({}); "
        "print(os.path.dirname(env['RAY_SERVE_HAPROXY_SOCKET_PATH']), flush=True); "
        "cli.main = lambda: 3; cli.nodes_in_threads = lambda: ['pretrain']; cli.exit_with_main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 3, done.stderr
    assert not os.path.exists(done.stdout.strip())


def test_serve_s_python_proxy_gets_no_haproxy_folder(monkeypatch) -> None:
    made = []
    monkeypatch.setattr(ingress, "new_files_folder", lambda: made.append("folder") or "/tmp/ptft-hap-x")
    env = ingress.local_cluster_env({ingress.ENABLE: "0"})
    assert not any(name in env for name in ingress.FILES) and made == []
