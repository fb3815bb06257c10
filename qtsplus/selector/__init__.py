"""QTSplus selector: query-aware visual-token selection with an adaptive budget (paper Sec. 3.2).

`QTSplusSelector` is plain PyTorch; `QTSplusForConditionalGeneration` puts it between Qwen2.5-VL's vision tower and
its language model (import it from `qtsplus.selector.model`, which needs transformers).
"""

from qtsplus.selector.config import SelectorConfig
from qtsplus.selector.losses import attention_cost, budget_loss, budget_prior, memory_cost, update_rho_bar
from qtsplus.selector.selector import (
    QTSplusSelector,
    SelectorOutput,
    budget_size,
    compact,
    find_threshold,
    topn_mask,
    training_gate,
)

__all__ = [
    "QTSplusSelector",
    "SelectorConfig",
    "SelectorOutput",
    "attention_cost",
    "budget_loss",
    "budget_prior",
    "budget_size",
    "compact",
    "find_threshold",
    "memory_cost",
    "topn_mask",
    "training_gate",
    "update_rho_bar",
]
