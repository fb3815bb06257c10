"""Configuration of an evaluate run (paper Sec. 4.3-4.5, Fig. 4)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from qtsplus.presets import config_from_preset
from qtsplus.video import SamplingConfig

# Methods with a meaning of their own; every other name is looked up in qtsplus.selectors.SELECTORS.
TEACHER = "teacher"  # the base model the checkpoint was trained from, no selection
NO_SELECTION = "no_selection"  # the checkpoint with its selector switched off (equals the teacher for `selector`)
QTSPLUS = "qtsplus"  # the checkpoint's own selector and its own (adaptive) budget
QTSPLUS_NO_TIME = "qtsplus_no_time"  # ablation: the checkpoint's QTSplus with its time embedding zeroed (at `budgets`)


class EvalConfig(BaseModel):
    """Everything an evaluate run depends on."""

    data: str = Field(description="dataset folder written by build-dataset (held-out VSCQ2 and QTS-VQA splits)")
    checkpoint: str = Field(description="a QTSplus checkpoint folder (train-selector's final/)")
    out: str = Field(description="report folder: predictions.parquet, metrics.json, report.md, *.png")
    video_root: str | None = Field(None, description="default: the dataset's recorded video root")
    video: SamplingConfig | None = Field(None, description="default: the teacher's sampling of stage VSCQ2")
    features: str | None = Field(
        "auto", description="vision features cached by `qtsplus cache-features` for the MCQ forward of the "
        "checkpoint's methods (docs/feature_cache.md): 'auto' = <data>/features, a store folder, or null / 'off'. "
        "Only a set stored losslessly for exactly this vision tower and dtype is used, so reports do not change")
    methods: list[str] = [TEACHER, QTSPLUS, "uniform_frames", "random_tokens"]
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-method config overrides")
    budget: float | int = Field(0.25, description="budget of comparators when qtsplus is not evaluated (ratio or count)")
    budgets: list[float | int] = Field(default_factory=list, description="fixed budgets (ratios of M or token counts): "
                                       "when set, every selecting method, the checkpoint's own selector included, "
                                       "runs once per budget, reported as 'method@budget' (e.g. uniform_frames@10%)")
    mcq_split: str = "eval_kept"
    vqa_split: str = "eval"
    max_mcq: int | None = None
    max_vqa: int | None = 50
    vqa_max_new_tokens: int = 64
    latency_frames: list[int] = Field(default_factory=list, description="frame counts of the Fig. 4 sweep")
    latency_max_new_tokens: int = 32
    teacher_model: str | None = Field(None, description="default: the base model in the checkpoint's training record")
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    @classmethod
    def preset(cls, name: str, **fields: Any) -> EvalConfig:
        return config_from_preset(cls, EVAL_PRESETS, name, fields)


EVAL_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"methods": [TEACHER, NO_SELECTION, QTSPLUS, "uniform_frames", "random_tokens"], "max_vqa": 6,
              "vqa_max_new_tokens": 8, "latency_frames": [2, 4, 8, 16], "latency_max_new_tokens": 4},
    "paper": {"methods": [TEACHER, QTSPLUS, "uniform_frames", "random_tokens", "flexselect", "vqtoken", "evs",
                          "vidcom2"],
              "max_vqa": 500, "latency_frames": [50, 100, 200, 300, 400, 500, 600]},
    # the needle task (docs/needle.md): MCQ accuracy and needle recall of every method at fixed budgets
    "needle": {"methods": [TEACHER, QTSPLUS, QTSPLUS_NO_TIME, "uniform_frames", "random_tokens", "flexselect",
                           "flexselect_lite", "vqtoken", "evs", "vidcom2"],
               "budgets": [0.05, 0.1, 0.25, 0.5], "max_vqa": 0},
}
