"""Training throughput and memory of every trainable method, through the real DeepSpeed launcher (CPU accelerator
here): QTSplus in both variants, FlexSelect-Lite (rank loss against the host's reference layer) and VQToken
(VQ-Attention through the LM loss), side by side in one run.

Builds the smoke dataset (tiny models) unless --data is given, then runs `max_steps` steps of each on it and
reports the median step time (first steps excluded), samples per second and peak memory per rank. On a GPU machine
pass e.g. `--paper --base Qwen/Qwen2.5-VL-3B-Instruct --frames 40` (the 3B presets' method settings; weights from
the hub; random-weight runs need a local checkpoint directory built from the config).

    python -m benchmarks.train_step [--steps 20] [--batch 2] [--frames 4] [--paper]
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
    parser.add_argument("--paper", action="store_true", help="the 3B presets' settings instead of the smoke ones")
    args = parser.parse_args()
    runs = [  # (label, preset, variant)
        ("qtsplus selector", "qtsplus-3b" if args.paper else "smoke", "selector"),
        ("qtsplus selector+lm", "qtsplus-3b" if args.paper else "smoke", "selector+lm"),
        ("flexselect_lite", "flexselect-lite-3b" if args.paper else "smoke-flexselect-lite", "selector"),
        ("vqtoken", "vqtoken-3b" if args.paper else "smoke-vqtoken", "selector"),
    ]

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
        for i, (label, preset, variant) in enumerate(runs):
            cfg = TrainConfig.preset(preset, data=data, out=f"{tmp}/run{i}", variant=variant, base_model=args.base,
                                     max_steps=args.steps, micro_batch_size=args.batch, grad_accum=1,
                                     checkpoint_every=10**6)
            cfg = cfg.model_copy(update={"video": dataclasses.replace(cfg.video, max_frames=args.frames)})
            run_training(cfg)
            steps = [m for m in read_metrics(Path(cfg.out)) if "step" in m][2:]
            median = statistics.median(m["seconds"] for m in steps)
            rows.append((label, steps[-1]["trainable_params"], median, args.batch / median,
                         max(m["peak_mem_mib"] for m in steps), statistics.mean(m["tokens_in"] for m in steps)))
    print(f"\ntrain step, base {args.base}, micro batch {args.batch}, up to {args.frames} frames, "
          f"{'cuda' if __import__('torch').cuda.is_available() else 'cpu'}")
    print(f"| {'method':<20} | {'trainable':>12} | {'step s':>8} | {'samples/s':>10} | {'peak MiB':>9} | "
          f"{'vision tokens':>14} |")
    print("|---|---|---|---|---|---|")
    for label, params, median, sps, mem, tokens in rows:
        print(f"| {label:<20} | {params:>12,} | {median:>8.3f} | {sps:>10.2f} | {mem:>9.0f} | {tokens:>14.0f} |")


if __name__ == "__main__":
    main()
