"""train-selector: streamed mixed data, real DeepSpeed (CPU accelerator) through its launcher, resume, cache, export."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtsplus.engines import EngineConfig, GenerationParams, Prompt
from qtsplus.engines.transformers_engine import TransformersEngine
from qtsplus.prompts import mcq_user_prompt
from qtsplus.tiny import tiny_model_path
from qtsplus.training.config import LoraSettings, TrainConfig
from qtsplus.training.data import (
    IGNORE,
    Collator,
    batches,
    default_video_root,
    example_stream,
    mcq_examples,
    vqa_examples,
)
from qtsplus.training.launch import read_metrics, run_training
from qtsplus.training.model import build_model, merge_lora
from qtsplus.video import load_video
from tests.conftest import EXAMPLES, REPO, run_cli
from tests.conftest import TRAIN_STEPS as STEPS


def steps_of(run: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run) if "step" in m]


def test_stream_mixes_both_sources_and_masks_all_but_the_answer(smoke) -> None:
    data, _, _ = smoke
    cfg = TrainConfig.preset("smoke", data=str(data), out="unused", shuffle_buffer=4)
    n_mcq, n_vqa = len(list(mcq_examples(data))), len(list(vqa_examples(data)))
    assert n_mcq > 0 and n_vqa > 0
    first_epoch = [ex for epoch, ex in itertools.islice(example_stream(cfg), n_mcq + n_vqa + 3) if epoch == 0]
    assert sorted(e.question_id + e.kind for e in first_epoch) == sorted(
        [e.question_id + "mcq" for e in mcq_examples(data)] + [e.question_id + "vqa" for e in vqa_examples(data)])
    ranks = [[ex.question_id + ex.kind for _, ex in itertools.islice(example_stream(cfg, r, 2), 2)] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])

    from transformers import AutoConfig, AutoTokenizer

    path = tiny_model_path("qwen2.5-vl")
    tok = AutoTokenizer.from_pretrained(path)
    collator = Collator(tok, AutoConfig.from_pretrained(path), default_video_root(data), cfg.video)
    _, batch, kinds = next(batches(cfg.model_copy(update={"micro_batch_size": 3}), collator, 0, 1))
    assert batch["input_ids"].shape[0] == 3 == len(kinds) == batch["video_grid_thw"].shape[0]
    examples = [ex for _, ex in itertools.islice(example_stream(cfg), 3)]
    for row, ex in zip(range(3), examples, strict=True):
        labels = batch["labels"][row]
        assert tok.decode(labels[labels != IGNORE]) == ex.target + "<|im_end|>"
        assert (batch["attention_mask"][row] == 0).sum() == (batch["input_ids"][row] == tok.pad_token_id).sum()


@pytest.mark.slow
def test_selector_variant_trains_only_the_selector_and_exports_a_loadable_checkpoint(trained) -> None:
    _, out, _ = trained
    assert steps_of(out) == list(range(1, 13))
    metrics = [m for m in read_metrics(out) if "step" in m]
    for key in ("loss", "lm_loss", "budget_loss", "attention_cost", "memory_cost", "budget_prior", "rho", "n",
                "kept_fraction"):
        assert all(key in m and m[key] == m[key] for m in metrics), key
    assert (out / "curves.png").stat().st_size > 10_000
    final = load_file(out / "final" / "model.safetensors")
    base = load_file(tiny_model_path("qwen2.5-vl") / "model.safetensors")
    frozen = [k for k in final if not k.startswith("selector.")]
    assert len(frozen) == len(base)
    for key in frozen:  # the base checkpoint's older key layout maps onto ours by a prefix
        base_key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        assert torch.equal(final[key], base[base_key if base_key in base else key]), key
    assert any("selector." in k for k in final)

    engine = TransformersEngine(EngineConfig(model_id=str(out / "final")))
    clip = load_video(EXAMPLES / "videos" / "bikes.mp4", TrainConfig.preset("smoke", data="x", out="y").video)
    prompt = Prompt(user=mcq_user_prompt("What are the people riding?", {"A": "bicycles", "B": "horses",
                                                                        "C": "boats", "D": "skateboards"}), video=clip)
    (choice,) = engine.choose([prompt], "ABCD")
    assert choice.choice in "ABCD" and abs(sum(choice.probs.values()) - 1) < 1e-5
    assert engine.model.selector.rho_bar.item() != 0.5  # rho_bar moved in training and came back with the weights
    (text,) = engine.generate_text([prompt], GenerationParams(max_new_tokens=5))
    assert isinstance(text, str)


@pytest.mark.slow
def test_identical_rerun_is_cached(trained) -> None:
    data, out, env = trained
    before = (out / "metrics.jsonl").read_text()
    run_cli(["train-selector", "--data", str(data), "--out", str(out), "--preset", "smoke", *STEPS], env)
    assert json.loads((out / "run-report.json").read_text())["state"] == "Cached"
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint_and_ends_the_same(trained, tmp_path: Path) -> None:
    data, reference, env = trained
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qtsplus.cli", "train-selector", "--data", str(data), "--out", str(out),
           "--preset", "smoke", *STEPS]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (steps_of(out) and steps_of(out)[-1] >= 4):  # past the step-3 checkpoint
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    run_cli(cmd[3:], env)
    starts = [m for m in read_metrics(out) if m.get("event") == "start"]
    assert starts[0]["resumed_from"] == 0 and starts[-1]["resumed_from"] >= 3
    assert steps_of(out) == list(range(1, 13))  # the step counter continued; no step logged twice
    ours, theirs = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # another configuration in the same folder starts over instead of resuming the checkpoints it did not write
    run_cli([*cmd[3:], "--set", "lr=0.002"], env)
    starts = [m for m in read_metrics(out) if m.get("event") == "start"]
    assert [m["resumed_from"] for m in starts] == [0] and steps_of(out) == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.parametrize("variant,ratio", [("selector+lm", 0.3), ("selector", 0.92)])
def test_overfitting_a_fixed_batch_drives_the_loss_down(smoke, tmp_path: Path, variant: str, ratio: float) -> None:
    data, _, _ = smoke
    cfg = TrainConfig.preset("smoke", data=str(data), out=str(tmp_path / "run"), variant=variant, overfit_batches=1,
                             max_steps=20, lr=3e-3, warmup_steps=1, checkpoint_every=100)
    run_training(cfg)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "step" in m]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < ratio * first, (variant, losses)


def test_lora_trains_adapters_only_and_merges_back_to_plain_weights(smoke) -> None:
    data, _, _ = smoke
    cfg = TrainConfig.preset("smoke", data=str(data), out="unused", variant="selector+lm", lora=LoraSettings(r=4))
    model, _ = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("selector.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    model.eval()  # no LoRA dropout
    x = torch.randint(0, 100, (1, 7))
    before = model.model.language_model(input_ids=x).last_hidden_state
    assert merge_lora(model.model.language_model) > 0
    assert not any("lora_" in n for n, _ in model.named_parameters())
    after = model.model.language_model(input_ids=x).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="selector\\+lm"):
        build_model(cfg.model_copy(update={"variant": "selector"}))


def test_no_warmup_runs_at_the_full_rate_from_the_first_scheduled_step() -> None:
    """DeepSpeed's WarmupCosineLR needs one warmup step, which starts at 0 unless told otherwise: with warmup_steps=0
    the schedule starts at the configured rate (and a warmup, when asked for, still starts at 0)."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from qtsplus.training.loop import deepspeed_config

    for warmup, expected in ((0, [1.0, 1.0]), (4, [0.0, 0.25])):  # x cfg.lr in the engine's steps 1 and 2
        cfg = TrainConfig.preset("smoke", data="d", out="o", warmup_steps=warmup, max_steps=20)
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        schedule = WarmupCosineLR(optimizer, **deepspeed_config(cfg, bf16=False)["scheduler"]["params"])
        rates = []
        schedule.step()  # what the training loop does before its first step
        for _ in expected:
            rates.append(optimizer.param_groups[0]["lr"] / cfg.lr)  # the rate of the engine's next step
            schedule.step()  # what each optimizer step of the engine does
        assert rates == pytest.approx(expected, abs=1e-3), (warmup, rates)
