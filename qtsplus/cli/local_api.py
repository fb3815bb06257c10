"""A local Prefect API that outlives one command, so that only the first command of a session pays its start-up.

With no server configured (PREFECT_API_URL unset), Prefect starts a temporary API server in every process that runs a
flow and stops it when the process ends: ~10 s of every CLI command on 2 cores, and a crash ("Timed out while attempting
to connect to ephemeral Prefect API server") when a busy machine needs more than Prefect's 20 s. Instead, the CLI
starts the same server (Prefect's own app, in ephemeral mode: no UI, no background services, the SQLite database
under PREFECT_HOME) once, detached, on 127.0.0.1, and later commands with the same PREFECT_HOME reuse it:

- state: `$PREFECT_HOME/qtsplus-local-api.json` (pid, port, prefect version); a lock file serialises starts;
- every command that uses it registers its pid in `$PREFECT_HOME/qtsplus-local-api.clients/`; the server stops
  `QTSPLUS_LOCAL_API_IDLE` seconds (default 600) after the last registered command has exited, never while one runs
  (a long training task makes no API calls for hours);
- a slow start is waited for (up to `QTSPLUS_LOCAL_API_START_TIMEOUT`, default 600 s) with a message, not a crash.

`QTSPLUS_LOCAL_API=off` restores Prefect's own per-process temporary server; PREFECT_API_URL bypasses both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE = "qtsplus-local-api.json"
CLIENTS = "qtsplus-local-api.clients"
LOG = "qtsplus-local-api.log"
IDLE_ENV = "QTSPLUS_LOCAL_API_IDLE"
TIMEOUT_ENV = "QTSPLUS_LOCAL_API_START_TIMEOUT"
SWITCH_ENV = "QTSPLUS_LOCAL_API"


class LocalApiError(RuntimeError):
    """The local API server could not be started."""


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it (default ~/.prefect), without importing Prefect."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def enabled() -> bool:
    return not os.environ.get("PREFECT_API_URL") and os.environ.get(SWITCH_ENV, "on").lower() not in ("off", "0", "no")


def ensure(home: Path | None = None) -> str:
    """The URL of a healthy local API for `home` (started if none runs), registered as used by this process, and
    exported as PREFECT_API_URL for the Prefect client of this process."""
    home = home or prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        state = _read_state(home)
        if state is None or not _healthy(state["port"]) or state.get("prefect") != _prefect_version():
            if state is not None:
                _terminate(state.get("pid"))
            state = _start(home)
        _register(home, os.getpid())
    url = f"http://127.0.0.1:{state['port']}/api"
    os.environ["PREFECT_API_URL"] = url
    return url


def stop(home: Path | None = None) -> bool:
    """Stop the local API of `home` if one runs (tests and `qtsplus local-api stop`); True when one was stopped."""
    home = home or prefect_home()
    with _locked(home):
        state = _read_state(home)
        (home / STATE).unlink(missing_ok=True)
        return state is not None and _terminate(state.get("pid"))


# ---------------------------------------------------------------------------------------------------------------------
# the client side


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    with open(home / (STATE + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads((home / STATE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _healthy(port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _prefect_version() -> str:
    from importlib import metadata

    return metadata.version("prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home: Path) -> dict[str, Any]:
    port = _free_port()
    timeout = float(os.environ.get(TIMEOUT_ENV, "600"))
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                        "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = open(home / LOG, "ab")  # the detached server keeps writing to it
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "qtsplus.cli.local_api:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    log.close()
    print(f"qtsplus: starting a local Prefect API on 127.0.0.1:{port} (PREFECT_HOME={home}); later commands reuse it, "
          f"it stops {_idle_seconds():.0f} s after the last one ends (set PREFECT_API_URL to use your own server)",
          file=sys.stderr, flush=True)
    started, said = time.monotonic(), 0.0
    while not _healthy(port, timeout=1.0):
        if process.poll() is not None:
            raise LocalApiError(f"the local Prefect API exited with code {process.returncode} while starting; "
                                f"its log, {home / LOG}, ends with:\n{_tail(home / LOG)}")
        waited = time.monotonic() - started
        if waited > timeout:
            process.kill()
            raise LocalApiError(f"the local Prefect API did not answer within {timeout:.0f} s ({TIMEOUT_ENV}); its "
                                f"log, {home / LOG}, ends with:\n{_tail(home / LOG)}")
        if waited - said >= 20:
            said = waited
            print(f"qtsplus: still waiting for the local Prefect API ({waited:.0f} s; a busy machine starts it slowly)",
                  file=sys.stderr, flush=True)
        time.sleep(0.2)
    state = {"pid": process.pid, "port": port, "prefect": _prefect_version(), "started": time.time()}
    tmp = home / (STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(home / STATE)
    return state


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def _terminate(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    for _ in range(50):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of this process (tests start servers as children) is dead for our purpose
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


def _register(home: Path, pid: int) -> None:
    clients = home / CLIENTS
    clients.mkdir(exist_ok=True)
    (clients / str(pid)).touch()


def _idle_seconds() -> float:
    return float(os.environ.get(IDLE_ENV, "600"))


# ---------------------------------------------------------------------------------------------------------------------
# the server side


def create_app() -> Any:
    """Prefect's API app (ephemeral: no UI, no background services) and a watchdog that stops this server once no
    registered command has been alive for QTSPLUS_LOCAL_API_IDLE seconds. Run by uvicorn (see `_start`)."""
    from prefect.server.api.server import create_app as prefect_app

    home = prefect_home()
    threading.Thread(target=_watchdog, args=(home, _idle_seconds()), daemon=True, name="idle-watchdog").start()
    return prefect_app(ephemeral=True, final=True)


def _watchdog(home: Path, idle: float, every: float = 2.0) -> None:
    try:
        _watch(home, idle, every)
    finally:  # idle, PREFECT_HOME deleted (a test's temporary folder), or any error: never outlive the watchdog
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down gracefully


def _watch(home: Path, idle: float, every: float) -> None:
    last_busy = time.monotonic()
    while home.is_dir():
        time.sleep(every)
        clients = home / CLIENTS
        live = False
        for entry in clients.iterdir() if clients.is_dir() else ():
            if entry.name.isdigit() and _alive(int(entry.name)):
                live = True
            else:
                entry.unlink(missing_ok=True)  # a command that ended (or was killed) no longer keeps us up
        if live:
            last_busy = time.monotonic()
        elif time.monotonic() - last_busy > idle:
            with _locked(home):  # a command registering right now holds the lock: it will be seen below
                if any(e.name.isdigit() and _alive(int(e.name)) for e in clients.iterdir()) if clients.is_dir() else False:
                    last_busy = time.monotonic()
                    continue
                state = _read_state(home)
                if state is not None and state.get("pid") == os.getpid():
                    (home / STATE).unlink(missing_ok=True)
            return
