"""Flow `cache-features`: the frozen vision tower's output for every video of a dataset, once (docs/feature_cache.md)."""

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from qtsplus.features.cache import dataset_video_root, store_root
from qtsplus.features.config import FeatureConfig
from qtsplus.replicas import StageNeeds
from tasks.chunks import model_stage
from tasks.features import (
    STAGE,
    FeatureSummary,
    finalize_task,
    plan_task,
    publish_features,
    run_feature_tasks,
)


@flow(name="cache-features", task_runner=ThreadPoolTaskRunner(max_workers=4))
def cache_features(config: FeatureConfig, progress: bool = True) -> FeatureSummary:
    """Plan (hash and probe the videos, print the expected storage), compute every uncached chunk on the stage's
    replicas (`config.replicas`: worker processes or Ray actors, each loading the vision tower once, and only if some
    chunk needs it), then write the set's manifest."""
    out = store_root(config).resolve()
    data = Path(config.data).resolve()
    config = config.model_copy(update={"data": str(data), "out": str(out)})
    video_root = str(Path(config.video_root).resolve() if config.video_root else dataset_video_root(data))
    plan = plan_task(config)
    line = f"feature set {plan.set_id} ({config.model_id}, {plan.spec.compute_dtype} compute) -> {out}\n{plan.storage_line()}"
    print(line, flush=True)
    get_run_logger().info(line)
    with model_stage(STAGE, config.replicas, StageNeeds(gpu=config.device in ("auto", "cuda"))) as pool:
        run = run_feature_tasks(out, [
            dict(out=str(out), chunk=chunk, videos=videos, spec=plan.spec, video_root=video_root, device=config.device)
            for chunk, videos in sorted(plan.chunks.items())
        ], progress, concurrency=2 * pool.size)
    manifest = finalize_task(out, plan.spec, run, plan)
    return publish_features(out, manifest, run, plan)
