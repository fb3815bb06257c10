"""QTSplus on Qwen2.5-VL: vision tower -> QTSplusSelector -> kept tokens spliced at the video placeholder -> LM.

A thin subclass of transformers' `Qwen2_5_VLForConditionalGeneration`: only the prefill of a sequence that carries
video pixels takes a new path; everything else (text, images, KV-cache decoding, selection switched off) is the base
model's own forward.

The prefill path, per batch:
1. 3-D rotary position ids (t, h, w) of the FULL sequence, from the base model's `get_rope_index` (time-aligned with
   `second_per_grid_ts`).
2. Video features from the base vision tower (or the precomputed `video_embeds`, qtsplus.features): one [M_v, d]
   block per video, in placeholder order.
3. `select`: the selector scores each video against its sample's question (the LM's token embeddings of the question
   tokens, `question_mask`), keeps n_v tokens in temporal order and re-encodes them with their absolute time.
4. `qtsplus.host.splice.splice`: the pruned video placeholders leave the sequence with their position ids; kept
   tokens keep their original (t, h, w) position ids; sequences are left-padded to a common length.
5. `run_language_model`: the LM runs on the shortened sequence; `labels` are shortened the same way.

Step 3 can be another method of qtsplus.selectors: borrowed for evaluation (`use_method`), or the checkpoint's own
selector when it was trained with one (`QTSplusConfig.selection_method`: flexselect_lite, vqtoken). Steps 4-5 are the
same for every method. In training, a method whose objective is its own loss alone (FlexSelect-Lite) ends the
forward after step 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

from qtsplus.checkpoints import QTSPLUS_MODEL_TYPE
from qtsplus.host.splice import Spliced, gather_rows, splice, video_slots
from qtsplus.selectors.qtsplus.config import SelectorConfig
from qtsplus.selectors.qtsplus.selector import QTSplusSelector, SelectorOutput

# transformers' own renaming for Qwen2_5_VLForConditionalGeneration checkpoints (a no-op on already-new keys)
QWEN2_5_VL_CHECKPOINT_KEYS = {
    r"^visual": "model.visual",
    r"^model(?!\.(language_model|visual))": "model.language_model",
}


QTSPLUS_METHOD = "qtsplus"


@strict
class QTSplusConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL's config plus the selection method between its vision tower and LM.

    selection_method "qtsplus" (default): the QTSplus selector, configured by `selector_config` (a `SelectorConfig`
    as a dict; None -> defaults shaped like the LM). Any other name of `qtsplus.selectors.SELECTORS` (a trainable
    method: flexselect_lite, vqtoken): that selector, configured by `method_config` (its config dataclass as a dict;
    None -> defaults shaped like the LM) and run with `method_budget` tokens (int) or ratio of M (float).
    """

    model_type = QTSPLUS_MODEL_TYPE
    selector_config: dict | None = None
    selection_method: str = QTSPLUS_METHOD
    method_config: dict | None = None
    method_budget: float | int | None = None


@dataclass
class QTSplusOutput(CausalLMOutputWithPast):
    """`loss` = lm_loss + budget_loss when both exist. `attention_mask` / `position_ids` describe the pruned sequence
    the LM actually saw (prefill only): generation continues from them."""

    lm_loss: Tensor | None = None
    budget_loss: Tensor | None = None
    selection: SelectorOutput | None = None
    attention_mask: Tensor | None = None  # [B, S'] of the pruned, left-padded sequence
    position_ids: Tensor | None = None  # [4, B, S']: text row, then the kept tokens' original (t, h, w)
    labels: Tensor | None = None  # [B, S'] labels of the pruned sequence


class QTSplusForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = QTSplusConfig
    config: QTSplusConfig

    def __init__(self, config: QTSplusConfig) -> None:
        super().__init__(config)
        self.selector_config = SelectorConfig.from_text_config(
            config.text_config, **(config.selector_config or {})
        )
        config.selector_config = self.selector_config.to_dict()
        if config.selection_method == QTSPLUS_METHOD:
            self.selector = QTSplusSelector(self.selector_config)
        else:  # another trainable method of qtsplus.selectors is this checkpoint's selector
            self.selector = build_method(config)
        self.selection = True  # False: skip the selector, keep every video token (exactly the base model)
        # inference only: another method of qtsplus.selectors (a `Selector`) and its per-call budget replace the
        # checkpoint's selector, so every method runs through the same vision tower, splice and LM (`use_method`).
        # Kept out of the module tree (a plain attribute): a borrowed method is not part of this checkpoint.
        self.__dict__["method"] = None
        self.method_budget = None
        self.last_prefill: dict | None = None  # per-sample token counts of the last prefill (diagnostics)
        self.post_init()  # initialises only the selector: everything else is already marked initialised

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        # transformers visits only modules that own tensors, children first: the selector (it owns rho_bar) comes after
        # its Linears, and, in from_pretrained of a base checkpoint, after the LM weights are loaded
        if isinstance(module, QTSplusSelector):
            init.constant_(module.rho_bar, module.config.rho_bar_init)
            init.zeros_(module.reencoder.time.proj.weight)
            if module.config.init_from_lm:
                module.init_from_decoder_layers(self.model.language_model.layers, copy_=init.copy_)

    def _initialize_weights(self, module: torch.nn.Module, is_custom_code: bool = False) -> None:
        # parts of other selectors with an init of their own (VQ-Attention's zero W_O): transformers marks a module
        # that owns no tensors itself as done without calling `_init_weights`, so catch them here; their children
        # (visited first) got the default init, `init_parameters` then applies its own through transformers' `init`
        # functions, which leave loaded weights alone
        if hasattr(module, "init_parameters") and not getattr(module, "_is_hf_initialized", False):
            module.init_parameters(init)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    @property
    def uses_qtsplus(self) -> bool:
        """True when this checkpoint's own selector is the QTSplus selector (not another method of qtsplus.selectors)."""
        return isinstance(self.selector, QTSplusSelector)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> QTSplusForConditionalGeneration:
        """transformers' from_pretrained; also reads base Qwen2.5-VL checkpoints, whose keys use the older layout
        (`model.layers.*`, `visual.*`): transformers renames those by class name, which ours is not."""
        kwargs.setdefault("key_mapping", QWEN2_5_VL_CHECKPOINT_KEYS)
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def from_qwen(
        cls,
        base: Qwen2_5_VLForConditionalGeneration,
        selection_method: str = QTSPLUS_METHOD,
        method_config: dict | None = None,
        method_budget: float | int | None = None,
        **selector_config,
    ) -> QTSplusForConditionalGeneration:
        """Wrap an in-memory Qwen2.5-VL: copy its weights, build the selector (QTSplus from its decoder layers if they
        fit, or another trainable method of qtsplus.selectors: `selection_method`, `method_config`, `method_budget`)."""
        base_config = {k: v for k, v in base.config.to_dict().items() if k != "model_type"}
        model = cls(QTSplusConfig.from_dict({
            **base_config, "selector_config": selector_config, "selection_method": selection_method,
            "method_config": method_config, "method_budget": method_budget}))
        model.to(device=base.device, dtype=base.dtype)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("selector.") for k in missing), (missing, unexpected)
        if model.uses_qtsplus and model.selector_config.init_from_lm:
            model.selector.init_from_decoder_layers(model.model.language_model.layers)
        return model

    def freeze_base(self, train_lm: bool = False) -> None:
        """QTSplus-3B: only the selector trains. QTSplus-3B-FT (train_lm=True): selector + LM. Vision tower frozen."""
        self.model.visual.requires_grad_(False)
        self.model.language_model.requires_grad_(train_lm)
        self.lm_head.requires_grad_(train_lm)
        self.selector.requires_grad_(True)

    def mm_token_type_ids(self, input_ids: Tensor) -> Tensor:
        """Qwen2.5-VL's token types: 0 text, 1 image, 2 video."""
        image = input_ids == self.config.image_token_id
        video = input_ids == self.config.video_token_id
        return image.int() + 2 * video.int()

    def default_question_mask(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None
    ) -> Tensor:
        """The question = the text after the sample's last vision token, minus padding and supervised (answer) tokens.

        Pass `question_mask` to `forward` when the question sits elsewhere, or when running without a KV cache on a
        sequence that already holds generated tokens.
        """
        cfg = self.config
        vision = torch.isin(
            input_ids,
            torch.tensor(
                [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id],
                device=input_ids.device,
            ),
        )
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_vision = torch.where(vision, pos, -1).amax(-1)  # [B]
        mask = (pos > last_vision[:, None]) & attention_mask.bool()
        if labels is not None:
            mask &= labels == -100
        return mask

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        second_per_grid_ts: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        question_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        video_embeds: Tensor | None = None,
        **kwargs,
    ) -> QTSplusOutput | CausalLMOutputWithPast:
        """Base Qwen2.5-VL forward, plus `question_mask` [B, S] (bool: the question tokens that score the video;
        default `default_question_mask`), `generator` (the training gate's random draws) and `video_embeds`
        [sum M_v, d]: the vision tower's output for every video, packed in placeholder order (`video_grid_thw` still
        given), used instead of running the tower on `pixel_values_videos` (qtsplus.features). Ignored on steps
        without video placeholders (decoding)."""
        if mm_token_type_ids is None and input_ids is not None:  # the base model needs them for 3-D positions
            mm_token_type_ids = self.mm_token_type_ids(input_ids)
        if video_embeds is not None:
            if pixel_values_videos is not None:
                raise ValueError("pass pixel_values_videos or video_embeds, not both")
            if input_ids is None or not (input_ids == self.config.video_token_id).any():
                video_embeds = None  # a decoding step: the video is already in the KV cache
        if not self.selection and video_embeds is not None:  # the base forward, with the precomputed features
            kwargs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(
                pooler_output=self.split_video_embeds(video_embeds, video_grid_thw))}
        if not self.selection or (pixel_values_videos is None and video_embeds is None):
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                second_per_grid_ts=second_per_grid_ts,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        assert input_ids is not None and inputs_embeds is None, "selection needs input_ids (video, question)"
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if position_ids is None:
            position_ids, _ = self.model.get_rope_index(
                input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask
            )
        # [3, B, S]: (t, h, w) of the full sequence (generate() passes a text row first: dropped, renumbered later)
        position_ids = position_ids[-3:]
        if question_mask is None:
            question_mask = self.default_question_mask(input_ids, attention_mask, labels)

        text_embeds = self.model.get_input_embeddings()(input_ids)  # [B, S, d]
        inputs_embeds = self.embed_images(input_ids, text_embeds, pixel_values, image_grid_thw)
        videos = (self.split_video_embeds(video_embeds, video_grid_thw) if video_embeds is not None
                  else self.model.get_video_features(pixel_values_videos, video_grid_thw).pooler_output)
        is_video = input_ids == self.config.video_token_id  # [B, S]

        sel, owner, slots = self.select(videos, text_embeds, is_video, input_ids, attention_mask, position_ids,
                                        question_mask, video_grid_thw, second_per_grid_ts, generator)
        if self.training and not getattr(self.method or self.selector, "lm_objective", True):
            return QTSplusOutput(loss=sel.loss, selection=sel)  # e.g. FlexSelect-Lite: its rank loss is all it learns
        spliced = splice(inputs_embeds, position_ids, attention_mask, labels, is_video, owner, slots, sel)
        self.model.rope_deltas = spliced.rope_deltas
        return self.run_language_model(spliced, sel, past_key_values, use_cache, logits_to_keep, owner=owner, **kwargs)

    def embed_images(self, input_ids: Tensor, embeds: Tensor, pixel_values: Tensor | None,
                     image_grid_thw: Tensor | None) -> Tensor:
        """The token embeddings with image features at the image placeholders (images are never pruned)."""
        if pixel_values is None:
            return embeds
        image_embeds = torch.cat(self.model.get_image_features(pixel_values, image_grid_thw).pooler_output)
        image_embeds = image_embeds.to(embeds.dtype)
        image_mask, _ = self.model.get_placeholder_mask(input_ids, embeds, image_features=image_embeds)
        return embeds.masked_scatter(image_mask, image_embeds)

    def select(self, videos: tuple[Tensor, ...], text_embeds: Tensor, is_video: Tensor, input_ids: Tensor,
               attention_mask: Tensor, position_ids: Tensor, question_mask: Tensor, video_grid_thw: Tensor,
               second_per_grid_ts: Tensor | None, generator: torch.Generator | None):
        """Run the selection method on every video against its sample's question.

        videos: V x [M_v, d] in placeholder (batch, sequence) order. Returns the selection (a `SelectorOutput` of
        QTSplus or a `Selection` of another method), the owning sample of each video [V] and the sequence position
        of each of its tokens [V, M]."""
        owner, slots, slot_mask = video_slots(is_video, [v.shape[0] for v in videos])  # [V], [V, M], [V, M]
        x = pad_sequence([v.to(text_embeds.dtype) for v in videos], batch_first=True)  # [V, M, d]
        q, q_mask = gather_rows(text_embeds[owner], question_mask.bool()[owner])  # [V, L, d], [V, L]
        if self.method is None and self.uses_qtsplus:
            times = self.token_times(video_grid_thw, second_per_grid_ts, x.shape[1])  # [V, M] seconds
            return self.selector(x, q, times, slot_mask, q_mask, generator=generator), owner, slots
        method, budget = self.method, self.method_budget
        if method is None:  # this checkpoint's own (non-QTSplus) method, at its trained budget
            method, budget = self.selector, self.config.method_budget
        sel = self._run_method(method, budget, x, q, q_mask, slot_mask, video_grid_thw, second_per_grid_ts, owner,
                               slots, input_ids, attention_mask, position_ids, question_mask, generator)
        return sel, owner, slots

    def run_language_model(self, spliced: Spliced, sel, past_key_values, use_cache: bool | None,
                           logits_to_keep: int | Tensor, owner: Tensor | None = None, **kwargs) -> QTSplusOutput:
        """The LM on the shortened sequence; LM loss on its labels plus the selector's own loss terms (and, in
        training with `lambda_pg` > 0, the gate's score-function term; `owner`: the sample of each video)."""
        outputs = self.model.language_model(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask.long(),
            position_ids=spliced.position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        keep_slice = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep_slice])
        self.last_prefill = {
            "video_tokens_in": sel.num_tokens.tolist(),
            "video_tokens_kept": sel.num_kept.tolist(),
            "lm_tokens": spliced.attention_mask.sum(-1).tolist(),
            "rho": sel.rho.tolist() if getattr(sel, "rho", None) is not None else None,
        }
        lm_loss = None
        if spliced.labels is not None:
            vocab_size = self.config.text_config.vocab_size
            lm_loss = self.loss_function(logits=logits, labels=spliced.labels, vocab_size=vocab_size, **kwargs)
        losses = [t for t in (lm_loss, sel.loss) if t is not None]
        if lm_loss is not None and owner is not None and self.training and self.method is None and self.uses_qtsplus:
            if self.selector_config.lambda_pg > 0 and sel.keep_prob is not None:
                losses.append(self.selector_config.lambda_pg * gate_score_function(logits, spliced.labels, sel, owner))
        return QTSplusOutput(
            loss=sum(losses) if losses else None,
            logits=logits,
            past_key_values=outputs.past_key_values,
            lm_loss=lm_loss,
            budget_loss=sel.loss,
            selection=sel,
            attention_mask=spliced.attention_mask.long(),
            position_ids=spliced.position_ids,
            labels=spliced.labels,
        )

    def split_video_embeds(self, video_embeds: Tensor, video_grid_thw: Tensor) -> tuple[Tensor, ...]:
        """Packed [sum M_v, d] precomputed video features -> one [M_v, d] block per video (M_v from the grid)."""
        if video_grid_thw is None:
            raise ValueError("video_embeds needs video_grid_thw")
        sizes = (video_grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        if sum(sizes) != video_embeds.shape[0]:
            raise ValueError(f"video_embeds has {video_embeds.shape[0]} rows, video_grid_thw says {sum(sizes)}")
        return torch.split(video_embeds, sizes)

    def use_method(self, method, budget=None) -> None:
        """Route selection through `method` (a `qtsplus.selectors.Selector`, possibly this checkpoint's own
        `selector`, or None for the checkpoint's own selector at its own budget) with `budget` (a `Budget`, an int
        token count or a ratio). Inference only; one video per sample. The method is not registered as a submodule."""
        if method is not None and self.training:
            raise RuntimeError("use_method is for evaluation: call model.eval() first")
        self.__dict__["method"] = method
        self.method_budget = budget

    def _run_method(self, method, budget, x, q, q_mask, slot_mask, video_grid_thw, second_per_grid_ts, owner, slots,
                    input_ids, attention_mask, position_ids, question_mask, generator):
        from qtsplus.selectors.base import HostLM, SelectorInput  # noqa: I001 (lazy: selectors import the host's splice)

        if not torch.equal(owner, torch.arange(input_ids.shape[0], device=owner.device)):
            raise ValueError("use_method supports exactly one video per sample")
        merge = self.config.vision_config.spatial_merge_size
        grid = video_grid_thw.cpu() // torch.tensor([1, merge, merge])  # [B, 3] in LM tokens
        seconds = 1.0 if second_per_grid_ts is None else second_per_grid_ts
        host = None
        if method.needs_host:
            host = HostLM(language_model=self.model.language_model, input_ids=input_ids,
                          attention_mask=attention_mask, position_ids=position_ids, video_slots=slots,
                          text_rows=question_mask.bool())
        inputs = SelectorInput.from_grid(x, q, grid, seconds, q_mask=q_mask, host=host)
        if budget is None:
            raise ValueError(f"no budget for selector {method.name!r}: pass one to use_method")
        return method(inputs, budget, generator=generator)

    def token_times(self, video_grid_thw: Tensor, second_per_grid_ts: Tensor | None, width: int) -> Tensor:
        """[V, width]: each video token's time in seconds = its temporal patch index * seconds per temporal patch.

        The vision tower emits tokens frame-group by frame-group (t-major, then merged h, w rows), so token j of video
        v sits in temporal patch j // (h w / merge^2), which starts at that many times `second_per_grid_ts[v]`
        seconds after the first sampled frame. Padding columns get harmless times.
        """
        merge = self.config.vision_config.spatial_merge_size
        per_step = video_grid_thw[:, 1] * video_grid_thw[:, 2] // merge**2  # [V] tokens per temporal patch
        if second_per_grid_ts is None:
            second_per_grid_ts = torch.ones(video_grid_thw.shape[0])
        seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32, device=video_grid_thw.device)
        j = torch.arange(width, device=video_grid_thw.device)
        return (j[None] // per_step[:, None]).float() * seconds[:, None]

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1
    ):
        # after a pruned prefill the KV cache holds the kept tokens only: decode on from their mask and position ids
        if getattr(outputs, "position_ids", None) is not None and model_kwargs.get("use_cache", True):
            model_kwargs["attention_mask"] = outputs.attention_mask
            model_kwargs["position_ids"] = outputs.position_ids
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder, num_new_tokens
        )

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # generate() needs token types for 3-D positions; derive them from the ids when the caller did not pass them
        if model_kwargs.get("mm_token_type_ids") is None and not inputs_tensor.is_floating_point():
            model_kwargs["mm_token_type_ids"] = self.mm_token_type_ids(inputs_tensor)
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)


def build_method(config: QTSplusConfig):
    """The checkpoint's own non-QTSplus selector (a trainable `qtsplus.selectors.Selector`) from its config; records
    the complete method config (host shapes included) back into `config.method_config`."""
    from dataclasses import asdict

    from qtsplus.selectors import SELECTORS, build_selector

    name = config.selection_method
    if name not in SELECTORS:
        raise ValueError(f"unknown selection_method {name!r}; known: {sorted(SELECTORS)}")
    if config.method_budget is None:
        raise ValueError(f"selection_method {name!r} needs method_budget (tokens, or a ratio of M)")
    method = build_selector(name, config.text_config, **(config.method_config or {}))
    if not any(True for _ in method.parameters()):
        raise ValueError(f"{name} has no parameters to train or store: evaluate it by name instead")
    config.method_config = json_ready(asdict(method.config))
    return method


def json_ready(value):
    """Tuples (dataclass fields such as grid shapes) as lists, so the config round-trips through config.json."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForImageTextToText load QTSplus checkpoints (idempotent)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        AutoConfig.register(QTSplusConfig.model_type, QTSplusConfig)
        AutoModelForImageTextToText.register(QTSplusConfig, QTSplusForConditionalGeneration)
    except ValueError as err:  # transformers raises ValueError when the type is already registered
        if "already used" not in str(err):
            raise


def per_sample_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """[B] mean next-token cross-entropy of each sample over its labelled tokens, and [B] bool: has it any. Only the
    labelled positions are upcast (a [B, S, vocab] fp32 copy would be large at real vocabularies)."""
    targets = labels[:, 1:]
    valid = targets != -100
    row, pos = valid.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[:, :-1][row, pos].float(), targets[row, pos], reduction="none")
    total = torch.zeros(labels.shape[0], device=ce.device, dtype=ce.dtype).index_add_(0, row, ce)
    count = valid.sum(-1)
    return total / count.clamp(min=1), count > 0


def gate_score_function(logits: Tensor, labels: Tensor, sel, owner: Tensor) -> Tensor:
    """REINFORCE for the training gate's draws: mean over videos of (its sample's LM loss - the batch mean, no
    gradient) * log P(its draw). Its gradient lowers the probability of draws whose answer came out worse than the
    batch's, so a token the gate dropped still gets a signal (the straight-through gradient reaches kept tokens
    only). Samples without labels get no advantage and stay out of the mean; with one labelled sample the term is 0
    (no baseline to compare with), so it needs a micro-batch of 2 or more."""
    with torch.no_grad():
        loss, labelled = per_sample_lm_loss(logits, labels)
        baseline = loss[labelled].mean() if bool(labelled.any()) else loss.new_zeros(())
        advantage = torch.where(labelled, loss - baseline, 0.0)[owner]  # [V]
    return (advantage * sel.keep_log_prob()).mean()
