"""What a fully cached `qtsplus build-dataset --preset smoke` costs, as a whole process, and where the floor is.

    python -m benchmarks.noop_rerun [--repeats 3]

In one run, side by side: the cold build (fresh Prefect home and dataset folder), then fully cached reruns with the
local Prefect API that the CLI keeps between commands (the default), and with Prefect's own per-process temporary
server (`QTSPLUS_LOCAL_API=off`, what every command paid before). The floor rows time what any command pays before
it can look at a cache: the interpreter, importing Prefect, importing the build flow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], env: dict[str, str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fully cached reruns per variant")
    args = parser.parse_args(argv)

    from qtsplus.cli import local_api

    with tempfile.TemporaryDirectory(prefix="qtsplus-noop-") as tmp:
        home, out = Path(tmp) / "prefect", Path(tmp) / "ds"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
            "PREFECT_HOME": str(home), "QTSPLUS_NO_PROGRESS": "1", "QTSPLUS_LOCAL_API_IDLE": "60"}
        build = [sys.executable, "-m", "qtsplus.cli", "build-dataset", "--out", str(out), "--preset", "smoke",
                 "--no-progress"]
        rows: list[tuple[str, list[float]]] = []
        try:
            rows.append(("cold build (fresh home and folder)", timed(build, env, 1)))
            rows.append(("cached rerun, local API kept (default)", timed(build, env, args.repeats)))
            off = env | {"QTSPLUS_LOCAL_API": "off"}
            rows.append(("cached rerun, Prefect's temporary server", timed(build, off, args.repeats)))
            rows.append(("floor: python -c pass", timed([sys.executable, "-c", "pass"], env, args.repeats)))
            rows.append(("floor: import prefect", timed([sys.executable, "-c", "import prefect"], env, args.repeats)))
            rows.append(("floor: import the build flow",
                         timed([sys.executable, "-c", "import flows.build_dataset"], env, args.repeats)))
        finally:
            local_api.stop(home)

    load = os.getloadavg()[0]
    print(f"\n`qtsplus build-dataset --preset smoke`, whole process, seconds (load average {load:.1f} on "
          f"{os.cpu_count()} CPUs)\n")
    print(f"| {'what':<42} | {'min':>6} | {'median':>6} | {'max':>6} |")
    print(f"|{'-' * 44}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for name, t in rows:
        print(f"| {name:<42} | {min(t):>6.2f} | {statistics.median(t):>6.2f} | {max(t):>6.2f} |")
    kept = statistics.median(rows[1][1])
    temporary = statistics.median(rows[2][1])
    print(f"\nnoop: cached={kept:.2f}s temporary_server={temporary:.2f}s speedup={temporary / kept:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
