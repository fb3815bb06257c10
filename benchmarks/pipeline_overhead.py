"""The build-dataset flow's own cost, model calls excluded (the `null` engine answers instantly).

For each size N it writes N synthetic ShareGPTVideo captions over the shipped videos, runs `qtsplus build-dataset`
in a subprocess (fresh), runs it again (fully cached: the "resume a completed run" time), and records wall time and
peak RSS. Per-record overhead is the marginal cost between sizes: (wall(N2) - wall(N1)) / (N2 - N1), so fixed start-up
costs (imports, the temporary Prefect server) do not count. It covers ingest, prompt building, validation, video
decoding for the teacher stages, Parquet writing and Prefect task overhead.

    python -m benchmarks.pipeline_overhead --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VIDEOS = ["bigbuckbunny.mp4", "bikes.mp4", "carphone.mp4", "carphone_frames", "bigbuckbunny.webm"]
WORDS = "a man woman rides bike car street talks phone rabbit meadow tree red blue walks smiles slowly".split()


def write_captions(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            caption = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(24)) + f". Clip {i}."
            f.write(json.dumps({"id": f"syn-{i:07d}", "video": VIDEOS[i % len(VIDEOS)], "conversations": [
                {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": caption}]}) + "\n")


def run(out: Path, captions: Path, env: dict[str, str], chunk_size: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the largest process) of one CLI run, measured from a fresh parent."""
    sets = ["vscq1.engine.backend=null", "teacher.engine.backend=null", f"ingest.chunk_size={chunk_size}",
            "ingest.eval_fraction=0.01", "teacher.group_size=256"]
    cmd = [sys.executable, "-m", "qtsplus.cli", "build-dataset", "--out", str(out), "--preset", "smoke",
           "--input", str(captions), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); w = time.perf_counter() - t; "
             "sys.stderr.write(p.stderr[-3000:] if p.returncode else ''); "
             "print(p.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, cwd=REPO, capture_output=True, text=True)
    code, wall, rss_kib = proc.stdout.split()
    if code != "0":
        raise SystemExit(f"build-dataset failed:\n{proc.stderr}")
    return float(wall), int(rss_kib) / 1024


def null_engine_seconds(n_captions: int, n_questions: int) -> float:
    """Time the null engine itself takes for a run's worth of requests (subtracted: it stands in for the model)."""
    from qtsplus.engines import EngineConfig, GenerationParams, Prompt
    from qtsplus.engines.null_engine import NullEngine
    from schemas import vscq1_generation_schema

    engine = NullEngine(EngineConfig(model_id="null", backend="null"))
    schema = vscq1_generation_schema(n_questions, 24)
    prompts = [Prompt(user=f"caption {i}", seed=i) for i in range(2000)]
    t = time.perf_counter()
    engine.generate_json(prompts, schema, GenerationParams())
    engine.choose(prompts, "ABCD")
    engine.generate_text(prompts, GenerationParams())
    return (time.perf_counter() - t) / 2000 * n_captions * (1 + n_questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--chunk-size", type=int, default=1000)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env.update(PREFECT_HOME=f"{tmp}/home", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="ERROR",
                   QTSPLUS_NO_PROGRESS="1")
        for n in args.sizes:
            captions = Path(tmp) / f"captions-{n}.jsonl"
            write_captions(captions, n)
            fresh, rss = run(Path(tmp) / f"out-{n}", captions, env, args.chunk_size)
            cached, rss_cached = run(Path(tmp) / f"out-{n}", captions, env, args.chunk_size)
            rows.append((n, fresh, cached, rss, rss_cached, null_engine_seconds(n, 2)))
            print(f"  measured N={n}: fresh {fresh:.1f} s, cached {cached:.1f} s", file=sys.stderr)
    print(f"\nbuild-dataset overhead, null engine, chunk size {args.chunk_size}, {os.cpu_count()} CPUs")
    print(f"{'captions':>9} {'fresh s':>8} {'engine s':>9} {'outside engine':>15} {'cached rerun s':>15} "
          f"{'peak RSS MiB':>13} {'(cached)':>9}")
    for n, fresh, cached, rss, rss_c, eng in rows:
        print(f"{n:>9} {fresh:>8.1f} {eng:>9.1f} {1 - eng / fresh:>15.1%} {cached:>15.1f} {rss:>13.0f} {rss_c:>9.0f}")
    for (n1, f1, *_ , e1), (n2, f2, *_, e2) in zip(rows, rows[1:], strict=False):
        per = ((f2 - e2) - (f1 - e1)) / (n2 - n1) * 1000
        print(f"marginal overhead per caption, N {n1} -> {n2}: {per:.3f} ms (2 questions per caption, 3 stages)")


if __name__ == "__main__":
    main()
