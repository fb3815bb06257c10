"""QTSplus: query-aware visual-token selection with an adaptive budget (paper Sec. 3.2), one method of
`qtsplus.selectors`.

`QTSplusSelector` (selector.py, Alg. 1-2 in plain PyTorch) with its config (config.py) and the Eq. 5 terms (losses.py);
`QTSplusAdapter` (adapter.py) puts it behind the selector contract under the name "qtsplus". The host model that
runs it between Qwen2.5-VL's vision tower and LM is `qtsplus.host.QTSplusForConditionalGeneration`.
"""

from qtsplus.selectors.qtsplus.adapter import QTSplusAdapter, QTSplusAdapterConfig
from qtsplus.selectors.qtsplus.config import SelectorConfig
from qtsplus.selectors.qtsplus.losses import (
    attention_cost,
    budget_loss,
    budget_prior,
    memory_cost,
    update_rho_bar,
)
from qtsplus.selectors.qtsplus.selector import (
    QTSplusSelector,
    SelectorOutput,
    budget_size,
    find_threshold,
    keep_log_prob,
    training_gate,
)

__all__ = [
    "QTSplusAdapter",
    "QTSplusAdapterConfig",
    "QTSplusSelector",
    "SelectorConfig",
    "SelectorOutput",
    "attention_cost",
    "budget_loss",
    "budget_prior",
    "budget_size",
    "find_threshold",
    "keep_log_prob",
    "memory_cost",
    "training_gate",
    "update_rho_bar",
]
