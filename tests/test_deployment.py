"""Operating qtsplus: deployments against a real local `prefect server start`, prefect.yaml, compose, PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qtsplus.registry import Registry
from qtsplus.shards import load_manifest
from tests.conftest import REPO, free_port, start_prefect_server, start_process, stop_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory: pytest.TempPathFactory):
    """`qtsplus serve` on a fresh root against the shared server: (root, api, env, serve log)."""
    api, env = prefect_server
    root = tmp_path_factory.mktemp("served") / "runs"
    log = root.parent / "serve.log"
    serve = start_process([sys.executable, "-m", "qtsplus.cli", "serve", "--root", str(root), "--gpus", "1"],
                          env | {"PREFECT_LOGGING_LEVEL": "INFO"}, log)  # INFO: the runs' logs reach the server
    try:
        yield root, api, env, log
    finally:
        stop_process(serve)


def run_deployment(name: str, served) -> subprocess.CompletedProcess:
    """`prefect deployment run NAME --watch`, retried until serve has registered the deployment."""
    _, _, env, log = served
    deadline = time.time() + 180
    while True:
        run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", name, "--watch",
                              "--watch-timeout", "600"], env=env, cwd=REPO, capture_output=True, text=True, timeout=700)
        if "not found" not in (run.stdout + run.stderr).lower() or time.time() > deadline:
            return run
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        time.sleep(2)


def deployment_runs(client, name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    deployment = client.read_deployment_by_name(name)
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(
        any_=[deployment.id])), limit=10, sort=FlowRunSort.START_TIME_DESC)


def artifacts_of(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
        any_=[flow_run_id])), limit=50)


def logs_of(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
        any_=[flow_run_id])), limit=200)]


@contextmanager
def sync_client(api: str) -> Iterator:
    """A client of this test process for the server at `api` (settings may be loaded already)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def test_served_deployments_run_and_report_back_through_the_client(served) -> None:
    root, api, _, _ = served
    run = run_deployment("build-dataset/default", served)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert load_manifest(root / "default", "vqa").read > 0

    with sync_client(api) as client:
        for name in ("build-dataset/default", "train-selector/default", "evaluate/default"):
            assert client.read_deployment_by_name(name).name == "default"
        retrain = client.read_deployment_by_name("retrain/default")
        assert retrain.global_concurrency_limit.limit == 1  # overlapping retrain runs wait their turn
        assert retrain.concurrency_options.collision_strategy == "ENQUEUE"
        runs = deployment_runs(client, "build-dataset/default")
        assert len(runs) == 1 and runs[0].state.is_completed()
        artifacts = artifacts_of(client, runs[0].id)
        keys = {a.key for a in artifacts}
        assert {"build-dataset-counts", "build-dataset-sample-questions", "build-dataset-card"} <= keys
        counts = next(a for a in artifacts if a.key == "build-dataset-counts")
        assert "vscq2" in str(counts.data) and "kept" in str(counts.data)
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
        # each model stage (VSCQ1, VSCQ2, QTS-VQA) says in the run's logs that it holds the one GPU slot
        logs = logs_of(client, runs[0].id)
        assert sum(m.startswith("holding 1 of 1 `gpu` slot(s)") for m in logs) == 3, logs
        assert not any("do not exist" in m for m in logs)


def test_retrain_on_a_fresh_setup_ends_with_no_new_captions(served) -> None:
    root, api, _, _ = served
    run = run_deployment("retrain/default", served)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (root / "inbox").is_dir()  # created by serving
    with sync_client(api) as client:
        runs = deployment_runs(client, "retrain/default")
        assert len(runs) == 1 and runs[0].state.is_completed(), runs[0].state
        decision = next(a for a in artifacts_of(client, runs[0].id) if a.key == "retrain-decision")
        assert decision.data.startswith("# no new captions"), decision.data
        assert str(root / "inbox") in decision.data
    assert Registry(root / "registry").list() == []  # nothing trained, nothing recorded


def test_prefect_yaml_is_generated_from_the_served_deployments() -> None:
    from flows.deployments import render_prefect_yaml

    assert (REPO / "prefect.yaml").read_text() == render_prefect_yaml(), "run: qtsplus serve --print-prefect-yaml > prefect.yaml"


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_compose() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_file_validates(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"POSTGRES_PASSWORD": "test-only", "QTSPLUS_DATA": str(tmp_path)}
    out = subprocess.run([*_compose(), "-f", str(REPO / "infra" / "docker" / "compose.yaml"), "config"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "postgresql+asyncpg://" in out.stdout and "127.0.0.1" in out.stdout
    assert "PREFECT_UI_API_URL: http://127.0.0.1:4200/api" in out.stdout  # the UI calls the API it is served with


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
    port = free_port()
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
        server, api = start_prefect_server(env, tmp_path)
        flows = urllib.request.urlopen(urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST",
                                                              headers={"Content-Type": "application/json"}))
        assert flows.status == 200
        tables = subprocess.run([str(pg / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-tAc",
                                 "select count(*) from information_schema.tables where table_name = 'flow_run'",
                                 "prefect"], capture_output=True, text=True, check=True).stdout.strip()
        assert tables == "1"  # the server migrated its schema into PostgreSQL
    finally:
        if server is not None:
            stop_process(server)
        stop_process(postgres)
        shutil.rmtree(scratch, ignore_errors=True)
