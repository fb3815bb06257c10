"""Flow `build-dataset`: captions -> VSCQ1 -> VSCQ2 -> QTS-VQA Parquet shards (paper Sec. 4.1, Fig. 3)."""

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from qtsplus.build_config import BuildConfig
from qtsplus.replica_pool import engine_needs
from tasks.build_dataset import (
    ingest_chunk,
    run_chunk_tasks,
    scan_captions,
    vqa_chunk,
    vscq1_chunk,
    vscq2_chunk,
)
from tasks.chunks import model_stage
from tasks.publish import BuildSummary, finalize, publish_build

STAGES = ("captions", "vscq1", "vscq2", "vqa")


@flow(name="build-dataset", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def build_dataset(config: BuildConfig, progress: bool = True) -> BuildSummary:
    """Build the distillation dataset from a caption file; every (stage, chunk) is a cached task. Each model stage
    runs its chunks on a pool of model replicas (`config.replicas`: local processes or Ray actors), started only
    when a chunk is not cached; twice as many chunk tasks as replicas are in flight."""
    out = Path(config.out).resolve()
    video_root = str(Path(config.video_root).resolve())
    specs = scan_captions(str(Path(config.input).resolve()), config.ingest.chunk_size)

    captions = run_chunk_tasks("captions", ingest_chunk, out, [
        dict(out=str(out), input=str(Path(config.input).resolve()), spec=s, cfg=config.ingest, video_root=video_root)
        for s in specs
    ], progress)
    runs = [captions]
    finalize(out, captions, config)

    with model_stage("vscq1", config.replicas, engine_needs(config.vscq1.engine)) as pool:
        vscq1 = run_chunk_tasks("vscq1", vscq1_chunk, out, [
            dict(out=str(out), prev=r, cfg=config.vscq1) for r in captions.results
        ], progress, concurrency=2 * pool.size)
        pools = {"vscq1": pool.stats()}
    runs.append(vscq1)
    finalize(out, vscq1, config)

    with model_stage("vscq2", config.replicas, engine_needs(config.teacher.engine)) as pool:
        vscq2 = run_chunk_tasks("vscq2", vscq2_chunk, out, [
            dict(out=str(out), prev=r, cfg=config.teacher, video_root=video_root) for r in vscq1.results
        ], progress, concurrency=2 * pool.size)
        pools["vscq2"] = pool.stats()
    runs.append(vscq2)
    finalize(out, vscq2, config)

    with model_stage("vqa", config.replicas, engine_needs(config.teacher.engine)) as pool:
        vqa = run_chunk_tasks("vqa", vqa_chunk, out, [
            dict(out=str(out), prev=r, cfg=config.teacher, video_root=video_root) for r in vscq2.results
        ], progress, concurrency=2 * pool.size)
        pools["vqa"] = pool.stats()
    runs.append(vqa)
    finalize(out, vqa, config)

    return publish_build(out, runs, config, pools)
