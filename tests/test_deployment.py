"""`prefect deployment run build-dataset/default` against a real local `prefect server start`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from qtsplus.config import BuildConfig
from qtsplus.shards import load_manifest
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_deployment_run_against_local_server(prefect_env: dict[str, str], tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env | {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api}
    server = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env, tmp_path / "server.log")
    serve = None
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{api}/health", timeout=2).read() == b"true":
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        out = tmp_path / "ds"
        serve = _start([sys.executable, "-m", "infra.serve", "--out", str(out)], env, tmp_path / "serve.log")
        run = None
        deadline = time.time() + 120
        while time.time() < deadline:  # the deployment exists once serve has registered it
            run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "build-dataset/default",
                                  "--watch", "--watch-timeout", "600"], env=env, cwd=REPO, capture_output=True,
                                 text=True, timeout=700)
            if "not found" not in (run.stdout + run.stderr).lower():
                break
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        assert run is not None and run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
        assert load_manifest(out, "vqa").read > 0
        assert (out / "README.md").is_file()
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)


def test_prefect_yaml_default_matches_the_smoke_preset() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["name"] == "default")
    assert deployment["entrypoint"] == "flows/build_dataset.py:build_dataset"
    declared = BuildConfig.model_validate(deployment["parameters"]["config"])
    smoke = BuildConfig.preset("smoke", out="runs/default", input="examples/captions.jsonl",
                               video_root="examples/videos")
    assert declared == smoke
