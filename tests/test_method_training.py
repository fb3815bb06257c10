"""Training other selectors than QTSplus: FlexSelect-Lite (rank loss against the host's reference layer) and VQToken's
VQ-Attention (through the LM loss) as a checkpoint's own selector, in the host model's forward, through the
train-selector flow (real DeepSpeed launcher) and back out through evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny_vl import random_video, tiny_qwen, video_prompt

from qtsplus.host.model import QTSplusForConditionalGeneration
from qtsplus.selectors import FlexSelect, FlexSelectConfig, FlexSelectLite, SelectorInput, VQToken, spearman
from qtsplus.training.config import TrainConfig
from tests.conftest import run_cli

QUESTION, ANSWER = [5, 6, 7, 8, 9], [20, 21]
LITE = dict(ranker_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64, reference_layer=1,
            frames_per_set=32)
VQ = dict(map_grid=[2, 2, 2], map_hidden=16, kmeans_restarts=1)


@pytest.fixture(scope="module")
def base():
    return tiny_qwen(seed=0)


def training_batch(videos=((4, 8, 8), (2, 4, 8))) -> dict[str, torch.Tensor]:
    """Two left-padded prompts <video> question answer, labels on the answer only."""
    clips = [random_video(*thw, seed=i) for i, thw in enumerate(videos)]
    prompts = [video_prompt(n, QUESTION) + ANSWER for _, _, n in clips]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    labels = torch.full_like(ids, -100)
    labels[:, -len(ANSWER):] = torch.tensor(ANSWER)
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                pixel_values_videos=torch.cat([c[0] for c in clips]), video_grid_thw=torch.cat([c[1] for c in clips]),
                second_per_grid_ts=torch.ones(len(videos)))


def trainable_model(base, method: str, options: dict, budget) -> QTSplusForConditionalGeneration:
    torch.manual_seed(0)
    model = QTSplusForConditionalGeneration.from_qwen(base, method, options, budget)
    model.freeze_base()
    return model.train()


def test_a_checkpoint_holds_another_method_as_its_selector(base, tmp_path: Path) -> None:
    model = QTSplusForConditionalGeneration.from_qwen(base, "vqtoken", VQ, 8)
    assert isinstance(model.selector, VQToken) and not model.uses_qtsplus
    assert model.config.method_config["hidden_size"] == base.config.text_config.hidden_size  # the host's shapes
    assert torch.count_nonzero(model.selector.vq_attention.o_proj.weight) == 0  # its own init, not transformers'
    assert float(model.selector.vq_attention.q_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    keys = {k for k in model.state_dict() if k.startswith("selector.")}
    assert keys and all(k.startswith("selector.vq_attention.") for k in keys)  # no unused QTSplus weights
    with torch.no_grad():
        model.selector.vq_attention.o_proj.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = QTSplusForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.selection_method == "vqtoken" and loaded.config.method_budget == 8
    assert loaded.config.method_config == model.config.method_config
    theirs = loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no parameters"):
        QTSplusForConditionalGeneration.from_qwen(base, "flexselect", {"reference_layer": 1}, 8)
    with pytest.raises(ValueError, match="method_budget"):
        QTSplusForConditionalGeneration.from_qwen(base, "vqtoken", VQ, None)


def test_lite_learns_the_reference_layer_ranking_in_the_host_forward(base) -> None:
    """The host runs FlexSelect-Lite as its selector: the forward's loss is the rank loss (no LM pass), gradients
    reach the ranker only, and 60 steps on a fixed batch raise the Spearman correlation with the teacher, the very
    FlexSelect scores the library computes for the same prompt."""
    model = trainable_model(base, "flexselect_lite", LITE, 0.25)
    batch = training_batch()
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(60):
        out = model(**batch)
        assert out.lm_loss is None and out.logits is None  # the LM never ran
        assert torch.equal(out.loss, out.selection.losses["rank"])
        optimizer.zero_grad()
        out.loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(n.startswith("selector.ranker.") for n in grads)
        optimizer.step()
        history.append([row["spearman"] for row in out.selection.extras])
    first, last = history[0], history[-1]
    assert all(b > a + 0.3 for a, b in zip(first, last, strict=True)) and min(last) > 0.7, (first, last)
    assert all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm_before.items())

    # the spearman the forward reports is against the library's FlexSelect on the same prompt
    model.eval()
    with torch.no_grad():
        inputs = SelectorInput.from_qwen(model, batch["input_ids"], batch["attention_mask"],
                                         batch["pixel_values_videos"], batch["video_grid_thw"],
                                         batch["second_per_grid_ts"], question_mask=model.default_question_mask(
                                             batch["input_ids"], batch["attention_mask"], batch["labels"]))
        teacher = FlexSelect(FlexSelectConfig(reference_layer=1, frames_per_set=32)).scores(inputs)
        student = model.selector.ranker(inputs.x, inputs.x_mask, inputs.q, inputs.q_mask, inputs.positions)
        model.train()
        reported = [row["spearman"] for row in model(**batch).selection.extras]
    assert spearman(student, teacher, inputs.x_mask).tolist() == pytest.approx(reported, abs=1e-5)


def test_vq_attention_learns_through_the_lm_loss(base) -> None:
    model = trainable_model(base, "vqtoken", VQ, 8)
    batch = training_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(**batch)
        assert out.selection.num_kept.tolist() == [8, 8]  # K = the budget
        optimizer.zero_grad()
        out.loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads and all(n.startswith("selector.vq_attention.") for n in grads)
        optimizer.step()
        losses.append(float(out.lm_loss.detach()))
    # the frozen random LM bounds what K re-mixed tokens can do (it plateaus near 0.87x): mechanics, not quality
    assert sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5, losses


def test_train_config_refuses_what_cannot_train() -> None:
    ok = TrainConfig.preset("smoke-vqtoken", data="d", out="o")
    assert ok.method == "vqtoken"
    for fields, match in (
        ({"method": "flexselect"}, "nothing to train"),
        ({"method": "magic"}, "unknown method"),
        ({"method": "flexselect_lite", "variant": "selector+lm"}, "variant 'selector'"),
        ({"method": "vqtoken", "selector": {"rho_min": 0.1}}, "method_options"),
        ({"method_options": {"mode": "adaptive"}}, "QTSplus takes"),
        ({"method": "vqtoken", "method_budget": 1.5}, "ratio"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(data="d", out="o", **fields)


@pytest.mark.slow
@pytest.mark.parametrize("preset,method", [("smoke-flexselect-lite", "flexselect_lite"), ("smoke-vqtoken", "vqtoken")])
def test_train_selector_flow_trains_the_method_and_evaluate_runs_it(smoke, tmp_path: Path, preset, method) -> None:
    """CLI -> Prefect flow -> deepspeed launcher on a fixed batch; the exported checkpoint holds the trained method,
    and evaluate runs it as the checkpoint's own selector, giving its kept counts to the comparators."""
    from qtsplus.evaluation.config import EvalConfig
    from qtsplus.evaluation.evaluate import evaluate_checkpoint, read_predictions

    data, env, _ = smoke
    run = tmp_path / "run"
    run_cli(["train-selector", "--data", str(data), "--out", str(run), "--preset", preset, "--set",
             "overfit_batches=1", "--set", "max_steps=25", "--set", "lr=3e-3", "--set", "checkpoint_every=25"], env)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert len(steps) == 25 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[1]["loss"] != steps[0]["loss"]  # the first step already learns (no step at lr 0)
    if method == "flexselect_lite":
        assert all(math.isnan(r["lm_loss"]) and r["rank_loss"] == r["loss"] for r in steps)
        first, last = [sum(r["spearman"] for r in part) / 5 for part in (steps[:5], steps[-5:])]
        assert last > first + 0.2, (first, last)
    else:
        first, last = [sum(r["lm_loss"] for r in part) / 5 for part in (steps[:5], steps[-5:])]
        assert last < 0.95 * first, (first, last)
        assert all(r["num_clusters"] <= 8 for r in steps)
    record = json.loads((run / "final" / "qtsplus_training.json").read_text())
    assert record["method"] == method and record["rho_bar"] is None

    loaded = QTSplusForConditionalGeneration.from_pretrained(run / "final")
    assert loaded.config.selection_method == method
    assert isinstance(loaded.selector, FlexSelectLite if method == "flexselect_lite" else VQToken)

    other = "vqtoken" if method == "flexselect_lite" else "flexselect_lite"  # borrowed, untrained here
    cfg = EvalConfig.preset("smoke", data=str(data), checkpoint=str(run / "final"), out=str(tmp_path / "eval"),
                            methods=["teacher", "qtsplus", "random_tokens", other], max_vqa=2, latency_frames=[])
    summary = evaluate_checkpoint(cfg, progress=False)
    assert set(summary.tokdense) == {"teacher", method, "random_tokens", other}  # qtsplus = the checkpoint's own
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"# Evaluation of a {method} checkpoint" in report and f"the token count {method} (the checkpoint's" in report
    assert f"(not trained in this checkpoint): {other}." in report
    preds = read_predictions(tmp_path / "eval")
    own = {(p.task, p.question_id): p.video_tokens_kept for p in preds if p.method == method}
    assert own and all(0 < kept < 10_000 for kept in own.values())
    for p in preds:
        if p.method in ("random_tokens", other):
            assert p.budget == own[(p.task, p.question_id)] == p.video_tokens_kept


def test_lite_ranker_starts_from_a_small_causal_lm(base, tmp_path: Path) -> None:
    """ranker_init (the paper: Qwen2-0.5B-Instruct): the ranker's blocks are the LM's first decoder layers, standalone
    and as a checkpoint's selector built from a base model; a trained checkpoint keeps its own weights on load."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qtsplus.selectors import build_selector

    torch.manual_seed(1)
    small = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, num_hidden_layers=2, vocab_size=64))
    small.save_pretrained(tmp_path / "small")
    options = LITE | {"ranker_init": str(tmp_path / "small")}

    def same(ranker) -> bool:
        layer, block = small.model.layers[0], ranker.blocks[0]
        return (torch.equal(block.attn.q_proj.weight, layer.self_attn.q_proj.weight)
                and torch.equal(block.attn.k_proj.bias, layer.self_attn.k_proj.bias)
                and torch.equal(block.mlp.down_proj.weight, layer.mlp.down_proj.weight)
                and torch.equal(block.post_norm.weight, layer.post_attention_layernorm.weight))

    assert same(build_selector("flexselect_lite", base.config.text_config, **options).ranker)
    model = QTSplusForConditionalGeneration.from_qwen(base, "flexselect_lite", options, 0.25)
    assert same(model.selector.ranker)
    base.save_pretrained(tmp_path / "base")  # how train-selector starts: from_pretrained of the plain Qwen2.5-VL
    started = QTSplusForConditionalGeneration.from_pretrained(
        tmp_path / "base", selection_method="flexselect_lite", method_config=options, method_budget=0.25)
    assert same(started.selector.ranker)
    with torch.no_grad():
        model.selector.ranker.blocks[0].attn.q_proj.weight.add_(1.0)  # "trained"
    model.save_pretrained(tmp_path / "ckpt")
    loaded = QTSplusForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.selector.ranker.blocks[0].attn.q_proj.weight,
                       model.selector.ranker.blocks[0].attn.q_proj.weight)
    with pytest.raises(ValueError, match="does not fit"):
        build_selector("flexselect_lite", base.config.text_config, **(options | {"intermediate_size": 48}))
