"""lmms-eval end to end on a tiny local task (tests/lmms_tasks) with a tiny QTSplus checkpoint.

Runs lmms-eval's own evaluator (and once its CLI) through the ``qtsplus`` model adapter with the selector on and off,
and checks each reported metric against a recomputation from the logged samples.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lmms_tasks"
SAMPLING = "max_frames=4,max_pixels=50176"  # 4 frames of at most 64 patches: small enough for CPU
LETTERS = ["A", "B", "C", "D"]

needs_lmms_eval = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed: pip install -e '.[lmms-eval]' (or the lean install in docs/lmms_eval.md)",
)


def _task_utils():
    spec = importlib.util.spec_from_file_location("qtsplus_tiny_lmms_task_utils", TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs() -> list[dict]:
    lines = (TASKS / "qtsplus_tiny_mcq.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny QTSplus checkpoint (random selector, n_max 64 < the 72 video tokens: selection prunes)."""
    from transformers import AutoTokenizer

    from qtsplus.host.model import QTSplusForConditionalGeneration, register_auto_classes
    from qtsplus.tiny import tiny_model_path

    register_auto_classes()
    base = tiny_model_path("qwen2.5-vl")
    out = tmp_path_factory.mktemp("qtsplus-ckpt")
    torch.manual_seed(0)
    model = QTSplusForConditionalGeneration.from_pretrained(
        base, selector_config={"n_max": 64, "rho_min": 0.2, "rho_max": 0.8}
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lmms_env(tmp_path_factory: pytest.TempPathFactory):
    """lmms-eval's datasets cache in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("lmms-datasets")))
        mp.setenv("QTSPLUS_NO_PROGRESS", "1")
        yield


def _evaluate(model_args: str, tasks: list[str]) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    import qtsplus.evaluation.lmms_eval_adapter  # noqa: F401  (registers the model "qtsplus")

    results = simple_evaluate(
        model="qtsplus",
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        batch_size=2,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert results is not None
    return results


@pytest.fixture(scope="module")
def selection_on(checkpoint: Path, lmms_env) -> dict:
    return _evaluate(f"pretrained={checkpoint},{SAMPLING}", ["qtsplus_tiny_mcq_gen", "qtsplus_tiny_mcq_ll"])


@pytest.fixture(scope="module")
def selection_off(checkpoint: Path, lmms_env) -> dict:
    return _evaluate(
        f"pretrained={checkpoint},{SAMPLING},selection=false,loglikelihood_output=nll",
        ["qtsplus_tiny_mcq_gen", "qtsplus_tiny_mcq_ppl"],
    )


def _by_doc(results: dict, task: str) -> list[dict]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(_docs()))), f"{task}: not every doc was answered"
    return samples


def _choice_scores(results: dict, task: str) -> list[list[float]]:
    """Per doc, the adapter's value for each choice (4 loglikelihood requests per doc)."""
    scores = []
    for sample in _by_doc(results, task):
        assert len(sample["filtered_resps"]) == len(LETTERS)
        row = []
        for value, greedy in sample["filtered_resps"]:
            assert isinstance(value, float) and math.isfinite(value) and isinstance(greedy, bool)
            row.append(value)
        scores.append(row)
    return scores


def _check_generation(results: dict) -> None:
    """Every doc got a string response, cut at the task's stop strings; the metrics are those of the samples."""
    utils = _task_utils()
    docs = _docs()
    samples = _by_doc(results, "qtsplus_tiny_mcq_gen")
    responses = []
    for sample in samples:
        (response,) = sample["filtered_resps"]
        assert isinstance(response, str)
        assert "\n\n" not in response and "<|im_end|>" not in response
        responses.append(response.strip())  # lmms-eval strips generate_until responses before process_results
    assert all(responses), "the tiny model should answer something for every doc"
    correct = [utils.extract_letter(r) == d["answer"] for r, d in zip(responses, docs, strict=True)]
    metrics = results["results"]["qtsplus_tiny_mcq_gen"]
    assert metrics["mcq_accuracy,none"] == pytest.approx(100.0 * sum(correct) / len(docs))
    assert metrics["response_chars,none"] == pytest.approx(sum(map(len, responses)) / len(docs))


@needs_lmms_eval
def test_selection_on_generate_and_loglikelihood(selection_on: dict, checkpoint: Path) -> None:
    assert set(selection_on["results"]) == {"qtsplus_tiny_mcq_gen", "qtsplus_tiny_mcq_ll"}
    assert selection_on["config"]["model_backend"].startswith("qtsplus.evaluation.lmms_eval_adapter.QTSplusLMM")
    _check_generation(selection_on)

    docs = _docs()
    lls = _choice_scores(selection_on, "qtsplus_tiny_mcq_ll")
    assert all(ll < 0 for row in lls for ll in row), "log-probabilities of a continuation are negative"
    preds = [LETTERS[max(range(4), key=row.__getitem__)] for row in lls]
    expected = 100.0 * sum(p == d["answer"] for p, d in zip(preds, docs, strict=True)) / len(docs)
    assert selection_on["results"]["qtsplus_tiny_mcq_ll"]["choice_accuracy,none"] == pytest.approx(expected)

    # the log-likelihoods are the model's own: over the four single-token options they give the same distribution
    # as the engine's choose() (one forward pass of its own, with the same video and question, selection on)
    from qtsplus.engines import EngineConfig, Prompt, get_engine
    from qtsplus.video import SamplingConfig, load_video

    utils = _task_utils()
    engine = get_engine(EngineConfig(model_id=str(checkpoint), batch_size=2))  # the adapter's engine (cached)
    sampling = SamplingConfig(max_frames=4, max_pixels=50176)  # what SAMPLING asks the adapter for
    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}
    prompts = [
        Prompt(user=utils.doc_to_text(d, kwargs), video=load_video(utils.doc_to_visual(d)[0], sampling)) for d in docs
    ]
    assert engine.model.selection is True
    for row, choice in zip(lls, engine.choose(prompts, LETTERS), strict=True):
        probs = torch.tensor(row).softmax(-1).tolist()
        assert probs == pytest.approx([choice.probs[x] for x in LETTERS], abs=1e-4)


@needs_lmms_eval
def test_selection_off_and_builtin_multiple_choice_scoring(selection_off: dict, selection_on: dict) -> None:
    assert set(selection_off["results"]) == {"qtsplus_tiny_mcq_gen", "qtsplus_tiny_mcq_ppl"}
    _check_generation(selection_off)

    # loglikelihood_output=nll: lmms-eval's built-in multiple_choice metric picks the lowest value = the most likely
    docs = _docs()
    nll = _choice_scores(selection_off, "qtsplus_tiny_mcq_ppl")
    assert all(v > 0 for row in nll for v in row)
    preds = [max(range(4), key=lambda i, row=row: -row[i]) for row in nll]
    expected = sum(LETTERS[p] == d["answer"] for p, d in zip(preds, docs, strict=True)) / len(docs)
    assert selection_off["results"]["qtsplus_tiny_mcq_ppl"]["acc,none"] == pytest.approx(expected)

    # selection matters: the same questions score differently with every video token kept
    on = _choice_scores(selection_on, "qtsplus_tiny_mcq_ll")
    off = [[-v for v in row] for row in nll]
    assert not torch.allclose(torch.tensor(on), torch.tensor(off), atol=1e-3)


@needs_lmms_eval
def test_selection_off_equals_the_teacher(selection_off: dict, lmms_env) -> None:
    """selection=false through a QTSplus checkpoint scores exactly as its base Qwen2.5-VL (the teacher)."""
    teacher = _evaluate(f"pretrained=tiny/qwen2.5-vl,{SAMPLING},loglikelihood_output=nll", ["qtsplus_tiny_mcq_ppl"])
    assert torch.allclose(
        torch.tensor(_choice_scores(teacher, "qtsplus_tiny_mcq_ppl")),
        torch.tensor(_choice_scores(selection_off, "qtsplus_tiny_mcq_ppl")),
        atol=1e-4,
    )


@needs_lmms_eval
def test_cli(checkpoint: Path, tmp_path: Path) -> None:
    """The documented command: lmms-eval's CLI with the model registered by the adapter module."""
    env = os.environ | {"LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets"), "QTSPLUS_NO_PROGRESS": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qtsplus.evaluation.lmms_eval_adapter", "--model", "qtsplus",
           "--model_args", f"pretrained={checkpoint},{SAMPLING}", "--tasks", "qtsplus_tiny_mcq_gen",
           "--include_path", str(TASKS), "--batch_size", "2", "--limit", "2", "--output_path", str(out),
           "--log_samples"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    (samples_file,) = out.rglob("*_samples_qtsplus_tiny_mcq_gen.jsonl")
    results = json.loads(results_file.read_text())["results"]["qtsplus_tiny_mcq_gen"]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1]
    # the samples file keeps a single filtered response as a bare string
    responses = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0] for s in samples]
    lengths = [len(r.strip()) for r in responses]
    assert results["response_chars,none"] == pytest.approx(sum(lengths) / len(lengths))


def _request(kind: str, *args):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})


@needs_lmms_eval
def test_generation_kwargs_until_and_multi_round(checkpoint: Path) -> None:
    """The adapter's own contract, called directly: gen_kwargs mapping, `until`, `max_new_tokens`, multi-round."""
    from qtsplus.engines import GenerationParams
    from qtsplus.evaluation.lmms_eval_adapter import QTSplusLMM

    lm = QTSplusLMM(pretrained=str(checkpoint), max_frames=4, max_pixels=50176, batch_size="2", max_new_tokens=12)
    assert lm._generation({}, 0) == (GenerationParams(max_new_tokens=12), [])
    assert lm._generation({"until": "\n\n", "max_new_tokens": 5, "temperature": 0.7, "do_sample": False}, 0) == (
        GenerationParams(max_new_tokens=5), ["\n\n"])
    assert lm._generation({"do_sample": True, "top_p": None}, 0)[0].temperature == 1.0
    assert lm._generation({"temperature": 0.5, "top_p": 0.9, "top_k": 5}, 0)[0] == GenerationParams(
        temperature=0.5, top_p=0.9, top_k=5, max_new_tokens=12)

    utils = _task_utils()
    doc = _docs()[1]
    lm.task_dict = {"t": {"test": [doc]}}
    ctx = utils.doc_to_text(doc)

    def generate(**gen_kwargs) -> str:
        (text,) = lm.generate_until([_request("generate_until", ctx, gen_kwargs, utils.doc_to_visual, 0, "t", "test")])
        return text

    full = generate(max_new_tokens=8)
    assert len(full) >= 5, full
    stop = full[3:5]
    assert generate(max_new_tokens=8, until=[stop]) == full[: full.index(stop)]
    assert full.startswith(generate(max_new_tokens=2)) and len(generate(max_new_tokens=2)) < len(full)

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        assert len(previous_output) == round_idx and previous_round_info == (round_idx - 1 or None)
        return [utils.doc_to_visual(doc)[0]], f"Round {round_idx}: why?", round_idx == 3, previous_output, round_idx

    (rounds,) = lm.generate_until_multi_round(
        [_request("generate_until_multi_round", ctx, {"max_new_tokens": 4, "until": ["x"]}, utils.doc_to_visual,
                  doc_to_text, 0, "t", "test")]
    )
    assert len(rounds) == 3 and all(isinstance(r, str) for r in rounds)

    with pytest.raises(ValueError, match="selection=true needs a QTSplus checkpoint"):
        QTSplusLMM(pretrained="tiny/qwen2.5-vl", selection=True)
    with pytest.raises(TypeError, match="unknown model_args for qtsplus: frames"):
        QTSplusLMM(pretrained=str(checkpoint), frames=4)


def test_missing_lmms_eval_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without lmms-eval the adapter does not import, and says how to install it."""
    from qtsplus.engines import MissingExtraError

    for name in [n for n in sys.modules if n == "lmms_eval" or n.startswith("lmms_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    monkeypatch.delitem(sys.modules, "qtsplus.evaluation.lmms_eval_adapter", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[lmms-eval\]'"):
        importlib.import_module("qtsplus.evaluation.lmms_eval_adapter")
