"""The dataset card (`<out>/README.md`) and the tables it shares with the Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from qtsplus.shards import StageManifest
from schemas import OPTION_KEYS

STAGE_TITLES = {
    "captions": "Captions (ingest)",
    "vscq1": "QTS-VSCQ1: generated single-choice questions",
    "vscq2": "QTS-VSCQ2: teacher-screened questions",
    "vqa": "QTS-VQA: teacher free-form answers",
}


# what each column of `counts_table` means (the artifact's description and the card say it)
COUNT_COLUMNS = {
    "read": "input rows the stage read",
    "rejected": "input rows rejected with a reason (bad input or unusable model output; see the reasons table)",
    "accepted %": "share of the input rows not rejected",
    "passed on": "rows written to the splits the next stage (or training) reads",
    "teacher correct %": "VSCQ2 only: questions the teacher answered correctly, which are the ones kept",
}
# the splits a stage's `passed on` counts: what the next stage (or training) reads
PASSED_ON = {"vscq2": ("train_kept", "eval_kept")}
SPLIT_ORDER = ("train", "eval", "train_kept", "eval_kept", "train_screened_out", "eval_screened_out", "rejects")


def counts_table(manifests: list[StageManifest]) -> list[dict[str, object]]:
    """One row per stage: read, rejected, accepted %, passed on, teacher correct %, then rows per split (one column
    each; empty where the stage has no such split). Column meanings: `COUNT_COLUMNS`."""
    splits = [s for s in SPLIT_ORDER if any(s in m.rows_per_split for m in manifests)]
    splits += sorted({s for m in manifests for s in m.rows_per_split} - set(splits))
    rows: list[dict[str, object]] = []
    for m in manifests:
        passed = sum(n for split, n in m.rows_per_split.items() if split in PASSED_ON.get(m.stage, ("train", "eval")))
        correct, wrong = m.stats.get("correct", 0), m.stats.get("wrong", 0)
        row: dict[str, object] = {
            "stage": m.stage, "read": m.read, "rejected": m.rejected,
            "accepted %": _percent(m.read - m.rejected, m.read), "passed on": passed,
            "teacher correct %": _percent(correct, correct + wrong) if m.stage == "vscq2" else "",
        }
        row |= {f"split {s}": m.rows_per_split.get(s, "") for s in splits}
        rows.append(row)
    return rows


def reasons_table(manifests: list[StageManifest]) -> list[dict[str, object]]:
    """One row per (stage, reject reason) with the rejected input rows."""
    return [{"stage": m.stage, "reason": reason, "rejected rows": n}
            for m in manifests for reason, n in sorted(m.reasons.items())]


def _percent(part: int, whole: int) -> float | str:
    return round(100 * part / whole, 1) if whole else ""


def _markdown_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def key_distribution(manifest: StageManifest) -> dict[str, float]:
    """Share of each answer key among the stage's questions (VSCQ1 stats)."""
    counts = {k: manifest.stats.get(f"key_{k}", 0) for k in OPTION_KEYS}
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def sample_questions(root: Path, manifest: StageManifest, n: int = 5, width: int = 60) -> list[dict[str, object]]:
    """The first `n` questions of a question stage, for the card and the UI: the answer first, then the question and
    one column per option, each cut to `width` characters so the table fits a page."""
    rows: list[dict[str, object]] = []
    for f in manifest.files:
        if f.split == "rejects" or len(rows) >= n:
            continue
        for rec in pq.read_table(root / f.path).slice(0, n - len(rows)).to_pylist():
            rows.append({"answer": rec["answer"], "type": rec["question_type"],
                         "question": _cut(rec["question"], width)}
                        | {k: _cut(rec["options"][k], width // 2) for k in OPTION_KEYS}
                        | {"question_id": rec["question_id"]})
    return rows


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _provenance_summary(provenance: dict) -> dict:
    """The provenance lines a reader scans for (the model as id/backend/revision; the full record is in the manifest)."""
    short = {k: v for k, v in provenance.items() if k not in ("parameters", "engine", "ingest", "video_sampling")}
    engine = provenance.get("engine")
    if isinstance(engine, dict):
        short = {"model": f"{engine['model_id']} ({engine['backend']}, revision {engine.get('revision') or 'default'})"} | short
    return short


def render_card(root: Path, manifests: list[StageManifest], title: str = "qtsplus distillation dataset") -> str:
    """Markdown dataset card: what each stage holds, counts per filter, provenance and how to load it."""
    parts = [f"# {title}\n\n", "Built by `qtsplus build-dataset`. Every input row is accounted for at every stage: "
             "kept + rejected = read; rejects carry a reason in the `rejects` split of each stage.\n"]
    parts.append("\n## Counts per stage\n\n")
    parts.append(_markdown_table(counts_table(manifests)))
    parts.append("\n" + "\n".join(f"- **{k}**: {v}" for k, v in COUNT_COLUMNS.items()) + "\n")
    reasons = reasons_table(manifests)
    if reasons:
        parts.append("\nRejected rows per reason:\n\n" + _markdown_table(reasons))
    for m in manifests:
        parts.append(f"\n## {STAGE_TITLES.get(m.stage, m.stage)} (`{m.stage}/`)\n\n")
        parts.append(f"Record `{m.record}`, schema version {m.schema_version}, {len(m.files)} files.\n")
        if m.stage == "vscq1":
            dist = key_distribution(m)
            parts.append("Answer-key distribution after shuffling: "
                         + ", ".join(f"{k} {v:.1%}" for k, v in dist.items()) + "\n")
            types = {k.removeprefix("type_"): v for k, v in m.stats.items() if k.startswith("type_")}
            if types:
                parts.append("\nQuestion types: " + ", ".join(f"{k} {v}" for k, v in sorted(types.items())) + "\n")
            parts.append("\nSample questions:\n\n" + _markdown_table(sample_questions(root, m)))
        prov = ", ".join(f"{k}: `{v}`" for k, v in _provenance_summary(m.provenance).items())
        parts.append(f"\nProvenance: {prov}\n")
        splits = sorted({f.split for f in m.files})
        if splits:
            files = ", ".join(f'"{s}": "{root}/{m.stage}/{s}-*.parquet"' for s in splits)
            parts.append(f"\n```python\ndatasets.load_dataset(\"parquet\", data_files={{{files}}})\n```\n")
    return "".join(parts)
