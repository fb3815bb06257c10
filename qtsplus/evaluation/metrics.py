"""Evaluation metrics, as pure functions of the prediction records (so metrics.json can always be recomputed).

- MCQ accuracy: the option whose letter has the highest logit at the last position (the paper's protocol), against
  the teacher-validated key; overall, per question type, per difficulty.
- VQA: ROUGE-L F1 of the answer against the teacher's, on lower-cased whitespace tokens (LCS-based, Lin 2004).
- Tokens: visual tokens in (M), allowed (budget) and kept, LM sequence length; TokDense = accuracy / mean kept.
- Latency per sample (mean, p50, p90) and QTSplus's rho and n distributions.
- Needle recall, where questions carry `target_tokens`: the mean share of the target's tokens that reached the LM.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable

from schemas import EvalPrediction


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) on lower-cased whitespace tokens."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(predictions: Iterable[EvalPrediction]) -> dict[str, dict]:
    """metrics.json: one entry per method."""
    by_method: dict[str, list[EvalPrediction]] = defaultdict(list)
    for p in predictions:
        by_method[p.method].append(p)
    out = {}
    for method, rows in sorted(by_method.items()):
        mcq = [r for r in rows if r.task == "mcq"]
        vqa = [r for r in rows if r.task == "vqa"]
        m: dict = {"mcq_samples": len(mcq), "vqa_samples": len(vqa)}
        if mcq:
            acc = sum(bool(r.correct) for r in mcq) / len(mcq)
            kept = statistics.fmean(r.video_tokens_kept for r in mcq)
            m.update(
                accuracy=acc,
                accuracy_by_type=_grouped(mcq, lambda r: r.question_type),
                accuracy_by_difficulty=_grouped(mcq, lambda r: r.difficulty),
                video_tokens_in=statistics.fmean(r.video_tokens_in for r in mcq),
                video_tokens_kept=kept,
                kept_fraction=statistics.fmean(r.video_tokens_kept / r.video_tokens_in for r in mcq),
                lm_tokens=statistics.fmean(r.lm_tokens for r in mcq),
                tokdense=acc / kept if kept else 0.0,
                latency_mean_s=statistics.fmean(r.latency_s for r in mcq),
                latency_p50_s=_quantile([r.latency_s for r in mcq], 0.5),
                latency_p90_s=_quantile([r.latency_s for r in mcq], 0.9),
            )
            recalls = [r.target_recall for r in mcq if r.target_recall is not None]
            if recalls:  # questions whose target tokens are known (the needle task)
                m["target_recall"] = statistics.fmean(recalls)
            rhos = [r.rho for r in mcq if r.rho is not None]
            if rhos:
                m["rho"] = {"mean": statistics.fmean(rhos), "min": min(rhos), "max": max(rhos)}
                kept_counts = [r.video_tokens_kept for r in mcq]
                m["n"] = {"mean": statistics.fmean(kept_counts), "min": min(kept_counts), "max": max(kept_counts)}
        if vqa:
            m.update(
                rouge_l=statistics.fmean(r.rouge_l or 0.0 for r in vqa),
                vqa_latency_mean_s=statistics.fmean(r.latency_s for r in vqa),
            )
        out[method] = m
    return out


def _grouped(rows: list[EvalPrediction], key) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(bool(r.correct))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}
