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


def counts_table(manifests: list[StageManifest]) -> list[dict[str, object]]:
    """One row per (stage, outcome): rows written per split and rejects per reason."""
    rows: list[dict[str, object]] = []
    for m in manifests:
        rows.append({"stage": m.stage, "what": "read (input rows)", "count": m.read})
        rows.append({"stage": m.stage, "what": "kept (input rows with output)", "count": m.kept})
        rows.append({"stage": m.stage, "what": "rejected (input rows)", "count": m.rejected})
        rows.append({"stage": m.stage, "what": "keep rate (%)", "count": round(100 * m.kept / m.read, 1) if m.read else 0})
        if m.stage == "vscq2":
            correct, total = m.stats.get("correct", 0), m.stats.get("correct", 0) + m.stats.get("wrong", 0)
            rows.append({"stage": m.stage, "what": "teacher correct (%)",
                         "count": round(100 * correct / total, 1) if total else 0})
        for split, n in m.rows_per_split.items():
            rows.append({"stage": m.stage, "what": f"split {split}", "count": n})
        for reason, n in m.reasons.items():
            rows.append({"stage": m.stage, "what": f"reject: {reason}", "count": n})
    return rows


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


def sample_questions(root: Path, manifest: StageManifest, n: int = 5) -> list[dict[str, object]]:
    """The first `n` questions of a question stage, for the card and the UI."""
    rows: list[dict[str, object]] = []
    for f in manifest.files:
        if f.split == "rejects" or len(rows) >= n:
            continue
        for rec in pq.read_table(root / f.path).slice(0, n - len(rows)).to_pylist():
            options = " / ".join(f"{k}. {rec['options'][k]}" for k in OPTION_KEYS)
            rows.append({"question_id": rec["question_id"], "type": rec["question_type"], "question": rec["question"],
                         "options": options, "answer": rec["answer"]})
    return rows


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
    parts.append("\n## Counts per stage and filter\n\n")
    parts.append(_markdown_table(counts_table(manifests)))
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
