"""The compute-aware terms of Eq. 5, as pure functions of (rho, M, n_max).

    L = L_SFT + lambda_t (rho M)^2 / n_max^2 + lambda_m rho M / n_max + lambda_s (rho - rho_bar)^2

All functions take rho and M as [B] tensors (one entry per video) and return [B] tensors, so the caller chooses the
reduction (`budget_loss` takes the batch mean, the E over the batch in Eq. 5). rho_bar itself is state, kept by
`QTSplusSelector` as a buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_cost(rho: Tensor, num_tokens: Tensor, n_max: int) -> Tensor:
    """(rho M)^2 / n_max^2: quadratic attention time of the kept tokens, normalised by the cap."""
    return (rho * num_tokens / n_max) ** 2


def memory_cost(rho: Tensor, num_tokens: Tensor, n_max: int) -> Tensor:
    """rho M / n_max: linear KV-cache memory of the kept tokens, normalised by the cap."""
    return rho * num_tokens / n_max


def budget_prior(rho: Tensor, rho_bar: Tensor) -> Tensor:
    """(rho - rho_bar)^2: the optional prior that stabilises early training."""
    return (rho - rho_bar) ** 2


def budget_loss(
    rho: Tensor,
    num_tokens: Tensor,
    n_max: int,
    rho_bar: Tensor,
    lambda_t: float,
    lambda_m: float,
    lambda_s: float,
) -> Tensor:
    """Batch mean of the three regularisers of Eq. 5 (everything except L_SFT). rho: [B], num_tokens: [B]."""
    num_tokens = num_tokens.to(rho.dtype)
    per_sample = (
        lambda_t * attention_cost(rho, num_tokens, n_max)
        + lambda_m * memory_cost(rho, num_tokens, n_max)
        + lambda_s * budget_prior(rho, rho_bar.to(rho.dtype))
    )
    return per_sample.mean()


def update_rho_bar(rho_bar: Tensor, rho: Tensor, momentum: float) -> None:
    """In place: rho_bar <- momentum * rho_bar + (1 - momentum) * mean(rho), averaged over all ranks when distributed.

    Every rank holds the same rho_bar because the batch mean is all-reduced before the update, so under
    torch.distributed every rank must run the selector in every training step (momentum=1.0 disables the update).
    """
    if momentum == 1.0:  # a fixed prior: nothing to update (and no collective to join)
        return
    batch_mean = rho.detach().float().mean()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(batch_mean)  # SUM: AVG is NCCL-only
        batch_mean = batch_mean / torch.distributed.get_world_size()
    rho_bar.copy_(torch.lerp(rho_bar.float(), batch_mean, 1.0 - momentum))
