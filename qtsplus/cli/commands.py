"""The CLI's commands, one table row each: the config class a command builds, its own arguments, the flow it runs and
how its result is printed. `qtsplus.cli` turns the table into argparse subcommands and adds what every command has
(`--preset` with the choices of the config's preset table, `--set`, `--show-config`, `--no-progress`).

A new command is a new `Command` in `COMMANDS`; nothing else in the CLI changes.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Arg:
    """A command-line argument that sets the config field `field` (flag `--field-name` unless `flag` is given)."""

    field: str
    help: str
    required: bool = False
    flag: str | None = None
    nargs: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")


@dataclass(frozen=True)
class Command:
    """One subcommand. `config` and `flow` are "module:attribute" paths, imported only when the command runs, so
    `qtsplus --help` stays fast and a command never imports another's dependencies."""

    name: str
    help: str
    config: str  # "module:Class" of a pydantic config with a `preset(name, **fields)` classmethod
    presets: str | None  # "module:TABLE" of its presets (the --preset choices), or None: built from the args alone
    default_preset: str | None
    args: tuple[Arg, ...]
    flow: str  # "module:function" called as flow(config=config, **flow_kwargs)
    printer: Callable[[Any], None]
    progress: bool = False  # the flow takes progress=...; the command gets --no-progress
    examples: tuple[str, ...] = field(default_factory=tuple)

    def load(self, path: str) -> Any:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def preset_names(self) -> list[str]:
        return sorted(self.load(self.presets)) if self.presets else []

    def build_config(self, preset: str | None, fields: dict[str, Any]) -> BaseModel:
        cls = self.load(self.config)
        if self.presets is None:
            return cls(**{k: v for k, v in fields.items() if v is not None})
        return cls.preset(preset or self.default_preset, **fields)


# ---------------------------------------------------------------------------------------------------------------------
# printers: what each command prints when its flow returns


def print_build(summary: Any) -> None:
    print(f"\ndataset: {summary.out}")
    print(f"{'stage':<9} {'read':>7} {'rejected':>9}  rows per split  [tasks]")
    for stage, rows in summary.rows.items():
        states = Counter(summary.states.get(stage, {}).values())
        splits = ", ".join(f"{k}={v}" for k, v in rows.items()) or "-"
        tasks = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        print(f"{stage:<9} {summary.read[stage]:>7} {summary.rejected[stage]:>9}  {splits}  [{tasks}]")
    print(f"card: {summary.out}/README.md")


def print_training(result: Any) -> None:
    print(f"\ncheckpoint: {result.final}\nsteps: {result.steps}, final loss {result.final_loss:.4f}, "
          f"restarts {result.restarts}\ncurves: {result.out}/curves.png")


def print_features(summary: Any) -> None:
    states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(summary.states.values()).items())) or "no chunks"
    print(f"\nfeature store: {summary.out} (set {summary.set_id}, {summary.storage_dtype})\n"
          f"videos: {summary.videos} cached, {len(summary.failed)} failed; {summary.bytes:,} bytes; [{states}]")


def print_evaluation(summary: Any) -> None:
    print(f"\n{'method':<16} {'accuracy':>9} {'tokens kept':>12} {'TokDense':>10}")
    for m in summary.methods:
        acc, kept, dense = summary.accuracy.get(m), summary.tokens_kept.get(m), summary.tokdense.get(m)
        if acc is not None:
            print(f"{m:<16} {acc:>9.3f} {kept:>12.1f} {dense:>10.4f}")
    print(f"report: {summary.out}/report.md")


def print_needle(summary: Any) -> None:
    states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(summary.states.values()).items()))
    print(f"\nneedle dataset: {summary.out} ({summary.tokens_per_video} visual tokens per video)\n"
          f"videos: {summary.videos}; questions: {summary.rows['vscq2']}; [{states}]\ncard: {summary.out}/README.md")


def print_retrain(outcome: dict) -> None:
    print(f"\nversion: {outcome['version']}  promoted: {outcome['promoted']}  current: {outcome['current']}\n"
          f"{outcome['decision']}")


# ---------------------------------------------------------------------------------------------------------------------
# the table

COMMANDS: tuple[Command, ...] = (
    Command(
        name="build-dataset", help="captions -> VSCQ1 -> VSCQ2 -> QTS-VQA Parquet shards",
        config="qtsplus.build_config:BuildConfig", presets="qtsplus.build_config:PRESETS", default_preset="smoke",
        args=(Arg("out", "dataset folder", required=True),
              Arg("input", "caption file (JSONL or Parquet); default: the preset's"),
              Arg("video_root", "folder the video paths are relative to; default: the preset's")),
        flow="flows.build_dataset:build_dataset", printer=print_build, progress=True,
        examples=("qtsplus build-dataset --out runs/smoke --preset smoke",
                  "qtsplus build-dataset --out D --preset single-gpu --input captions.jsonl --video-root videos/ "
                  "--set teacher.video.fps=0.5"),
    ),
    Command(
        name="cache-features", help="run the frozen vision tower once per video and store its output",
        config="qtsplus.features.config:FeatureConfig", presets="qtsplus.features.config:FEATURE_PRESETS",
        default_preset="smoke",
        args=(Arg("data", "dataset folder written by build-dataset", required=True),
              Arg("out", "feature store folder (default: DATA/features, which train-selector reads)")),
        flow="flows.cache_features:cache_features", printer=print_features, progress=True,
        examples=("qtsplus cache-features --data runs/smoke --preset smoke",),
    ),
    Command(
        name="train-selector", help="DeepSpeed training of QTSplus (or FlexSelect-Lite, VQToken) on a built dataset",
        config="qtsplus.training.config:TrainConfig", presets="qtsplus.training.config:TRAIN_PRESETS",
        default_preset="smoke",
        args=(Arg("data", "dataset folder written by build-dataset", required=True),
              Arg("out", "run folder (checkpoints, final/, metrics.jsonl, curves.png)", required=True),
              Arg("variant", "what trains; default: the preset's", choices=("selector", "selector+lm", "base"))),
        flow="flows.train_selector:train_selector", printer=print_training,
        examples=("qtsplus train-selector --data runs/smoke --out runs/smoke-train --preset smoke",
                  "qtsplus train-selector --data D --out R --preset qtsplus-3b --set max_steps=100"),
    ),
    Command(
        name="evaluate", help="accuracy, tokens and latency against the teacher and other selectors",
        config="qtsplus.evaluation.config:EvalConfig", presets="qtsplus.evaluation.config:EVAL_PRESETS",
        default_preset="smoke",
        args=(Arg("data", "dataset folder (held-out VSCQ2 / QTS-VQA splits)", required=True),
              Arg("checkpoint", "QTSplus checkpoint (train-selector's final/)", required=True),
              Arg("out", "report folder", required=True),
              Arg("methods", "methods to compare (names of qtsplus.selectors, teacher, no_selection); default: "
                  "the preset's", nargs="+")),
        flow="flows.evaluate:evaluate", printer=print_evaluation,
        examples=("qtsplus evaluate --data runs/smoke --checkpoint runs/smoke-train/final --out runs/smoke-eval "
                  "--preset smoke",),
    ),
    Command(
        name="retrain", help="new captions in the inbox -> dataset -> train -> evaluate -> promote",
        config="qtsplus.retrain:RetrainConfig", presets=None, default_preset=None,
        args=(Arg("inbox", "watched folder of *.jsonl caption files", required=True),
              Arg("registry", "model registry folder", required=True),
              Arg("work", "working folder (combined captions, dataset, runs, evaluations)", required=True),
              Arg("video_root", "root of the video paths in the captions", required=True)),
        flow="flows.retrain:retrain", printer=print_retrain,
        examples=("qtsplus retrain --inbox runs/inbox --registry runs/registry --work runs/work "
                  "--video-root examples/videos --set promotion.min_delta=0.01",),
    ),
    Command(
        name="build-needle", help="the needle-in-a-video-haystack dataset: videos and questions with known answers",
        config="qtsplus.needle.config:NeedleConfig", presets="qtsplus.needle.config:NEEDLE_PRESETS",
        default_preset="needle",
        args=(Arg("out", "dataset folder", required=True),
              Arg("seed", "data seed (default: the preset's)")),
        flow="flows.needle:build_needle", printer=print_needle, progress=True,
        examples=("qtsplus build-needle --out runs/needle/data --preset needle",
                  "qtsplus build-needle --out runs/needle-ci --preset needle-ci --set seed=1"),
    ),
)
