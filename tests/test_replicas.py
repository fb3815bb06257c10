"""Replica pools with real worker processes (no Prefect): lazy, spread over free replicas, pinned to their devices,
replaced when killed, holding their slots exactly while they live, under another interpreter too."""

from __future__ import annotations

import os
import signal
import sysconfig
import threading
import time
import venv
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

import pytest

from qtsplus.engines import EngineConfig
from qtsplus.replica_pool import LocalReplica, ReplicaPool, engine_needs, replica_pool
from qtsplus.replicas import ReplicaConfig, StageNeeds, plan_devices, visible_gpus
from qtsplus.workers import run_on_replica
from tasks.common import is_transient


def where_am_i(pause: float = 0.0) -> tuple[int, str | None]:
    time.sleep(pause)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def env_var(name: str) -> str | None:
    return os.environ.get(name)


class Slots:
    """A concurrency limit stand-in that records who holds how many slots (and from which thread)."""

    def __init__(self) -> None:
        self.held = 0
        self.events: list[tuple[str, int, str]] = []
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, occupy: int):
        with self._lock:
            self.held += occupy
            self.events.append(("acquire", occupy, threading.current_thread().name))
        try:
            yield
        finally:
            with self._lock:
                self.held -= occupy
                self.events.append(("release", occupy, threading.current_thread().name))


def test_pool_is_lazy_spreads_calls_over_free_replicas_and_pins_devices() -> None:
    slots = Slots()
    pool = ReplicaPool("s", [LocalReplica("s-0", devices=["3"]), LocalReplica("s-1", devices=["5", "6"])],
                       hold=slots, occupy=2)
    try:
        assert pool.spawned == 0 and slots.held == 0  # nothing starts before a call needs it
        with ThreadPoolExecutor(2) as ex:  # two calls at once: one on each replica
            results = list(ex.map(lambda _: pool.call(where_am_i, 1.0), range(2)))
        by_replica = {where["replica"]: (pid, devices, where) for (pid, devices), where in results}
        assert set(by_replica) == {"s-0", "s-1"}
        assert by_replica["s-0"][1] == "3" and by_replica["s-1"][1] == "5,6"
        assert by_replica["s-1"][2]["devices"] == "5,6" and by_replica["s-1"][2]["pid"] == str(by_replica["s-1"][0])
        assert os.getpid() not in {pid for pid, _, _ in by_replica.values()}
        assert pool.spawned == 2 and slots.held == 4  # each live replica holds its 2 slots
        pids = {pool.run(where_am_i)[0] for _ in range(6)}  # later calls reuse the two processes
        assert pids == {pid for pid, _, _ in by_replica.values()} and pool.spawned == 2
        stats = pool.stats()
        assert sum(r["chunks"] for r in stats["replicas"]) == 8 and stats["started"] == 2 and stats["replaced"] == 0
    finally:
        pool.close()
    assert slots.held == 0
    # slots are entered and left in one thread per replica (never in the callers' threads)
    threads = {name for _, _, name in slots.events}
    assert threads == {"slots-s-0", "slots-s-1"}


def test_a_killed_replica_is_replaced_and_its_slots_given_back() -> None:
    slots = Slots()
    pool = ReplicaPool("k", [LocalReplica("k-0")], hold=slots)
    try:
        pid, _ = pool.run(where_am_i)
        with pytest.raises(BrokenProcessPool) as info:
            pool.run(os.kill, pid, signal.SIGKILL)  # dies in the middle of a call
        assert is_transient(None, None, _State(info.value))  # so Prefect retries the chunk
        assert slots.held == 0 and pool.replaced == 1
        new_pid, _ = pool.run(where_am_i)
        assert new_pid != pid and pool.started == 2 and slots.held == 1
        os.kill(new_pid, signal.SIGKILL)  # dies while idle: the next call fails, the one after gets a fresh one
        time.sleep(0.5)
        with pytest.raises(BrokenProcessPool):
            pool.run(where_am_i)
        assert pool.run(where_am_i)[0] not in (pid, new_pid) and pool.stats()["replicas"][0]["pids"][:2] == [
            str(pid), str(new_pid)]
    finally:
        pool.close()
    assert slots.held == 0


def test_replica_pool_scope_reaches_tasks_by_stage_name_and_closes_processes() -> None:
    with replica_pool("scoped", ReplicaConfig(count=2), StageNeeds(gpu=False)) as pool:
        assert pool.size == 2 and pool.backend == "local"
        (pid, devices), where = run_on_replica("scoped", where_am_i)
        assert where["replica"] == "scoped-0" and devices == os.environ.get("CUDA_VISIBLE_DEVICES")  # not pinned
        # CPU replicas share the cores instead of each starting a thread per core
        share = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // 2))
        assert run_on_replica("scoped", env_var, "OMP_NUM_THREADS")[0] == share
    with pytest.raises(ProcessLookupError):  # closed with the scope
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
    (other, _), where = run_on_replica("scoped", where_am_i)  # no open scope: a temporary worker
    assert where["replica"] == "scoped-0" and other != pid


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    return str(root / "bin" / "python")


def test_every_replica_runs_under_the_engine_interpreter(bare_python) -> None:
    pool = ReplicaPool("e", [LocalReplica(f"e-{i}", python=bare_python, devices=[str(i)]) for i in range(2)])
    try:
        with ThreadPoolExecutor(2) as ex:
            got = list(ex.map(lambda _: pool.call(sysconfig.get_path, "purelib"), range(2)))
        assert {where["replica"] for _, where in got} == {"e-0", "e-1"}
        assert {where["devices"] for _, where in got} == {"0", "1"}
        for purelib, _ in got:
            assert purelib != sysconfig.get_path("purelib")
            assert purelib.startswith(os.path.dirname(os.path.dirname(bare_python)))
    finally:
        pool.close()


def test_plan_devices() -> None:
    gpus = ["0", "1", "2", "3"]
    cpu, gpu, tp2 = StageNeeds(gpu=False), StageNeeds(), StageNeeds(tensor_parallel=2)
    assert plan_devices("s", ReplicaConfig(), cpu, gpus) == [None]  # a stage that uses no GPU: one replica
    assert plan_devices("s", ReplicaConfig(), gpu, []) == [None]  # a CPU machine: one replica
    assert plan_devices("s", ReplicaConfig(count=3), gpu, []) == [None, None, None]
    assert plan_devices("s", ReplicaConfig(), gpu, gpus) == [["0"], ["1"], ["2"], ["3"]]
    assert plan_devices("s", ReplicaConfig(), tp2, gpus) == [["0", "1"], ["2", "3"]]
    assert plan_devices("s", ReplicaConfig(), StageNeeds(tensor_parallel=8), gpus) == [None]  # vLLM decides
    assert plan_devices("s", ReplicaConfig(per_stage={"s": 1}), tp2, gpus) == [["0", "1"]]
    assert plan_devices("t", ReplicaConfig(per_stage={"s": 1}), tp2, gpus) == [["0", "1"], ["2", "3"]]
    assert plan_devices("s", ReplicaConfig(), gpu, gpus, max_slots=3) == [["0"], ["1"], ["2"]]  # the `gpu` limit
    with pytest.raises(ValueError, match="need 6 GPUs, but 4 are visible"):
        plan_devices("s", ReplicaConfig(count=3), tp2, gpus)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,3")
    assert visible_gpus() == ["1"]


def test_engine_needs() -> None:
    assert engine_needs(EngineConfig(model_id="m", backend="vllm", tensor_parallel_size=4)).tensor_parallel == 4
    assert engine_needs(EngineConfig(model_id="m", tensor_parallel_size=4)).tensor_parallel == 1  # transformers
    assert not engine_needs(EngineConfig(model_id="m", backend="null")).gpu
    assert not engine_needs(EngineConfig(model_id="m", device="cpu")).gpu
    assert engine_needs(EngineConfig(model_id="m", python="/opt/engine/bin/python")).python == "/opt/engine/bin/python"


class _State:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc
