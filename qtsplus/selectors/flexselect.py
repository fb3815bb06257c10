"""FlexSelect (training-free, scored by a reference layer of the host LM) and FlexSelect-Lite (a small rank-supervised
ranker that imitates it). Paper: "FlexSelect: Flexible Token Selection for Efficient Long Video Understanding".

Top-down: `FrameSetSelector` (frame sets -> per-set budget shares -> top tokens of each set, merged in order)
-> `FlexSelect.score_set` (the host's reference layer: `layer_inputs`, `reference_layer_scores`,
`text_to_video_attention`) | `FlexSelectLite.score_set` (`LiteRanker`) -> Lite training: `soft_rank`,
`spearman_loss`, `lite_train_step`.

Shapes: B videos, M visual tokens (padded, `x_mask`), T time steps of the LM token grid (Qwen2.5-VL: one step = one
temporal patch = 2 video frames), S tokens of a frame set's sequence, L text rows after the video, h query heads and
h_kv key/value heads of size d_h.

Frame sets: G = ceil(T / frames_per_set) sets, set g = steps {g, g + G, g + 2G, ...}: each covers the whole video at
a stride, every step is in exactly one set, no set has more than frames_per_set steps. Set g gets an equal share of
the budget n (shares differ by at most one; a share a set cannot use goes to the others); its top-share tokens by
score are kept; the union is kept in the original order, with the original slots (hence the original multimodal
rotary ids once spliced into the host's prompt).

Scoring a set with the host (`FlexSelect`): the set's sequence is the full prompt with the other sets' video
placeholders removed; every token keeps its position id of the FULL prompt (the ids it will have in the answer
pass). The host runs its first `reference_layer` decoder layers on it; the reference layer's own q/k projections and
multimodal rotary embedding give the causal softmax attention of each text row after the video over the whole
sequence; the score of video token i is the max over heads and text rows of its column (the public code's reduction;
`reduce="mean"` gives the paper text's mean).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from qtsplus.layers import Block, LayerShape, RMSNorm, copy_decoder_layer
from qtsplus.selectors.base import Selection, Selector, SelectorInput, register, selection_from_keep

# ---------------------------------------------------------------------------------------------------------------------
# frame sets and budget shares


def frame_sets(num_frames: int, frames_per_set: int) -> list[Tensor]:
    """G = ceil(T / frames_per_set) strided sets: set g = [g, g + G, g + 2G, ...] < T."""
    num_sets = math.ceil(num_frames / frames_per_set)
    return [torch.arange(g, num_frames, num_sets) for g in range(num_sets)]


def split_budget(n: int, sizes: list[int]) -> list[int]:
    """n tokens over sets of the given sizes: equal shares (the first ones get the remainder), none above its set's
    size; what a full set cannot take is shared among the others. Sums to min(n, sum(sizes))."""
    shares = [0] * len(sizes)
    left, open_sets = n, list(range(len(sizes)))
    while left > 0 and open_sets:
        each, extra = divmod(left, len(open_sets))
        for j, i in enumerate(open_sets):
            give = min(each + (j < extra), sizes[i] - shares[i])
            shares[i] += give
            left -= give
        open_sets = [i for i in open_sets if shares[i] < sizes[i]]
    return shares


class FrameSetSelector(Selector):
    """Frame sets, an equal budget share per set, the top-scored tokens of each set, merged in original order.
    Subclasses say how a set is scored (`score_set`); `config.frames_per_set` bounds the set length in time steps."""

    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        return self.keep_top(inputs, n, self.scores(inputs))

    def keep_top(self, inputs: SelectorInput, n: Tensor, scores: Tensor) -> Selection:
        """Each set's budget share of its top-scored tokens (scores [B, M], each set scored on its own)."""
        keep = torch.zeros_like(inputs.x_mask)
        extras = []
        for b in range(inputs.x.shape[0]):
            sets = self.sets(inputs, b)
            shares = split_budget(int(n[b]), [len(tokens) for tokens in sets])
            for tokens, share in zip(sets, shares, strict=True):  # the top `share` of each set
                keep[b, tokens[scores[b, tokens].topk(share).indices]] = True
            extras.append(dict(frame_sets=len(sets), set_sizes=[len(t) for t in sets], shares=shares))
        return selection_from_keep(inputs, keep, n, scores, extras)

    @torch.no_grad()
    def scores(self, inputs: SelectorInput) -> Tensor:
        """[B, M] each token's score within its frame set (each set scored on its own; 0 at padding).
        FlexSelect's are the teacher of FlexSelect-Lite."""
        scores = torch.zeros(inputs.x_mask.shape, device=inputs.x.device)
        for b in range(inputs.x.shape[0]):
            for tokens in self.sets(inputs, b):
                scores[b, tokens] = self.score_set(inputs, b, tokens)
        return scores

    def sets(self, inputs: SelectorInput, b: int) -> list[Tensor]:
        """Video b's frame sets as the indices of their tokens in x, each ascending."""
        real = inputs.x_mask[b]
        t = inputs.positions[b, :, 0]
        num_frames = int(t[real].max()) + 1
        steps = frame_sets(num_frames, self.config.frames_per_set)
        return [(torch.isin(t, s.to(t.device)) & real).nonzero()[:, 0] for s in steps]

    @abstractmethod
    def score_set(self, inputs: SelectorInput, b: int, tokens: Tensor) -> Tensor:
        """Scores [m] of video b's tokens `tokens` [m] (one frame set), higher = more relevant."""


# ---------------------------------------------------------------------------------------------------------------------
# FlexSelect: the host's reference layer


PAPER_REFERENCE_DEPTH = 20 / 28  # the paper's reference layer for Qwen2.5-VL-7B: layer 20 of 28


def reference_layer_for(text_config: Any) -> int:
    """The default reference layer of a host: the paper's relative depth (20 of 28 for Qwen2.5-VL-7B), so 20 on the
    7B and 26 of 36 on the 3B. A heuristic until the layer is chosen by Recall@K on the host (paper Sec. 3.2)."""
    layers = text_config.num_hidden_layers
    return min(layers - 1, round(PAPER_REFERENCE_DEPTH * layers))


@dataclass
class FlexSelectConfig:
    reference_layer: int = 20  # built from a host: its `reference_layer_for` (20 on Qwen2.5-VL-7B, 26 on -3B)
    frames_per_set: int = 32  # time steps per set (a Qwen2.5-VL step = 2 frames: the paper's 64 frames)
    reduce: str = "max"  # over heads and text rows: "max" (public code) or "mean" (paper text)

    def __post_init__(self) -> None:
        assert self.reduce in ("max", "mean") and self.frames_per_set >= 1 and self.reference_layer >= 0


@register
class FlexSelect(FrameSetSelector):
    """Training-free: each frame set is scored by the host LM's reference layer; selected tokens pass unchanged."""

    name = "flexselect"
    config_class = FlexSelectConfig
    needs_host = True

    @classmethod
    def shape_fields(cls, text_config: Any) -> dict[str, Any]:
        return dict(reference_layer=reference_layer_for(text_config))

    def score_set(self, inputs: SelectorInput, b: int, tokens: Tensor) -> Tensor:
        layer = self.config.reference_layer
        return self.score_set_at_layers(inputs, b, tokens, [layer])[layer]

    def score_set_at_layers(self, inputs: SelectorInput, b: int, tokens: Tensor, layers: list[int]) -> dict[int, Tensor]:
        """The set's scores [m] at each of `layers` (one pass through the host up to the deepest): what choosing the
        reference layer compares (qtsplus.selectors.reference_layer)."""
        host = inputs.host
        lm = host.language_model
        # the set's sequence: the prompt without the other sets' placeholders; every token keeps its full-prompt id
        slots = host.video_slots[b, : int(inputs.num_tokens[b])]  # [M_b] sequence positions of visual tokens
        keep = host.attention_mask[b].bool().clone()
        keep[slots] = False
        keep[slots[tokens]] = True
        src = keep.nonzero()[:, 0]  # [S] ascending
        is_video = torch.zeros_like(keep)
        is_video[slots[tokens]] = True
        video_rows, text_rows = is_video[src], host.text_rows[b, src]  # [S], [S]

        embeds = lm.embed_tokens(host.input_ids[b, src])  # [S, d]
        embeds[video_rows] = inputs.x[b, tokens].to(embeds.dtype)  # slots ascend with the token index
        position_ids = host.position_ids[:, b, src][:, None]  # [3, 1, S]
        wanted, scores = set(layers), {}
        for layer, hidden, rope in layer_inputs(lm, embeds[None], position_ids, max(layers)):
            if layer in wanted:
                scores[layer] = reference_layer_scores(
                    lm.layers[layer], hidden, rope, text_rows, video_rows, self.config.reduce
                )
        return scores


def layer_inputs(
    lm: nn.Module, embeds: Tensor, position_ids: Tensor, last: int
) -> Iterator[tuple[int, Tensor, tuple[Tensor, Tensor]]]:
    """Run the host's decoder layers (transformers' own modules: causal mask, multimodal rotary, layers) and yield,
    for each layer 0..last, (layer, the hidden states entering it [1, S, d], (cos, sin) [1, S, d_h]).
    embeds [1, S, d], position_ids [3, 1, S]. Layer `last` itself is not run."""
    assert last < len(lm.layers), f"reference layer {last} but the host has {len(lm.layers)} layers"
    assert not lm.has_sliding_layers, "sliding-window layers are not supported"
    rope = lm.rotary_emb(embeds, position_ids)
    mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
        past_key_values=None,
    )
    hidden = embeds
    for layer in range(last + 1):
        yield layer, hidden, rope
        if layer < last:
            hidden = lm.layers[layer](hidden, attention_mask=mask, position_embeddings=rope)


def reference_layer_scores(
    block: nn.Module,
    hidden: Tensor,
    rope: tuple[Tensor, Tensor],
    text_rows: Tensor,
    video_rows: Tensor,
    reduce: str = "max",
) -> Tensor:
    """The reference decoder layer's attention from the text rows to the video rows, reduced over heads and rows.
    hidden [1, S, d] entering the layer; text_rows, video_rows [S] bool -> [M_set] float32."""
    attn = block.self_attn
    rows, cols = text_rows.nonzero()[:, 0], video_rows.nonzero()[:, 0]  # [L], [M_set]
    assert rows.numel() > 0, "no text after the video to score it with"
    h = block.input_layernorm(hidden)  # [1, S, d]
    S, L, d_h = h.shape[1], rows.numel(), attn.head_dim
    q = attn.q_proj(h[:, rows]).view(1, L, -1, d_h).transpose(1, 2)  # [1, heads, L, d_h]: only the text rows
    k = attn.k_proj(h).view(1, S, -1, d_h).transpose(1, 2)  # [1, h_kv, S, d_h]
    cos, sin = rope
    # apply_rotary_pos_emb rotates a q and a k at the same positions: rotate each on its own rows
    q, _ = apply_rotary_pos_emb(q, q, cos[:, rows], sin[:, rows])
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    return text_to_video_attention(q[0], k[0], rows, cols, attn.scaling, reduce)


def text_to_video_attention(
    q: Tensor, k: Tensor, query_index: Tensor, video_index: Tensor, scaling: float, reduce: str = "max"
) -> Tensor:
    """Causal softmax attention of the text rows over the whole sequence, read at the video columns.

    q [h, L, d_h] (rotated) queries of the rows at sequence positions query_index [L]; k [h_kv, S, d_h] (rotated)
    keys of the whole sequence (query head j reads key head j // (h / h_kv), as transformers' repeat_kv);
    video_index [M] -> [M] float32: max (or mean) over heads and rows of alpha[head, row, video_index].
    """
    h, L, d_h = q.shape
    h_kv, S, _ = k.shape
    g = h // h_kv
    logits = (q.reshape(h_kv, g * L, d_h) @ k.transpose(-1, -2)).float() * scaling  # [h_kv, g L, S]
    causal = torch.arange(S, device=k.device) <= query_index.repeat(g)[:, None]  # [g L, S]
    alpha = logits.masked_fill(~causal, -math.inf).softmax(-1)[..., video_index]  # [h_kv, g L, M]
    return alpha.amax(dim=(0, 1)) if reduce == "max" else alpha.mean(dim=(0, 1))


# ---------------------------------------------------------------------------------------------------------------------
# FlexSelect-Lite: a small ranker trained to reproduce the reference layer's ranking


@dataclass
class FlexSelectLiteConfig:
    hidden_size: int = 2048  # d of the visual tokens and question embeddings (the host's)
    ranker_size: int = 896  # Qwen2-0.5B's width, heads and FFN (its 24 layers cut to num_layers)
    num_layers: int = 4
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    frames_per_set: int = 32
    tau: float = 0.1  # soft-rank temperature, in standard deviations of the ranker's scores
    reference_layer: int = 20  # the teacher in training: FlexSelect at this layer of the host (its shape default)
    reduce: str = "max"  # the teacher's reduction over heads and text rows
    grid_features: int = 16  # sinusoid features per grid axis (t, h, w)
    initializer_range: float = 0.02
    # a Qwen2-layout causal LM (hub id or path, e.g. Qwen/Qwen2-0.5B-Instruct, as the paper) whose first num_layers
    # decoder layers initialise the ranker's blocks; its width, heads and FFN must be the ranker's. None: random
    ranker_init: str | None = None


@register
class FlexSelectLite(FrameSetSelector):
    """FlexSelect's frame sets and shares, each set scored by `LiteRanker` instead of the host LM.

    In training mode (train-selector with method=flexselect_lite) it needs the host: each frame set is also scored by
    the teacher (FlexSelect at `reference_layer`, no gradient), the loss "rank" is the Spearman loss of the ranker's
    soft ranks against the teacher's ranks, averaged over the batch's frame sets, and each video's extras carry the
    hard Spearman correlation. The tokens it keeps are the ranker's choice, as at inference. The host's LM loss plays
    no part (`lm_objective` False).
    """

    name = "flexselect_lite"
    config_class = FlexSelectLiteConfig
    lm_objective = False

    def __init__(self, config: FlexSelectLiteConfig) -> None:
        super().__init__(config)
        self.ranker = LiteRanker(config)

    @property
    def needs_host(self) -> bool:  # the teacher runs the host's layers; inference does not
        return self.training

    @classmethod
    def shape_fields(cls, text_config: Any) -> dict[str, Any]:
        return dict(hidden_size=text_config.hidden_size, reference_layer=reference_layer_for(text_config))

    def teacher(self) -> FlexSelect:
        """FlexSelect with this ranker's frame sets, reference layer and reduction: what the ranker imitates."""
        cfg = self.config
        return FlexSelect(FlexSelectConfig(cfg.reference_layer, cfg.frames_per_set, cfg.reduce))

    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        if not self.training:
            return super().select(inputs, n, generator)
        teacher = self.teacher().scores(inputs)  # [B, M], no gradient
        student = torch.zeros_like(teacher)
        losses, extras = [], []
        for b in range(inputs.x.shape[0]):
            correlations = []
            for tokens in self.sets(inputs, b):
                if len(tokens) < 2:  # a single token has no ranking to learn
                    continue
                s, t = self.score_set(inputs, b, tokens)[None], teacher[b, tokens][None]  # [1, m]
                ones = torch.ones_like(t, dtype=torch.bool)
                losses.append(spearman_loss(s, t, ones, self.config.tau))
                correlations.append(float(spearman(s.detach(), t, ones)))
                student[b, tokens] = s.detach()[0]
            extras.append(dict(spearman=sum(correlations) / len(correlations) if correlations else math.nan))
        sel = self.keep_top(inputs, n, student)
        for row, extra in zip(sel.extras, extras, strict=True):
            row.update(extra)
        # no set with two tokens: a zero loss that still touches every weight (so each rank's backward has a graph)
        zero = sum(p.sum() for p in self.parameters()) * 0.0
        sel.losses["rank"] = torch.stack(losses).mean() if losses else zero
        return sel

    def score_set(self, inputs: SelectorInput, b: int, tokens: Tensor) -> Tensor:
        q = inputs.q[b : b + 1, inputs.q_mask[b]]  # [1, L, d]
        x, positions = inputs.x[b : b + 1, tokens], inputs.positions[b : b + 1, tokens]  # [1, m, d], [.., 3]
        x_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        q_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        return self.ranker(x, x_mask, q, q_mask, positions)[0]


class LiteRanker(nn.Module):
    """[video tokens; question tokens] -> shared input projection + token-type and grid-position embeddings ->
    num_layers bidirectional pre-norm blocks (Qwen2 decoder-layer layout) -> RMSNorm -> linear score per video token."""

    def __init__(self, config: FlexSelectLiteConfig) -> None:
        super().__init__()
        self.config = config
        r = config.ranker_size
        self.in_proj = nn.Linear(config.hidden_size, r)
        self.kind = nn.Embedding(2, r)  # 0: video token, 1: question token
        self.grid = nn.Linear(3 * config.grid_features, r, bias=False)
        block_config = LayerShape(hidden_size=r, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                                  intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps)
        self.blocks = nn.ModuleList(Block(block_config, cross=False) for _ in range(config.num_layers))
        self.norm = RMSNorm(r, config.rms_norm_eps)
        self.head = nn.Linear(r, 1)
        self.init_parameters()

    def init_parameters(self, init=nn.init) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms; then the blocks from `ranker_init`'s first
        decoder layers when set. `init`: torch.nn.init, or transformers' flag-respecting copy when a host model
        initialises its missing weights (then a ranker loaded from a checkpoint is left alone)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                init.ones_(module.weight)
        params = list(self.blocks.parameters())
        loaded = all(getattr(p, "_is_hf_initialized", False) for p in params)
        meta = any(p.is_meta for p in params)  # built inside a host's from_pretrained: the host's init comes later
        if self.config.ranker_init is not None and not loaded and not meta:
            self.init_blocks_from(self.config.ranker_init, copy_=getattr(init, "copy_", Tensor.copy_))

    @torch.no_grad()
    def init_blocks_from(self, model_id: str, copy_=Tensor.copy_) -> None:
        """Copy the first num_layers decoder layers of a Qwen2-layout causal LM into the blocks."""
        from transformers import AutoModelForCausalLM

        from qtsplus.tiny import resolve_model

        path, revision = resolve_model(model_id, None)
        source = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch.float32)
        layers = source.model.layers
        if len(layers) < len(self.blocks):
            raise ValueError(f"ranker_init {model_id}: {len(layers)} layers for {len(self.blocks)} ranker blocks")
        for i, block in enumerate(self.blocks):
            if not copy_decoder_layer(block, layers[i], copy_):
                raise ValueError(f"ranker_init {model_id}: its layer {i} does not fit a ranker block (width "
                                 f"{self.config.ranker_size}, {self.config.num_heads} / {self.config.num_kv_heads} "
                                 f"heads, FFN {self.config.intermediate_size})")

    def forward(self, x: Tensor, x_mask: Tensor, q: Tensor, q_mask: Tensor, positions: Tensor) -> Tensor:
        """x [B, M, d], q [B, L, d], positions [B, M, 3] -> scores [B, M] float32 (padding: arbitrary)."""
        M = x.shape[1]
        grid = self.grid(grid_features(positions, self.config.grid_features))  # [B, M, r]
        hx = self.in_proj(x) + self.kind.weight[0] + grid
        hq = self.in_proj(q) + self.kind.weight[1]
        h = torch.cat([hx, hq], 1)  # [B, M + L, r]
        mask = torch.cat([x_mask, q_mask], 1)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h[:, :M])).squeeze(-1).float()  # [B, M]


def grid_features(positions: Tensor, n: int) -> Tensor:
    """[B, M, 3] grid positions -> [B, M, 3 n]: sin, cos of each axis at n/2 geometric frequencies (1 .. 1/1000)."""
    exponent = torch.arange(n // 2, device=positions.device, dtype=torch.float32) / max(n // 2 - 1, 1)
    freqs = 1000.0**-exponent
    angles = positions.float()[..., None] * freqs  # [B, M, 3, n / 2]
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def soft_rank(scores: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Pairwise-sigmoid soft rank: rank_i = 1/2 + sum_j sigmoid((z_i - z_j) / tau) over real j, z = the row's scores
    standardised over its real entries (so tau is in standard deviations). -> the ascending rank 1..M (ties shared)
    as tau -> 0; differentiable. scores, mask: [B, M] -> [B, M]. Memory O(B M^2): run it on one frame set."""
    m = mask.float()
    count = m.sum(-1, keepdim=True)
    mean = (scores * m).sum(-1, keepdim=True) / count
    std = (((scores - mean) ** 2 * m).sum(-1, keepdim=True) / count).sqrt().clamp_min(1e-8)
    z = (scores - mean) / std
    pairs = torch.sigmoid((z[:, :, None] - z[:, None, :]) / tau)  # [B, M, M]: sigma((z_i - z_j) / tau)
    return 0.5 + (pairs * m[:, None, :]).sum(-1)


def hard_rank(scores: Tensor, mask: Tensor) -> Tensor:
    """Ascending ranks 1..M_b of the real entries of each row (padding ranks below them), float32. [B, M]."""
    order = scores.float().masked_fill(~mask, -math.inf).argsort(-1)
    arange = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, arange)
    return (ranks + 1 - (~mask).sum(-1, keepdim=True)).float()


def pearson(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Correlation of each row's real entries. a, b, mask: [B, M] -> [B]."""
    m = mask.float()
    count = m.sum(-1, keepdim=True)
    a = (a - (a * m).sum(-1, keepdim=True) / count) * m
    b = (b - (b * m).sum(-1, keepdim=True) / count) * m
    return (a * b).sum(-1) / (a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt()).clamp_min(1e-12)


def spearman(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Spearman rank correlation per row (the metric). [B, M] x 2 -> [B]."""
    return pearson(hard_rank(a, mask), hard_rank(b, mask), mask)


def spearman_loss(student: Tensor, teacher: Tensor, mask: Tensor, tau: float) -> Tensor:
    """The paper's Eq. 4: 1 - Pearson(softrank(student), rank(teacher)), averaged over the batch."""
    return (1 - pearson(soft_rank(student, mask, tau), hard_rank(teacher, mask), mask)).mean()


def lite_train_step(
    selector: FlexSelectLite, optimizer: torch.optim.Optimizer, inputs: SelectorInput, teacher: Tensor
) -> dict[str, float]:
    """One optimiser step of the ranker on a batch of clips (each at most one frame set long) against the teacher's
    scores [B, M] (`FlexSelect.scores` on the same inputs). Returns the loss and the hard Spearman before the step."""
    selector.train()
    student = selector.ranker(inputs.x, inputs.x_mask, inputs.q, inputs.q_mask, inputs.positions)  # [B, M]
    loss = spearman_loss(student, teacher, inputs.x_mask, selector.config.tau)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    rho = spearman(student.detach(), teacher, inputs.x_mask).mean()
    return dict(loss=float(loss.detach()), spearman=float(rho))
