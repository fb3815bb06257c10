"""Stage workers under another interpreter (the engine environment): isolated, lazy, reused, gone with their parent.

The other environment here is a bare venv (no pip, no packages): the worker imports qtsplus from this checkout's
source tree and nothing from this environment's site-packages.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
import venv
from concurrent.futures.process import BrokenProcessPool

import pytest

from qtsplus.workers import check_pickle_compat, stage_worker
from tasks.common import is_transient


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    return str(root / "bin" / "python")


def test_worker_runs_in_the_other_environment(bare_python) -> None:
    with stage_worker("engine", python=bare_python) as worker:
        assert worker.spawned == 0
        pids = {worker.run(os.getpid) for _ in range(3)}
        assert worker.spawned == 1 and len(pids) == 1 and os.getpid() not in pids
        purelib = worker.run(sysconfig.get_path, "purelib")
        assert purelib != sysconfig.get_path("purelib") and purelib.startswith(os.path.dirname(os.path.dirname(bare_python)))
        assert importlib.util.find_spec("prefect") is not None  # here: the orchestrator environment
        assert worker.run(importlib.util.find_spec, "prefect") is None  # there: not installed, not leaked in
        with pytest.raises(ModuleNotFoundError, match="pydantic"):
            worker.run(importlib.import_module, "pydantic")


def test_errors_come_back_and_a_dead_worker_is_replaced(bare_python) -> None:
    with stage_worker("engine", python=bare_python) as worker:
        with pytest.raises(ValueError, match="invalid literal") as info:
            worker.run(int, "not a number")
        assert "Traceback" in str(info.value.__cause__)  # the worker's own traceback is attached
        pid = worker.run(os.getpid)
        with pytest.raises(BrokenProcessPool, match="exit code -9") as info:
            worker.run(os.kill, pid, signal.SIGKILL)
        assert is_transient(None, None, _State(info.value))  # Prefect retries it
        assert worker.run(os.getpid) != pid and worker.spawned == 2


def test_a_missing_interpreter_is_a_clear_error(tmp_path) -> None:
    with stage_worker("engine", python=str(tmp_path / "nope" / "python")) as worker:
        with pytest.raises(RuntimeError, match="cannot start interpreter"):
            worker.run(os.getpid)


def test_worker_under_another_interpreter_dies_with_its_parent(bare_python, tmp_path) -> None:
    script = textwrap.dedent(f"""
        import os, time
        from qtsplus.workers import stage_worker
        with stage_worker("x", python={bare_python!r}) as w:
            print(w.run(os.getpid), flush=True)
            time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("worker outlived its parent")


def test_incompatible_pickle_environments_are_refused() -> None:
    ours = {"python": "3.11.7", "pydantic": "2.13.4", "numpy": "2.2.6"}
    check_pickle_compat(ours, {**ours, "pydantic": "2.12.5"}, "py")  # same major: compatible
    check_pickle_compat(ours, {**ours, "numpy": None}, "py")  # absent there: nothing of it crosses
    with pytest.raises(RuntimeError, match="pydantic 2.13.4 here, 1.10.0 there"):
        check_pickle_compat(ours, {**ours, "pydantic": "1.10.0"}, "py")
    with pytest.raises(RuntimeError, match="numpy"):
        check_pickle_compat(ours, {**ours, "numpy": "1.26.4"}, "py")


class _State:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc
