"""FlexSelect: frame sets, budget shares, the reference-layer score (against transformers' own attention weights),
planted needles (at the scoring function and end to end on a tiny Qwen2.5-VL); FlexSelect-Lite's rank training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _tiny_vl import random_video, tiny_qwen, video_prompt

from qtsplus.selectors import SelectorInput, build_selector, frame_sets, lite_train_step, spearman
from qtsplus.selectors.flexselect import hard_rank, soft_rank, split_budget, text_to_video_attention

QUESTION = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def host():
    return tiny_qwen(seed=0)


def qwen_inputs(model, videos=((4, 8, 8), (2, 4, 8)), questions=(QUESTION, [10, 11])) -> SelectorInput:
    """One prompt per video (left-padded): prefix <vision_start> <video>*n <vision_end> question."""
    clips = [random_video(*thw, seed=i) for i, thw in enumerate(videos)]
    prompts = [video_prompt(n, list(question)) for (_, _, n), question in zip(clips, questions, strict=True)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pix, grid = torch.cat([c[0] for c in clips]), torch.cat([c[1] for c in clips])
    with torch.no_grad():
        return SelectorInput.from_qwen(model, ids, mask, pix, grid, torch.ones(len(videos)))


# ------------------------------------------------------------------------------------------------------- frame sets


@pytest.mark.parametrize("frames_per_set", [1, 2, 3, 7, 32, 64])
def test_frame_sets_cover_every_frame_exactly_once(frames_per_set):
    for num_frames in [1, 2, 5, 31, 32, 33, 64, 65, 100, 1024]:
        sets = frame_sets(num_frames, frames_per_set)
        num_sets = math.ceil(num_frames / frames_per_set)
        assert len(sets) == num_sets
        assert torch.equal(torch.cat(sets).sort().values, torch.arange(num_frames))  # each frame exactly once
        for g, s in enumerate(sets):
            assert 1 <= len(s) <= frames_per_set
            assert int(s[0]) == g and (s.diff() == num_sets).all()  # frames g, g + G, g + 2G, ...


def test_token_sets_partition_the_video():
    inputs = SelectorInput.from_grid(
        torch.randn(2, 10 * 6, 8), torch.randn(2, 2, 8), torch.tensor([[10, 2, 3], [7, 2, 3]])
    )
    selector = build_selector("flexselect", frames_per_set=3)
    for b, frames in enumerate([10, 7]):
        sets = selector.sets(inputs, b)
        assert len(sets) == math.ceil(frames / 3)
        assert torch.equal(torch.cat(sets).sort().values, torch.arange(frames * 6))
        for g, tokens in enumerate(sets):
            assert inputs.positions[b, tokens, 0].unique().tolist() == list(range(g, frames, len(sets)))


def test_budget_shares_are_equal():
    assert split_budget(10, [30, 30, 30]) == [4, 3, 3]
    assert split_budget(9, [30, 30, 30]) == [3, 3, 3]
    assert split_budget(10, [2, 30, 30]) == [2, 4, 4]  # what a full set cannot take goes to the others
    assert split_budget(100, [2, 3, 4]) == [2, 3, 4]
    assert split_budget(1, [5, 5]) == [1, 0]


# ----------------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_scoring_function_recovers_planted_needles(reduce):
    """Keys of 12 planted tokens point along the question's query direction: they are the top 12 (recall@12 = 1)."""
    g = torch.Generator().manual_seed(0)
    h, h_kv, d_h, S = 8, 2, 16, 300
    video = torch.arange(10, 266)  # 256 video tokens, then some text, then 10 question rows at the end
    rows = torch.arange(290, 300)
    direction = torch.nn.functional.normalize(torch.randn(h_kv, 1, 1, d_h, generator=g), dim=-1)
    q = (4 * direction + 0.3 * torch.randn(h_kv, h // h_kv, len(rows), d_h, generator=g)).reshape(
        h, len(rows), d_h
    )
    k = torch.randn(h_kv, S, d_h, generator=g)
    needles = video[torch.randperm(len(video), generator=g)[:12]]
    k[:, needles] = 4 * direction[:, 0] + 0.3 * torch.randn(h_kv, 12, d_h, generator=g)
    scores = text_to_video_attention(q, k, rows, video, d_h**-0.5, reduce)  # [256]
    top = video[scores.topk(12).indices]
    assert set(top.tolist()) == set(needles.tolist())


@pytest.mark.parametrize("layer", [0, 1])
def test_reference_scores_are_the_models_own_attention(host, layer):
    """Same numbers as transformers' eager attention weights of the full sequence, at the reference layer."""
    inputs = qwen_inputs(host, videos=((4, 8, 8),), questions=(QUESTION,))
    scores = build_selector("flexselect", reference_layer=layer, frames_per_set=32).scores(inputs)  # one set
    model = copy.deepcopy(host)
    model.model.language_model.config._attn_implementation = "eager"
    hostlm = inputs.host
    with torch.no_grad():
        embeds = model.get_input_embeddings()(hostlm.input_ids)
        embeds[0, hostlm.video_slots[0]] = inputs.x[0]
        out = model.model.language_model(
            inputs_embeds=embeds, position_ids=hostlm.position_ids, output_attentions=True
        )
    alpha = out.attentions[layer][0]  # [heads, S, S]
    rows = hostlm.text_rows[0].nonzero()[:, 0]
    expected = alpha[:, rows][:, :, hostlm.video_slots[0]].amax(dim=(0, 1))
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-7)


def plant_needles(host, reference_layer: int, needles_per_frame: int = 1):
    """A tiny host whose reference layer reads one direction u (q/k rows on the lowest-frequency rotary pair, so
    positions barely rotate them), a question whose embeddings point along u, and visual tokens orthogonal to u
    except the needles (the same spatial cell(s) of every frame, like a tracked object): the query matches them."""
    model = copy.deepcopy(host)
    g = torch.Generator().manual_seed(0)
    lm = model.model.language_model
    d = lm.config.hidden_size
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    attn = lm.layers[reference_layer].self_attn
    d_h = attn.head_dim
    with torch.no_grad():
        lm.embed_tokens.weight[QUESTION] = 4 * u + 0.1 * torch.randn(len(QUESTION), d, generator=g)
        for proj, heads in [
            (attn.q_proj, attn.config.num_attention_heads),
            (attn.k_proj, attn.config.num_key_value_heads),
        ]:
            proj.weight.zero_(), proj.bias.zero_()
            for head in range(heads):  # dims (d_h/2 - 1, d_h - 1): the rotary pair with the lowest frequency
                proj.weight[head * d_h + d_h // 2 - 1] = u
                proj.weight[head * d_h + d_h - 1] = u
    inputs = qwen_inputs(model, videos=((8, 8, 8),), questions=(QUESTION,))  # 8 frames of 16 tokens
    x = torch.randn(inputs.x.shape, generator=g)
    x = x - (x @ u)[..., None] * u  # orthogonal to u
    cells = inputs.positions[0, :, 1] * 4 + inputs.positions[0, :, 2]  # 4 x 4 merged grid
    needles = (cells < needles_per_frame).nonzero()[:, 0]
    x[0, needles] += 4 * u
    inputs.x = x
    return model, inputs, needles


@pytest.mark.parametrize("frames_per_set", [8, 2])
@pytest.mark.parametrize("reference_layer", [0, 1])
def test_flexselect_recovers_needles_end_to_end(host, frames_per_set, reference_layer):
    """Tiny Qwen2.5-VL, full pipeline (layers before the reference, its rotary, frame sets, shares): with the budget
    = the number of needles, exactly the needles are kept (recall@K = 1), in order, at their own slots."""
    model, inputs, needles = plant_needles(host, reference_layer, needles_per_frame=2)
    selector = build_selector("flexselect", reference_layer=reference_layer, frames_per_set=frames_per_set)
    out = selector(inputs, len(needles))
    assert out.indices[0].tolist() == needles.tolist()
    assert out.extras[0]["frame_sets"] == 8 // frames_per_set
    assert len(set(out.extras[0]["shares"])) == 1  # equal shares
    scores = selector.scores(inputs)[0]
    if frames_per_set == 8:  # one set: the needles are the top of the whole ranking
        assert set(scores.topk(len(needles)).indices.tolist()) == set(needles.tolist())


# ------------------------------------------------------------------------------------------------------------- Lite


def test_soft_rank_tends_to_the_rank():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 50, generator=g)
    mask = torch.arange(50)[None] < torch.tensor([[50], [30], [1]])
    hard = hard_rank(s, mask)
    assert torch.equal(hard[1, :30].sort().values, torch.arange(1, 31).float())
    torch.testing.assert_close(soft_rank(s, mask, tau=1e-4)[mask], hard[mask], atol=1e-3, rtol=0)


def test_lite_training_raises_spearman_with_the_teacher(host):
    """A tiny ranker, 60 AdamW steps on a fixed batch, against the reference layer of a tiny Qwen2.5-VL."""
    inputs = qwen_inputs(host)
    teacher = build_selector("flexselect", reference_layer=1, frames_per_set=32).scores(inputs)  # [2, 64]
    torch.manual_seed(0)
    lite = build_selector("flexselect_lite", host.config.text_config, ranker_size=32, num_layers=1, num_heads=4,
                          num_kv_heads=2, intermediate_size=64)  # fmt: skip
    optimizer = torch.optim.AdamW(lite.parameters(), lr=3e-3)
    history = [lite_train_step(lite, optimizer, inputs, teacher) for _ in range(60)]
    with torch.no_grad():
        student = lite.ranker(inputs.x, inputs.x_mask, inputs.q, inputs.q_mask, inputs.positions)
    before, after = history[0]["spearman"], float(spearman(student, teacher, inputs.x_mask).mean())
    assert after > before + 0.4 and after > 0.7, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    # the trained ranker drives selection through the contract
    out = lite.eval()(inputs, 0.25)
    assert out.num_kept.tolist() == [16, 4]


# ---------------------------------------------------------------------------------------------- reference layer


def test_scores_at_every_layer_in_one_pass_equal_flexselect_at_each(host):
    from qtsplus.selectors.reference_layer import scores_by_layer

    inputs = qwen_inputs(host)
    by_layer = scores_by_layer(inputs, [0, 1], frames_per_set=2)  # several frame sets per video
    for layer in (0, 1):
        expected = build_selector("flexselect", reference_layer=layer, frames_per_set=2).scores(inputs)
        torch.testing.assert_close(by_layer[layer], expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(by_layer[0], by_layer[1])


def test_recall_at_k_finds_the_layer_that_reads_the_needles(host):
    from qtsplus.selectors.reference_layer import recall_at_k, scores_by_layer

    model, inputs, needles = plant_needles(host, reference_layer=1)
    is_needle = torch.zeros_like(inputs.x_mask)
    is_needle[0, needles] = True
    scores = scores_by_layer(inputs, [0, 1], frames_per_set=8)
    assert float(recall_at_k(scores[1], is_needle, inputs.x_mask)[0]) == 1.0
    assert float(recall_at_k(scores[0], is_needle, inputs.x_mask)[0]) < 1.0
    uniform = torch.zeros_like(scores[1])
    assert float(recall_at_k(-uniform.index_fill(1, needles, 1.0), is_needle, inputs.x_mask)[0]) == 0.0


def test_insert_needle_replaces_exactly_the_needle_steps():
    import numpy as np

    from qtsplus.selectors.reference_layer import insert_needle
    from qtsplus.video import VideoClip

    hay = VideoClip(frames=np.zeros((8, 56, 84, 3), np.uint8), timestamps=np.arange(8.0), native_fps=1.0, source="h")
    needle = VideoClip(frames=np.full((5, 28, 28, 3), 200, np.uint8), timestamps=np.arange(5.0), native_fps=1.0,
                       source="n")
    clip = insert_needle(hay, needle, start_step=1, steps=2)
    assert clip.frames.shape == hay.frames.shape and np.array_equal(clip.timestamps, hay.timestamps)
    assert (clip.frames[2:6] == 200).all() and (clip.frames[:2] == 0).all() and (clip.frames[6:] == 0).all()
    with pytest.raises(ValueError, match="outside"):
        insert_needle(hay, needle, start_step=3, steps=2)
