"""Flow `build-needle`: the needle-in-a-video-haystack dataset (qtsplus.needle, docs/needle.md)."""

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from qtsplus.needle import NeedleConfig, plan_chunks
from qtsplus.needle.vision import VisionTeaching
from tasks.needle import NeedleSummary, publish_needle, run_needle_chunks, run_needle_host


@flow(name="build-needle", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def build_needle(config: NeedleConfig, progress: bool = True) -> NeedleSummary:
    """Render every chunk of videos and questions (cached per chunk), then write manifests and the card."""
    out = Path(config.out).resolve()
    config = config.model_copy(update={"out": str(out)})
    run = run_needle_chunks(out, config, plan_chunks(config), progress)
    return publish_needle(out, config, run)


@flow(name="needle-host", log_prints=True)
def needle_host(data: NeedleConfig, out: str, teaching: VisionTeaching | None = None, progress: bool = True) -> str:
    """The needle host: the tiny Qwen2.5-VL with its vision tower taught to see the scenes of `data` (cached)."""
    path, state = run_needle_host(Path(out).resolve(), data, teaching or VisionTeaching(), progress)
    print(f"needle host: {path} ({state})")
    return path
