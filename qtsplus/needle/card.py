"""The needle dataset's card (`<out>/README.md`): what the task is, its geometry, and the usual counts per stage."""

from __future__ import annotations

from pathlib import Path

from qtsplus.dataset_card import counts_table, key_distribution, sample_questions
from qtsplus.needle.config import CELL, NeedleConfig
from qtsplus.shards import StageManifest


def markdown_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_needle_card(root: Path, cfg: NeedleConfig, manifests: list[StageManifest]) -> str:
    by_stage = {m.stage: m for m in manifests}
    vscq1 = by_stage["vscq1"]
    kinds = {k.removeprefix("kind_"): v for k, v in sorted(vscq1.stats.items()) if k.startswith("kind_")}
    keys = key_distribution(vscq1)
    parts = [
        "# qtsplus needle dataset\n\n",
        "Built by `qtsplus build-needle` (qtsplus.needle, docs/needle.md): procedurally made videos whose answers are "
        "known by construction. Each video is a drifting grey texture with objects of distinct colours, shapes from a "
        "small set, a place (quadrant) and a time (one or two LM time steps); each question names an object by its "
        "colour and asks for its shape, place or time, or which of four named objects appears first. Every record carries "
        "`target_tokens`: the visual-token indices that hold the object(s) it asks about.\n\n",
        f"Geometry: {cfg.width}x{cfg.height} px frames = {cfg.grid_rows}x{cfg.grid_cols} cells of {CELL} px, "
        f"{cfg.frames} frames at {cfg.fps:g} fps = {cfg.steps} time steps, so M = {cfg.tokens} visual tokens per video "
        f"(one per cell and time step); {cfg.objects} objects per video; seed {cfg.seed}.\n\n",
        f"Questions: {vscq1.rows_per_split}; kinds {kinds}; answer keys "
        + ", ".join(f"{k} {v:.1%}" for k, v in keys.items()) + ".\n\n",
        "Read with `qtsplus train-selector --data DIR` and `qtsplus evaluate --data DIR` like any built dataset "
        "(the ground truth stands in for the teacher: VSCQ2 keeps every question).\n",
        "\n## Counts per stage\n\n", markdown_table(counts_table(manifests)),
        "\n## Sample questions\n\n", markdown_table(sample_questions(root, vscq1, n=8)),
    ]
    return "".join(parts)
