"""Configuration of a train-selector run: one typed model, with presets (paper Sec. 3.3, 4.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from qtsplus.paths import REPO_ROOT
from qtsplus.presets import config_from_preset
from qtsplus.video import SamplingConfig

Variant = Literal["selector", "selector+lm", "base"]  # base: the host itself learns a task, selection off (docs/needle.md)
TRAINABLE_METHODS = ("flexselect_lite", "vqtoken")  # besides qtsplus: the selectors of qtsplus.selectors with weights


class LoraSettings(BaseModel):
    """Optional LoRA adapters on the LM's attention and MLP projections (needs `pip install -e .[lora]`)."""

    r: int = Field(16, ge=1)
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LauncherSettings(BaseModel):
    """How the deepspeed launcher starts the ranks (one node by default)."""

    num_gpus: int | None = Field(None, description="ranks on this node; None = all visible accelerators (1 on CPU)")
    num_nodes: int = 1
    hostfile: str | None = None
    master_port: int | None = Field(None, description="None = a free port")
    max_restarts: int = Field(2, ge=0, description="relaunches after a crash; each resumes from the newest checkpoint")


class TrainConfig(BaseModel):
    """Everything a train-selector run depends on."""

    data: str = Field(description="dataset folder written by build-dataset")
    out: str = Field(description="run folder: checkpoints/, final/, metrics.jsonl, curves.png")
    video_root: str | None = Field(None, description="default: the video root recorded in the dataset's manifest")
    base_model: str = Field("tiny/qwen2.5-vl", description="Qwen2.5-VL checkpoint (hub id, path or tiny/...)")
    base_revision: str | None = None
    method: str = Field("qtsplus", description="what trains between the vision tower and the LM: 'qtsplus', or "
                        "a trainable method of qtsplus.selectors ('flexselect_lite', 'vqtoken'), which then becomes "
                        "the checkpoint's selector (docs/selectors.md, Training)")
    method_options: dict[str, Any] = Field(default_factory=dict, description="config overrides of a non-QTSplus "
                                           "method (e.g. reference_layer, mode, k_max); QTSplus uses `selector`")
    method_budget: float | int = Field(0.25, description="a non-QTSplus method's budget in training and as the "
                                       "checkpoint's default: tokens (int) or a ratio of M (float)")
    variant: Variant = Field("selector", description="selector: the selector trains (QTSplus-3B); selector+lm: "
                             "and the LM (QTSplus-3B-FT); base: the LM (and the vision tower, `train_vision`) trains "
                             "with selection off, and final/ is a plain Qwen2.5-VL to host a later run")
    train_vision: bool = Field(True, description="variant base: the vision tower trains too (False: frozen, so "
                               "cached features can stand in for it)")
    lora: LoraSettings | None = None
    selector: dict[str, Any] = Field(default_factory=dict, description="SelectorConfig overrides (rho_min, tau_s, ...)")
    video: SamplingConfig = SamplingConfig(fps=1.0, max_frames=40, max_pixels=360 * 420)
    features: str | None = Field(
        "auto", description="vision features cached by `qtsplus cache-features` (docs/feature_cache.md): 'auto' = "
        "<data>/features when it holds a set for this sampling and vision tower, a store folder, or null / 'off' = "
        "always run the vision tower. Videos without verified cached features are decoded as usual; the training "
        "is the same either way (up to the storage dtype's rounding), and what is cached never enters the run's key")

    mcq_weight: int = Field(1, ge=0, description="MCQ examples (VSCQ2 kept) per round of the mix")
    vqa_weight: int = Field(1, ge=0, description="VQA examples (QTS-VQA) per round of the mix")
    shuffle_buffer: int = Field(256, ge=1, description="examples held for the streaming shuffle")
    overfit_batches: int = Field(0, ge=0, description="> 0: cycle over the first N batches (debugging, tests)")

    max_steps: int = Field(1000, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)

    deepspeed_config: str = "infra/deepspeed/zero1.json"
    launcher: LauncherSettings = LauncherSettings()

    @model_validator(mode="after")
    def _check_method(self) -> TrainConfig:
        """Fail before any launch on a method that cannot train as asked."""
        from qtsplus.selectors import SELECTORS

        if self.method != "qtsplus":
            if self.method not in SELECTORS:
                raise ValueError(f"unknown method {self.method!r}; trainable: qtsplus, {', '.join(TRAINABLE_METHODS)}")
            if self.method not in TRAINABLE_METHODS:
                raise ValueError(f"{self.method} has nothing to train; evaluate it by name (trainable: qtsplus, "
                                 f"{', '.join(TRAINABLE_METHODS)})")
            if self.selector:
                raise ValueError("`selector` configures QTSplus; give a method's options in `method_options` (presets "
                                 "for other methods: smoke-flexselect-lite, smoke-vqtoken, flexselect-lite-3b, "
                                 "vqtoken-3b)")
            if not SELECTORS[self.method].lm_objective and self.variant != "selector":
                raise ValueError(f"{self.method} learns from its own loss only, the LM gets no gradient: use variant "
                                 "'selector'")
        elif self.method_options:
            raise ValueError("`method_options` configures a non-QTSplus method; QTSplus takes `selector`")
        if self.variant == "base" and (self.method != "qtsplus" or self.lora is not None):
            raise ValueError("variant 'base' trains the host model itself (no selector, no LoRA)")
        if isinstance(self.method_budget, float) and not 0.0 < self.method_budget <= 1.0:
            raise ValueError(f"method_budget {self.method_budget}: a ratio must be in (0, 1]")
        if isinstance(self.method_budget, int) and self.method_budget < 1:
            raise ValueError(f"method_budget {self.method_budget}: a token count must be >= 1")
        return self

    @classmethod
    def preset(cls, name: str, **fields: Any) -> TrainConfig:
        return config_from_preset(cls, TRAIN_PRESETS, name, fields)

    def deepspeed_config_path(self) -> Path:
        path = Path(self.deepspeed_config)
        return path if path.is_absolute() else REPO_ROOT / path


# what the presets of one scale share (each preset is deep-copied when used, so sharing these dicts is safe)
_TINY = "tiny/qwen2.5-vl"
_SMOKE_VIDEO = {"fps": 1.0, "min_frames": 2, "max_frames": 4, "min_pixels": 56 * 56, "max_pixels": 112 * 112}
_SMOKE_RUN = {"max_steps": 8, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "checkpoint_every": 2,
              "shuffle_buffer": 16}
_QWEN_3B = "Qwen/Qwen2.5-VL-3B-Instruct"
_RUN_3B = {"max_steps": 20000, "micro_batch_size": 1, "grad_accum": 8, "warmup_steps": 500, "checkpoint_every": 500}
_QTSPLUS_3B_SELECTOR = {"rho_min": 0.05, "rho_max": 0.5, "tau_s": 0.5, "n_max": 2560,
                        "lambda_t": 0.1, "lambda_m": 0.17, "lambda_s": 0.05}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Tiny random-weight model on the smoke dataset: mechanics only.
    "smoke": {"base_model": _TINY, "selector": {"n_max": 64, "rho_min": 0.2, "rho_max": 0.8},
              "video": _SMOKE_VIDEO, **_SMOKE_RUN},
    # The other trainable methods on the same tiny model (reference layer 1 of 2; K up to the budget).
    "smoke-flexselect-lite": {
        "base_model": _TINY, "method": "flexselect_lite", "method_budget": 0.25,
        "method_options": {"ranker_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                           "intermediate_size": 64, "frames_per_set": 2},
        "video": {**_SMOKE_VIDEO, "max_frames": 8}, **_SMOKE_RUN,
    },
    "smoke-vqtoken": {
        "base_model": _TINY, "method": "vqtoken", "method_budget": 8,
        "method_options": {"map_grid": [2, 2, 2], "map_hidden": 32, "kmeans_restarts": 1},
        "video": _SMOKE_VIDEO, **_SMOKE_RUN,
    },
    # QTSplus-3B (selector only) and -3B-FT (selector + LM), paper Sec. 4.2 and the public training script.
    "qtsplus-3b": {"base_model": _QWEN_3B, "variant": "selector", "selector": _QTSPLUS_3B_SELECTOR, **_RUN_3B,
                   "lr": 1e-4},
    "qtsplus-3b-ft": {"base_model": _QWEN_3B, "variant": "selector+lm", "selector": _QTSPLUS_3B_SELECTOR, **_RUN_3B,
                      "lr": 1e-5, "deepspeed_config": "infra/deepspeed/zero2.json"},
    # FlexSelect-Lite on the 3B host: the ranker imitates the reference layer's ranking (paper: blocks from
    # Qwen2-0.5B-Instruct, lr 1e-5, cosine, 64 frames per set = 32 Qwen2.5-VL time steps, 1-3 epochs); the reference
    # layer is the host's default (choose it with benchmarks.flexselect_layers).
    "flexselect-lite-3b": {
        "base_model": _QWEN_3B, "method": "flexselect_lite", "variant": "selector",
        "method_options": {"frames_per_set": 32, "ranker_init": "Qwen/Qwen2-0.5B-Instruct"}, "method_budget": 0.0625,
        "video": {"fps": 1.0, "max_frames": 64, "max_pixels": 360 * 420}, **_RUN_3B, "lr": 1e-5,
    },
    # VQToken on the 3B host: VQ-Attention learns through the LM loss with the LM frozen, adaptive K (12..32).
    "vqtoken-3b": {
        "base_model": _QWEN_3B, "method": "vqtoken", "variant": "selector",
        "method_options": {"mode": "adaptive", "k_min": 12, "k_max": 32}, "method_budget": 32, **_RUN_3B, "lr": 1e-4,
    },
}
# The needle task (docs/needle.md, benchmarks/needle.py): the host (its vision tower taught by the needle-host flow,
# then frozen, so cached features feed it) learns the task with every visual token, on small scenes first
# (`warmup-base`, from the taught host) and then on the full ones (`base`, from the warm-up's final/); QTSplus learns
# on top of it (the base run's final/ as base_model). `needle-ci-*`: the CI-sized run (tests/test_needle.py, seed 0).
# The full warm-up learns at lr 5e-4: at 1e-3 its loss fell after 600 steps on data seed 0 but stalled at 0.1-0.3 on
# seed 1 (2,000 or 3,000 steps; the host then answered 0.754 held-out, red, white and yellow at chance); at 5e-4
# seed 1 reaches 0.01-0.03 by step 1,800 and both seeds' hosts answer 0.88 (seed 0's 1.000 at 1e-3).
# The full-scene host run takes 1,000 steps: after 400 its loss was still 0.1-0.2 and the hosts answered 0.878 / 0.880
# held-out (seeds 0 / 1), after 1,000 1.000 / 0.936. QTSplus takes 600 steps: after 300 it was 5.6 / 8.4 points below
# that host at 10% of the tokens (LM frozen), after 600 4.0 / 5.0. What is left is a few colours per seed whose
# objects it keeps less often (seed 1's blue: recall 0.39); a softer training gate (tau_s 1.5) finds those but loses
# others (seed 0 at 600 steps: 0.900), so tau_s stays 0.5 (docs/needle.md). The CI warm-up keeps 1,600 steps:
# at 1,100 the CI host answered 0.656 and QTSplus cleared uniform frames by 21 points (900 warm-up and 400 base
# steps: 0.569, 21 points), too close to the test's 20; at 1,600, 0.694 and 33 points.
# FlexSelect-Lite trains as long as QTSplus (a fair comparator): at 300 steps it answered 0.898 / 0.844 at 10%
# (seeds 0 / 1), at 600 0.874 / 0.824, within noise.
_NEEDLE_HOST = "tiny/qwen2.5-vl-needle"
_NEEDLE_VIDEO = {"fps": 2.0, "min_frames": 16, "max_frames": 16, "min_pixels": 112 * 112, "max_pixels": 112 * 112,
                 "frames_folder_fps": 2.0}  # qtsplus.needle.NeedleConfig().sampling(): every frame at full size
_NEEDLE_RUN = {"micro_batch_size": 16, "warmup_steps": 20, "log_every": 10, "shuffle_buffer": 512,
               "checkpoint_every": 100, "video": _NEEDLE_VIDEO}
# rho_min 0.1: the selector's own budget falls to rho_min during training, so this is the budget it learns at; at
# 0.05 it learned at 5% and held-out accuracy at 10% was 0.858 (seed 0), at 0.1 0.908 (docs/needle.md)
# lambda_pg 1: the gate's score-function term (SelectorConfig.lambda_pg) also teaches the scorer about the tokens it
# dropped; without it QTSplus missed a few colours per seed (seed 1's blue: recall 0.39) and answered 0.960 / 0.886 at
# 10% (seeds 0 / 1), with it (the same 600 steps) 0.998 / 0.920, recall 0.997 / 0.969 (docs/needle.md)
_NEEDLE_SELECTOR = {"rho_min": 0.1, "rho_max": 0.5, "tau_s": 0.5, "n_max": 128, "lambda_pg": 1.0}
_NEEDLE: dict[str, dict[str, Any]] = {
    "base": {"base_model": _NEEDLE_HOST, "variant": "base", "train_vision": False, "lr": 1e-3, "vqa_weight": 0,
             **_NEEDLE_RUN},
    "warmup-base": {"base_model": _NEEDLE_HOST, "variant": "base", "train_vision": False, "lr": 1e-3,
                    "vqa_weight": 0, **_NEEDLE_RUN},
    "selector": {"variant": "selector", "selector": _NEEDLE_SELECTOR, "lr": 1e-3, "vqa_weight": 0, **_NEEDLE_RUN},
    "selector-lm": {"variant": "selector+lm", "selector": _NEEDLE_SELECTOR, "lr": 5e-4, "vqa_weight": 0,
                    **_NEEDLE_RUN},
    # the FlexSelect-Lite comparator: a ranker at the host's width imitates FlexSelect at the host's reference layer,
    # one frame set per video (8 time steps)
    "flexselect-lite": {"variant": "selector", "method": "flexselect_lite", "method_budget": 0.1, "lr": 1e-3,
                        "method_options": {"ranker_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                           "intermediate_size": 256, "frames_per_set": 8}, **_NEEDLE_RUN},
}
_NEEDLE_STEPS = {"needle": {"warmup-base": 2000, "base": 1000, "selector": 600, "selector-lm": 600,
                            "flexselect-lite": 600},
                 "needle-ci": {"warmup-base": 1600, "base": 250, "selector": 100, "selector-lm": 100,
                               "flexselect-lite": 100}}
TRAIN_PRESETS.update({f"{scale}-{variant}": {**cfg, "max_steps": steps[variant]}
                      for scale, steps in _NEEDLE_STEPS.items() for variant, cfg in _NEEDLE.items()})
TRAIN_PRESETS["needle-warmup-base"]["lr"] = 5e-4
