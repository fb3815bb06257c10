"""Layers shared by the selectors: Qwen2.5's decoder-layer layout without rotary, and copying LM layers into them.

`Block` is a pre-norm block (RMSNorm -> attention -> RMSNorm -> SwiGLU MLP) whose parameter names follow transformers'
`Qwen2_5_VLDecoderLayer`, so `copy_decoder_layer` can initialise it from the host LM (paper Sec. 4.2). QTSplus's
scorer and re-encoder and FlexSelect-Lite's ranker are built from these.

Shapes: `LayerShape` (or any object with the same fields, e.g. the QTSplus `SelectorConfig`) gives d = hidden_size,
h query heads and h_kv key/value heads of size d_h = head_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Shape(Protocol):
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool

    @property
    def head_dim(self) -> int: ...


@dataclass(frozen=True)
class LayerShape:
    """The shape of a `Block`: widths, heads, norm epsilon, whether q/k/v carry a bias (Qwen2.5: yes)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads




class Block(nn.Module):
    """Pre-norm block in the Qwen2.5 decoder-layer layout: h += Attn(RMSNorm(h), ctx); h += SwiGLU(RMSNorm(h)).

    cross=False: self-attention over h (bidirectional, keys masked by `mask`); cross=True: keys/values from
    RMSNorm(context), masked by `mask`.
    """

    def __init__(self, config: Shape, cross: bool) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.context_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if cross else None
        self.attn = Attention(config)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        hn = self.input_norm(h)
        kv = hn if self.context_norm is None else self.context_norm(context)
        h = h + self.attn(hn, kv, mask)
        return h + self.mlp(self.post_norm(h))


class Attention(nn.Module):
    """Grouped-query attention with Qwen2.5's q/k/v/o projections and no rotary. x: [B, L, d], kv: [B, M, d]."""

    def __init__(self, config: Shape) -> None:
        super().__init__()
        self.config = config
        d, h, h_kv, d_h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(d, h * d_h, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, h_kv * d_h, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, h_kv * d_h, bias=config.attention_bias)
        self.o_proj = nn.Linear(h * d_h, d, bias=False)

    def forward(self, x: Tensor, kv: Tensor, kv_mask: Tensor) -> Tensor:
        B, L, _ = x.shape
        M = kv.shape[1]
        h, h_kv, d_h = self.config.num_heads, self.config.num_kv_heads, self.config.head_dim
        q = self.q_proj(x).view(B, L, h, d_h).transpose(1, 2)  # [B, h, L, d_h]
        k = self.k_proj(kv).view(B, M, h_kv, d_h).transpose(1, 2)  # [B, h_kv, M, d_h]
        v = self.v_proj(kv).view(B, M, h_kv, d_h).transpose(1, 2)  # [B, h_kv, M, d_h]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :], enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, h * d_h))


class MLP(nn.Module):
    def __init__(self, config: Shape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def copy_decoder_layer(
    module: nn.Module, layer: nn.Module, copy_: Callable[[Tensor, Tensor], Tensor] = Tensor.copy_
) -> bool:
    """Copy a Qwen2-layout decoder layer into a `Block` (or a scoring head) if every parameter has its counterpart
    of the same shape; returns whether it did (nothing is copied otherwise)."""
    theirs = dict(layer.named_parameters())
    pairs = [(p, theirs.get(_lm_name(n))) for n, p in module.named_parameters()]
    if not all(src is not None and src.shape == dst.shape for dst, src in pairs):
        return False
    for dst, src in pairs:
        copy_(dst, src)
    return True


# names of our modules in a Qwen2 decoder layer (Qwen2_5_VLDecoderLayer)
_LM_MODULE = {
    "input_norm": "input_layernorm",
    "context_norm": "input_layernorm",
    "q_norm": "input_layernorm",
    "x_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
    "attn": "self_attn",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "mlp": "mlp",
}


def _lm_name(name: str) -> str:
    head, _, rest = name.partition(".")
    return f"{_LM_MODULE[head]}.{rest}"
