"""Replica pools through the CLI, in real subprocesses with real Prefect and Parquet: two local replicas on tiny
models, two Ray actors on a local Ray cluster, a replica killed with SIGKILL in the middle of a stage, and cached
reruns that start no replica and no actor. Whatever the replicas, the shards are the same bytes.

The Ray and kill tests use the `null` engine (the engine does not matter there) with 2-caption chunks (6 chunks per
stage) and one question per teacher batch (so a teacher chunk is still busy after its model loads); they compare
with one one-replica build of the same settings."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qtsplus.shards import load_manifest
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
MODEL_STAGES = ("vscq1", "vscq2", "vqa")
STAGES = ("captions", *MODEL_STAGES)
NULL = ["--set", "vscq1.engine.backend=null", "--set", "teacher.engine.backend=null", "--set", "ingest.chunk_size=2",
        "--set", "teacher.group_size=1"]


def build_args(out: Path, *sets: str) -> list[str]:
    return ["build-dataset", "--out", str(out), "--preset", "smoke", "--no-progress", *sets]


def report(out: Path) -> dict:
    return json.loads((out / "run-report.json").read_text())


def loads(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def rows_by_file(out: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(out)): pq.read_table(p).to_pylist() for p in sorted(out.glob("*/*.parquet"))}


def shard_shas(out: Path) -> dict[str, str]:
    return {f.path: f.sha256 for stage in STAGES for f in load_manifest(out, stage).files}


def assert_same_dataset(out: Path, reference: Path) -> None:
    """Row for row, and byte for byte (every shard's sha256 and every manifest)."""
    assert rows_by_file(out) == rows_by_file(reference)
    assert shard_shas(out) == shard_shas(reference)
    for stage in STAGES:
        assert (out / stage / "manifest.json").read_bytes() == (reference / stage / "manifest.json").read_bytes()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def pools(out: Path) -> dict[str, dict]:
    return {stage: report(out)["replicas"][stage]["pool"] for stage in MODEL_STAGES}


def computed_by(out: Path, stage: str) -> dict[int, dict]:
    return {int(k): v for k, v in report(out)["replicas"][stage]["computed_by"].items()}


def assert_each_replica_loaded_once(out: Path, log: Path, backend: str) -> None:
    """Two replicas per model stage, both given chunks, each one process that loaded its model exactly once."""
    by_pid = Counter(line["pid"] for line in loads(log))
    assert len(by_pid) == 2 * len(MODEL_STAGES) and set(by_pid.values()) == {1}, by_pid
    replica_pids = set()
    for stage, pool in pools(out).items():
        assert (pool["backend"], pool["size"], pool["started"], pool["replaced"]) == (backend, 2, 2, 0), stage
        assert all(r["chunks"] > 0 for r in pool["replicas"]), pool  # both replicas received chunks
        assert sum(r["chunks"] for r in pool["replicas"]) == len(computed_by(out, stage))
        pids = {int(p) for r in pool["replicas"] for p in r["pids"]}
        assert {int(w["pid"]) for w in computed_by(out, stage).values()} == pids
        replica_pids |= pids
    assert replica_pids == set(by_pid)


@pytest.fixture(scope="module")
def null_reference(prefect_env, tmp_path_factory) -> Path:
    """One build of the NULL settings with one replica (the uninterrupted reference of the Ray and kill tests)."""
    out = tmp_path_factory.mktemp("null-reference") / "ds"
    run_cli(build_args(out, *NULL), prefect_env)
    assert {r["size"] for r in pools(out).values()} == {1}
    return out


# -- (1) two local replicas, tiny models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_local(smoke, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    _, env, _ = smoke
    folder = tmp_path_factory.mktemp("two-local")
    env = env | {"QTSPLUS_ENGINE_LOAD_LOG": str(folder / "loads.log")}
    run_cli(build_args(folder / "ds", "--set", "replicas.count=2"), env)
    return folder / "ds", env, folder / "loads.log"


def test_two_local_replicas_build_what_one_builds_and_load_their_model_once(smoke, two_local) -> None:
    reference, _, _ = smoke
    out, _, log = two_local
    assert_same_dataset(out, reference)
    assert_each_replica_loaded_once(out, log, "local")


def test_cached_rerun_with_another_replica_count_starts_no_replica(two_local) -> None:
    out, env, log = two_local
    before, n = shard_shas(out), len(loads(log))
    run_cli(build_args(out, "--set", "replicas.count=3"), env)  # replica counts are in no cache key
    assert {s for stage in STAGES for s in report(out)["states"][stage].values()} == {"Cached"}
    assert {(p["size"], p["started"]) for p in pools(out).values()} == {(3, 0)}
    assert len(loads(log)) == n and shard_shas(out) == before


# -- (3) a replica killed in the middle of a stage ------------------------------------------------------------------


def test_a_replica_killed_mid_stage_is_replaced_and_the_shards_are_unchanged(null_reference, prefect_env,
                                                                              tmp_path) -> None:
    out, log = tmp_path / "ds", tmp_path / "loads.log"
    proc = subprocess.Popen([sys.executable, "-m", "qtsplus.cli", *build_args(out, *NULL, "--set", "replicas.count=2")],
                            env=prefect_env | {"QTSPLUS_ENGINE_LOAD_LOG": str(log)}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (teacher := [line for line in loads(log) if line["model_id"] == "tiny/qwen2.5-vl"]):
            assert proc.poll() is None, "the run ended before VSCQ2 loaded its model"
            assert time.time() < deadline
            time.sleep(0.01)
        victim = teacher[0]["pid"]  # a VSCQ2 replica, busy with its first chunk (its model loads inside it)
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output

    assert_same_dataset(out, null_reference)  # nothing lost, nothing written twice
    vscq2 = pools(out)["vscq2"]
    assert (vscq2["replaced"], vscq2["started"]) == (1, 3), vscq2  # it died mid-stage and was replaced
    assert str(victim) in {p for r in vscq2["replicas"] for p in r["pids"]}
    assert sorted(computed_by(out, "vscq2")) == list(range(6))  # every chunk, once
    assert victim not in {int(w["pid"]) for w in computed_by(out, "vscq2").values()}
    assert len(loads(log)) == 7  # 2 per model stage + the replacement
    assert set(report(out)["states"]["vscq2"].values()) == {"Completed"}


# -- GPU discipline on a real Prefect server ------------------------------------------------------------------------


def test_replicas_hold_their_gpu_slots_and_never_outnumber_the_limit(prefect_server, tmp_path) -> None:
    """Each replica holds a slot of the server's `gpu` limit while it lives; asking for more replicas than the limit
    has slots runs as many as it has (more would wait forever for slots their siblings keep), and says so."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env = prefect_server
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        try:  # the limit `qtsplus serve --gpus 1` creates (tests/test_deployment.py shares this server)
            slots = client.read_global_concurrency_limit_by_name("gpu").limit
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))
            slots = 1
        out = tmp_path / "ds"
        run_cli(build_args(out, *NULL, "--set", f"replicas.count={slots + 1}"), env | {"PREFECT_LOGGING_LEVEL": "INFO"})
        for pool in pools(out).values():
            assert (pool["size"], pool["started"]) == (slots, slots), pool
        flow_run = next(r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
                        if r.parameters.get("config", {}).get("out") == str(out))
        logs: list[str] = []
        while page := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
                                       limit=200, offset=len(logs)):
            logs += [log.message for log in page]
        assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0  # all given back
    assert sum(m.startswith(f"holding 1 of {slots} `gpu` slot(s)") for m in logs) == 3 * slots, logs
    assert sum(m.startswith("released 1 `gpu` slot(s)") for m in logs) == 3 * slots, logs
    assert sum(f"{slots + 1} replicas asked, {slots} run" in m for m in logs) == 3, logs


# -- (2) two Ray actors on a local Ray cluster ---------------------------------------------------------------------

HOLDER = r"""
import ray, sys
ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="WARNING")
print(ray.get_runtime_context().gcs_address, flush=True)
for _ in sys.stdin:  # each line asks: how many actors has this cluster ever had? (its GCS table; the public state
    import ray._private.state  # API needs the dashboard, which this test cluster does without)
    print(len(ray._private.state.actors()), flush=True)
ray.shutdown()
"""


class RayCluster:
    """A Ray cluster on this machine, started by a driver process the test owns (stdin closed: it shuts down)."""

    def __init__(self, folder: str):
        token = secrets.token_hex(32)  # the cluster's auth token, shared with the CLI through the environment
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        self._proc = subprocess.Popen([sys.executable, "-c", HOLDER, folder], env=os.environ | self.env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.address = self._proc.stdout.readline().strip()
        if not self.address:
            self.stop()
            raise AssertionError("the Ray cluster did not start")

    def actors_ever(self) -> int:
        self._proc.stdin.write("?\n")
        self._proc.stdin.flush()
        return int(self._proc.stdout.readline())

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="Ray is not installed (the `ray` extra: pip install -e '.[ray]')")
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cluster = RayCluster(folder)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_actors(ray_cluster, prefect_env, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    folder = tmp_path_factory.mktemp("two-actors")
    env = prefect_env | ray_cluster.env | {"QTSPLUS_ENGINE_LOAD_LOG": str(folder / "loads.log")}
    sets = [*NULL, "--set", "replicas.count=2", "--set", f"replicas.ray_address={ray_cluster.address}"]
    run_cli(build_args(folder / "ds", *sets), env)
    return folder / "ds", env, folder / "loads.log"


def test_ray_actor_replicas_build_what_one_replica_builds(null_reference, two_actors, ray_cluster) -> None:
    out, _, log = two_actors
    assert_same_dataset(out, null_reference)
    assert_each_replica_loaded_once(out, log, "ray")  # the load log reached the actors (QTSPLUS_* forwarded)
    for stage in MODEL_STAGES:
        assert all(w["node_ip"] for w in computed_by(out, stage).values())  # computed in Ray actors
    assert ray_cluster.actors_ever() == 2 * len(MODEL_STAGES)


def test_ray_cached_rerun_starts_no_actor(two_actors, ray_cluster) -> None:
    out, env, log = two_actors
    actors, n = ray_cluster.actors_ever(), len(loads(log))
    sets = [*NULL, "--set", "replicas.count=2", "--set", f"replicas.ray_address={ray_cluster.address}"]
    run_cli(build_args(out, *sets), env)
    assert {s for stage in STAGES for s in report(out)["states"][stage].values()} == {"Cached"}
    assert {p["started"] for p in pools(out).values()} == {0}
    assert ray_cluster.actors_ever() == actors and len(loads(log)) == n
