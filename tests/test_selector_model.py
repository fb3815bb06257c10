"""QTSplusForConditionalGeneration on a tiny random Qwen2.5-VL: splicing, position ids, generation, training, I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_vl import IMAGE, VIDEO, VISION_END, VISION_START, random_video, tiny_qwen, video_prompt

from qtsplus.host.model import QTSplusConfig, QTSplusForConditionalGeneration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "videos"
QUESTION = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def base():
    return tiny_qwen(seed=0)


def wrap(base, **selector_config) -> QTSplusForConditionalGeneration:
    torch.manual_seed(1)
    return QTSplusForConditionalGeneration.from_qwen(base, **selector_config).eval()


def batch_of_two(question_b: list[int] = (10, 11)):
    """Two samples with different video sizes and question lengths, left-padded, as generate() wants them."""
    pix_a, grid_a, n_a = random_video(4, 8, 8, seed=0)  # 64 LM tokens
    pix_b, grid_b, n_b = random_video(2, 4, 8, seed=1)  # 16 LM tokens
    prompts = [video_prompt(n_a, QUESTION), video_prompt(n_b, list(question_b), prefix=(3,))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    videos = dict(
        pixel_values_videos=torch.cat([pix_a, pix_b]),
        video_grid_thw=torch.cat([grid_a, grid_b]),
        second_per_grid_ts=torch.tensor([1.0, 0.5]),
    )
    singles = [
        dict(input_ids=torch.tensor([prompts[0]]), pixel_values_videos=pix_a, video_grid_thw=grid_a,
             second_per_grid_ts=torch.tensor([1.0])),
        dict(input_ids=torch.tensor([prompts[1]]), pixel_values_videos=pix_b, video_grid_thw=grid_b,
             second_per_grid_ts=torch.tensor([0.5])),
    ]  # fmt: skip
    return dict(input_ids=ids, attention_mask=mask, **videos), singles


def base_forward(base, inputs):
    mm = (inputs["input_ids"] == VIDEO).int() * 2
    return base(**inputs, mm_token_type_ids=mm)


@torch.no_grad()
def test_selection_off_equals_base(base):
    model = wrap(base)
    inputs, _ = batch_of_two()
    model.selection = False
    torch.testing.assert_close(model(**inputs).logits, base_forward(base, inputs).logits, rtol=0, atol=0)


@torch.no_grad()
def test_keep_everything_through_the_selection_path_equals_base(base):
    """rho = 1 and no re-encoding: the splice / re-padding / position-id path must reproduce the base logits."""
    model = wrap(base, rho_min=1.0, rho_max=1.0, reencoder_depth=0, n_max=10**6)
    inputs, _ = batch_of_two()
    out = model(**inputs)
    assert torch.equal(out.selection.num_kept, out.selection.num_tokens)
    ref = base_forward(base, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_images_pass_through_unpruned(base):
    """An image before the video: its tokens are spliced as in the base model and never pruned."""
    model = wrap(base, rho_min=1.0, rho_max=1.0, reencoder_depth=0, n_max=10**6)
    image = torch.randn(4 * 4, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    pix, grid, n = random_video(2, 4, 4)
    ids = torch.tensor([[1, VISION_START, *[IMAGE] * 4, VISION_END] + video_prompt(n, QUESTION, prefix=())])
    inputs = dict(
        input_ids=ids, pixel_values=image, image_grid_thw=torch.tensor([[1, 4, 4]]),
        pixel_values_videos=pix, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.0]),
    )  # fmt: skip
    mm = (ids == IMAGE).int() + (ids == VIDEO).int() * 2
    ref = base(**inputs, mm_token_type_ids=mm)
    torch.testing.assert_close(model(**inputs).logits, ref.logits, rtol=1e-5, atol=1e-5)
    model = wrap(base, rho_min=0.25, rho_max=0.25)
    out = model(**inputs)
    assert int(out.attention_mask.sum()) == ids.shape[1] - n + -(-n // 4)  # only video tokens were dropped


@torch.no_grad()
def test_kept_tokens_keep_their_original_position_ids(base):
    model = wrap(base, rho_min=0.25, rho_max=0.25)
    inputs, _ = batch_of_two()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full, full_delta = base.model.get_rope_index(
        ids, (ids == VIDEO).int() * 2, None, inputs["video_grid_thw"], inputs["second_per_grid_ts"], mask
    )
    out = model(**inputs)
    sel = out.selection
    assert torch.equal(sel.num_kept, torch.tensor([16, 4]))  # ceil(0.25 * 64), ceil(0.25 * 16)
    for b in range(2):
        slots = (ids[b] == VIDEO).nonzero().squeeze(-1)
        kept_slots = slots[sel.indices[b][sel.token_mask[b]]]
        text = ((ids[b] != VIDEO) & mask[b].bool()).nonzero().squeeze(-1)
        cols = torch.cat([text, kept_slots]).sort().values  # the surviving tokens, in their original order
        real = out.attention_mask[b].bool()
        assert int(real.sum()) == cols.numel()
        assert torch.equal(out.position_ids[1:, b, real], full[:, b, cols])  # (t, h, w) untouched
        assert torch.equal(out.position_ids[0, b, real], torch.arange(cols.numel()))  # text row renumbered
        # decoding continues where the unpruned prompt would have: max position + 1
        assert int(model.model.rope_deltas[b]) + cols.numel() == int(full_delta[b]) + int(mask[b].sum())


def test_default_question_is_the_text_after_the_video(base):
    model = wrap(base)
    inputs, _ = batch_of_two()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    question = model.default_question_mask(ids, mask, None)
    assert ids[0][question[0]].tolist() == QUESTION and ids[1][question[1]].tolist() == [10, 11]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # the last two tokens are a supervised answer: never part of the question
    question = model.default_question_mask(ids, mask, labels)
    assert ids[0][question[0]].tolist() == QUESTION[:-2] and not question[1].any()


def test_token_times_are_seconds_of_the_temporal_patch(base):
    model = wrap(base)
    times = model.token_times(torch.tensor([[4, 8, 8], [2, 4, 8]]), torch.tensor([2.0, 0.5]), 64)
    assert times[0].tolist() == [0.0] * 16 + [2.0] * 16 + [4.0] * 16 + [6.0] * 16
    assert times[1, :16].tolist() == [0.0] * 8 + [0.5] * 8


@torch.no_grad()
def test_batch_equals_one_by_one(base):
    model = wrap(base, rho_min=0.3, rho_max=0.3, reencoder_depth=1)
    model.selector.reencoder.time.proj.weight.normal_(std=0.02)
    inputs, singles = batch_of_two()
    batch = model(**inputs)
    for b, single in enumerate(singles):
        one = model(**single)
        n = int(one.selection.num_kept[0])
        assert torch.equal(batch.selection.indices[b, :n], one.selection.indices[0])
        torch.testing.assert_close(batch.logits[b, -1], one.logits[0, -1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_generation_with_kv_cache_matches_full_recompute(base):
    model = wrap(base, rho_min=0.3, rho_max=0.3)
    inputs, _ = batch_of_two()
    steps = 5
    gen = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    question = model.default_question_mask(inputs["input_ids"], inputs["attention_mask"], None)
    seq, attn = inputs["input_ids"], inputs["attention_mask"]
    for step in range(steps):  # no cache: prune and run the whole sequence again at every step
        q = torch.cat([question, torch.zeros(2, seq.shape[1] - prompt_len, dtype=torch.bool)], 1)
        kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = model(input_ids=seq, attention_mask=attn, question_mask=q, use_cache=False, **kw)
        torch.testing.assert_close(gen.logits[step], out.logits[:, -1], rtol=1e-4, atol=1e-4)
        seq = gen.sequences[:, : seq.shape[1] + 1]  # teacher-forced on what generate() picked
        attn = torch.cat([attn, torch.ones(2, 1, dtype=attn.dtype)], 1)


@pytest.mark.parametrize("train_lm", [False, True])
def test_training_gradients_reach_the_selector_and_no_frozen_part(base, train_lm):
    model = wrap(base, scoring_depth=2, reencoder_depth=1, n_max=10**6)
    model.freeze_base(train_lm=train_lm)
    model.train()
    answer = [20, 21, 22, 23]
    pix, grid, n = random_video(4, 8, 8)
    ids = torch.tensor([video_prompt(n, QUESTION) + answer])
    labels = torch.full_like(ids, -100)
    labels[0, -len(answer) :] = torch.tensor(answer)
    out = model(input_ids=ids, labels=labels, pixel_values_videos=pix, video_grid_thw=grid,
                second_per_grid_ts=torch.tensor([1.0]), generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(out.loss, out.lm_loss + out.budget_loss)
    # the answer stays supervised after pruning, and it was not part of the question
    assert out.labels[0, -len(answer) :].tolist() == answer and (out.labels != -100).sum() == len(answer)
    out.loss.backward()
    for name, p in model.selector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches selector.{name}"
    assert all(p.grad is None for p in model.model.visual.parameters())
    lm_grads = [p.grad is not None for p in model.model.language_model.parameters()]
    assert all(lm_grads) if train_lm else not any(lm_grads)


def test_score_function_term_joins_the_loss_when_lambda_pg_is_set(base):
    from qtsplus.host.model import gate_score_function, per_sample_lm_loss

    model = wrap(base, n_max=10**6, lambda_pg=0.5)
    model.freeze_base(train_lm=False)
    model.train()
    inputs, _ = batch_of_two(question_b=[10, 11, 12, 13])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]  # the last two tokens of each prompt are its "answer"
    out = model(**inputs, labels=labels, generator=torch.Generator().manual_seed(0))
    term = gate_score_function(out.logits, out.labels, out.selection, torch.arange(2))
    assert term.abs() > 0  # two samples with different LM losses: a non-zero advantage
    torch.testing.assert_close(out.loss, out.lm_loss + out.budget_loss + 0.5 * term)
    per_sample, labelled = per_sample_lm_loss(out.logits, out.labels)
    assert labelled.all()
    torch.testing.assert_close(per_sample.mean(), out.lm_loss)  # two labels each: the mean of means is the loss
    out.loss.backward()
    assert model.selector.scorer.parameters().__next__().grad is not None
    # a sample without labels has no advantage, and one labelled sample has no baseline to compare with: term 0
    one = labels.clone()
    one[1] = -100
    out = model(**inputs, labels=one, generator=torch.Generator().manual_seed(0))
    assert gate_score_function(out.logits, out.labels, out.selection, torch.arange(2)) == 0


@torch.no_grad()
def test_save_pretrained_round_trip(base, tmp_path):
    model = wrap(base, scoring_depth=2, reencoder_depth=2, n_max=77, tau_s=0.3)
    model.selector.rho_bar.fill_(0.123)
    model.selector.reencoder.time.proj.weight.normal_(std=0.02)
    model.save_pretrained(tmp_path)
    loaded = QTSplusForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, QTSplusConfig)
    assert loaded.selector_config == model.selector_config
    assert loaded.selector.rho_bar.item() == pytest.approx(0.123)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    inputs, _ = batch_of_two()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@torch.no_grad()
def test_from_pretrained_base_checkpoint_initialises_selector_from_lm(base, tmp_path):
    base.save_pretrained(tmp_path)
    model = QTSplusForConditionalGeneration.from_pretrained(
        tmp_path, selector_config={"scoring_depth": 1, "reencoder_depth": 2}
    )
    layers = base.model.language_model.layers
    sel = model.selector
    assert torch.equal(sel.scorer.head.q_proj.weight, layers[0].self_attn.q_proj.weight)
    assert torch.equal(sel.scorer.head.k_proj.bias, layers[0].self_attn.k_proj.bias)
    assert torch.equal(sel.scorer.head.q_norm.weight, layers[0].input_layernorm.weight)
    for i in range(2):
        assert torch.equal(sel.reencoder.blocks[i].attn.o_proj.weight, layers[i].self_attn.o_proj.weight)
        assert torch.equal(sel.reencoder.blocks[i].mlp.gate_proj.weight, layers[i].mlp.gate_proj.weight)
    assert torch.equal(sel.reencoder.time.proj.weight, torch.zeros_like(sel.reencoder.time.proj.weight))
    assert sel.rho_bar.item() == pytest.approx(sel.config.rho_bar_init)
    ours = model.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(ours[k], v), k


@torch.no_grad()
def test_bf16_forward_and_generate(base):
    model = wrap(base, rho_min=0.3, rho_max=0.3).to(torch.bfloat16)
    inputs, _ = batch_of_two()
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
    out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)


@torch.no_grad()
def test_generate_from_a_real_video(base):
    """The example clip through qtsplus.video -> tiny Qwen2.5-VL vision tower -> selector -> LM, with a KV cache."""
    from qtsplus.video import SamplingConfig, load_video, qwen_video_inputs

    clip = load_video(EXAMPLES / "carphone.mp4", SamplingConfig(fps=2.0, max_frames=8, max_pixels=112 * 140))
    video = qwen_video_inputs(clip)
    model = wrap(base, rho_min=0.2, rho_max=0.2)
    ids = torch.tensor([video_prompt(video.num_video_tokens, QUESTION)])
    kwargs = dict(
        input_ids=ids,
        pixel_values_videos=video.pixel_values_videos,
        video_grid_thw=video.video_grid_thw,
        second_per_grid_ts=torch.tensor([video.second_per_grid_t]),
    )
    gen = model.generate(**kwargs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 6) and torch.equal(gen[:, : ids.shape[1]], ids)
    (diag,) = model(**kwargs).selection.diagnostics()
    assert diag["num_tokens"] == video.num_video_tokens
    assert diag["kept"] == diag["budget"] == -(-video.num_video_tokens // 5)
    assert (diag["indices"][1:] > diag["indices"][:-1]).all()
