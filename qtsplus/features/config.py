"""Configuration of a cache-features run: which dataset, which vision tower, which frame sampling, which storage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from qtsplus.presets import config_from_preset
from qtsplus.replicas import ReplicaConfig
from qtsplus.video import SamplingConfig

StorageDtype = Literal["fp32", "bf16", "fp16", "fp8"]
ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]

# bytes per stored element (fp8 adds one fp32 scale per token, see qtsplus.features.cache.encode_features)
STORAGE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FEATURES_DIR = "features"  # default store: <dataset>/features (what train-selector's features="auto" reads)


class FeatureConfig(BaseModel):
    """Everything a cache-features run depends on."""

    data: str = Field(description="dataset folder written by build-dataset")
    out: str | None = Field(None, description="feature store folder; default DATA/features")
    video_root: str | None = Field(None, description="default: the video root recorded in the dataset's manifest")
    model_id: str = Field("tiny/qwen2.5-vl", description="Qwen2.5-VL (or QTSplus) checkpoint whose vision tower runs")
    revision: str | None = None
    video: SamplingConfig = Field(SamplingConfig(fps=1.0, max_frames=40, max_pixels=360 * 420),
                                  description="frame sampling; must equal train-selector's `video` to be used there")
    storage_dtype: StorageDtype = Field("bf16", description="fp32 | bf16 | fp16 | fp8 (e4m3 with a per-token scale)")
    compute_dtype: ComputeDtype = Field("auto", description="dtype the vision tower runs in; auto: bf16 on a GPU "
                                                            "(as DeepSpeed trains), fp32 on the CPU")
    device: str = "auto"
    splits: dict[str, list[str]] = Field(
        default_factory=lambda: {"vscq2": ["train_kept", "eval_kept"], "vqa": ["train", "eval"]},
        description="the dataset shards whose videos are cached (what train-selector and evaluate read)")
    replicas: ReplicaConfig = Field(ReplicaConfig(), description="vision-tower replicas (stage `features`) and where "
                                                                  "they run; speed only, in no cache key")

    @classmethod
    def preset(cls, name: str, **fields: Any) -> FeatureConfig:
        return config_from_preset(cls, FEATURE_PRESETS, name, fields)


FEATURE_PRESETS: dict[str, dict[str, Any]] = {
    # The smoke training preset's model and sampling (qtsplus.training.config.TRAIN_PRESETS["smoke"]).
    "smoke": {
        "model_id": "tiny/qwen2.5-vl",
        "video": {"fps": 1.0, "min_frames": 2, "max_frames": 4, "min_pixels": 56 * 56, "max_pixels": 112 * 112},
    },
    # QTSplus-3B / -3B-FT training (paper Sec. 4.2): Qwen2.5-VL-3B's vision tower, 1 fps, up to 40 frames.
    "qtsplus-3b": {
        "model_id": "Qwen/Qwen2.5-VL-3B-Instruct",
        "video": {"fps": 1.0, "max_frames": 40, "max_pixels": 360 * 420},
    },
}
