"""Operating qtsplus: deployments against a real local `prefect server start`, prefect.yaml, compose, PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

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


def _wait_healthy(api: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"{api}/health", timeout=2).read() == b"true":
                return
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _server(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    proc = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  env, log)
    _wait_healthy(api, proc, log)
    return proc, api


async def _artifacts_of(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        TaskRunFilter,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:  # (every field given: this server rejects the client's nulls)
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC, limit=50)


def test_served_deployments_run_and_report_back_through_the_client(prefect_env, tmp_path: Path) -> None:
    env = prefect_env | {"PREFECT_HOME": str(tmp_path / "home")}
    server, api = _server(env, tmp_path)
    env["PREFECT_API_URL"] = api
    serve = None
    try:
        root = tmp_path / "runs"
        serve = _start([sys.executable, "-m", "qtsplus.cli", "serve", "--root", str(root), "--gpus", "1"], env,
                       tmp_path / "serve.log")
        run = None
        deadline = time.time() + 180
        while time.time() < deadline:  # the deployment exists once serve has registered it
            run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "build-dataset/default",
                                  "--watch", "--watch-timeout", "600"], env=env, cwd=REPO, capture_output=True,
                                 text=True, timeout=700)
            if "not found" not in (run.stdout + run.stderr).lower():
                break
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        assert run is not None and run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert load_manifest(root / "default", "vqa").read > 0

        from prefect.settings import PREFECT_API_URL, temporary_settings

        # the client of this test process talks to the same server (settings may be loaded already)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import (
                FlowRunFilter,
                FlowRunFilterDeploymentId,
            )
            from prefect.client.schemas.sorting import FlowRunSort

            with get_client(sync_client=True) as client:
                for name in ("build-dataset/default", "train-selector/default", "evaluate/default"):
                    assert client.read_deployment_by_name(name).name == "default"
                deployment = client.read_deployment_by_name("build-dataset/default")
                retrain = client.read_deployment_by_name("retrain/default")
                assert retrain.global_concurrency_limit.limit == 1  # overlapping retrain runs wait their turn
                assert retrain.concurrency_options.collision_strategy == "ENQUEUE"
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])), limit=10,
                    sort=FlowRunSort.START_TIME_DESC)
                assert len(runs) == 1 and runs[0].state.is_completed()
                artifacts = asyncio.run(_artifacts_of(runs[0].id))
                keys = {a.key for a in artifacts}
                assert {"build-dataset-counts", "build-dataset-sample-questions", "build-dataset-card"} <= keys
                counts = next(a for a in artifacts if a.key == "build-dataset-counts")
                assert "vscq2" in str(counts.data) and "kept" in str(counts.data)
                assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)


def test_prefect_yaml_is_generated_from_the_served_deployments() -> None:
    from flows.deployments import render_prefect_yaml

    assert (REPO / "prefect.yaml").read_text() == render_prefect_yaml(), "run: qtsplus serve --print-prefect-yaml > prefect.yaml"


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_compose() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_file_validates(tmp_path: Path) -> None:
    env = {**os.environ, "POSTGRES_PASSWORD": "test-only", "QTSPLUS_DATA": str(tmp_path)}
    out = subprocess.run([*_compose(), "-f", str(REPO / "infra" / "docker" / "compose.yaml"), "config"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "postgresql+asyncpg://" in out.stdout and "127.0.0.1" in out.stdout


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.mark.skipif(_pg_bin() is None, reason="PostgreSQL server binaries are not installed")
def test_prefect_server_on_postgresql(prefect_env, tmp_path: Path) -> None:
    pg = _pg_bin()
    user = {} if os.geteuid() != 0 else {"user": "nobody"}  # postgres refuses to run as root
    scratch = Path(tempfile.mkdtemp(prefix="qtsplus-pg-"))  # outside pytest's root-only tmp tree
    scratch.chmod(0o777)
    data = scratch / "data"
    run = (lambda cmd: subprocess.run(["runuser", "-u", "nobody", "--", *cmd], check=True, capture_output=True)) \
        if user else (lambda cmd: subprocess.run(cmd, check=True, capture_output=True))
    run([str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "prefect"])
    port = _free_port()
    postgres = subprocess.Popen(
        ["runuser", "-u", "nobody", "--"] * bool(user) + [str(pg / "postgres"), "-D", str(data), "-p", str(port),
                                                          "-k", str(scratch), "-h", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = None
    try:
        for _ in range(100):
            if subprocess.run([str(pg / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"])
        env = prefect_env | {"PREFECT_HOME": str(tmp_path / "home"),
                             "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                                 f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"}
        server, api = _server(env, tmp_path)
        flows = urllib.request.urlopen(urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST",
                                                              headers={"Content-Type": "application/json"}))
        assert flows.status == 200
        tables = subprocess.run([str(pg / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-tAc",
                                 "select count(*) from information_schema.tables where table_name = 'flow_run'",
                                 "prefect"], capture_output=True, text=True, check=True).stdout.strip()
        assert tables == "1"  # the server migrated its schema into PostgreSQL
    finally:
        if server is not None:
            _stop(server)
        _stop(postgres)
        shutil.rmtree(scratch, ignore_errors=True)
