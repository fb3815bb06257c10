"""The retrain inbox: files appended once, in arrival order, every row traceable to its inbox file; ids repeated
across files are rejected at ingest naming both files; a BOM at the start of a dropped file costs no row."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path

from qtsplus.inbox import LEGACY_LEDGER, Inbox
from qtsplus.ingest import IngestConfig, ingest_chunk, read_sources, scan_input
from qtsplus.shards import read_rows
from schemas import Caption, Reject
from tests.conftest import EXAMPLES

VIDEOS = EXAMPLES / "videos"


def drop(inbox: Path, name: str, ids: list[str], *, at: int, bom: bool = False) -> Path:
    """A caption file in the inbox with one plain row per id, arriving at time `at` (its mtime)."""
    rows = [json.dumps({"video_id": i, "video": "bikes.mp4", "caption": f"Bicycles pass by, take {i}."}) for i in ids]
    path = inbox / name
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + "\n".join(rows).encode() + b"\n")
    os.utime(path, (at, at))
    return path


def ingest_combined(inbox: Inbox, out: Path, chunk_size: int = 2) -> tuple[list[Caption], list[Reject], list]:
    specs = scan_input(inbox.combined, chunk_size)
    results = [ingest_chunk(inbox.combined, s, IngestConfig(), VIDEOS, out) for s in specs]
    assert all(r.kept + r.rejected == r.read for r in results)
    assert sum(r.read for r in results) == sum(f.rows for f in inbox.ledger())  # every row of every file read
    captions = [c for r in results for c in read_rows(out, r.files_for("train", "eval"), Caption)]
    rejects = [c for r in results for c in read_rows(out, r.files_for("rejects"), Reject)]
    return sorted(captions, key=lambda c: c.source_row), rejects, specs


def test_duplicate_ids_across_inbox_files_keep_the_first_and_name_both_files(tmp_path: Path) -> None:
    folder, work = tmp_path / "inbox", tmp_path / "work"
    folder.mkdir()
    drop(folder, "drop-001.jsonl", ["a", "b", "c"], at=1_000)
    drop(folder, "drop-002.jsonl", ["d", "b", "e"], at=2_000, bom=True)  # saved with a BOM; "b" again
    inbox = Inbox(folder, work)
    assert [f.name for f in inbox.take(inbox.pending())] == ["drop-001.jsonl", "drop-002.jsonl"]
    assert inbox.pending() == []
    assert [(r.name, r.start, r.end) for r in read_sources(inbox.combined)] == [
        (f.name, f.start, f.end) for f in inbox.ledger()]

    captions, rejects, before = ingest_combined(inbox, tmp_path / "out1")
    assert [c.video_id for c in captions] == ["a", "b", "c", "d", "e"]  # "d": the first row after the BOM is kept
    assert [(r.record_id, r.reason, r.source_row) for r in rejects] == [("b", "duplicate_id", 4)]
    assert rejects[0].detail == "row 1 of drop-002.jsonl: id 'b' already seen in row 1 (row 1 of drop-001.jsonl)"
    assert inbox.locate(4) == ("drop-002.jsonl", 1) and inbox.locate(3) == ("drop-002.jsonl", 0)

    # a later round: the new file's duplicate names the earlier file; complete earlier chunks are unchanged
    drop(folder, "drop-003.jsonl", ["e", "f"], at=3_000)
    assert [f.name for f in inbox.take(inbox.pending())] == ["drop-003.jsonl"]
    captions, rejects, after = ingest_combined(inbox, tmp_path / "out2")
    assert after[:3] == before[:3] and [c.video_id for c in captions][-1] == "f"
    assert [(r.record_id, r.source_row) for r in rejects] == [("b", 4), ("e", 6)]
    assert rejects[1].detail == "row 0 of drop-003.jsonl: id 'e' already seen in row 5 (row 2 of drop-002.jsonl)"
    assert inbox.locate(7) == ("drop-003.jsonl", 1)


def test_every_reject_from_the_inbox_names_its_file(tmp_path: Path) -> None:
    folder, work = tmp_path / "inbox", tmp_path / "work"
    folder.mkdir()
    drop(folder, "good.jsonl", ["a"], at=1_000)
    (folder / "broken.jsonl").write_bytes(b'{"video_id": "x", "video": "bikes.mp4", "caption": \n')
    os.utime(folder / "broken.jsonl", (2_000, 2_000))
    inbox = Inbox(folder, work)
    inbox.take(inbox.pending())
    captions, rejects, _ = ingest_combined(inbox, tmp_path / "out")
    assert [c.video_id for c in captions] == ["a"]
    assert [r.reason for r in rejects] == ["malformed_json"]
    assert rejects[0].detail.startswith("row 0 of broken.jsonl: ")


def test_a_ledger_under_its_former_name_is_read_and_renamed(tmp_path: Path) -> None:
    folder, work = tmp_path / "inbox", tmp_path / "work"
    folder.mkdir()
    work.mkdir()
    first = drop(folder, "drop-001.jsonl", ["a", "b"], at=1_000)
    data = first.read_bytes()
    (work / "captions.jsonl").write_bytes(data)  # what an earlier version of the inbox left behind
    legacy = [{"name": first.name, "sha256": hashlib.sha256(data).hexdigest(), "rows": 2, "start": 0,
               "end": len(data)}]
    (work / LEGACY_LEDGER).write_text(json.dumps(legacy))
    inbox = Inbox(folder, work)
    assert [f.name for f in inbox.ledger()] == ["drop-001.jsonl"] and inbox.pending() == []

    drop(folder, "drop-002.jsonl", ["a"], at=2_000)
    inbox.take(inbox.pending())
    assert not (work / LEGACY_LEDGER).exists() and inbox.ledger_path.is_file()
    assert [f.name for f in inbox.ledger()] == ["drop-001.jsonl", "drop-002.jsonl"]
    _, rejects, _ = ingest_combined(inbox, tmp_path / "out")
    assert [(r.record_id, r.reason) for r in rejects] == [("a", "duplicate_id")]
    assert "drop-001.jsonl" in rejects[0].detail and "drop-002.jsonl" in rejects[0].detail
