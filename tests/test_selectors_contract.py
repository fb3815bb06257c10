"""The selector contract: every registered method on the same inputs from a tiny random Qwen2.5-VL, budgets, order,
positions; the baselines; the QTSplus adapter against QTSplusSelector itself."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_vl import VIDEO, random_video, tiny_qwen, video_prompt

from qtsplus.selectors import SELECTORS, Budget, QTSplusAdapter, SelectorInput, build_selector
from qtsplus.selectors.qtsplus import QTSplusSelector, SelectorConfig

QUESTION = [5, 6, 7, 8, 9]
# tiny shapes for the methods with parameters (the host's hidden size, heads etc. come from its text config)
TINY = {
    "qtsplus": dict(budget_hidden=16, time_dim=8),
    "flexselect": dict(reference_layer=1, frames_per_set=2),
    "flexselect_lite": dict(ranker_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
                            frames_per_set=2),
    "vqtoken": dict(map_hidden=16, map_grid=(2, 2, 2), k_min=2, k_max=6),
}  # fmt: skip
# their tokens are rows of x
PASS_THROUGH = {"none", "uniform_frames", "random_tokens", "flexselect", "flexselect_lite", "evs", "vidcom2"}


@pytest.fixture(scope="module")
def host():
    return tiny_qwen(seed=0)


@pytest.fixture(scope="module")
def inputs(host) -> SelectorInput:
    """Two videos of 64 and 16 tokens (4 and 2 time steps), different questions, left-padded prompts."""
    pix_a, grid_a, n_a = random_video(4, 8, 8, seed=0)
    pix_b, grid_b, n_b = random_video(2, 4, 8, seed=1)
    prompts = [video_prompt(n_a, QUESTION), video_prompt(n_b, [10, 11], prefix=(3,))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        return SelectorInput.from_qwen(
            host, ids, mask, torch.cat([pix_a, pix_b]), torch.cat([grid_a, grid_b]), torch.tensor([1.0, 0.5])
        )


def make(name: str, host, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_selector(name, host.config.text_config, **{**TINY.get(name, {}), **overrides}).eval()


def check_selection(out, inputs: SelectorInput) -> None:
    B, M, d = inputs.x.shape
    N = out.tokens.shape[1]
    assert out.tokens.shape == (B, N, d) and out.token_mask.shape == out.indices.shape == (B, N)
    assert torch.isfinite(out.tokens[out.token_mask]).all()
    for b in range(B):
        idx = out.indices[b][out.token_mask[b]]
        assert (idx[1:] > idx[:-1]).all(), "indices must be strictly ascending"
        assert inputs.x_mask[b, idx].all(), "an output token stands at a padding slot"
        assert torch.equal(out.positions[b][out.token_mask[b]], inputs.positions[b, idx])
        assert torch.equal(out.times[b][out.token_mask[b]], inputs.times[b, idx])
    assert len(out.diagnostics()) == B


def test_registry_holds_every_method(host):
    assert set(SELECTORS) == {"none", "uniform_frames", "random_tokens", "qtsplus", "flexselect",
                              "flexselect_lite", "vqtoken", "evs", "vidcom2"}  # fmt: skip
    for name in SELECTORS:
        assert make(name, host).name == name
    with pytest.raises(AssertionError, match="unknown"):
        build_selector("vqtoken", not_a_field=1)


@pytest.mark.parametrize("budget", [1, 5, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_selector_honours_its_budget(name, budget, host, inputs):
    selector = make(name, host)
    with torch.no_grad():
        out = selector(inputs, budget)
    n = Budget.of(budget).resolve(inputs.num_tokens)
    assert torch.equal(out.budget, n)
    check_selection(out, inputs)
    if name == "none":
        assert torch.equal(out.num_kept, inputs.num_tokens)
    else:
        assert (out.num_kept <= n).all() and (out.num_kept >= 1).all()
    if selector.fills_budget:
        assert torch.equal(out.num_kept, n)
    if name in PASS_THROUGH:
        for b in range(2):
            kept = out.token_mask[b]
            assert torch.equal(out.tokens[b][kept], inputs.x[b, out.indices[b][kept]])


def test_budget_forms():
    m = torch.tensor([2000, 7, 1])
    assert Budget.of(0.05).resolve(m).tolist() == [100, 1, 1]  # no float noise: 0.05 * 2000 is 100
    assert Budget.of("10%").resolve(m).tolist() == [200, 1, 1]
    assert Budget.of("0.5").resolve(m).tolist() == [1000, 4, 1]
    assert Budget.of("512").resolve(m).tolist() == [512, 7, 1]
    assert Budget.of(1.0).resolve(m).tolist() == [2000, 7, 1]
    with pytest.raises(AssertionError):
        Budget(tokens=0)


def grid_inputs(t: int, h: int, w: int, d: int = 16, seed: int = 0) -> SelectorInput:
    g = torch.Generator().manual_seed(seed)
    return SelectorInput.from_grid(torch.randn(1, t * h * w, d, generator=g), torch.randn(1, 3, d, generator=g),
                                   (t, h, w), seconds_per_step=2.0)  # fmt: skip


def test_uniform_frames_keeps_whole_evenly_spaced_frames():
    inputs = grid_inputs(10, 2, 3)  # 10 frames of 6 tokens
    selector = build_selector("uniform_frames")
    out = selector(inputs, 20)  # 3 whole frames (18 tokens): frames floor((j + 1/2) 10 / 3) = 1, 5, 8
    assert out.positions[0, :, 0].unique().tolist() == [1, 5, 8] and int(out.num_kept[0]) == 18
    out = selector(inputs, 60)
    assert int(out.num_kept[0]) == 60
    out = selector(inputs, 4)  # less than a frame: 4 tokens of the middle frame
    assert out.positions[0, :, 0].tolist() == [5] * 4 and int(out.num_kept[0]) == 4
    assert out.times[0].tolist() == [10.0] * 4


def test_random_tokens_are_seeded():
    inputs = grid_inputs(8, 4, 4)
    first = build_selector("random_tokens")(inputs, 0.25).indices
    assert torch.equal(first, build_selector("random_tokens")(inputs, 0.25).indices)
    assert not torch.equal(first, build_selector("random_tokens", seed=1)(inputs, 0.25).indices)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(first, build_selector("random_tokens")(inputs, 0.25, generator=gen).indices)


# ---------------------------------------------------------------------------------------------------------- QTSplus


def qtsplus_pair(host, **config):
    """A QTSplusSelector and an independent copy behind the contract (training updates rho_bar in place)."""
    torch.manual_seed(0)
    selector = QTSplusSelector(SelectorConfig.from_text_config(host.config.text_config, budget_hidden=16,
                                                               time_dim=8, **config))  # fmt: skip
    with torch.no_grad():
        selector.reencoder.time.proj.weight.normal_(std=0.02)  # exercise the time path
    return selector, QTSplusAdapter.wrap(copy.deepcopy(selector), own_budget=True)


def test_qtsplus_adapter_is_the_selector_in_inference(host, inputs):
    selector, adapter = qtsplus_pair(host, n_max=20)
    selector.eval(), adapter.eval()
    i = inputs
    with torch.no_grad():
        ref = selector(i.x, i.q, i.times, i.x_mask, i.q_mask)
        out = adapter(i, 1.0)  # the budget allows everything: QTSplus's own n
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.token_mask, ref.token_mask)
    torch.testing.assert_close(out.tokens, ref.tokens, rtol=0, atol=0)
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=0)
    assert [e["rho"] for e in out.extras] == ref.rho.tolist()
    assert [e["own_budget"] for e in out.extras] == ref.budget.tolist() == out.num_kept.tolist()
    with torch.no_grad():  # a smaller budget caps the adaptive n
        assert (adapter(i, 3).num_kept == 3).all()


def test_qtsplus_adapter_is_the_selector_in_training(host, inputs):
    selector, adapter = qtsplus_pair(host, n_max=10_000)
    selector.train(), adapter.train()
    i = inputs
    ref = selector(i.x, i.q, i.times, i.x_mask, i.q_mask, generator=torch.Generator().manual_seed(3))
    out = adapter(i, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.tokens, ref.tokens, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    assert torch.equal(adapter.selector.rho_bar, selector.rho_bar)  # the EMA moved the same way
    out.loss.backward()  # the Eq. 5 terms reach the budget head
    assert adapter.selector.budget_head.mlp[0].weight.grad.abs().sum() > 0
    capped = adapter(i, 2, generator=torch.Generator().manual_seed(3))
    assert (capped.num_kept <= 2).all()


def test_qtsplus_at_a_given_budget_keeps_the_top_n(host, inputs):
    adapter = make("qtsplus", host)
    assert adapter.fills_budget and not adapter.config.own_budget
    with torch.no_grad():
        out = adapter(inputs, 0.25)
    for b in range(2):
        m, n = int(inputs.num_tokens[b]), int(out.budget[b])
        top = out.scores[b, :m].topk(n).indices.sort().values
        assert torch.equal(out.indices[b, :n], top)


def test_wrap_shares_the_module(host):
    from qtsplus.host.model import QTSplusForConditionalGeneration

    model = QTSplusForConditionalGeneration.from_qwen(host, budget_hidden=16, time_dim=8)
    adapter = QTSplusAdapter.wrap(model.selector)
    assert adapter.selector is model.selector
    assert set(adapter.state_dict()) == {f"selector.{k}" for k in model.selector.state_dict()}


# ------------------------------------------------------------------------------------------------------- inputs


def test_inputs_from_qwen(host, inputs):
    B, M, d = inputs.x.shape
    assert (B, M, d) == (2, 64, 64) and inputs.num_tokens.tolist() == [64, 16]
    assert inputs.q_mask.sum(-1).tolist() == [5, 2]  # the text after the video
    embed = host.get_input_embeddings()
    torch.testing.assert_close(inputs.q[0], embed(torch.tensor(QUESTION)))
    assert inputs.positions[1, :16].tolist() == [
        [t, h, w] for t in range(2) for h in range(2) for w in range(4)
    ]
    assert inputs.times[1, :16].tolist() == [0.0] * 8 + [0.5] * 8
    slots = inputs.host.video_slots
    assert (inputs.host.input_ids.gather(1, slots)[inputs.x_mask] == VIDEO).all()
