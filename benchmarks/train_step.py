"""Training throughput and memory of both variants, through the real DeepSpeed launcher (CPU accelerator here).

Builds the smoke dataset (tiny models) unless --data is given, then runs `max_steps` steps of each variant on it and
reports the median step time (first steps excluded), samples per second and peak memory per rank. On a GPU machine
pass e.g. `--base Qwen/Qwen2.5-VL-3B-Instruct --frames 40` (weights from the hub; random-weight runs need a local
checkpoint directory built from the config).

    python -m benchmarks.train_step [--steps 20] [--batch 2] [--frames 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a built dataset (default: build the smoke dataset in a temp folder)")
    parser.add_argument("--base", default="tiny/qwen2.5-vl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()

    from qtsplus.training.config import TrainConfig
    from qtsplus.training.launch import read_metrics, run_training

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=f"{tmp}/home", QTSPLUS_NO_PROGRESS="1", PREFECT_LOGGING_LEVEL="ERROR")
        data = args.data
        if data is None:
            data = f"{tmp}/data"
            subprocess.run([sys.executable, "-m", "qtsplus.cli", "build-dataset", "--out", data, "--preset", "smoke",
                            "--no-progress"], env=env, cwd=REPO, check=True, capture_output=True)
        rows = []
        for variant in ("selector", "selector+lm"):
            cfg = TrainConfig.preset("smoke", data=data, out=f"{tmp}/{variant}", variant=variant, base_model=args.base,
                                     max_steps=args.steps, micro_batch_size=args.batch, checkpoint_every=10**6)
            cfg = cfg.model_copy(update={"video": dataclasses.replace(cfg.video, max_frames=args.frames)})
            run_training(cfg)
            steps = [m for m in read_metrics(Path(cfg.out)) if "step" in m][2:]
            median = statistics.median(m["seconds"] for m in steps)
            rows.append((variant, steps[-1]["trainable_params"], median, args.batch / median,
                         max(m["peak_mem_mib"] for m in steps), statistics.mean(m["tokens_in"] for m in steps)))
    print(f"\ntrain step, base {args.base}, micro batch {args.batch}, up to {args.frames} frames, "
          f"{'cuda' if __import__('torch').cuda.is_available() else 'cpu'}")
    print(f"{'variant':<12} {'trainable':>12} {'step s':>8} {'samples/s':>10} {'peak MiB':>9} {'vision tokens':>14}")
    for variant, params, median, sps, mem, tokens in rows:
        print(f"{variant:<12} {params:>12,} {median:>8.3f} {sps:>10.2f} {mem:>9.0f} {tokens:>14.0f}")


if __name__ == "__main__":
    main()
