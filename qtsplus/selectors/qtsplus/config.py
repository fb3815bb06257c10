"""Configuration of the QTSplus selector (paper Sec. 3.2, Alg. 1-2, Eq. 5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class SelectorConfig:
    # shapes: the visual tokens X arrive already in the LM hidden size d (after Qwen2.5-VL's patch merger)
    hidden_size: int = 2048
    num_heads: int = 16
    num_kv_heads: int = 2
    intermediate_size: int = 11008  # SwiGLU width of the re-encoder (and scorer) blocks
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True  # Qwen2.5 puts a bias on q/k/v (not on o)

    # depth: scoring_depth - 1 cross-attention blocks refine the question stream, then one q/k layer gives alpha
    scoring_depth: int = 1
    reencoder_depth: int = 1

    # budget head (Sec. 3.2.2): rho = rho_min + (rho_max - rho_min) * sigmoid(MLP([s_q, log M, max r, H(p)]))
    rho_min: float = 0.05
    rho_max: float = 0.5
    budget_hidden: int = 256
    n_max: int = 2560  # hard cap on kept tokens per video, in training and in inference

    # training gate (Sec. 3.2.3, Alg. 2). tau_s is in nats of the scaled score log(M r), see docs/selector.md
    tau_s: float = 0.5
    newton_max_iters: int = 50
    newton_rel_tol: float = 1e-5  # stop when |sum_i sigmoid(.) - k| <= rel_tol * k for every sample

    # absolute time injected into the re-encoder: sinusoids of t (seconds), periods geometric in [min, max]
    time_dim: int = 64
    time_min_period: float = 1.0
    time_max_period: float = 10_000.0

    # Eq. 5 weights and the rho_bar prior (a buffer: EMA of the batch-mean rho, saved with the model)
    lambda_t: float = 0.1
    lambda_m: float = 0.17
    lambda_s: float = 0.05
    rho_bar_init: float | None = None  # None -> (rho_min + rho_max) / 2
    rho_bar_momentum: float = 0.99
    # score-function (REINFORCE) term of the training gate: lambda_pg * (sample's LM loss - batch mean) * log P(the
    # video's drawn keep pattern). The straight-through gate gives the scorer a gradient on the tokens it keeps only;
    # this term also reaches the ones it dropped (docs/needle.md). 0 turns it off.
    lambda_pg: float = 0.0

    # copy the scorer / re-encoder weights from the LM's decoder layers when their shapes match (paper Sec. 4.2)
    init_from_lm: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.rho_bar_init is None:
            self.rho_bar_init = (self.rho_min + self.rho_max) / 2
        assert self.hidden_size % self.num_heads == 0, "hidden_size must be divisible by num_heads"
        assert self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
        assert 0.0 < self.rho_min <= self.rho_max <= 1.0, "need 0 < rho_min <= rho_max <= 1"
        assert self.scoring_depth >= 1 and self.reencoder_depth >= 0 and self.n_max >= 1
        assert self.time_dim % 2 == 0
        assert self.lambda_pg >= 0.0, "lambda_pg must be >= 0"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_text_config(cls, text_config: Any, **overrides: Any) -> SelectorConfig:
        """Shapes from a Qwen2.5-VL text config (heads and K/V heads = the LM's, so LM layers can initialise it)."""
        return cls(**{**cls.shape_fields(text_config), **overrides})

    @staticmethod
    def shape_fields(text_config: Any) -> dict[str, Any]:
        """The fields a selector takes from the LM it sits in front of."""
        return dict(
            hidden_size=text_config.hidden_size,
            num_heads=text_config.num_attention_heads,
            num_kv_heads=text_config.num_key_value_heads,
            intermediate_size=text_config.intermediate_size,
            rms_norm_eps=text_config.rms_norm_eps,
            initializer_range=text_config.initializer_range,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectorConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        assert not unknown, f"unknown SelectorConfig fields: {sorted(unknown)}"
        return cls(**d)
