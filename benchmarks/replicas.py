"""Throughput of a model stage on a replica pool: VSCQ2 chunks per second with 1, 2 (and on a GPU machine, all)
replicas, on the `null` engine (no model: video decoding, prompts, Parquet) and on the tiny transformers engine.

The inputs (synthetic captions over the shipped videos, ingested, with questions from the null engine) are made once.
Each measurement opens a fresh pool (`qtsplus.replica_pool.replica_pool`, local processes), starts and warms every
replica (model loaded), then times the chunks alone, with twice as many calls in flight as replicas, as the flow
does. Efficiency at r replicas = throughput(r) / (r x throughput(1)). Every replica gets the same CPU threads
(OMP_NUM_THREADS = cores // the largest count, unless --threads), so the comparison is of replicas, not of thread
counts (a pool of CPU replicas splits the cores the same way). The load average is printed with the table: on a
shared machine the replicas compete with other jobs for the same cores.

    python -m benchmarks.replicas [--chunks 8] [--chunk-size 4] [--replicas 1 2] [--repeats 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from benchmarks.pipeline_overhead import write_captions
from qtsplus import ingest
from qtsplus.build_config import BuildConfig
from qtsplus.engines import EngineConfig, get_engine
from qtsplus.replica_pool import engine_needs, replica_pool
from qtsplus.replicas import ReplicaConfig, visible_gpus
from qtsplus.shards import ChunkResult
from qtsplus.stages.teacher import TeacherConfig, run_vscq2_chunk
from qtsplus.stages.vscq1 import run_vscq1_chunk

REPO = Path(__file__).resolve().parent.parent


def probe(engine: EngineConfig, hold_s: float) -> tuple[int, float]:
    """Load the replica's model (if not yet), stay busy a moment (so concurrent probes land on distinct replicas):
    (pid, CPU seconds this replica process has used)."""
    get_engine(engine)
    time.sleep(hold_s)
    t = os.times()
    return os.getpid(), t.user + t.system


def probe_all(pool, engine: EngineConfig, count: int) -> dict[int, float]:
    with ThreadPoolExecutor(count) as ex:
        found = dict(ex.map(lambda _: pool.run(probe, engine, 0.5), range(count)))
    assert len(found) == count, "one probe per replica"
    return found


def prepare(root: Path, n_chunks: int, chunk_size: int) -> tuple[Path, Path, list[ChunkResult], BuildConfig]:
    """Captions and VSCQ1 questions (null engine) for `n_chunks` chunks, under `root/inputs`."""
    captions = root / "captions.jsonl"
    write_captions(captions, n_chunks * chunk_size)
    out, videos = root / "inputs", REPO / "examples" / "videos"
    config = BuildConfig.preset("smoke", out=str(out), input=str(captions))
    v1 = config.vscq1.model_copy(update={"engine": replace(config.vscq1.engine, backend="null")})
    questions = []
    for spec in ingest.scan_input(captions, chunk_size):
        caps = ingest.ingest_chunk(captions, spec, config.ingest, videos, out)
        questions.append(run_vscq1_chunk(out, caps.chunk, caps.files_for("train", "eval"), v1, caps.output_fingerprint))
    return out, videos, questions, config


def measure(out: Path, videos: Path, inputs: list[ChunkResult], cfg: TeacherConfig,
            count: int) -> tuple[float, float, float, float]:
    """(seconds to start and warm `count` replicas, chunks per second once they are warm, replica CPU seconds per
    chunk, this process's CPU seconds per chunk)."""
    shutil.rmtree(out / "vscq2", ignore_errors=True)
    with replica_pool("vscq2", ReplicaConfig(count=count), engine_needs(cfg.engine)) as pool:
        t0 = time.perf_counter()
        before = probe_all(pool, cfg.engine, count)
        assert pool.started == count, "every replica started once"
        t1, cpu1 = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(2 * count) as ex:
            list(ex.map(lambda r: pool.run(run_vscq2_chunk, out, r.chunk, r.files_for("train", "eval"), cfg, videos,
                                           r.output_fingerprint), inputs))
        t2, cpu2 = time.perf_counter(), time.process_time()
        after = probe_all(pool, cfg.engine, count)
        assert after.keys() == before.keys() and pool.started == count
    n = len(inputs)
    return t1 - t0, n / (t2 - t1), sum(after[p] - before[p] for p in before) / n, (cpu2 - cpu1) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8, help="VSCQ2 chunks per measurement")
    parser.add_argument("--chunk-size", type=int, default=4, help="captions per chunk (2 questions each)")
    parser.add_argument("--replicas", type=int, nargs="+", default=None,
                        help="replica counts (default: 1 2, and all visible GPUs on a GPU machine)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per point, interleaved (the best is kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per replica (default: cores // the largest replica count)")
    args = parser.parse_args()
    gpus = visible_gpus()
    counts = args.replicas or sorted({1, 2, *([len(gpus)] if gpus else [])})
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // max(counts))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by every replica process
    os.environ.setdefault("QTSPLUS_NO_PROGRESS", "1")
    load_before = os.getloadavg()
    rows: list[tuple[str, int, float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out, videos, inputs, config = prepare(Path(tmp), args.chunks, args.chunk_size)
        for backend in ("null", "transformers"):
            cfg = config.teacher.model_copy(update={"engine": replace(config.teacher.engine, backend=backend)})
            runs: dict[int, list[tuple[float, float, float, float]]] = {c: [] for c in counts}
            for _ in range(args.repeats):  # interleaved (1, 2, 1, 2, ...): a shared machine's load drifts
                for count in counts:
                    runs[count].append(measure(out, videos, inputs, cfg, count))
            rows += [(backend, count, *max(runs[count], key=lambda m: m[1])) for count in counts]
    load_after = os.getloadavg()

    print(f"VSCQ2, {args.chunks} chunks x {args.chunk_size} captions (2 questions each), local replicas with "
          f"{threads} CPU thread(s) each; {cores} CPU cores, GPUs: {','.join(gpus) or 'none'}")
    print(f"load average (1/5/15 min): before {'/'.join(f'{x:.1f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.1f}' for x in load_after)}")
    print(f"{'engine':<13} {'replicas':>8} {'start+load s':>12} {'chunks/s':>9} {'speed-up':>8} {'efficiency':>10} "
          f"{'replica CPU s/chunk':>19} {'parent CPU s/chunk':>18}")
    base = {backend: thr for backend, count, _, thr, _, _ in rows if count == 1}
    for backend, count, start, thr, cpu, parent in rows:
        one = base.get(backend)
        speedup = f"{thr / one:8.2f}" if one else f"{'-':>8}"
        eff = f"{thr / (count * one):10.2f}" if one else f"{'-':>10}"
        print(f"{backend:<13} {count:>8} {start:>12.1f} {thr:>9.3f} {speedup} {eff} {cpu:>19.3f} {parent:>18.3f}")
    tiny = {count: thr for backend, count, _, thr, _, _ in rows if backend == "transformers"}
    if 1 in tiny and 2 in tiny:
        print(f"replicas: 1={tiny[1]:.3f} 2={tiny[2]:.3f} efficiency={tiny[2] / (2 * tiny[1]):.2f}")


if __name__ == "__main__":
    main()
