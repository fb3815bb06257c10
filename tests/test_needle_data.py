"""The needle generator: geometry (an object's pixels are exactly in the visual tokens it names, through
qtsplus.video and Qwen2.5-VL's packing), questions (answers true of the scene, keys balanced, every option shown by
some object), determinism, the dataset layout train-selector and evaluate read, and the cached, resumable flow."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from qtsplus.needle import NeedleConfig, build_needle, plan_chunks
from qtsplus.needle.config import PALETTE, PLACES, QUARTERS, SHAPES
from qtsplus.needle.questions import ask
from qtsplus.needle.scene import render, sample_scene
from qtsplus.needle.writer import video_id, video_rng
from qtsplus.shards import load_manifest, read_rows
from qtsplus.video import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_video, qwen_video_inputs
from schemas import OPTION_KEYS, Caption, VQAAnswer, VSCQ2Question
from tests.conftest import run_cli

SMALL = dict(train_videos=6, eval_videos=3, chunk_size=4)


def _scene(cfg: NeedleConfig, i: int):
    rng = video_rng(cfg, "eval", i)
    scene = sample_scene(cfg, video_id(cfg, "eval", i), rng)
    return scene, ask(cfg, scene, rng)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[NeedleConfig, Path]:
    out = tmp_path_factory.mktemp("needle") / "data"
    cfg = NeedleConfig(out=str(out), **SMALL)
    build_needle(cfg)
    return cfg, out


def test_each_object_is_exactly_in_the_tokens_it_names(dataset) -> None:
    """Decode a written video with qtsplus.video, pack it as Qwen2.5-VL does, and read back each merged token's
    pixels: a token named by an object shows that object's colour, every other token shows only grey texture."""
    cfg, out = dataset
    vid = video_id(cfg, "eval", 0)
    rng = video_rng(cfg, "eval", 0)
    scene = sample_scene(cfg, vid, rng)
    clip = load_video(out / "videos" / "eval" / vid, cfg.sampling())
    assert clip.frames.shape == (cfg.frames, cfg.height, cfg.width, 3)
    packed = qwen_video_inputs(clip)
    assert packed.num_video_tokens == cfg.tokens
    # rows are (t, h-block, w-block, merge-row, merge-col) patches of (channel, time, 14, 14): 4 rows per LM token
    pixels = packed.pixel_values_videos.view(cfg.tokens, 4, 3, 2, 14, 14)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    rgb = (pixels.permute(0, 1, 3, 4, 5, 2) * std + mean) * 255  # [token, 4, time, 14, 14, 3]
    owner = {t: o for o in scene.objects for t in o.tokens(cfg)}
    for token in range(cfg.tokens):
        colours = rgb[token].reshape(-1, 3)
        grey = (colours.max(-1).values - colours.min(-1).values) < 3
        if token in owner:
            target = torch.tensor(PALETTE[owner[token].colour], dtype=torch.float32)
            share = ((colours - target).abs().max(-1).values < 2).float().mean()
            assert share > 0.3, (token, owner[token], float(share))  # a 26-px shape covers 40-86 % of its 28-px cell
        else:
            assert bool(grey.all()), (token, "colour outside the tokens of every object")


def test_answers_are_true_of_the_scene_and_options_are_all_shown() -> None:
    cfg = NeedleConfig(out="unused")
    for i in range(40):
        scene, questions = _scene(cfg, i)
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # a colour names exactly one object
        assert {o.shape for o in scene.objects} == set(SHAPES)  # every shape option is on some object
        assert {o.place(cfg) for o in scene.objects} == set(PLACES)
        assert {o.quarter(cfg) for o in scene.objects} == set(QUARTERS)
        for q in questions:
            objects = [scene.objects[i] for i in q.targets]
            correct = q.options[q.answer]
            if q.kind == "shape":
                assert correct == f"a {objects[0].shape}"
            elif q.kind == "place":
                assert correct == f"in the {objects[0].place(cfg)}"
            elif q.kind == "time":
                assert correct == f"in the {objects[0].quarter(cfg)} quarter"
            else:
                assert len({o.start for o in objects}) == 4
                assert correct == f"the {min(objects, key=lambda o: o.start).colour} object"
            assert objects[0].colour in q.question or q.kind == "order"
            assert q.target_tokens == sorted(t for o in objects for t in o.tokens(cfg))


def test_answer_keys_are_balanced_in_every_kind() -> None:
    cfg = NeedleConfig(out="unused")
    counts: Counter[tuple[str, str]] = Counter()
    for i in range(300):
        for q in _scene(cfg, i)[1]:
            counts[(q.kind, q.answer)] += 1
    for kind in ("shape", "place", "time", "order"):
        per_key = [counts[(kind, k)] for k in OPTION_KEYS]
        assert min(per_key) > 0.6 * sum(per_key) / 4, (kind, per_key)


def test_same_seed_same_video_other_seed_other_video() -> None:
    a, b = NeedleConfig(out="x", seed=0), NeedleConfig(out="x", seed=1)
    first = render(a, _scene(a, 3)[0])
    assert np.array_equal(first, render(a, _scene(a, 3)[0]))
    assert not np.array_equal(first, render(b, _scene(b, 3)[0]))
    assert [q.question for q in _scene(a, 3)[1]] == [q.question for q in _scene(a, 3)[1]]


def test_training_scenes_can_start_smaller_but_held_out_ones_never_do(tmp_path: Path) -> None:
    cfg = NeedleConfig(out=str(tmp_path / "d"), train_min_objects=1, train_videos=12, eval_videos=4, chunk_size=8)
    build_needle(cfg)
    counts = {split: [] for split in ("train", "eval")}
    for row in read_rows(tmp_path / "d", load_manifest(tmp_path / "d", "captions").files, Caption):
        counts[row.partition].append(row.caption.count(" at "))
    assert min(counts["train"]) < cfg.objects and set(counts["eval"]) == {cfg.objects}


def test_dataset_is_what_training_and_evaluation_read(dataset) -> None:
    cfg, out = dataset
    for stage in ("captions", "vscq1", "vscq2", "vqa"):
        manifest = load_manifest(out, stage)
        assert manifest.read == manifest.kept == cfg.train_videos + cfg.eval_videos and manifest.rejected == 0
    vscq2 = load_manifest(out, "vscq2")
    assert vscq2.rows_per_split == {"eval_kept": cfg.eval_videos * cfg.questions_per_video,
                                    "train_kept": cfg.train_videos * cfg.questions_per_video}
    assert vscq2.provenance["video_sampling"]["max_frames"] == cfg.frames
    assert Path(load_manifest(out, "captions").provenance["video_root"]) == (out / "videos").resolve()
    rows = list(read_rows(out, vscq2.files, VSCQ2Question))
    assert all(r.correct and r.teacher_answer == r.answer and r.target_tokens for r in rows)
    answers = list(read_rows(out, load_manifest(out, "vqa").files, VQAAnswer))
    assert len(answers) == cfg.train_videos + cfg.eval_videos and all(a.target_tokens for a in answers)
    from qtsplus.training.data import mcq_examples

    examples = list(mcq_examples(out))
    assert len(examples) == cfg.train_videos * cfg.questions_per_video
    assert "Please provide your options" in examples[0].prompt and examples[0].target in OPTION_KEYS
    assert (out / "README.md").read_text().startswith("# qtsplus needle dataset")


def test_chunks_cover_each_split_once() -> None:
    cfg = NeedleConfig(out="x", train_videos=250, eval_videos=130, chunk_size=100)
    chunks = plan_chunks(cfg)
    for split, total in (("train", 250), ("eval", 130)):
        spans = [(c.first, c.count) for c in chunks if c.split == split]
        assert sum(n for _, n in spans) == total and spans[0][0] == 0
    assert [c.chunk for c in chunks] == list(range(len(chunks)))


def test_cli_flow_is_cached_and_rebuilds_a_chunk_whose_video_is_gone(prefect_env, tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = ["build-needle", "--out", str(out), "--preset", "needle-ci", "--no-progress",
            *(f"--set={k}={v}" for k, v in SMALL.items())]
    assert "[3 Completed]" in run_cli(args, prefect_env).stdout
    assert "[3 Cached]" in run_cli(args, prefect_env).stdout
    cfg = NeedleConfig.preset("needle-ci", out=str(out), **SMALL)
    shutil.rmtree(out / "videos" / "train" / video_id(cfg, "train", 5))  # in chunk 1 (train videos 4..5)
    assert "[2 Cached, 1 Recomputed]" in run_cli(args, prefect_env).stdout
    assert (out / "videos" / "train" / video_id(cfg, "train", 5) / "frame_0015.png").is_file()


def test_taught_vision_tower_tells_colour_and_shape_and_nothing_else_changes(dataset, tmp_path: Path) -> None:
    """qtsplus.needle.vision: the tower learns per-token colour and shape on training scenes, only the tower
    changes, and the result is a plain Qwen2.5-VL folder (what train-selector's `base_model` and the feature cache
    load)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qtsplus.needle.vision import RECORD, VisionTeaching, teach_vision
    from qtsplus.tiny import tiny_model_path

    cfg, _ = dataset
    cfg = cfg.model_copy(update={"train_videos": 40})
    host = teach_vision(cfg, VisionTeaching(steps=60, videos=40), tmp_path / "host", progress=False)
    record = json.loads((host / RECORD).read_text())
    assert record["last_batch_accuracy_on_object_tokens"]["colour"] > 0.9
    assert record["last_batch_accuracy_on_object_tokens"]["shape"] > 0.9
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_path("qwen2.5-vl-needle"))
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(host)
    b, a = before.state_dict(), after.state_dict()
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    assert changed and all(".visual." in f".{k}" for k in changed)


def test_every_colour_and_shape_is_one_token_of_the_tiny_tokenizer() -> None:
    """As in Qwen's tokenizer. Split into pieces, a colour shares them with the prompt's instruction (" or" of
    orange, " p" of pink) and a selector scoring with token embeddings points every question at those objects
    (docs/needle.md, "How the host learns")."""
    from qtsplus.prompts import mcq_user_prompt
    from qtsplus.tiny import build_tokenizer

    tok = build_tokenizer("")
    split = {w: tok.tokenize(f" {w}") for w in (*PALETTE, *SHAPES) if len(tok.tokenize(f" {w}")) != 1}
    assert not split, split
    prompt = tok.tokenize(mcq_user_prompt("What shape is the cyan object?", dict(zip(OPTION_KEYS, SHAPES, strict=True))))
    colours = [t for t in prompt if tok.convert_tokens_to_string([t]).strip() in PALETTE]
    assert colours == [tok.tokenize(" cyan")[0]]  # the named colour, and nothing else that reads as a colour
