"""Visual-token selectors behind one contract (see `base.py` and docs/selectors.md).

    from qtsplus.selectors import SELECTORS, SelectorInput, build_selector
    inputs = SelectorInput.from_qwen(model, input_ids, attention_mask, pixel_values_videos, video_grid_thw, spg)
    for name in SELECTORS:
        out = build_selector(name, model.config.text_config)(inputs, budget=0.1)   # or budget=512 tokens

Importing this package imports every method module, so `SELECTORS` is complete.
"""

from qtsplus.selectors.base import (
    SELECTORS,
    Budget,
    HostLM,
    Selection,
    Selector,
    SelectorInput,
    build_selector,
    grid_positions,
    register,
)
from qtsplus.selectors.baselines import KeepAll, RandomTokens, UniformFrames
from qtsplus.selectors.evs import EVS, EVSConfig
from qtsplus.selectors.flexselect import (
    FlexSelect,
    FlexSelectConfig,
    FlexSelectLite,
    FlexSelectLiteConfig,
    frame_sets,
    lite_train_step,
    spearman,
    spearman_loss,
)
from qtsplus.selectors.qtsplus.adapter import QTSplusAdapter, QTSplusAdapterConfig
from qtsplus.selectors.vidcom2 import VidCom2, VidCom2Config, frame_budgets
from qtsplus.selectors.vqtoken import VQToken, VQTokenConfig, cosine_kmeans, elbow

__all__ = [
    "SELECTORS",
    "Budget",
    "EVS",
    "EVSConfig",
    "FlexSelect",
    "FlexSelectConfig",
    "FlexSelectLite",
    "FlexSelectLiteConfig",
    "HostLM",
    "KeepAll",
    "QTSplusAdapter",
    "QTSplusAdapterConfig",
    "RandomTokens",
    "Selection",
    "Selector",
    "SelectorInput",
    "UniformFrames",
    "VidCom2",
    "VidCom2Config",
    "VQToken",
    "VQTokenConfig",
    "build_selector",
    "cosine_kmeans",
    "elbow",
    "frame_budgets",
    "frame_sets",
    "grid_positions",
    "lite_train_step",
    "register",
    "spearman",
    "spearman_loss",
]
