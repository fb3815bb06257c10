"""Vision feature cache: cached features train and evaluate exactly like computed ones; the store is cached,
verified and repaired like every other stage.

Tolerances (stated in docs/feature_cache.md): fp32 storage is exact (the same loss, gradients and indices, bit for bit);
bf16 storage changes the loss by less than 1e-3 relative (observed ~2e-5), fp8 by less than 1e-2 (observed ~5e-4);
fp32 and bf16 keep the same tokens (training gate and inference top-n); fp8 moves the scores of an untrained
selector enough to flip some draws and near-ties, so only its loss is compared.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from _tiny_vl import random_video, tiny_qwen, video_prompt

from qtsplus.features import FeatureConfig, FeatureStore, video_sha256
from qtsplus.features.cache import build_feature_set, expected_tokens, load_vision_tower
from qtsplus.features.store import decode_features, encode_features, read_feature_row
from qtsplus.fingerprint import file_sha256
from qtsplus.host.model import QTSplusForConditionalGeneration
from qtsplus.training.config import TrainConfig
from qtsplus.training.data import Collator, default_video_root, example_stream
from qtsplus.training.launch import read_metrics
from qtsplus.training.loop import gate_generator
from qtsplus.training.model import build_model
from qtsplus.video import load_video, qwen_video_inputs
from tests.conftest import EXAMPLES, TRAIN_STEPS, run_cli

LOSS_RTOL = {"fp32": 0.0, "bf16": 1e-3, "fp8": 1e-2}
SMOKE_SAMPLING = TrainConfig.preset("smoke", data="x", out="y").video


def cli_store(data: Path, out: Path, env: dict, *extra: str) -> tuple[dict, str]:
    proc = run_cli(["cache-features", "--data", str(data), "--out", str(out), "--preset", "smoke", "--no-progress",
                    *extra], env)
    return json.loads((out / "run-report.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def store(smoke, tmp_path_factory) -> tuple[Path, Path, dict, dict, str]:
    """A bf16 (default) feature store of the smoke dataset, built by the CLI: (data, store, env, report, stdout)."""
    data, env, _ = smoke
    out = tmp_path_factory.mktemp("features") / "store"
    report, stdout = cli_store(data, out, env)
    return data, out, env, report, stdout


@pytest.fixture(scope="module")
def model_and_tokenizer(smoke):
    data, _, _ = smoke
    torch.manual_seed(0)  # the selector's init: the comparisons below are deterministic
    return build_model(TrainConfig.preset("smoke", data=str(data), out="unused"))


def forward(model, batch: dict, seed: int = 0):
    """A training forward that leaves the model as it found it (the forward moves rho_bar)."""
    rho_bar = model.selector.rho_bar.clone()
    model.zero_grad(set_to_none=True)
    out = model(**batch, generator=gate_generator(seed, 1, 0, 0))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.selector.rho_bar.copy_(rho_bar)
    return out, grads


@pytest.mark.parametrize("storage", ["fp32", "bf16", "fp8"])
def test_cached_features_train_like_computed_ones(smoke, model_and_tokenizer, tmp_path, storage) -> None:
    data, _, _ = smoke
    model, tok = model_and_tokenizer
    cfg = FeatureConfig.preset("smoke", data=str(data), out=str(tmp_path / "store"), storage_dtype=storage)
    manifest = build_feature_set(cfg)
    assert manifest.vision_sha256 == load_vision_tower("tiny/qwen2.5-vl", None, "fp32").sha256
    train = TrainConfig.preset("smoke", data=str(data), out="unused")
    found = FeatureStore(tmp_path / "store").find(train.video, model_id=train.base_model)
    assert found is not None and found.spec.storage_dtype == storage
    root = default_video_root(data)
    plain, cached = Collator(tok, model.config, root, train.video), Collator(tok, model.config, root, train.video, found)
    examples = [ex for _, ex in itertools.islice(example_stream(train), 4)]
    for batch_examples in (examples[:2], examples[2:]):
        a, b = plain(batch_examples), cached(batch_examples)
        assert "pixel_values_videos" in a and "video_embeds" in b and "pixel_values_videos" not in b
        for key in ("input_ids", "attention_mask", "labels", "video_grid_thw", "second_per_grid_ts"):
            assert torch.equal(a[key], b[key]), key  # the same tokens, labels, grids and times
        (out_a, grads_a), (out_b, grads_b) = forward(model, a), forward(model, b)
        if storage != "fp8":  # the training gate keeps the same tokens (fp8 moves scores enough to flip draws)
            assert torch.equal(out_a.selection.indices, out_b.selection.indices)
            assert torch.equal(out_a.selection.token_mask, out_b.selection.token_mask)
        if storage == "fp32":
            assert out_a.loss.item() == out_b.loss.item()
            assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
        else:
            assert out_b.loss.item() == pytest.approx(out_a.loss.item(), rel=LOSS_RTOL[storage])
        if storage != "fp8":  # and so does the inference gate (top-n)
            model.eval()
            with torch.no_grad():
                ea, eb = model(**a), model(**b)
            model.train()
            assert torch.equal(ea.selection.indices, eb.selection.indices)
    assert found.hits == 4 and found.misses == found.rejected == 0


def test_video_embeds_replace_the_vision_tower_in_prefill_and_generation() -> None:
    """The model-level contract: packed precomputed features give the base path's and the selection path's outputs
    bit for bit, and generation (whose decoding steps carry them along) the same tokens."""
    base = tiny_qwen(0)
    torch.manual_seed(1)
    model = QTSplusForConditionalGeneration.from_qwen(base).eval()
    (pa, ga, na), (pb, gb, nb) = random_video(4, 8, 8, seed=0), random_video(2, 4, 8, seed=1)
    prompts = [video_prompt(na, [5, 6, 7]), video_prompt(nb, [10, 11], prefix=(3,))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    common = dict(input_ids=ids, attention_mask=mask, video_grid_thw=torch.cat([ga, gb]),
                  second_per_grid_ts=torch.tensor([1.0, 0.5]))
    pixels = torch.cat([pa, pb])
    with torch.no_grad():
        embeds = torch.cat(model.model.get_video_features(pixels, common["video_grid_thw"]).pooler_output)
        for selection in (True, False):
            model.selection = selection
            a = model(**common, pixel_values_videos=pixels)
            b = model(**common, video_embeds=embeds)
            assert torch.equal(a.logits, b.logits)
            if selection:
                assert torch.equal(a.selection.indices, b.selection.indices)
            gen = dict(max_new_tokens=4, do_sample=False)
            assert torch.equal(model.generate(**common, pixel_values_videos=pixels, **gen),
                               model.generate(**common, video_embeds=embeds, **gen))
        with pytest.raises(ValueError, match="not both"):
            model(**common, pixel_values_videos=pixels, video_embeds=embeds)
        with pytest.raises(ValueError, match="rows"):
            model(**common, video_embeds=embeds[:-1])


def test_first_run_writes_a_verified_store_and_prints_its_storage(store) -> None:
    data, out, _, report, stdout = store
    assert "expected storage:" in stdout and f"set {report['set_id']}" in stdout
    assert set(report["states"].values()) == {"Completed"} and report["storage_dtype"] == "bf16"
    manifest = json.loads((out / report["set_id"] / "manifest.json").read_text())
    for shard in manifest["files"]:
        assert file_sha256(out / shard["path"]) == shard["sha256"]
    # every distinct video the kept questions and VQA answers name (which ones, the tiny random models decide)
    named = {video_sha256(EXAMPLES / "videos" / v) for stage, splits in FeatureConfig(data=str(data)).splits.items()
             for split in splits for f in (data / stage).glob(f"{split}-*.parquet")
             for v in pq.read_table(f, columns=["video"]).column("video").to_pylist()}
    assert 1 <= len(named) <= 5  # the shipped examples: 5 videos (one of them a frame folder)
    assert report["videos"] == len(manifest["videos"]) == len(named) and not report["failed"]
    assert report["bytes"] == manifest["bytes"] > 0
    assert report["expected_bytes"] == report["tokens"] * 64 * 2  # probed tokens = computed tokens, d=64, bf16
    # what the store holds is what the vision tower computes, rounded to bf16
    path = EXAMPLES / "videos" / "bikes.mp4"
    got = FeatureStore(out).get(path, SMOKE_SAMPLING, "tiny/qwen2.5-vl")
    tower = load_vision_tower("tiny/qwen2.5-vl", None, "fp32")
    inputs = qwen_video_inputs(load_video(path, SMOKE_SAMPLING))
    ref = tower.module(inputs.pixel_values_videos, grid_thw=inputs.video_grid_thw).pooler_output
    assert got is not None and got.features.dtype == torch.bfloat16
    assert torch.equal(got.features, ref.to(torch.bfloat16)) and torch.equal(got.grid_thw, inputs.video_grid_thw)
    assert got.second_per_grid_t == inputs.second_per_grid_t
    assert expected_tokens(path, SMOKE_SAMPLING) == got.num_tokens


def test_second_run_is_fully_cached_and_loads_no_model(store) -> None:
    data, out, env, first, _ = store
    log = Path(env["QTSPLUS_ENGINE_LOAD_LOG"])
    before = log.read_text() if log.exists() else ""
    report, _ = cli_store(data, out, env)
    assert report["set_id"] == first["set_id"]
    assert set(report["states"].values()) == {"Cached"} and len(report["states"]) == len(first["states"])
    assert (log.read_text() if log.exists() else "") == before  # no vision tower was loaded


@pytest.mark.slow
def test_train_selector_reads_the_store_and_ends_with_the_same_loss(store, trained, tmp_path) -> None:
    data, out, env, _, _ = store
    _, reference, _ = trained
    run = tmp_path / "run"
    run_cli(["train-selector", "--data", str(data), "--out", str(run), "--preset", "smoke", *TRAIN_STEPS,
             "--set", f"features={out}"], env)
    start = next(m for m in read_metrics(run) if m.get("event") == "start")
    assert start["features"] and Path(start["features"]).parent == out
    ours = [m for m in read_metrics(run) if "step" in m]
    theirs = [m for m in read_metrics(reference) if "step" in m]
    assert all(m["cached_videos"] == m["samples"] for m in ours)  # every micro-batch came from the store
    assert all(m.get("cached_videos", 0) == 0 for m in theirs)
    for a, b in zip(ours, theirs, strict=True):  # bf16 storage: the same run up to its rounding
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL["bf16"]), (a["step"], a["loss"], b["loss"])
        assert a["tokens_in"] == b["tokens_in"]
    result = json.loads((run / "run-report.json").read_text())
    assert result["final_loss"] == pytest.approx(theirs[-1]["loss"], rel=LOSS_RTOL["bf16"])


def test_corrupt_and_missing_shards_are_never_used_and_are_recomputed(store, model_and_tokenizer) -> None:
    data, out, env, first, _ = store
    folder = out / first["set_id"]
    manifest = json.loads((folder / "manifest.json").read_text())
    by_shard: dict[str, list[str]] = {}
    for sha, entry in manifest["videos"].items():
        by_shard.setdefault(entry["shard"], []).append(sha)
    bikes = video_sha256(EXAMPLES / "videos" / "bikes.mp4")
    corrupt = manifest["videos"][bikes]["shard"]
    missing = next(s for s in by_shard if s != corrupt)
    before = {sha: FeatureStore(out).find(SMOKE_SAMPLING, model_id="tiny/qwen2.5-vl").get_by_sha(sha).features
              for sha in manifest["videos"]}

    # flip one byte inside bikes' stored features (the file still parses), delete another shard
    row = read_feature_row(folder / corrupt, manifest["videos"][bikes]["row"])
    raw = bytearray((folder / corrupt).read_bytes())
    at = raw.find(row["features"]) + 10
    raw[at] ^= 0xFF
    (folder / corrupt).write_bytes(bytes(raw))
    (folder / missing).unlink()

    found = FeatureStore(out).find(SMOKE_SAMPLING, model_id="tiny/qwen2.5-vl")
    assert found.get(EXAMPLES / "videos" / "bikes.mp4") is None  # checksum mismatch: rejected
    assert all(found.get_by_sha(sha) is None for sha in by_shard[missing])  # shard gone: rejected
    assert found.rejected == 1 + len(by_shard[missing])
    assert all(found.get_by_sha(sha) is not None for s, shas in by_shard.items() if s not in (corrupt, missing)
               for sha in shas)
    model, tok = model_and_tokenizer
    train = TrainConfig.preset("smoke", data=str(data), out="unused")
    examples = [ex for _, ex in itertools.islice(example_stream(train), 6) if ex.video == "bikes.mp4"][:1]
    batch = Collator(tok, model.config, default_video_root(data), train.video, found)(examples)
    assert "pixel_values_videos" in batch and "video_embeds" not in batch  # decoded instead

    report, _ = cli_store(data, out, env)
    chunk_of = {f"features-{int(c):05d}.parquet": c for c in report["states"]}
    assert report["states"][chunk_of[corrupt]] == "Recomputed" and report["states"][chunk_of[missing]] == "Recomputed"
    assert {s for c, s in report["states"].items() if c not in (chunk_of[corrupt], chunk_of[missing])} == {"Cached"}
    repaired = FeatureStore(out).find(SMOKE_SAMPLING, model_id="tiny/qwen2.5-vl")
    for sha, features in before.items():
        assert torch.equal(repaired.get_by_sha(sha).features, features)
    assert repaired.rejected == 0


def test_a_feature_set_keeps_shards_open_and_returns_copies_of_what_it_verified(store) -> None:
    """Open shards and remembered features are bounded (open_files, memo_bytes); every lookup, first or repeated,
    returns the stored features, and a caller writing into what it got does not change the next lookup."""
    from qtsplus.features.store import FeatureSet

    _, out, _, _, _ = store
    found = FeatureStore(out).find(SMOKE_SAMPLING, model_id="tiny/qwen2.5-vl")
    plain = FeatureSet(found.folder, found.manifest, open_files=0, memo_bytes=0)  # opens, reads, checks every time
    shas = list(found.manifest.videos)
    truth = {sha: plain.get_by_sha(sha).features for sha in shas}
    shards = {found.manifest.videos[sha].shard for sha in shas}
    assert len(shards) > 1 and not plain._files and not plain._memo
    one = max(t.numel() * t.element_size() for t in truth.values())
    kept = FeatureSet(found.folder, found.manifest, open_files=1, memo_bytes=2 * one)
    for _ in range(2):
        for sha in shas:
            got = kept.get_by_sha(sha)
            assert torch.equal(got.features, truth[sha])
            got.features.zero_()  # the caller's copy
            assert len(kept._files) == 1 and kept._memo_size <= 2 * one
    assert kept.hits == 2 * len(shas) and kept.rejected == kept.misses == 0
    assert 1 <= len(kept._memo) <= 2
    name = found.manifest.videos[shas[0]].shard
    assert kept._shard(name) is kept._shard(name)  # reused, not reopened
    kept.close()
    assert not kept._files and not kept._memo


def test_content_hash_follows_the_bytes_of_files_and_frame_folders(tmp_path) -> None:
    frames = tmp_path / "frames"
    shutil.copytree(EXAMPLES / "videos" / "carphone_frames", frames)
    copy = tmp_path / "copy.mp4"
    shutil.copy(EXAMPLES / "videos" / "bikes.mp4", copy)
    assert video_sha256(copy) == video_sha256(EXAMPLES / "videos" / "bikes.mp4") == file_sha256(copy)
    first = video_sha256(frames)
    (frames / "notes.txt").write_text("not a frame")  # load_video ignores it, so does the hash
    assert video_sha256(frames) == first
    frame = sorted(p for p in frames.iterdir() if p.suffix != ".txt")[0]
    data = bytearray(frame.read_bytes())
    data[-1] ^= 0x01
    frame.write_bytes(bytes(data))
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 1))
    assert video_sha256(frames) != first


def test_fp8_storage_round_trips_within_its_precision() -> None:
    x = torch.randn(50, 64) * torch.logspace(-2, 3, 50)[:, None]  # token norms over five decades
    for storage, rtol in (("fp32", 0.0), ("bf16", 2**-8), ("fp16", 2**-11), ("fp8", 2**-3)):
        blob, scales = encode_features(x, storage)
        assert (scales is not None) == (storage == "fp8")
        y = decode_features(blob, scales, storage, 50, 64).float()
        err = ((y - x).abs() / x.abs().amax(-1, keepdim=True)).max().item()
        assert err <= rtol, (storage, err)


@pytest.mark.slow
def test_evaluation_reads_a_lossless_set_and_gives_the_same_answers(trained, tmp_path) -> None:
    from qtsplus.evaluation.config import EvalConfig
    from qtsplus.evaluation.harness import Harness

    data, run, _ = trained
    build_feature_set(FeatureConfig.preset("smoke", data=str(data), out=str(tmp_path / "fp32"), storage_dtype="fp32"))
    build_feature_set(FeatureConfig.preset("smoke", data=str(data), out=str(tmp_path / "bf16")))
    cfg = EvalConfig.preset("smoke", data=str(data), checkpoint=str(run / "final"), out=str(tmp_path / "eval"))
    plain = Harness(cfg.model_copy(update={"features": "off"}))
    cached = Harness(cfg.model_copy(update={"features": str(tmp_path / "fp32")}))
    assert cached.features is not None  # found by the tower's weights: the checkpoint shares its base's tower
    assert Harness(cfg.model_copy(update={"features": str(tmp_path / "bf16")})).features is None  # lossy on fp32
    questions = plain.mcq_questions()
    for method in ("qtsplus", "no_selection", "random_tokens"):
        budget = None if method in ("qtsplus", "no_selection") else 4
        for q in questions:
            a, stats_a = plain.answer_mcq(plain.method(method), q, budget)
            b, stats_b = cached.answer_mcq(cached.method(method), q, budget)
            assert a.option_probs == b.option_probs and stats_a == stats_b, (method, q.question_id)
    assert cached.features.hits == 3 * len(questions) and cached.features.rejected == 0
