"""EVS and VidCom2 (the training-free video pruners vLLM ships) on hand-built videos whose right answer is known by
construction: what each method keeps first, its exact budget, padding, determinism, and that the question is ignored.
The contract (every budget form, slots, positions) is in tests/test_selectors_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtsplus.selectors import SelectorInput, build_selector, frame_budgets

D = 8


def video(frames: list[torch.Tensor], h: int, w: int, q_seed: int = 0) -> SelectorInput:
    """One video from frames [h w, D] each (raster order), t-major as Qwen2.5-VL lays out its tokens."""
    x = torch.cat(frames)[None]
    q = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(q_seed))
    return SelectorInput.from_grid(x, q, (len(frames), h, w), seconds_per_step=2.0)


def kept(out, b: int = 0) -> list[int]:
    return out.indices[b][out.token_mask[b]].tolist()


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# EVS


def edited_video() -> SelectorInput:
    """4 frames of 2 x 3 tokens: frame 1 = frame 0 with token 4 reversed (dissimilarity 2), frame 2 = frame 1 with
    token 1 replaced by a new vector, frame 3 = frame 2. Every other token repeats its place in the previous frame."""
    f0 = randn(6, D, seed=0)
    f1 = f0.clone()
    f1[4] = -f0[4]
    f2 = f1.clone()
    f2[1] = randn(D, seed=1)
    return video([f0, f1, f2, f2.clone()], 2, 3)


def test_evs_keeps_the_first_frame_whole_then_the_changed_tokens():
    inputs, evs = edited_video(), build_selector("evs")
    assert kept(evs(inputs, 6)) == [0, 1, 2, 3, 4, 5]  # exactly the first frame
    assert kept(evs(inputs, 7)) == [0, 1, 2, 3, 4, 5, 10]  # + the reversed token (the largest change)
    assert kept(evs(inputs, 8)) == [0, 1, 2, 3, 4, 5, 10, 13]  # + the replaced one
    changed, first = {10, 13}, set(range(6))
    for n in range(1, 25):
        out = evs(inputs, n)
        k = set(kept(out))
        assert len(k) == n == int(out.num_kept[0])  # the exact budget
        if n >= 6:
            assert first <= k  # the first frame whole
        if k - first - changed:  # an exact repeat is kept only once every changed token is
            assert changed <= k


def test_evs_scores_are_the_cosine_dissimilarity_to_the_same_place_one_frame_earlier():
    T, h, w = 3, 2, 4
    x = randn(T * h * w, D, seed=3)
    out = build_selector("evs")(video(list(x.split(h * w)), h, w), 5)
    grid = x.reshape(T, h * w, D)
    expected = torch.cat([torch.full((h * w,), 2.0), 1 - F.cosine_similarity(grid[1:], grid[:-1], dim=-1).flatten()])
    torch.testing.assert_close(out.scores[0], expected.clamp(0, 2))


def test_evs_breaks_ties_by_order_and_spreads_a_budget_below_one_frame():
    still = randn(6, D, seed=4)
    inputs, evs = video([still, still.clone(), still.clone()], 2, 3), build_selector("evs")
    # a still video: every later token ties at 0, the earlier ones go first
    assert kept(evs(inputs, 9)) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    # below one frame: evenly spaced over the first frame (vLLM would keep the whole frame, over budget)
    assert kept(evs(inputs, 3)) == [1, 3, 5]
    assert kept(evs(inputs, 1)) == [3]


# ---------------------------------------------------------------------------------------------------------------------
# VidCom2


def test_vidcom2_gives_a_more_distinctive_frame_a_larger_share():
    """Frames 0, 1, 3 show the same scene (small noise); frame 2 shows another one."""
    scene, other = randn(8, D, seed=5), randn(8, D, seed=6)
    frames = [scene + 0.05 * randn(8, D, seed=10 + t) for t in range(4)]
    frames[2] = other
    out = build_selector("vidcom2")(video(frames, 2, 4), 8)
    share, budget = out.extras[0]["frame_share"], out.extras[0]["frame_budget"]
    assert max(range(4), key=share.__getitem__) == 2
    assert sum(budget) == 8 and all(budget[2] > budget[t] for t in (0, 1, 3))
    per_frame = torch.bincount(out.positions[0, out.token_mask[0], 0], minlength=4).tolist()
    assert per_frame == budget
    # a still video: every frame gets an equal share
    still = build_selector("vidcom2")(video([scene.clone() for _ in range(4)], 2, 4), 8)
    assert still.extras[0]["frame_budget"] == [2, 2, 2, 2]


def duplicate_video() -> tuple[SelectorInput, list[int]]:
    """3 frames of 6 tokens: 5 copies of one vector (the same in every frame) and one unique token, at place 2, 4, 0."""
    common = randn(D, seed=7)
    frames, unique = [], []
    for t, place in enumerate([2, 4, 0]):
        frame = common.expand(6, D).clone()
        frame[place] = randn(D, seed=20 + t)
        frames.append(frame)
        unique.append(6 * t + place)
    return video(frames, 2, 3), unique


def test_vidcom2_keeps_unique_tokens_over_duplicates():
    inputs, unique = duplicate_video()
    vidcom2 = build_selector("vidcom2")
    assert kept(vidcom2(inputs, 3)) == unique  # one per frame: its unique token
    out = vidcom2(inputs, 6)
    assert set(unique) <= set(kept(out)) and int(out.num_kept[0]) == 6
    # each frame: its unique token first, then its duplicates, which tie and go by order
    budget = out.extras[0]["frame_budget"]
    for t, u in enumerate(unique):
        duplicates = [i for i in range(6 * t, 6 * t + 6) if i != u]
        assert [i for i in kept(out) if i // 6 == t] == sorted([u] + duplicates[: budget[t] - 1])
    assert all(out.scores[0, u] > out.scores[0, i] for u in unique for i in range(18) if i not in unique)


def test_vidcom2_budgets_are_exact_and_follow_vllms_quotas():
    T, h, w = 5, 2, 4
    P, M = h * w, T * h * w
    x = randn(M, D, seed=8) + torch.arange(T).repeat_interleave(P)[:, None] * randn(D, seed=9)  # drifting scene
    inputs, vidcom2 = video(list(x.split(P)), h, w), build_selector("vidcom2", temperature=0.5)
    for n in range(1, M + 1):
        out = vidcom2(inputs, n)
        budget = torch.tensor(out.extras[0]["frame_budget"])
        assert int(out.num_kept[0]) == n == int(budget.sum())
        assert torch.equal(torch.bincount(out.positions[0, out.token_mask[0], 0], minlength=T), budget)
        if n >= T:
            assert bool((budget >= 1).all())  # no frame emptied
        # vLLM's quota (n / M)(1 + p_t - 1/T) P where it needs no clamp: this rounds it
        quota = n / M * (1 + torch.tensor(out.extras[0]["frame_share"]) - 1 / T) * P
        if bool(((quota >= 1) & (quota <= P)).all()):
            assert bool(((budget - quota).abs() < 1).all()), (n, budget, quota)


def test_frame_budgets_sum_to_n_within_floors_and_sizes():
    sizes = torch.tensor([3, 10, 1, 6])
    weight = torch.tensor([1.0, 0.5, 4.0, 1.0])
    for n in range(1, 21):
        k = frame_budgets(n, weight, sizes)
        assert int(k.sum()) == n and bool((k <= sizes).all())
        assert bool((k >= 1).all()) == (n >= 4)  # floors only when every frame can have one
    assert frame_budgets(20, weight, sizes).tolist() == [3, 10, 1, 6]
    assert frame_budgets(2, weight, sizes).tolist() == [0, 1, 0, 1]  # below one per frame: by weight x size
    # equal frames and weights: equal shares, the remainder to the earlier frames
    assert frame_budgets(10, torch.ones(4), torch.full((4,), 5)).tolist() == [3, 3, 2, 2]


# ---------------------------------------------------------------------------------------------------------------------
# both


@pytest.mark.parametrize("name", ["evs", "vidcom2"])
def test_padding_rows_are_never_selected_and_batching_changes_nothing(name):
    a, b = randn(4 * 6, D, seed=11), randn(2 * 6, D, seed=12)
    x = torch.stack([a, torch.cat([b, 1e3 * randn(12, D, seed=13)])])  # video b: 12 tokens + 12 loud padding rows
    q = randn(2, 3, D, seed=14)
    batch = SelectorInput.from_grid(x, q, torch.tensor([[4, 2, 3], [2, 2, 3]]))
    alone = SelectorInput.from_grid(b[None], q[1:], (2, 2, 3))
    selector = build_selector(name)
    for n in [1, 5, 12, 0.5, 1.0]:
        out, single = selector(batch, n), selector(alone, n)
        assert int(out.num_kept[1]) == int(single.num_kept[0]) == min(int(out.budget[1]), 12)
        assert max(kept(out, 1)) < 12 and bool((out.scores[1, 12:] == 0).all())
        assert kept(out, 1) == kept(single)
        torch.testing.assert_close(out.scores[1, :12], single.scores[0])


@pytest.mark.parametrize("name", ["evs", "vidcom2"])
def test_query_agnostic_and_deterministic(name):
    x = list(randn(4 * 6, D, seed=15).split(6))
    selector = build_selector(name)
    first = selector(video(x, 2, 3, q_seed=0), 7)
    for q_seed in (0, 1, 2):  # another question, and the same one again
        out = selector(video(x, 2, 3, q_seed=q_seed), 7)
        assert kept(out) == kept(first) and torch.equal(out.scores, first.scores)


@pytest.mark.parametrize("name", ["evs", "vidcom2"])
def test_rows_are_found_by_their_positions_not_their_order(name):
    """The same video with its rows shuffled and a padding row in the middle keeps the same tokens."""
    x = randn(4 * 6, D, seed=16)
    inputs = video(list(x.split(6)), 2, 3)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(17))
    gap = torch.cat([perm[:10], torch.tensor([24]), perm[10:]])  # row 10 of the shuffled video is padding
    shuffled = SelectorInput(
        x=torch.cat([x, 1e3 * torch.ones(1, D)])[gap][None],
        positions=torch.cat([inputs.positions[0], torch.zeros(1, 3, dtype=torch.long)])[gap][None],
        times=torch.cat([inputs.times[0], torch.zeros(1)])[gap][None],
        q=inputs.q,
        x_mask=(gap < 24)[None],
    )
    selector = build_selector(name)
    for n in [6, 9, 15]:
        out, moved = selector(inputs, n), selector(shuffled, n)
        assert sorted(gap[kept(moved)].tolist()) == kept(out)
        torch.testing.assert_close(moved.scores[0, gap < 24], out.scores[0, gap[gap < 24]])
