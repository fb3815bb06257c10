"""Flow `build-dataset`: captions -> VSCQ1 -> VSCQ2 -> QTS-VQA Parquet shards (paper Sec. 4.1, Fig. 3)."""

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from qtsplus.build_config import BuildConfig
from qtsplus.engines import engine_python
from qtsplus.workers import stage_worker
from tasks.build_dataset import (
    ingest_chunk,
    run_chunk_tasks,
    scan_captions,
    vqa_chunk,
    vscq1_chunk,
    vscq2_chunk,
)
from tasks.gpu import gpu_slot
from tasks.publish import BuildSummary, finalize, publish_build

STAGES = ("captions", "vscq1", "vscq2", "vqa")


@flow(name="build-dataset", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def build_dataset(config: BuildConfig, progress: bool = True) -> BuildSummary:
    """Build the distillation dataset from a caption file; every (stage, chunk) is a cached task."""
    out = Path(config.out).resolve()
    video_root = str(Path(config.video_root).resolve())
    specs = scan_captions(str(Path(config.input).resolve()), config.ingest.chunk_size)

    captions = run_chunk_tasks("captions", ingest_chunk, out, [
        dict(out=str(out), input=str(Path(config.input).resolve()), spec=s, cfg=config.ingest, video_root=video_root)
        for s in specs
    ], progress)
    runs = [captions]
    finalize(out, captions, config)

    with gpu_slot(), stage_worker("vscq1", python=engine_python(config.vscq1.engine)):
        vscq1 = run_chunk_tasks("vscq1", vscq1_chunk, out, [
            dict(out=str(out), prev=r, cfg=config.vscq1) for r in captions.results
        ], progress)
    runs.append(vscq1)
    finalize(out, vscq1, config)

    with gpu_slot(), stage_worker("vscq2", python=engine_python(config.teacher.engine)):
        vscq2 = run_chunk_tasks("vscq2", vscq2_chunk, out, [
            dict(out=str(out), prev=r, cfg=config.teacher, video_root=video_root) for r in vscq1.results
        ], progress)
    runs.append(vscq2)
    finalize(out, vscq2, config)

    with gpu_slot(), stage_worker("vqa", python=engine_python(config.teacher.engine)):
        vqa = run_chunk_tasks("vqa", vqa_chunk, out, [
            dict(out=str(out), prev=r, cfg=config.teacher, video_root=video_root) for r in vscq2.results
        ], progress)
    runs.append(vqa)
    finalize(out, vqa, config)

    return publish_build(out, runs, config)
