"""Serve the build-dataset flow as deployment `build-dataset/default` from this process.

    prefect server start                                   # terminal 1 (binds 127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m infra.serve --out runs/default   # terminal 2
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run build-dataset/default

The deployment's default parameters are a preset (smoke unless --preset says otherwise); override any of them per
run with `prefect deployment run build-dataset/default --param config='{...}'` or in the UI.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/default", help="dataset folder of the deployment's runs")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--input", help="caption file (default: the preset's)")
    parser.add_argument("--video-root", help="video root (default: the preset's)")
    parser.add_argument("--name", default="default", help="deployment name")
    parser.add_argument("--cron", help="optional schedule, e.g. '0 3 * * *'")
    args = parser.parse_args(argv)

    from flows.build_dataset import build_dataset
    from qtsplus.config import BuildConfig

    config = BuildConfig.preset(args.preset, out=str(Path(args.out).resolve()), input=args.input,
                                video_root=args.video_root)
    build_dataset.serve(
        name=args.name,
        parameters={"config": config.model_dump(mode="json"), "progress": False},
        cron=args.cron,
        description=f"Captions -> VSCQ1 -> VSCQ2 -> QTS-VQA Parquet shards (preset: {args.preset})",
        tags=["qtsplus", "build-dataset", args.preset],
    )


if __name__ == "__main__":
    main()
