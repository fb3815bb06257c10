"""Stage functions run directly (no Prefect) on the tiny models: validation, balanced keys, accounting."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qtsplus.engines import EngineConfig, GenerationParams
from qtsplus.shards import read_rows, write_chunk_shards
from qtsplus.stages.teacher import TeacherConfig, run_vqa_chunk, run_vscq2_chunk
from qtsplus.stages.vscq1 import (
    Vscq1Config,
    balanced_keys,
    question_problem,
    run_vscq1_chunk,
    shuffle_options,
)
from qtsplus.video import SamplingConfig
from schemas import OPTION_KEYS, Caption, GeneratedQuestion, Reject, VQAAnswer, VSCQ1Question, VSCQ2Question
from tests.conftest import EXAMPLES


def _question(**kw) -> GeneratedQuestion:
    base = dict(question_type="count_quantity", question="How many bikes?", options={"A": "one", "B": "two", "C": "three",
                "D": "four"}, answer="C", difficulty="easy", rationale="r", evidence="e")
    return GeneratedQuestion.model_validate(base | kw)


@pytest.mark.parametrize("m", [0, 1, 3, 4, 7, 101])
def test_balanced_keys(m: int) -> None:
    keys = balanced_keys(m, random.Random(m))
    counts = Counter(keys)
    assert len(keys) == m
    assert max(counts.values(), default=0) - min((counts[k] for k in OPTION_KEYS), default=0) <= 1


def test_shuffle_moves_the_correct_text_to_the_target() -> None:
    q = _question()
    for target in OPTION_KEYS:
        options, key = shuffle_options(q, target, random.Random(0))
        assert key == target and options[target] == "three"
        assert sorted(options.values()) == sorted(["one", "two", "three", "four"])


def test_question_problems() -> None:
    assert question_problem(_question()) is None
    assert question_problem(_question(options={"A": "x", "B": "X ", "C": "y", "D": "z"}))[0] == "duplicate_options"
    assert question_problem(_question(options={"A": " ", "B": "a", "C": "y", "D": "z"}))[0] == "empty_option"
    assert question_problem(_question(question="  "))[0] == "empty_question"


def _captions(out: Path) -> list:
    captions = [
        Caption(video_id=f"v{i}", video=v, caption=f"A short clip number {i} with people and objects.",
                partition="eval" if i == 0 else "train", source_row=i)
        for i, v in enumerate(["bikes.mp4", "carphone.mp4", "carphone_frames", "bigbuckbunny.mp4", "bikes.mp4"])
    ]
    return write_chunk_shards(out, "captions", 0, {
        "train": (Caption, [c for c in captions if c.partition == "train"]),
        "eval": (Caption, [c for c in captions if c.partition == "eval"]),
    })


def test_three_stages_on_tiny_models(tmp_path: Path) -> None:
    files = _captions(tmp_path)
    cfg = Vscq1Config(engine=EngineConfig(model_id="tiny/qwen3"), n_questions=3, max_field_chars=16,
                      generation=GenerationParams(temperature=1.0, seed=3))
    r1 = run_vscq1_chunk(tmp_path, 0, files, cfg, "fp")
    assert r1.read == 5 and r1.kept + r1.rejected == 5
    questions = list(read_rows(tmp_path, r1.files_for("train", "eval"), VSCQ1Question))
    rejects = list(read_rows(tmp_path, r1.files_for("rejects"), Reject))
    # every generated slot is accounted for: kept questions + question-level rejects + 3 per rejected caption
    assert len(questions) + sum(r.level == "question" for r in rejects) + 3 * r1.rejected == 15
    assert len(questions) > 0
    keys = Counter(q.answer for q in questions)
    assert max(keys.values()) - min(keys.get(k, 0) for k in OPTION_KEYS) <= 1
    assert r1.stats["questions"] == len(questions)
    for q in questions:
        assert len({o.casefold() for o in q.options.model_dump().values()}) == 4
        assert q.question_id.startswith(q.video_id + "-q")
    # deterministic: the same chunk again gives the same rows
    (tmp_path / "again").mkdir()
    again = run_vscq1_chunk(tmp_path / "again", 0, [f.model_copy(update={"path": "../" + f.path}) for f in files], cfg, "fp")
    assert [f.sha256 for f in again.files] == [f.sha256 for f in r1.files]

    teacher = TeacherConfig(engine=EngineConfig(model_id="tiny/qwen2.5-vl"),
                            video=SamplingConfig(min_frames=2, max_frames=4, min_pixels=56 * 56, max_pixels=112 * 112),
                            vqa_generation=GenerationParams(temperature=1.0, max_new_tokens=12))
    r2 = run_vscq2_chunk(tmp_path, 0, r1.files_for("train", "eval"), teacher, EXAMPLES / "videos", "fp2")
    screened = list(read_rows(tmp_path, [f for f in r2.files if f.split != "rejects"], VSCQ2Question))
    assert r2.read == len(questions) == len(screened) and r2.rejected == 0
    for q in screened:
        assert sum(q.teacher_probs.model_dump().values()) == pytest.approx(1.0, abs=1e-6)
        assert q.correct == (q.teacher_answer == q.answer)
        assert q.teacher_answer == max(OPTION_KEYS, key=lambda k: getattr(q.teacher_probs, k))
    kept_files = r2.files_for("train_kept", "eval_kept")
    assert all(pq.read_table(tmp_path / f.path).column("correct").to_pylist() == [True] * f.rows for f in kept_files)

    r3 = run_vqa_chunk(tmp_path, 0, kept_files, teacher, EXAMPLES / "videos", "fp3")
    answers = list(read_rows(tmp_path, r3.files_for("train", "eval"), VQAAnswer))
    assert r3.read == sum(f.rows for f in kept_files) == len(answers) + r3.rejected
    assert all(a.prediction for a in answers)


def test_teacher_rejects_undecodable_videos(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "bad.mp4").write_bytes((EXAMPLES / "videos" / "bikes.mp4").read_bytes()[:5000])
    q = VSCQ1Question(question_id="x-q0", video_id="x", video="bad.mp4", partition="train", question_type="count_quantity",
                      question="How many?", options={"A": "1", "B": "2", "C": "3", "D": "4"}, answer="A",
                      difficulty="easy", rationale="r", evidence="e")
    files = write_chunk_shards(tmp_path, "vscq1", 0, {"train": (VSCQ1Question, [q])})
    r = run_vscq2_chunk(tmp_path, 0, files, TeacherConfig(engine=EngineConfig(model_id="tiny/qwen2.5-vl")), videos, "f")
    assert (r.read, r.kept, r.rejected, r.reasons) == (1, 0, 1, {"video_decode_error": 1})
    assert r.engine == {}  # no video decoded, so the teacher was never loaded
