"""Feature-cache lookups per second as training makes them: every video of a set, in a new random order each epoch.

    python -m benchmarks.feature_reads                          # builds the needle-ci data and its features (~30 s)
    python -m benchmarks.feature_reads --data runs/needle/data  # a dataset whose features are cached (fp32)

Three readers of the same `FeatureSet`, measured alternately epoch by epoch (so load from other processes hits them
alike), each lookup verified against the manifest as in training:
- reopen: every lookup opens its shard, reads its row group and checks it (`open_files=0, memo_bytes=0`; before);
- open shards: shards stay open (`open_files=8`), every lookup still reads and checks its row;
- open + memo: also the verified features of up to `memo_bytes` (256 MiB), so a video is read once per process and
  later lookups copy it (the `FeatureSet` default).
Prints lookups per second per reader and the ratio to `reopen`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

READERS = {"reopen": (0, 0), "open shards": (8, 0), "open + memo": (8, 256 * 2**20)}


def build(tmp: Path) -> Path:
    """The needle-ci dataset and its fp32 features with the (untaught) tiny needle host, in process."""
    from qtsplus.features.cache import build_feature_set
    from qtsplus.features.config import FeatureConfig
    from qtsplus.needle import NeedleConfig, build_needle

    cfg = NeedleConfig.preset("needle-ci", out=str(tmp / "data"))
    build_needle(cfg)
    build_feature_set(FeatureConfig(data=cfg.out, model_id="tiny/qwen2.5-vl-needle", video=cfg.sampling(),
                                    storage_dtype="fp32", compute_dtype="fp32", device="cpu"))
    return Path(cfg.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="a dataset with cached features (default: build one)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per reader")
    args = parser.parse_args()

    from qtsplus.features.store import FeatureSet, FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or build(Path(tmp))
        sets = FeatureStore(data / "features").sets()
        if not sets:
            raise SystemExit(f"{data}/features holds no feature set (run `qtsplus cache-features --data {data}`)")
        found = max(sets, key=lambda s: len(s.manifest.videos))
        shas = list(found.manifest.videos)
        shards = len({e.shard for e in found.manifest.videos.values()})
        readers = {name: FeatureSet(found.folder, found.manifest, open_files=o, memo_bytes=m)
                   for name, (o, m) in READERS.items()}
        seconds: dict[str, list[float]] = {name: [] for name in readers}
        order = random.Random(0)
        for epoch in range(args.epochs + 1):  # epoch 0 is untimed: page cache, imports
            order.shuffle(shas)
            for name, reader in readers.items():
                start = time.perf_counter()
                for sha in shas:
                    if reader.get_by_sha(sha) is None:
                        raise SystemExit(f"{found.folder}: video {sha} did not verify")
                if epoch:
                    seconds[name].append(time.perf_counter() - start)

    print(f"\nfeature lookups: {len(shas)} videos in {shards} shards ({found.folder.name}, "
          f"{found.spec.storage_dtype}), {args.epochs} epochs per reader, median epoch")
    print(f"{'reader':<12} {'lookups/s':>10} {'ms/lookup':>10} {'vs reopen':>10}")
    rate = {name: len(shas) / statistics.median(s) for name, s in seconds.items()}
    for name in readers:
        print(f"{name:<12} {rate[name]:>10.0f} {1e3 / rate[name]:>10.3f} {rate[name] / rate['reopen']:>9.1f}x")


if __name__ == "__main__":
    main()
