"""QTSplus: query-aware visual-token selection with an adaptive budget (paper Sec. 3.2, Alg. 1 and Alg. 2).

Top-down: `QTSplusSelector` (Alg. 1) -> `CrossAttentionScorer` (alpha, r) -> `BudgetHead` (rho, n) -> the gates
(`find_threshold` = Alg. 2, `training_gate`, top-n by `topk_keep`) -> `ReEncoder` (`TimeEmbedding` + `Block`s).

Shapes: B videos; M visual tokens per video (padded to the longest, `x_mask` marks real ones); L question tokens
(`q_mask`); d hidden size; h query heads and h_kv key/value heads of size d_h = d / h, g = h / h_kv; N kept tokens
(padded to the most kept in the batch, `token_mask`).

The gate does not compare the raw relevance r (which is ~1/M) with tau_s but the scale-free score
s = log(M r) = max_{h,l} (logit_{h,l,i} - log mean_j exp(logit_{h,l,j})): how many nats token i's attention logit
sits above the log-mean-exp of its row. Its distribution does not drift with M, so tau_s (in nats) means the same
thing at M = 2k and at M = 200k. See docs/selector.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtsplus.layers import Block, RMSNorm, copy_decoder_layer
from qtsplus.selectors.base import compact, topk_keep
from qtsplus.selectors.qtsplus.config import SelectorConfig
from qtsplus.selectors.qtsplus.losses import budget_loss, update_rho_bar


@dataclass
class SelectorOutput:
    tokens: Tensor  # [B, N, d] kept tokens after re-encoding, in their original (temporal) order
    token_mask: Tensor  # [B, N] bool, True for real kept tokens
    indices: Tensor  # [B, N] long, position of each kept token in X, strictly ascending (0 at padding)
    scores: Tensor  # [B, M] float32, relevance r = max_{h,l} alpha in [0, 1] (0 at padding)
    rho: Tensor  # [B] float32, predicted retention fraction (differentiable)
    budget: Tensor  # [B] long, n = max(1, min(ceil(rho M), n_max)): the inference top-n size
    num_tokens: Tensor  # [B] long, M per video
    # training only: p = sigmoid((s - t) / tau_s) [B, M], which sums to min(rho M, n_max)
    keep_prob: Tensor | None = None
    # training only: the gate's Bernoulli(p) draw [B, M] bool, before the at-least-one / at-most-n_max rules that
    # turn it into the kept set; log P(draw) is what the score-function term differentiates
    drawn: Tensor | None = None
    threshold: Tensor | None = None  # [B] training only: t of Alg. 2, on the scale of s = log(M r)
    loss: Tensor | None = None  # scalar, training only: the lambda_t, lambda_m, lambda_s terms of Eq. 5

    @property
    def num_kept(self) -> Tensor:  # [B]
        return self.token_mask.sum(-1)

    def keep_log_prob(self) -> Tensor:
        """[B] training only: log P of each video's drawn keep pattern under the gate's Bernoulli(p_i), summed over
        its real tokens; differentiable in p (so in the scores, the threshold and rho)."""
        if self.keep_prob is None or self.drawn is None:
            raise ValueError("keep_log_prob needs the training gate's keep_prob and draw (a selector in training mode)")
        return keep_log_prob(self.keep_prob, self.drawn, self.num_tokens)

    def diagnostics(self) -> list[dict]:
        """Per video: M, rho, n, how many were kept, the kept indices and r (the paper logs (r, rho, n))."""
        out = []
        for b in range(self.rho.shape[0]):
            m, kept = int(self.num_tokens[b]), self.token_mask[b]
            out.append(
                dict(
                    num_tokens=m,
                    rho=float(self.rho[b]),
                    budget=int(self.budget[b]),
                    kept=int(kept.sum()),
                    indices=self.indices[b][kept].cpu(),
                    scores=self.scores[b, :m].detach().cpu(),
                )
            )
        return out


class QTSplusSelector(nn.Module):
    """Alg. 1: score X against Q, predict the budget, gate, re-encode the kept tokens with their absolute time."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        self.scorer = CrossAttentionScorer(config)
        self.budget_head = BudgetHead(config)
        self.reencoder = ReEncoder(config)
        # prior mean of Eq. 5: an EMA of the batch-mean rho, a buffer so that it is checkpointed and rank-consistent
        self.register_buffer("rho_bar", torch.tensor(config.rho_bar_init, dtype=torch.float32))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        # no time signal at init: an LM-initialised re-encoder starts undisturbed
        if isinstance(module, TimeEmbedding):
            nn.init.zeros_(module.proj.weight)

    def _apply(self, fn: Callable, recurse: bool = True) -> QTSplusSelector:
        # .to(bfloat16) must not round rho_bar: an EMA stored in bf16 stalls once its steps fall below half an ulp
        rho_bar = self.rho_bar.float()
        super()._apply(fn, recurse)
        self.rho_bar = rho_bar.to(self.rho_bar.device)
        return self

    def forward(
        self,
        x: Tensor,
        q: Tensor,
        times: Tensor,
        x_mask: Tensor | None = None,
        q_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SelectorOutput:
        """x: [B, M, d] visual tokens; q: [B, L, d] question embeddings; times: [B, M] seconds of each visual token."""
        cfg = self.config
        B, M, _ = x.shape
        x_mask = x.new_ones(B, M, dtype=torch.bool) if x_mask is None else x_mask.bool()
        q_mask = q.new_ones(q.shape[:2], dtype=torch.bool) if q_mask is None else q_mask.bool()
        num_tokens = x_mask.sum(-1)  # [B]

        # cross-attention scoring: log r = max_{h,l} log alpha, alpha softmax-normalised over M
        log_r = self.scorer(x, x_mask, q, q_mask)  # [B, M] float32, -inf at padding
        r = log_r.exp()  # [B, M] in [0, 1]

        # adaptive budget
        rho = self.budget_head(q, q_mask, r, num_tokens)  # [B]
        budget = budget_size(rho, num_tokens, cfg.n_max)  # [B]

        # gate on the scale-free score s = log(M r)
        s = log_r + num_tokens.float().log()[:, None]  # [B, M]
        keep_prob = drawn = threshold = gate = loss = None
        if self.training:
            expected = (rho * num_tokens).clamp(max=cfg.n_max)  # E[#kept] = rho M, below the cap
            keep, gate, keep_prob, threshold, drawn = training_gate(
                s, x_mask, expected, cfg.tau_s, cfg.n_max, generator, cfg.newton_max_iters, cfg.newton_rel_tol
            )
        else:
            keep = topk_keep(s, budget)
        indices, token_mask = compact(keep)  # [B, N], [B, N]

        z = x.gather(1, indices[..., None].expand(-1, -1, x.shape[-1]))  # [B, N, d]
        if gate is not None:  # straight-through: the values are 1, the gradient is d keep_prob
            z = z * gate.gather(1, indices)[..., None].to(z.dtype)
        z = self.reencoder(z, times.gather(1, indices), token_mask)  # [B, N, d]

        if self.training:
            loss = budget_loss(
                rho, num_tokens, cfg.n_max, self.rho_bar, cfg.lambda_t, cfg.lambda_m, cfg.lambda_s
            )
            update_rho_bar(self.rho_bar, rho, cfg.rho_bar_momentum)
        return SelectorOutput(
            tokens=z,
            token_mask=token_mask,
            indices=indices,
            scores=r.masked_fill(~x_mask, 0.0),
            rho=rho,
            budget=budget,
            num_tokens=num_tokens,
            keep_prob=keep_prob,
            drawn=drawn,
            threshold=threshold,
            loss=loss,
        )

    @torch.no_grad()
    def init_from_decoder_layers(
        self, layers: Sequence[nn.Module], copy_: Callable[[Tensor, Tensor], Tensor] = Tensor.copy_
    ) -> list[str]:
        """Copy Qwen2-layout decoder layers into the scorer and the re-encoder wherever all shapes match.

        Scorer block i and re-encoder block i take LM layer i; the scoring head takes layer scoring_depth - 1 (its
        q_proj/k_proj, and input_layernorm for both its norms). Returns what was copied, e.g. "reencoder.blocks.0 <- 0".
        """
        targets = [(f"scorer.blocks.{i}", block, i) for i, block in enumerate(self.scorer.blocks)]
        targets.append(("scorer.head", self.scorer.head, len(self.scorer.blocks)))
        targets += [(f"reencoder.blocks.{i}", block, i) for i, block in enumerate(self.reencoder.blocks)]
        return [f"{name} <- {i}" for name, module, i in targets
                if i < len(layers) and copy_decoder_layer(module, layers[i], copy_)]


# ---------------------------------------------------------------------------------------------------------------------
# scoring


class CrossAttentionScorer(nn.Module):
    """alpha in [0,1]^{h x L x M}, softmax over M; returns log r = log max_{h,l} alpha. No rotary on either side."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config, cross=True) for _ in range(config.scoring_depth - 1))
        self.head = ScoringHead(config)

    def forward(self, x: Tensor, x_mask: Tensor, q: Tensor, q_mask: Tensor) -> Tensor:
        for block in self.blocks:  # deeper scorers first let the question read the video
            q = block(q, x_mask, context=x)  # [B, L, d]
        return self.head(x, x_mask, q, q_mask)  # [B, M]


class ScoringHead(nn.Module):
    """The last scoring layer: log r_i = max_{h,l} log softmax_i(q_{h,l} . k_i / sqrt(d_h)) over the M tokens, with
    q = W_q RMSNorm_q(Q) and k_i = W_k RMSNorm_x(x_i) + b (grouped: query head j reads K/V head j // g).

    The x-side RMSNorm is folded into k_proj. RMSNorm(x_i) = w * x_i * s_i with s_i = rsqrt(mean x_i^2 + eps), so
    k_i = (W_k diag(w)) x_i s_i + b: the folded [h_kv d_h, d] weight is formed at every call (the parameters, hence
    checkpoints, LM initialisation and optimiser state, are unchanged, and nothing cached can go stale) and s_i scales
    token i's keys (float32) or float32 logits (lower precision), so no [M, d] tensor is ever made.

    Two forms, chosen per call:
    - under autograd (training; grad mode on and an input or parameter that requires grad): whole logits
      [B, h_kv, g L, M] and a log-softmax over M, as in the paper; differentiable, O(M (h_kv d_h + h L)) memory.
    - without autograd (inference: torch.no_grad / inference_mode, or frozen weights and inputs): streamed over M in
      blocks (`block_size` tokens, or `block_bytes` of float32 logits). Pass 1 makes each block's keys and logits and
      updates an online log-sum-exp per query row; pass 2 recomputes each block's logits from the stored keys and
      takes max_{h,l} (logit - lse). Peak memory: the keys [B, M, h_kv d_h] plus one block of logits, whatever M.
      The bias b adds q . b to every logit of a row, which the softmax over M cancels, so this form leaves it out.
      This form is inference-only (no graph).
    Both give the r of the original formulation (`_reference_head_scores`) within float rounding (tested).
    """

    block_size: int | None = None  # tokens per block of the streamed form; None: from block_bytes
    block_bytes: tuple[int, int] = (32 * 2**20, 256 * 2**20)  # (CPU, CUDA) size of one block of float32 logits

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        d, h, h_kv, d_h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.x_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, h * d_h, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, h_kv * d_h, bias=config.attention_bias)

    def forward(self, x: Tensor, x_mask: Tensor, q: Tensor, q_mask: Tensor) -> Tensor:
        """x [B, M, d], x_mask [B, M], q [B, L, d], q_mask [B, L] -> log r [B, M] float32, -inf at padding."""
        B, L = q.shape[:2]
        h_kv, d_h = self.config.num_kv_heads, self.config.head_dim
        g = self.config.num_heads // h_kv
        # query head j uses K/V head j // g (Qwen's repeat_kv order); group the g*L query rows of each K/V head
        qh = self.q_proj(self.q_norm(q)).view(B, L, h_kv, g, d_h)
        qh = qh.permute(0, 2, 3, 1, 4).reshape(B, h_kv, g * L, d_h)  # [B, h_kv, g L, d_h]
        rows = q_mask[:, None, None, :].expand(B, 1, g, L).reshape(B, 1, g * L)  # [B, 1, g L] real question rows
        if torch.is_grad_enabled() and (
            x.requires_grad or qh.requires_grad or self.k_proj.weight.requires_grad or self.x_norm.weight.requires_grad
        ):
            return self._whole(x, x_mask, qh, rows)
        return self._streamed(x, x_mask, qh, rows)

    def _folded_weight(self, dtype: torch.dtype) -> Tensor:
        """W_k diag(w): [h_kv d_h, d], formed in float32 and rounded once to the compute dtype."""
        return (self.k_proj.weight.float() * self.x_norm.weight.float()).to(dtype)

    def _scale(self, x: Tensor) -> Tensor:
        """x [B, m, d] -> float32 s_i / sqrt(d_h) [B, m], s_i = rsqrt(mean x_i^2 + eps) (no [m, d] temporary)."""
        sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()
        return torch.rsqrt(sq / x.shape[-1] + self.config.rms_norm_eps) * self.config.head_dim**-0.5

    def _logits(self, qh: Tensor, keys: Tensor, scale: Tensor | None, out: Tensor | None = None) -> Tensor:
        """[B, h_kv, g L, d_h] queries, [B, m, h_kv d_h] keys -> float32 logits [B, h_kv, g L, m] (into `out` if
        given: float32 queries only), times the per-token scale [B, m] unless it is None (already in the keys)."""
        B, m, _ = keys.shape
        kt = keys.view(B, m, self.config.num_kv_heads, self.config.head_dim).permute(0, 2, 3, 1)  # [B, h_kv, d_h, m]
        logits = (qh @ kt).float() if out is None else torch.matmul(qh, kt, out=out)
        return logits if scale is None else logits.mul_(scale[:, None, None, :])

    def _whole(self, x: Tensor, x_mask: Tensor, qh: Tensor, rows: Tensor) -> Tensor:
        logits = self._logits(qh, F.linear(x, self._folded_weight(qh.dtype)), self._scale(x))  # [B, h_kv, g L, M]
        if self.k_proj.bias is not None:  # + q . b / sqrt(d_h) per row: no effect on r, kept so the graph is the layer's
            b = self.k_proj.bias.view(self.config.num_kv_heads, self.config.head_dim, 1)  # [h_kv, d_h, 1]
            logits = logits + (qh @ b).float() * self.config.head_dim**-0.5
        log_alpha = logits.masked_fill(~x_mask[:, None, None, :], -math.inf).log_softmax(-1)  # softmax over M
        log_alpha = log_alpha.masked_fill(~rows[..., None], -math.inf)  # padded question tokens never win the max
        return log_alpha.amax(dim=(1, 2))  # [B, M]: max over heads and question tokens

    @torch.no_grad()
    def _streamed(self, x: Tensor, x_mask: Tensor, qh: Tensor, rows: Tensor) -> Tensor:
        B, M, _ = x.shape
        if M == 0:
            return x.new_empty(B, 0, dtype=torch.float32)
        block = self.block_size or max(256, self.block_bytes[x.device.type == "cuda"] // (4 * qh[..., 0].numel()))
        weight = self._folded_weight(qh.dtype)
        starts = range(0, M, block)
        padded = not bool(x_mask.all())
        # float32 keys take the per-token scale once; lower precision keeps it for the float32 logits, so that the
        # keys are rounded once (as the reference's are)
        scale_keys = qh.dtype == torch.float32

        # The keys of all M tokens in one product and one allocation, the norm scale in one pass over X, and the
        # float32 logits of every block in one reused buffer: on 2 shared CPU cores every parallel operation can
        # stall for a scheduler slice (a few ms) when a thread is descheduled, so few, large operations matter; and
        # per-block tensors of mixed sizes and lifetimes fragment the CPU heap (3-5 blocks' worth of resident memory).
        keys = _inference_linear(x, weight)  # [B, M, h_kv d_h], unscaled
        scale = self._scale(x)  # [B, M] float32
        if scale_keys:
            keys.mul_(scale[..., None])
        rows_total = qh[..., 0].numel()  # B h_kv g L
        buffer = qh.new_empty(rows_total * min(block, M)) if scale_keys else None

        def logits_of(j: int) -> Tensor:  # [B, h_kv, g L, m] float32
            m = min(block, M - j)
            out = None if buffer is None else buffer[: rows_total * m].view(*qh.shape[:3], m)
            logits = self._logits(qh, keys[:, j : j + m], None if scale_keys else scale[:, j : j + m], out)
            if padded:
                logits.masked_fill_(~x_mask[:, None, None, j : j + m], -math.inf)
            return logits

        if len(starts) == 1:  # one block: a plain log-softmax over M
            log_alpha = logits_of(0).log_softmax(-1).masked_fill_(~rows[..., None], -math.inf)
            return log_alpha.amax(dim=(1, 2))

        # pass 1: per query row, a running max and sum of exp over M (online log-sum-exp)
        row_max = qh.new_full(qh.shape[:3], -math.inf, dtype=torch.float32)  # [B, h_kv, g L]
        row_sum = torch.zeros_like(row_max)
        for j in starts:
            logits = logits_of(j)
            new_max = torch.maximum(row_max, logits.amax(-1))
            shift = new_max.masked_fill(new_max == -math.inf, 0.0)  # a row with only padding so far: sum stays 0
            row_sum = row_sum * (row_max - shift).exp() + logits.sub_(shift[..., None]).exp_().sum(-1)  # in place
            row_max = new_max
        lse = (shift + row_sum.log()).masked_fill(~rows, math.inf)  # padded question rows: never the max

        # pass 2: log alpha = logit - lse, max over heads and question rows
        log_r = torch.empty(B, M, dtype=torch.float32, device=x.device)
        for j in starts:
            log_r[:, j : j + block] = logits_of(j).sub_(lse[..., None]).amax(dim=(1, 2))
        return log_r


# torch's oneDNN linear kernel (the one Inductor emits for CPU linear layers); x86 builds have it
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _inference_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T, no autograd. For float32 on CPU torch's oneDNN kernel: for the key projection ([M, 2048] x
    [2048, 256]) it ran 25% faster than F.linear's MKL sgemm on this project's AMD EPYC (AVX-512), at the same float32
    accuracy. Elsewhere (CUDA, bf16, strided x, builds without oneDNN) F.linear."""
    if _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def _reference_head_scores(head: ScoringHead, x: Tensor, x_mask: Tensor, q: Tensor, q_mask: Tensor) -> Tensor:
    """The scoring head as first written: RMSNorm over X ([B, M, d] temporaries), k_proj, whole logits. The check
    that the folded and streamed forms compute the same r (tests/test_selector.py, benchmarks/selector.py)."""
    B, M, _ = x.shape
    L = q.shape[1]
    h_kv, d_h = head.config.num_kv_heads, head.config.head_dim
    g = head.config.num_heads // h_kv
    qh = head.q_proj(head.q_norm(q)).view(B, L, h_kv, g, d_h)
    qh = qh.permute(0, 2, 3, 1, 4).reshape(B, h_kv, g * L, d_h)  # [B, h_kv, g L, d_h]
    kh = head.k_proj(head.x_norm(x)).view(B, M, h_kv, d_h).transpose(1, 2)  # [B, h_kv, M, d_h]
    logits = (qh @ kh.transpose(-1, -2)).float() * d_h**-0.5  # [B, h_kv, g L, M]
    log_alpha = logits.masked_fill(~x_mask[:, None, None, :], -math.inf).log_softmax(-1)  # softmax over M
    rows = q_mask[:, None, None, :].expand(B, 1, g, L).reshape(B, 1, g * L, 1)
    log_alpha = log_alpha.masked_fill(~rows, -math.inf)  # padded question tokens never win the max
    return log_alpha.amax(dim=(1, 2))  # [B, M]: max over heads and question tokens


# ---------------------------------------------------------------------------------------------------------------------
# budget


class BudgetHead(nn.Module):
    """rho = rho_min + (rho_max - rho_min) sigmoid(MLP([s_q, log M, max_i r_i, H(p)])), p = r / (sum r + eps)."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.rho_min, self.rho_max = config.rho_min, config.rho_max
        hidden = config.budget_hidden
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size + 3, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, q: Tensor, q_mask: Tensor, r: Tensor, num_tokens: Tensor) -> Tensor:
        w = q_mask[..., None].to(q.dtype)
        s_q = (q * w).sum(1).float() / w.sum(1).float()  # [B, d] mean question embedding
        p = r / (r.sum(-1, keepdim=True) + 1e-8)  # [B, M], 0 at padding
        # H(p); the clamp keeps 0 log 0 = 0 with a finite gradient
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1, keepdim=True)  # [B, 1]
        log_m = num_tokens.float().log()[:, None]  # [B, 1]
        features = torch.cat([s_q, log_m, r.amax(-1, keepdim=True), entropy], dim=-1)  # [B, d + 3]
        logit = self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1).float()  # [B]
        return self.rho_min + (self.rho_max - self.rho_min) * torch.sigmoid(logit)


def budget_size(rho: Tensor, num_tokens: Tensor, n_max: int) -> Tensor:
    """n = max(1, min(ceil(rho M), n_max)). The 1e-4 keeps float noise (0.05 * 2000 = 100.0000015) from adding one."""
    n = torch.ceil(rho.detach().double() * num_tokens - 1e-4).long()
    return n.clamp(max=n_max).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# gates


def find_threshold(
    s: Tensor, mask: Tensor, k: Tensor, tau: float, max_iters: int = 50, rel_tol: float = 1e-5
) -> Tensor:
    """Alg. 2: t with sum_i sigmoid((s_i - t) / tau) = k, per row. s: [B, M], mask: [B, M], k: [B] -> t: [B].

    Newton from the median (the paper's update), safeguarded: each row keeps a bracket [lo, hi] around the root, and a
    Newton step that leaves it (or divides by a vanishing derivative) is replaced by bisection, so the solve converges
    for any scores, and it runs until |residual| <= rel_tol * k rather than a fixed 4-6 steps. The solve itself runs
    in float64 without a graph; the gradient is that of the converged iteration, i.e. the implicit-function theorem:
    dt = (du) / g with u = sum_i sigmoid(.) - k and g = -du/dt, so t is differentiable in k (hence in rho) and in s.
    """
    t_star = _solve_threshold(s.detach().double(), mask, k.detach().double(), tau, max_iters, rel_tol).to(
        s.dtype
    )
    sig = torch.sigmoid((s.masked_fill(~mask, 0.0) - t_star[:, None]) / tau) * mask
    u = sig.sum(-1) - k  # ~0 at t_star
    g = ((sig * (1 - sig)).sum(-1) / tau).detach().clamp_min(1e-30)
    return t_star + (u - u.detach()) / g  # value t_star, gradient du / g


@torch.no_grad()
def _solve_threshold(
    s: Tensor, mask: Tensor, k: Tensor, tau: float, max_iters: int, rel_tol: float
) -> Tensor:
    t = s.masked_fill(~mask, math.nan).nanmedian(-1).values  # [B]
    m = mask.to(s.dtype)
    s = s.masked_fill(~mask, 0.0)
    # at lo every real token has sigmoid >= 1 - e^-30 / M, at hi <= e^-30 / M: the root lies inside for 0 < k < M
    margin = tau * (m.sum(-1).log() + 30.0)
    lo = s.masked_fill(~mask, math.inf).amin(-1) - margin
    hi = s.masked_fill(~mask, -math.inf).amax(-1) + margin
    for _ in range(max_iters):
        sig = torch.sigmoid((s - t[:, None]) / tau) * m
        u = sig.sum(-1) - k  # decreasing in t
        if bool((u.abs() <= rel_tol * k).all()):
            break
        lo = torch.where(u > 0, t, lo)
        hi = torch.where(u < 0, t, hi)
        g = (sig * (1 - sig)).sum(-1) / tau  # -du/dt
        t_newton = t + u / g
        inside = (t_newton > lo) & (t_newton < hi)  # False for inf / nan as well
        t = torch.where(inside, t_newton, (lo + hi) / 2)
    return t


def training_gate(
    s: Tensor,
    mask: Tensor,
    expected: Tensor,
    tau: float,
    n_max: int,
    generator: torch.Generator | None = None,
    max_iters: int = 50,
    rel_tol: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Differentiable keep/drop (Sec. 3.2.3). s: [B, M] scores, expected: [B] target kept count (rho M, capped).

    Each token is kept with probability p_i = sigmoid((s_i - t) / tau), t from Alg. 2, so E[#kept] = expected. The
    hard sample is a Bernoulli(p_i) draw: the same law as the paper's hard Gumbel-softmax over logits
    [(s_i - t) / tau, 0], but written so that tau visibly divides. At least one token is kept (the most relevant),
    at most n_max (the least relevant of the drawn ones go first). Returns keep [B, M] bool, the straight-through
    gate [B, M] (value keep, gradient dp), p [B, M], t [B] and the raw draw [B, M] bool (keep before those two rules).
    """
    t = find_threshold(s, mask, expected, tau, max_iters, rel_tol)
    p = torch.sigmoid((s.masked_fill(~mask, 0.0) - t[:, None]) / tau) * mask
    u = torch.rand(s.shape, generator=generator, device=s.device, dtype=torch.float32)
    drawn = (u < p.detach()) & mask
    keep = drawn

    empty = ~keep.any(-1)
    keep = keep | (F.one_hot(s.argmax(-1), s.shape[-1]).bool() & empty[:, None])
    if bool((keep.sum(-1) > n_max).any()):
        top = s.masked_fill(~keep, -math.inf).topk(n_max, dim=-1).indices
        keep = keep & torch.zeros_like(keep).scatter_(-1, top, True)

    gate = keep.to(p.dtype) + p - p.detach()
    return keep, gate, p, t, drawn


def keep_log_prob(keep_prob: Tensor, drawn: Tensor, num_tokens: Tensor) -> Tensor:
    """sum_i [drawn_i log p_i + (1 - drawn_i) log(1 - p_i)] over each row's first num_tokens tokens: [B, M] p and
    draw, [B] M -> [B]. The draw, not the kept set: the kept set is a fixed function of it (at least one, at most
    n_max), so log P(draw) is the unbiased score function. p is clamped away from 0 and 1."""
    real = torch.arange(keep_prob.shape[1], device=keep_prob.device)[None] < num_tokens[:, None]
    p = keep_prob.float().clamp(1e-6, 1 - 1e-6)
    return torch.where(drawn, p.log(), (-p).log1p()).masked_fill(~real, 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# re-encoding


class ReEncoder(nn.Module):
    """Adds each kept token's absolute time, then `reencoder_depth` pre-norm self-attention blocks over the kept set."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.time = TimeEmbedding(config)
        self.blocks = nn.ModuleList(Block(config, cross=False) for _ in range(config.reencoder_depth))

    def forward(self, z: Tensor, times: Tensor, mask: Tensor) -> Tensor:
        z = z + self.time(times)  # [B, N, d]
        for block in self.blocks:
            z = block(z, mask)
        return z


class TimeEmbedding(nn.Module):
    """t (seconds) -> W [sin(2 pi t / P_k), cos(2 pi t / P_k)]_k, periods P_k geometric in [min, max]; W zero-init."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.time_dim, config.hidden_size, bias=False)

    def forward(self, t: Tensor) -> Tensor:
        cfg = self.config
        half = cfg.time_dim // 2
        frac = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
        periods = cfg.time_min_period * (cfg.time_max_period / cfg.time_min_period) ** frac  # [time_dim / 2]
        angles = 2 * math.pi * t.float()[..., None] / periods  # [B, N, time_dim / 2]
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, N, time_dim]
        return self.proj(features.to(self.proj.weight.dtype))
