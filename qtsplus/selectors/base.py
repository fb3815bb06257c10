"""The contract every visual-token selector meets, and the registry the evaluation harness looks them up in.

A selector sits between the vision tower (after its patch merger, so tokens are already in the LM hidden size d) and
the language model. It reads

    SelectorInput: x [B, M, d] visual tokens with their (t, h, w) grid positions [B, M, 3] and times [B, M] (seconds),
                   q [B, L, d] question embeddings, padding masks, and optionally `host`: the host LM and the full
                   prompt (for methods that run the host's own layers, e.g. FlexSelect)

plus a budget (a token count or a ratio of M, the same for every method), and returns

    Selection: tokens [B, N, d] for the LM (copies of kept rows of x, re-encoded rows, or synthesized tokens), the index
               in x each output token stands at [B, N] (strictly ascending), their positions and times, relevance
               scores [B, M] when the method ranks, auxiliary losses, and per-video diagnostics.

Every output token stands at one input slot (`indices`): a kept token at its own, a synthesized token at an anchor
(VQToken: its cluster's first member). The host splices output j into the placeholder of visual token indices[j], so
it keeps that slot's multimodal rotary position id, and drops the other placeholders, whatever the method.

A method is a subclass of `Selector` with a config dataclass, registered under a name with `@register`; the harness
builds it with `build_selector(name, text_config, **overrides)` and calls `selector(inputs, budget)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from qtsplus.host.splice import gather_rows, video_slots

# ---------------------------------------------------------------------------------------------------------------------
# input


@dataclass
class HostLM:
    """The host LM and the full prompt, for methods that score with the host's own layers (FlexSelect).

    One video per sample: row b of the prompt holds the placeholders of video b, `video_slots[b, i]` is the sequence
    position of visual token i (the same order as `SelectorInput.x`).
    """

    language_model: nn.Module  # transformers' Qwen2_5_VLTextModel: embed_tokens, layers, rotary_emb, config
    input_ids: Tensor  # [B, S] the full prompt, video placeholders included
    attention_mask: Tensor  # [B, S] 1 for real tokens
    position_ids: Tensor  # [3, B, S] multimodal rotary ids (t, h, w) of the full sequence (get_rope_index)
    video_slots: Tensor  # [B, M] long, sequence position of each visual token (0 at padding)
    text_rows: Tensor  # [B, S] bool, the text after the video: the rows whose attention scores the video


@dataclass
class SelectorInput:
    x: Tensor  # [B, M, d] visual tokens in the LM hidden size
    positions: Tensor  # [B, M, 3] long (t, h, w) on the LM token grid: temporal patch, merged row, column
    times: Tensor  # [B, M] float32 seconds of each token from the first sampled frame
    q: Tensor  # [B, L, d] question embeddings (the LM's token embeddings of the question)
    x_mask: Tensor | None = None  # [B, M] bool, True for real tokens (None: all real)
    q_mask: Tensor | None = None  # [B, L] bool (None: all real)
    host: HostLM | None = None

    def __post_init__(self) -> None:
        B, M, _ = self.x.shape
        if self.x_mask is None:
            self.x_mask = torch.ones(B, M, dtype=torch.bool, device=self.x.device)
        if self.q_mask is None:
            self.q_mask = torch.ones(self.q.shape[:2], dtype=torch.bool, device=self.q.device)
        self.x_mask, self.q_mask = self.x_mask.bool(), self.q_mask.bool()
        assert self.positions.shape == (B, M, 3) and self.times.shape == (B, M)

    @property
    def num_tokens(self) -> Tensor:  # [B] long, M per video
        return self.x_mask.sum(-1)

    @classmethod
    def from_grid(
        cls,
        x: Tensor,
        q: Tensor,
        grid: Tensor | tuple[int, int, int],
        seconds_per_step: Tensor | float = 1.0,
        q_mask: Tensor | None = None,
        host: HostLM | None = None,
    ) -> SelectorInput:
        """Tokens laid out t-major on a (t, h, w) grid per video (grid [B, 3] or one (t, h, w) for all, in LM tokens);
        x is [B, M, d] with M >= the largest t h w, padded after each video's tokens."""
        B, M, _ = x.shape
        grid = torch.as_tensor(grid, dtype=torch.long).reshape(-1, 3).expand(B, 3)
        pos = [grid_positions(*g.tolist()) for g in grid]
        positions = pad_sequence(pos, batch_first=True)  # [B, max thw, 3]
        positions = torch.cat([positions, positions.new_zeros(B, M - positions.shape[1], 3)], 1).to(x.device)
        x_mask = torch.arange(M, device=x.device) < grid.prod(-1).to(x.device)[:, None]
        seconds = torch.as_tensor(seconds_per_step, dtype=torch.float32, device=x.device).reshape(-1, 1)
        times = positions[..., 0].float() * seconds
        return cls(x=x, positions=positions, times=times, q=q, x_mask=x_mask, q_mask=q_mask, host=host)

    @classmethod
    def from_qwen(
        cls,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        pixel_values_videos: Tensor,
        video_grid_thw: Tensor,
        second_per_grid_ts: Tensor | None = None,
        question_mask: Tensor | None = None,
    ) -> SelectorInput:
        """Selector input (with `host`) from a Qwen2.5-VL prompt holding one video (and no image) per sample.

        `model` is a transformers Qwen2_5_VLForConditionalGeneration (or a subclass). Visual tokens come from its
        vision tower, q from its token embeddings of `question_mask` (default: the text after the sample's last
        vision token, minus padding), positions from the merged grid, times = temporal patch x second_per_grid_ts.
        """
        cfg, base = model.config, model.model
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        is_video = input_ids == cfg.video_token_id
        assert not (input_ids == cfg.image_token_id).any(), "images in the prompt are not supported"
        position_ids, _ = base.get_rope_index(
            input_ids, 2 * is_video.int(), None, video_grid_thw, second_per_grid_ts, attention_mask
        )  # [3, B, S]
        videos = base.get_video_features(pixel_values_videos, video_grid_thw).pooler_output  # V x [M_v, d]
        owner, slots, _ = video_slots(is_video, [v.shape[0] for v in videos])
        one_each = torch.equal(owner, torch.arange(input_ids.shape[0], device=owner.device))
        assert one_each, "one video per sample"
        x = pad_sequence(list(videos), batch_first=True)  # [B, M, d]

        if question_mask is None:
            vision_ids = [cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
            vision = torch.isin(input_ids, torch.tensor(vision_ids, device=input_ids.device))
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            last_vision = torch.where(vision, pos, -1).amax(-1)  # [B]
            question_mask = (pos > last_vision[:, None]) & attention_mask.bool()
        embeds = model.get_input_embeddings()(input_ids)  # [B, S, d]
        q, q_mask = gather_rows(embeds, question_mask.bool())  # [B, L, d], [B, L]

        merge = cfg.vision_config.spatial_merge_size
        grid = video_grid_thw.cpu() // torch.tensor([1, merge, merge])  # [B, 3] in LM tokens
        seconds = 1.0 if second_per_grid_ts is None else second_per_grid_ts
        host = HostLM(
            language_model=base.language_model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            video_slots=slots,
            text_rows=question_mask.bool(),
        )
        return cls.from_grid(x.to(embeds.dtype), q, grid, seconds, q_mask=q_mask, host=host)


def grid_positions(t: int, h: int, w: int) -> Tensor:
    """[t h w, 3] long (t, h, w) of a grid in t-major raster order (the order of Qwen2.5-VL's merged video tokens)."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww], -1).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------------------------
# budget


@dataclass(frozen=True)
class Budget:
    """Tokens per video for the LM: a count (`tokens`) or a fraction of M (`ratio`); resolved per video to
    n = clamp(tokens, 1, M) or clamp(ceil(ratio M), 1, M)."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        assert (self.tokens is None) != (self.ratio is None), "give exactly one of tokens, ratio"
        assert self.tokens is None or self.tokens >= 1
        assert self.ratio is None or 0.0 < self.ratio <= 1.0

    @classmethod
    def of(cls, budget: Budget | int | float | str) -> Budget:
        """An int is a token count, a float a ratio of M; strings: "512", "0.1", "10%"."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, str):
            if budget.endswith("%"):
                budget = float(budget[:-1]) / 100
            else:
                budget = float(budget) if "." in budget else int(budget)
        return cls(tokens=budget) if isinstance(budget, int) else cls(ratio=float(budget))

    def resolve(self, num_tokens: Tensor) -> Tensor:
        """num_tokens [B] (M per video) -> n [B] long."""
        if self.tokens is not None:
            n = torch.full_like(num_tokens, self.tokens)
        else:  # the 1e-4 keeps float noise (0.05 * 2000 = 100.0000015) from adding one
            n = torch.ceil(num_tokens.double() * self.ratio - 1e-4).long()
        return torch.minimum(n, num_tokens).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# output


@dataclass
class Selection:
    tokens: Tensor  # [B, N, d] tokens for the LM, in ascending order of `indices`
    token_mask: Tensor  # [B, N] bool, True for real output tokens
    indices: Tensor  # [B, N] long, the x slot each output token stands at; strictly ascending, 0 at padding
    positions: Tensor  # [B, N, 3] (t, h, w) of those slots
    times: Tensor  # [B, N] seconds of those slots
    budget: Tensor  # [B] long, the n this call was given
    num_tokens: Tensor  # [B] long, M
    scores: Tensor | None = None  # [B, M] what the method ranked by (0 at padding); None if it does not rank
    losses: dict[str, Tensor] = field(default_factory=dict)  # auxiliary losses (scalars, already weighted)
    extras: list[dict[str, Any]] = field(default_factory=list)  # per video: method-specific diagnostics

    @property
    def num_kept(self) -> Tensor:  # [B]
        return self.token_mask.sum(-1)

    @property
    def loss(self) -> Tensor | None:
        """Sum of the auxiliary losses (None when there are none): add it to the LM loss."""
        return sum(self.losses.values()) if self.losses else None

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per video, on the CPU: M, n, how many tokens the LM gets, their slots, the scores, and the extras."""
        out = []
        for b in range(self.tokens.shape[0]):
            m, kept = int(self.num_tokens[b]), self.token_mask[b]
            row = dict(
                num_tokens=m,
                budget=int(self.budget[b]),
                kept=int(kept.sum()),
                indices=self.indices[b][kept].cpu(),
                scores=None if self.scores is None else self.scores[b, :m].detach().cpu(),
            )
            out.append({**row, **(self.extras[b] if self.extras else {})})
        return out


def selection_from_keep(
    inputs: SelectorInput,
    keep: Tensor,
    budget: Tensor,
    scores: Tensor | None = None,
    extras: list[dict[str, Any]] | None = None,
) -> Selection:
    """A Selection that passes the kept rows of x through unchanged. keep: [B, M] bool."""
    indices, token_mask = compact(keep & inputs.x_mask)  # [B, N], [B, N]
    return selection_at(inputs, indices, token_mask, gather(inputs.x, indices), budget, scores, extras=extras)


def selection_at(
    inputs: SelectorInput,
    indices: Tensor,
    token_mask: Tensor,
    tokens: Tensor,
    budget: Tensor,
    scores: Tensor | None = None,
    losses: dict[str, Tensor] | None = None,
    extras: list[dict[str, Any]] | None = None,
) -> Selection:
    """A Selection of `tokens` [B, N, d] standing at the x slots `indices` [B, N] (ascending)."""
    return Selection(
        tokens=tokens,
        token_mask=token_mask,
        indices=indices,
        positions=gather(inputs.positions, indices) * token_mask[..., None],
        times=inputs.times.gather(1, indices) * token_mask,
        budget=budget,
        num_tokens=inputs.num_tokens,
        scores=None if scores is None else scores.masked_fill(~inputs.x_mask, 0.0),
        losses=losses or {},
        extras=extras or [{} for _ in range(indices.shape[0])],
    )


def gather(values: Tensor, indices: Tensor) -> Tensor:
    """values [B, M, c], indices [B, N] -> [B, N, c]."""
    return values.gather(1, indices[..., None].expand(-1, -1, values.shape[-1]))


def compact(keep: Tensor) -> tuple[Tensor, Tensor]:
    """[B, M] bool -> kept indices [B, N] in ascending (temporal) order and their mask [B, N]; N = max kept."""
    count = keep.sum(-1)
    n = int(count.max())
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[:, :n]  # kept first, each group ascending
    token_mask = torch.arange(n, device=keep.device) < count[:, None]
    return order.masked_fill(~token_mask, 0), token_mask


def topk_keep(scores: Tensor, n: Tensor) -> Tensor:
    """[B, M] scores (-inf where not eligible), n [B] -> [B, M] bool, the top n[b] of each row."""
    top = scores.topk(int(n.max()), dim=-1).indices  # [B, n_max]
    take = torch.arange(top.shape[-1], device=scores.device) < n[:, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, take)


# ---------------------------------------------------------------------------------------------------------------------
# the selector interface and the registry


class Selector(nn.Module, ABC):
    """A visual-token selector. Subclasses set `name` and `config_class` and implement `select`.

    needs_host: the method runs the host LM's layers (SelectorInput.host must be set).
    budgeted: the method honours the budget: at most n output tokens per video (False only for `none`).
    fills_budget: it returns exactly n tokens per video (False for methods that pick their own count under the cap,
        or keep whole units such as frames).
    lm_objective: in training, the host's LM loss on the answer is part of the objective (VQToken's VQ-Attention
        learns through it). False: the method's own auxiliary losses are the whole objective and the host skips its LM
        (FlexSelect-Lite learns the reference layer's ranking; top-k selection passes no gradient from the LM).

    A method with parameters can be trained by train-selector (`TrainConfig.method`); it then becomes the checkpoint's
    own selector (`QTSplusConfig.selection_method`). In training mode it returns its objective in `losses`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    needs_host: ClassVar[bool] = False
    budgeted: ClassVar[bool] = True
    lm_objective: ClassVar[bool] = True
    fills_budget: bool = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def from_text_config(cls, text_config: Any | None = None, **overrides: Any) -> Selector:
        """Build with the host's shapes where the method has any (see `shape_fields`), overridden by `overrides`."""
        names = {f.name for f in fields(cls.config_class)}
        unknown = set(overrides) - names
        assert not unknown, f"unknown {cls.config_class.__name__} fields: {sorted(unknown)}"
        shapes = cls.shape_fields(text_config) if text_config is not None else {}
        return cls(cls.config_class(**{**shapes, **overrides}))

    @classmethod
    def shape_fields(cls, text_config: Any) -> dict[str, Any]:
        """Config fields taken from the host LM's text config (hidden size, heads ...): none by default."""
        return {}

    def forward(
        self,
        inputs: SelectorInput,
        budget: Budget | int | float | str,
        generator: torch.Generator | None = None,
    ) -> Selection:
        if self.needs_host:
            assert inputs.host is not None, (
                f"{self.name} scores with the host LM: SelectorInput.host is required"
            )
        n = Budget.of(budget).resolve(inputs.num_tokens)  # [B]
        out = self.select(inputs, n, generator)
        if self.budgeted:
            assert bool((out.num_kept <= n).all()), f"{self.name} returned more tokens than its budget"
        return out

    @abstractmethod
    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        """n: [B] long, the budget of each video, 1 <= n <= M."""


SELECTORS: dict[str, type[Selector]] = {}


class PerVideoSelector(Selector):
    """A training-free method that keeps rows of x and decides one video at a time, from its real rows alone.

    Subclasses implement `select_video(x [m, d], positions [m, 3], n) -> (kept [k] rows of x, scores [m], extras)`;
    the base class loops over the batch, skips padding and assembles the `Selection`."""

    @abstractmethod
    def select_video(self, x: Tensor, positions: Tensor, n: int) -> tuple[Tensor, Tensor, dict[str, Any]]: ...

    @torch.no_grad()
    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        keep = torch.zeros_like(inputs.x_mask)
        scores = torch.zeros(inputs.x_mask.shape, device=inputs.x.device)
        extras = []
        for b in range(inputs.x.shape[0]):
            real, x = real_rows(inputs, b)  # [m], [m, d]
            kept, s, extra = self.select_video(x, inputs.positions[b, real], int(n[b]))
            keep[b, real[kept]] = True
            scores[b, real] = s
            extras.append(extra)
        return selection_from_keep(inputs, keep, n, scores, extras)


def real_rows(inputs: SelectorInput, b: int) -> tuple[Tensor, Tensor]:
    """Video b's real rows: their indices [m] in x and the rows [m, d] (a view of x when they come first, as
    `SelectorInput.from_grid` and `from_qwen` lay them out; a gathered copy otherwise)."""
    real = inputs.x_mask[b].nonzero()[:, 0]
    m = real.numel()
    prefix = m == 0 or int(real[-1]) == m - 1
    return real, inputs.x[b, :m] if prefix else inputs.x[b, real]


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: SELECTORS[cls.name] = cls. `qtsplus.selectors` imports every method module, so the registry
    is complete whenever anything from the package is imported."""
    assert cls.name not in SELECTORS, f"selector {cls.name!r} registered twice"
    SELECTORS[cls.name] = cls
    return cls


def build_selector(name: str, text_config: Any | None = None, **overrides: Any) -> Selector:
    """SELECTORS[name] with the host's shapes (from `text_config`, e.g. a Qwen2.5-VL text config) and overrides."""
    assert name in SELECTORS, f"unknown selector {name!r}; known: {sorted(SELECTORS)}"
    return SELECTORS[name].from_text_config(text_config, **overrides)
