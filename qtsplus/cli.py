"""Command line: `qtsplus build-dataset | cache-features | train-selector | evaluate | retrain` (see --help).

Runs the Prefect flow in this process. With no Prefect server configured (PREFECT_API_URL unset), Prefect runs
against a temporary local API on SQLite (under PREFECT_HOME), so nothing needs to be started first.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

# Prefect reads its settings at import: keep the embedded server quiet and offline unless told otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# With no server configured, Prefect starts a temporary one and gives up after 20 s, which a busy machine exceeds:
# wait longer (a real server, PREFECT_API_URL, needs no start at all).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtsplus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-dataset", help="captions -> VSCQ1 -> VSCQ2 -> QTS-VQA Parquet shards")
    b.add_argument("--out", required=True, help="dataset folder")
    b.add_argument("--preset", default="smoke", help="smoke | single-gpu | paper-3b | paper-7b (default: smoke)")
    b.add_argument("--input", help="caption file (JSONL or Parquet); default: the preset's")
    b.add_argument("--video-root", help="folder the video paths are relative to; default: the preset's")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting by dotted key, e.g. --set teacher.video.fps=0.5 (repeatable)")
    b.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = sub.add_parser("train-selector", help="DeepSpeed training of QTSplus (or FlexSelect-Lite, VQToken) on a "
                       "built dataset")
    t.add_argument("--data", required=True, help="dataset folder written by build-dataset")
    t.add_argument("--out", required=True, help="run folder (checkpoints, final/, metrics.jsonl, curves.png)")
    t.add_argument("--preset", default="smoke", help="smoke | qtsplus-3b | qtsplus-3b-ft; other methods: "
                   "smoke-flexselect-lite | smoke-vqtoken | flexselect-lite-3b | vqtoken-3b (default: smoke)")
    t.add_argument("--variant", choices=["selector", "selector+lm"], help="default: the preset's")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting by dotted key, e.g. --set max_steps=100 (repeatable)")
    t.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")

    c = sub.add_parser("cache-features", help="run the frozen vision tower once per video and store its output")
    c.add_argument("--data", required=True, help="dataset folder written by build-dataset")
    c.add_argument("--out", help="feature store folder (default: DATA/features, which train-selector reads)")
    c.add_argument("--preset", default="smoke", help="smoke | qtsplus-3b (default: smoke)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting by dotted key, e.g. --set storage_dtype=fp32 (repeatable)")
    c.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="accuracy, tokens and latency against the teacher and other selectors")
    e.add_argument("--data", required=True, help="dataset folder (held-out VSCQ2 / QTS-VQA splits)")
    e.add_argument("--checkpoint", required=True, help="QTSplus checkpoint (train-selector's final/)")
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--preset", default="smoke", help="smoke | paper (default: smoke)")
    e.add_argument("--methods", nargs="+", help="teacher no_selection qtsplus uniform_frames random_tokens evs vidcom2 ...")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting by dotted key, e.g. --set max_vqa=20 (repeatable)")
    e.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")

    r = sub.add_parser("retrain", help="new captions in the inbox -> dataset -> train -> evaluate -> promote")
    r.add_argument("--inbox", required=True, help="watched folder of *.jsonl caption files")
    r.add_argument("--registry", required=True, help="model registry folder")
    r.add_argument("--work", required=True, help="working folder (combined captions, dataset, runs, evaluations)")
    r.add_argument("--video-root", required=True, help="root of the video paths in the captions")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a retrain setting, e.g. --set promotion.min_delta=0.01 or "
                        "--set 'train_overrides=[\"max_steps=100\"]' (repeatable)")
    return parser


def _print_summary(summary: object) -> None:
    print(f"\ndataset: {summary.out}")  # type: ignore[attr-defined]
    print(f"{'stage':<9} {'read':>7} {'rejected':>9}  rows per split  [tasks]")
    for stage, rows in summary.rows.items():  # type: ignore[attr-defined]
        states = Counter(summary.states.get(stage, {}).values())  # type: ignore[attr-defined]
        splits = ", ".join(f"{k}={v}" for k, v in rows.items()) or "-"
        tasks = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        print(f"{stage:<9} {summary.read[stage]:>7} {summary.rejected[stage]:>9}  {splits}  [{tasks}]")  # type: ignore[attr-defined]
    print(f"card: {summary.out}/README.md")  # type: ignore[attr-defined]


def build_dataset_main(args: argparse.Namespace) -> int:
    from qtsplus.build_config import BuildConfig
    from qtsplus.presets import apply_overrides

    config = BuildConfig.preset(args.preset, out=args.out, input=args.input, video_root=args.video_root)
    config = apply_overrides(config, args.overrides)
    if args.show_config:
        print(config.model_dump_json(indent=2))
        return 0
    if args.no_progress:
        os.environ["QTSPLUS_NO_PROGRESS"] = "1"
    from flows.build_dataset import build_dataset

    summary = build_dataset(config=config, progress=not args.no_progress)
    _print_summary(summary)
    return 0


def train_selector_main(args: argparse.Namespace) -> int:
    from qtsplus.presets import apply_overrides
    from qtsplus.training.config import TrainConfig

    config = TrainConfig.preset(args.preset, data=args.data, out=args.out, variant=args.variant)
    config = apply_overrides(config, args.overrides)
    if args.show_config:
        print(config.model_dump_json(indent=2))
        return 0
    from flows.train_selector import train_selector

    result = train_selector(config=config)
    print(f"\ncheckpoint: {result.final}\nsteps: {result.steps}, final loss {result.final_loss:.4f}, "
          f"restarts {result.restarts}\ncurves: {result.out}/curves.png")
    return 0


def cache_features_main(args: argparse.Namespace) -> int:
    from qtsplus.features.config import FeatureConfig
    from qtsplus.presets import apply_overrides

    config = FeatureConfig.preset(args.preset, data=args.data, out=args.out)
    config = apply_overrides(config, args.overrides)
    if args.show_config:
        print(config.model_dump_json(indent=2))
        return 0
    if args.no_progress:
        os.environ["QTSPLUS_NO_PROGRESS"] = "1"
    from flows.cache_features import cache_features

    summary = cache_features(config=config, progress=not args.no_progress)
    states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(summary.states.values()).items())) or "no chunks"
    print(f"\nfeature store: {summary.out} (set {summary.set_id}, {summary.storage_dtype})\n"
          f"videos: {summary.videos} cached, {len(summary.failed)} failed; {summary.bytes:,} bytes; [{states}]")
    return 0


def evaluate_main(args: argparse.Namespace) -> int:
    from qtsplus.evaluation.config import EvalConfig
    from qtsplus.presets import apply_overrides

    config = EvalConfig.preset(args.preset, data=args.data, checkpoint=args.checkpoint, out=args.out,
                               methods=args.methods)
    config = apply_overrides(config, args.overrides)
    if args.show_config:
        print(config.model_dump_json(indent=2))
        return 0
    from flows.evaluate import evaluate

    summary = evaluate(config=config)
    print(f"\n{'method':<16} {'accuracy':>9} {'tokens kept':>12} {'TokDense':>10}")
    for m in summary.methods:
        acc, kept, dense = summary.accuracy.get(m), summary.tokens_kept.get(m), summary.tokdense.get(m)
        if acc is not None:
            print(f"{m:<16} {acc:>9.3f} {kept:>12.1f} {dense:>10.4f}")
    print(f"report: {summary.out}/report.md")
    return 0


def retrain_main(args: argparse.Namespace) -> int:
    from qtsplus.presets import apply_overrides
    from qtsplus.retrain import RetrainConfig

    config = apply_overrides(RetrainConfig(inbox=args.inbox, registry=args.registry, work=args.work,
                                           video_root=args.video_root), args.overrides)
    from flows.retrain import retrain

    outcome = retrain(config=config)
    print(f"\nversion: {outcome['version']}  promoted: {outcome['promoted']}  current: {outcome['current']}\n"
          f"{outcome['decision']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "build-dataset":
        return build_dataset_main(args)
    if args.command == "train-selector":
        return train_selector_main(args)
    if args.command == "evaluate":
        return evaluate_main(args)
    if args.command == "cache-features":
        return cache_features_main(args)
    if args.command == "retrain":
        return retrain_main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
