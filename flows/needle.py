"""Flow `build-needle`: the needle-in-a-video-haystack dataset (qtsplus.needle, docs/needle.md)."""

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from qtsplus.needle import NeedleConfig, plan_chunks
from tasks.needle import NeedleSummary, publish_needle, run_needle_chunks


@flow(name="build-needle", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def build_needle(config: NeedleConfig, progress: bool = True) -> NeedleSummary:
    """Render every chunk of videos and questions (cached per chunk), then write manifests and the card."""
    out = Path(config.out).resolve()
    config = config.model_copy(update={"out": str(out)})
    run = run_needle_chunks(out, config, plan_chunks(config), progress)
    return publish_needle(out, config, run)
