"""The QTSplus selector (`QTSplusSelector` of selector.py, unchanged) behind the selector contract.

Inference follows Alg. 1 step by step with the selector's own modules (scorer, budget head, top-n gate, re-encoder);
only the top-n size differs:

    own_budget=False (default, for comparisons at equal budgets): n = the given budget
    own_budget=True  (QTSplus as trained, adaptive):              n = min(QTSplus's own n = ceil(rho M) capped at
                                                                      n_max, the given budget)

With own_budget=True and a budget >= its own n, the output is exactly `QTSplusSelector.forward`'s (tested).
In training the adapter calls `QTSplusSelector.forward` itself (its training gate, Eq. 5 regulariser, rho_bar update
are untouched) and returns the Eq. 5 terms as the auxiliary loss "budget"; if that keeps more than the given budget,
the least relevant of the kept tokens are dropped (after re-encoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtsplus.selectors.base import (
    Selection,
    Selector,
    SelectorInput,
    compact,
    gather,
    register,
    selection_at,
    topk_keep,
)
from qtsplus.selectors.qtsplus.config import SelectorConfig
from qtsplus.selectors.qtsplus.selector import QTSplusSelector, budget_size


@dataclass
class QTSplusAdapterConfig(SelectorConfig):
    own_budget: bool = False  # True: QTSplus's adaptive n, capped by the given budget; False: n = the budget


@register
class QTSplusAdapter(Selector):
    name = "qtsplus"
    config_class = QTSplusAdapterConfig

    def __init__(self, config: QTSplusAdapterConfig, selector: QTSplusSelector | None = None) -> None:
        super().__init__(config)
        self.selector = selector if selector is not None else QTSplusSelector(config)
        self.fills_budget = not config.own_budget

    @classmethod
    def wrap(cls, selector: QTSplusSelector, own_budget: bool = False) -> QTSplusAdapter:
        """Put an existing (e.g. trained, or a QTSplusForConditionalGeneration's `.selector`) selector behind the
        contract; the module is shared, not copied."""
        return cls(QTSplusAdapterConfig(**selector.config.to_dict(), own_budget=own_budget), selector)

    @classmethod
    def shape_fields(cls, text_config: Any) -> dict[str, Any]:
        return SelectorConfig.shape_fields(text_config)

    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        if self.training:
            return self.select_training(inputs, n, generator)
        sel, cfg = self.selector, self.selector.config
        x, q, x_mask, q_mask = inputs.x, inputs.q, inputs.x_mask, inputs.q_mask
        num_tokens = inputs.num_tokens  # [B]

        log_r = sel.scorer(x, x_mask, q, q_mask)  # [B, M] log r = max_{h,l} log alpha
        r = log_r.exp()
        rho = sel.budget_head(q, q_mask, r, num_tokens)  # [B]
        own_n = budget_size(rho, num_tokens, cfg.n_max)  # [B]
        if self.config.own_budget:
            n = torch.minimum(n, own_n)
        s = log_r + num_tokens.float().log()[:, None]  # scale-free score log(M r), see docs/selector.md
        indices, token_mask = compact(topk_keep(s, n))  # [B, N] ascending
        z = sel.reencoder(gather(x, indices), inputs.times.gather(1, indices), token_mask)  # [B, N, d]
        return selection_at(inputs, indices, token_mask, z, n, r, extras=_extras(rho, own_n))

    def select_training(
        self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None
    ) -> Selection:
        out = self.selector(
            inputs.x, inputs.q, inputs.times, inputs.x_mask, inputs.q_mask, generator=generator
        )
        indices, token_mask, tokens = out.indices, out.token_mask, out.tokens
        if bool((out.num_kept > n).any()):  # cap at the budget: drop the least relevant of the kept tokens
            kept_scores = out.scores.gather(1, indices).masked_fill(~token_mask, -math.inf)  # [B, N]
            pos, token_mask = compact(topk_keep(kept_scores, torch.minimum(n, out.num_kept)))
            indices, tokens = indices.gather(1, pos), gather(tokens, pos)
        losses = {"budget": out.loss}
        extras = _extras(out.rho, out.budget)
        return selection_at(inputs, indices, token_mask, tokens, n, out.scores, losses, extras)


def _extras(rho: Tensor, own_n: Tensor) -> list[dict[str, Any]]:
    return [dict(rho=float(p), own_budget=int(k)) for p, k in zip(rho.tolist(), own_n.tolist(), strict=True)]
