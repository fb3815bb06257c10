"""Worker processes of model stages: a model is loaded once, in its own process, and only if some chunk needs it.

The flow opens a stage's replica pool (`qtsplus.replica_pool.replica_pool`, or `stage_worker(name)` for a pool of one
local process) around a stage. Tasks of that stage call `run_in_stage_worker(name, fn, ...)` (or `run_on_replica`,
which also says where it ran): the call goes to a free replica, whose process is started on first use (it then loads
the model lazily, through `qtsplus.engines.get_engine`, and keeps it for every later chunk); a stage whose tasks are
all cached never starts one, so never loads a model. Leaving the scope shuts the processes down, which is the only
reliable way to give GPU memory back.

`WorkerProcess` is one such process. It dies with its parent (PR_SET_PDEATHSIG on Linux), so a killed run leaves no
orphan writing shards; `env` sets variables in it before anything runs there (a replica's CUDA_VISIBLE_DEVICES).

`WorkerProcess(name, python=PATH)` (and `stage_worker(name, python=PATH)`) runs under another interpreter, e.g. the
engine environment's (vLLM without Prefect, docs/vllm.md): a plain subprocess (`PATH -m qtsplus.workers FD`) that
talks pickles over an inherited socket (multiprocessing.connection). It gets this checkout's source tree on
PYTHONPATH, not this environment's site-packages, so it runs the same library code with its own dependencies.
Functions and their arguments/results cross by pickle: they must be importable by module name there (the stage
functions in qtsplus.stages are), and the two environments must agree on pydantic and numpy (checked when the worker
starts). This module imports only the standard library: it is also the worker's entry point in that environment.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _start_worker(env: dict[str, str]) -> None:
    """Initializer of a spawned worker: die with the parent, then set the replica's variables (before any import
    that reads them, e.g. CUDA_VISIBLE_DEVICES before torch initialises CUDA)."""
    _die_with_parent()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env and "torch" in sys.modules:  # imported before the initializer ran: tell it too
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))


class _Launcher:
    """The thread that starts every worker process of this process, and lives as long as it does.

    PR_SET_PDEATHSIG fires when the *thread* that started a child ends, not its process: a worker started from a task
    thread (or a short-lived pool thread) would be killed when that thread exits. Starting every worker here ties
    each one's life to the process instead."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` run in the launcher thread (keep it short: starting a process, not waiting for it)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="qtsplus-worker-launcher", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return fn()
        done: Future = Future()
        self._calls.put((fn, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            fn, done = self._calls.get()
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                done.set_exception(e)


_LAUNCHER = _Launcher()


def _ready() -> None:
    """A first call that makes a spawned worker start (and shows that it did)."""


class WorkerProcess:
    """One lazily started worker process that runs calls one at a time.

    ``python``: the interpreter of the worker process (another environment's); None: this process's own.
    ``env``: variables set in the worker process (on top of this process's environment)."""

    def __init__(self, name: str, python: str | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.python = python
        self.env = dict(env or {})
        self._executor: ProcessPoolExecutor | InterpreterProcess | None = None
        self._lock = threading.Lock()
        self.spawned = 0

    @property
    def alive(self) -> bool:
        """Started and not known to be dead."""
        return self._executor is not None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started: Future | None = None
        with self._lock:
            if self._executor is None:
                if self.python is None:
                    self._executor = ProcessPoolExecutor(
                        max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                        initargs=(self.env,),
                    )
                    started = _LAUNCHER.call(partial(self._executor.submit, _ready))  # the process starts in there
                else:
                    self._executor = InterpreterProcess(self.python, self.name, self.env)
                self.spawned += 1
            executor = self._executor
        try:
            if started is not None:
                started.result()
            return executor.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool:
            # the process died (OOM, a CUDA fault, kill -9): drop it so a retry starts a fresh one
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


# The open pool of each stage (qtsplus.replica_pool.ReplicaPool), by stage name.
_ACTIVE: dict[str, Any] = {}


@contextmanager
def stage_scope(name: str, pool: Any) -> Iterator[Any]:
    """Make `pool` the stage's pool while the block runs (tasks find it by name); close it afterwards."""
    if name in _ACTIVE:
        raise RuntimeError(f"stage worker {name!r} is already open")
    _ACTIVE[name] = pool
    try:
        yield pool
    finally:
        del _ACTIVE[name]
        pool.close()


@contextmanager
def stage_worker(name: str, python: str | None = None) -> Iterator[Any]:
    """Scope of a stage's single local worker process (a replica pool of one); ``python``: run it under that
    interpreter (None: this one). Many replicas, or Ray actors: `qtsplus.replica_pool.replica_pool`."""
    from qtsplus.replica_pool import LocalReplica, ReplicaPool

    with stage_scope(name, ReplicaPool(name, [LocalReplica(f"{name}-0", python)], backend="local")) as pool:
        yield pool


def run_on_replica(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, dict[str, str]]:
    """Run `fn` on a free replica of the stage's pool: (its result, where it ran: replica id, host, pid, devices).
    Without an open pool, run it in a temporary worker process."""
    pool = _ACTIVE.get(name)
    if pool is not None:
        return pool.call(fn, *args, **kwargs)
    with stage_worker(name) as temporary:
        return temporary.call(fn, *args, **kwargs)


def run_in_stage_worker(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on a free replica of the stage's pool (or in a temporary worker process when none is open)."""
    return run_on_replica(name, fn, *args, **kwargs)[0]


def describe_process() -> dict[str, str]:
    """Where this process runs: host, pid, and the GPUs it may use (CUDA_VISIBLE_DEVICES; empty: not pinned)."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()),
            "devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


# -- a worker under another interpreter ----------------------------------------------------------------------------

# Packages whose objects cross the process boundary inside pickles (pydantic records and configs, numpy arrays):
# (distribution, how many leading version parts must agree).
PICKLE_COMPAT = (("pydantic", 1), ("numpy", 1))


class _Future:
    """What ``WorkerProcess.run`` expects of an executor's submit(): a ``result()``."""

    def __init__(self, value: Any):
        self._value = value

    def result(self) -> Any:
        return self._value


class InterpreterProcess:
    """A worker process started as ``python -m qtsplus.workers FD``, running submitted calls one at a time.

    The call and its result travel as pickles over a socket pair (multiprocessing.connection). Exceptions raised by
    the function are re-raised here with the remote traceback attached; a worker that died (killed, out of memory)
    raises BrokenProcessPool, like ProcessPoolExecutor, so callers retry it the same way.
    """

    def __init__(self, python: str, name: str = "worker", env: dict[str, str] | None = None):
        self.python = python
        self.name = name
        self._lock = threading.Lock()
        ours, theirs = multiprocessing.Pipe(duplex=True)
        env = dict(os.environ) | dict(env or {})
        root = _source_root()
        if root is not None:  # a checkout (editable install): the worker imports this same code
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self._proc = _LAUNCHER.call(partial(
                subprocess.Popen,
                [python, "-m", "qtsplus.workers", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            ))
        except OSError as e:
            raise RuntimeError(f"stage worker {name!r}: cannot start interpreter {python!r}: {e}") from e
        finally:
            theirs.close()
        self._conn: Connection | None = ours
        try:
            kind, versions = self._receive()
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"stage worker {name!r}: {python} -m qtsplus.workers did not start (is qtsplus and its dependencies "
                f"installed in that environment? see its output above)"
            ) from e
        assert kind == "hello", kind
        self.versions = versions
        try:
            check_pickle_compat(_versions(), versions, python)
        except RuntimeError:
            self.shutdown()
            raise

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> _Future:
        with self._lock:
            if self._conn is None:
                raise BrokenProcessPool(f"stage worker {self.name!r} is shut down")
            self._conn.send_bytes(pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
            kind, payload = self._receive()
        if kind == "ok":
            return _Future(payload)
        exc, remote_tb = payload
        exc.__cause__ = _RemoteTraceback(remote_tb)
        raise exc

    def _receive(self) -> tuple[str, Any]:
        assert self._conn is not None
        try:
            data = self._conn.recv_bytes()
        except (EOFError, OSError) as e:
            code = self._proc.wait()
            self._conn.close()
            self._conn = None
            raise BrokenProcessPool(
                f"stage worker {self.name!r} ({self.python}) died with exit code {code}"
            ) from e
        kind, payload = pickle.loads(data)
        if kind == "error":
            exc_bytes, remote_tb = payload
            try:
                exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
            except Exception as e:  # noqa: BLE001 - e.g. the exception's class does not exist here
                exc = RuntimeError(f"the worker raised an exception that cannot be rebuilt here ({e!r})")
            if exc is None:
                exc = RuntimeError("the worker raised an exception that cannot be pickled")
            return kind, (exc, remote_tb)
        return kind, payload

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Close the connection (the worker exits on EOF) and reap the process; kill it if it does not exit."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        try:
            self._proc.wait(timeout=120 if wait else 5)
        except subprocess.TimeoutExpired:
            log.warning("stage worker %r did not exit; killing it", self.name)
            self._proc.kill()
            self._proc.wait()


class _RemoteTraceback(Exception):
    def __init__(self, tb: str):
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.tb}\"\"\""


def _source_root() -> str | None:
    """The directory holding this checkout's ``qtsplus`` package, unless it is an installed site-packages (putting
    that on the worker's path would mix this environment's packages into the other one)."""
    root = Path(__file__).resolve().parent.parent
    if root.name in ("site-packages", "dist-packages") or not (root / "pyproject.toml").is_file():
        return None
    return str(root)


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    for dist, _ in PICKLE_COMPAT:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def check_pickle_compat(ours: dict[str, str | None], theirs: dict[str, str | None], python: str) -> None:
    """Raise when the worker's environment cannot be trusted to unpickle our objects (or we its results)."""
    problems = []
    for dist, parts in PICKLE_COMPAT:
        a, b = ours.get(dist), theirs.get(dist)
        if a is None or b is None:
            continue  # not installed on one side: nothing of it can cross
        if a.split(".")[:parts] != b.split(".")[:parts]:
            problems.append(f"{dist} {a} here, {b} there")
        elif a != b:
            log.info("stage worker %s: %s %s here, %s there (compatible)", python, dist, a, b)
    if problems:
        raise RuntimeError(
            f"the worker interpreter {python} has incompatible versions ({'; '.join(problems)}): objects pickled "
            f"in one cannot be trusted in the other. Install matching versions in the engine environment."
        )


def _serve(fd: int, parent: int) -> None:
    """The worker side of InterpreterProcess: run calls until the parent closes the connection."""
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before PR_SET_PDEATHSIG was armed
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then closes the connection
    conn = Connection(fd)
    conn.send(("hello", _versions()))
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        try:
            fn, args, kwargs = pickle.loads(data)
            reply = pickle.dumps(("ok", fn(*args, **kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller, who raises it
            reply = _error_reply(e)
        conn.send_bytes(reply)


def _error_reply(e: BaseException) -> bytes:
    remote_tb = "".join(traceback.format_exception(e))
    try:
        exc_bytes: bytes | None = pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - unpicklable exception: the traceback text still goes back
        exc_bytes = None
    return pickle.dumps(("error", (exc_bytes, remote_tb)), protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
