"""Stage workers: spawned only when used, one process per stage, gone with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qtsplus.workers import run_in_stage_worker, stage_worker
from tasks.common import is_transient


def test_worker_is_lazy_and_reused() -> None:
    with stage_worker("s") as worker:
        assert worker.spawned == 0
        pids = {worker.run(os.getpid) for _ in range(3)}
        assert worker.spawned == 1 and len(pids) == 1 and os.getpid() not in pids
    assert run_in_stage_worker("t", os.getpid) != os.getpid()


def test_worker_dies_with_its_parent(tmp_path) -> None:
    script = textwrap.dedent("""
        import os, time
        from qtsplus.workers import stage_worker
        with stage_worker("x") as w:
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


class _State:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


def test_only_transient_errors_are_retried() -> None:
    assert is_transient(None, None, _State(OSError("disk hiccup")))
    assert is_transient(None, None, _State(TimeoutError()))
    assert not is_transient(None, None, _State(ValueError("bad config")))
