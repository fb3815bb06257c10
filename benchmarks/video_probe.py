"""What ingest's video probe costs per video, for each `check` level (`IngestConfig.video_check`), on the shipped
examples (or the videos / frames folders given): median wall time of `probe_video`, and a full teacher-style decode
(`load_video` of every frame) for scale. Ingest probes each distinct video once per process.

    python -m benchmarks.video_probe [--repeats 20] [PATH ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from qtsplus.video import SamplingConfig, list_frame_files, load_video, probe_video

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "videos"
SHIPPED = ["carphone_frames", "carphone.mp4", "bikes.mp4", "bigbuckbunny.mp4", "bigbuckbunny.webm"]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (file cache, decoder libraries)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def row(path: Path, repeats: int) -> str:
    n = probe_video(path).num_frames
    every = SamplingConfig(fps=1000.0, min_frames=2, max_frames=max(2, n + n % 2), max_pixels=10**8)
    cost = {check: median_ms(lambda c=check: probe_video(path, check=c), repeats) for check in ("open", "scan", "decode")}
    load = median_ms(lambda: load_video(path, every), max(3, repeats // 4))
    frames = len(list_frame_files(path)) if path.is_dir() else n
    return (f"{path.name:<22} {frames:>6} {cost['open']:>8.2f} {cost['scan']:>8.2f} {cost['decode']:>8.2f} "
            f"{cost['scan'] / frames:>11.3f} {load:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[EXAMPLES / name for name in SHIPPED])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"probe_video per video, median of {args.repeats}, ms ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"{'video':<22} {'frames':>6} {'open':>8} {'scan':>8} {'decode':>8} {'scan/frame':>11} {'load all':>9}")
    for path in args.paths:
        print(row(path, args.repeats))


if __name__ == "__main__":
    main()
