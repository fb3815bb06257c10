"""Task functions of the tiny QTSplus lmms-eval tasks (tests/test_lmms_eval.py), written as lmms-eval's own video
MCQ tasks write them (cf. lmms_eval/tasks/videomme/utils.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

# the videos shipped with the repository; QTSPLUS_LMMS_VIDEO_ROOT points the task at another copy
VIDEO_ROOT = Path(os.environ.get("QTSPLUS_LMMS_VIDEO_ROOT", Path(__file__).resolve().parents[2] / "examples" / "videos"))
LETTERS = ["A", "B", "C", "D"]
_LETTER = re.compile(r"^\s*\(?([A-D])(?:[).:\s]|$)")


def doc_to_visual(doc: dict) -> list[str]:
    path = VIDEO_ROOT / doc["video"]
    if not path.exists():
        raise FileNotFoundError(f"video {path} does not exist")
    return [str(path)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    options = "\n".join(doc["options"])
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}\n{options}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc: dict) -> list[str]:
    return LETTERS[: len(doc["options"])]


def doc_to_target_index(doc: dict) -> int:
    return LETTERS.index(doc["answer"])


def extract_letter(response: str) -> str | None:
    """The option letter a response starts with ("B", "B.", "(B)", "B) ..."), or None."""
    match = _LETTER.match(response)
    return match.group(1) if match else None


def process_results(doc: dict, results: list[str]) -> dict:
    response = results[0]
    pred = extract_letter(response)
    return {
        "mcq_accuracy": {"id": doc["id"], "pred": pred, "answer": doc["answer"], "correct": pred == doc["answer"]},
        "response_chars": len(response),
    }


def process_results_loglikelihood(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """results: one (log-probability, is_greedy) pair per choice, in doc_to_choice order."""
    lls = [ll for ll, _ in results]
    pred = doc_to_choice(doc)[max(range(len(lls)), key=lls.__getitem__)]
    return {"choice_accuracy": {"id": doc["id"], "pred": pred, "answer": doc["answer"], "correct": pred == doc["answer"]}}


def aggregate_accuracy(results: list[dict]) -> float:
    """Percentage of questions answered with the right letter (lmms-eval's video tasks report percentages)."""
    return 100.0 * sum(r["correct"] for r in results) / len(results)
