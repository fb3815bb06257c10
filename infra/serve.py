"""Serve every qtsplus flow as a deployment named `default` from this process (one machine, no work pool needed).

    prefect server start                                              # terminal 1 (binds 127.0.0.1:4200)
    # another port: PREFECT_UI_API_URL=http://127.0.0.1:4300/api prefect server start --port 4300  (see docs)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m infra.serve --root runs --gpus 1 [--retrain-cron "0 3 * * *"]     # terminal 2
    prefect deployment run build-dataset/default                      # then train-selector/, evaluate/, retrain/

Deployments (default parameters: the smoke presets on the shipped examples, under --root):
- build-dataset/default   captions -> <root>/default (dataset)
- train-selector/default  <root>/default -> <root>/default-train
- evaluate/default        <root>/default-train/final on <root>/default -> <root>/default-eval
- retrain/default         inbox <root>/inbox (created here), registry <root>/registry; at most one run at a time
                          (others wait in AwaitingConcurrencySlot), on --retrain-cron when given. With nothing new in
                          the inbox a run ends Completed with a "no new captions" `retrain-decision` artifact.
Every parameter can be overridden per run (`--param config='{...}'`) or in the UI. The global concurrency limit `gpu`
(--gpus slots) is created if missing, so two model stages never share a GPU.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def ensure_gpu_limit(slots: int) -> None:
    """Create the `gpu` global concurrency limit with `slots` slots unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from tasks.gpu import GPU_LIMIT

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


def deployments(root: Path, preset: str, retrain_cron: str | None) -> list:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.build_dataset import build_dataset
    from flows.evaluate import evaluate
    from flows.retrain import retrain
    from flows.train_selector import train_selector
    from qtsplus.build_config import BuildConfig
    from qtsplus.evaluation.config import EvalConfig
    from qtsplus.paths import EXAMPLES
    from qtsplus.retrain import RetrainConfig
    from qtsplus.training.config import TrainConfig

    data, run, report = root / "default", root / "default-train", root / "default-eval"
    build = BuildConfig.preset(preset, out=str(data))
    train = TrainConfig.preset("smoke", data=str(data), out=str(run))
    evaluation = EvalConfig.preset("smoke", data=str(data), checkpoint=str(run / "final"), out=str(report))
    again = RetrainConfig(inbox=str(root / "inbox"), registry=str(root / "registry"), work=str(root / "retrain"),
                          video_root=str(EXAMPLES / "videos"))
    tags = ["qtsplus", preset]
    return [
        build_dataset.to_deployment(name="default", parameters={"config": build.model_dump(mode="json"),
                                                                "progress": False}, tags=tags),
        train_selector.to_deployment(name="default", parameters={"config": train.model_dump(mode="json")}, tags=tags),
        evaluate.to_deployment(name="default", parameters={"config": evaluation.model_dump(mode="json")}, tags=tags),
        retrain.to_deployment(
            name="default", parameters={"config": again.model_dump(mode="json")}, tags=tags, cron=retrain_cron,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs", help="folder for the deployments' datasets, runs and registry")
    parser.add_argument("--preset", default="smoke", help="build-dataset preset of build-dataset/default")
    parser.add_argument("--gpus", type=int, default=1, help="slots of the `gpu` global concurrency limit")
    parser.add_argument("--retrain-cron", help="schedule of retrain/default, e.g. '0 3 * * *'")
    args = parser.parse_args(argv)

    from prefect import serve

    root = Path(args.root).resolve()
    (root / "inbox").mkdir(parents=True, exist_ok=True)  # retrain/default watches it: it must exist from the start
    ensure_gpu_limit(args.gpus)
    print(f"retrain/default picks up new caption files (*.jsonl) dropped into {root / 'inbox'}")
    serve(*deployments(root, args.preset, args.retrain_cron))


if __name__ == "__main__":
    main()
