"""Vision feature cache: the frozen vision tower's output per video, computed once and reused (docs/feature_cache.md).

`qtsplus.features.cache` writes a store (Prefect flow `cache-features`), `qtsplus.features.store` reads it.
"""

from qtsplus.features.config import FEATURE_PRESETS, FeatureConfig
from qtsplus.features.store import (
           FeatureSet,
           FeatureSpec,
           FeatureStore,
           VideoFeatures,
           video_sha256,
           vision_fingerprint,
)

__all__ = ["FEATURE_PRESETS", "FeatureConfig", "FeatureSet", "FeatureSpec", "FeatureStore", "VideoFeatures",
           "video_sha256", "vision_fingerprint"]
