"""A watched folder of caption files, appended in arrival order to one growing caption file.

Each caption file that appears in the inbox (`*.jsonl`) is appended, once, to `<work>/captions.jsonl`, in order of
arrival (modification time, then name), byte for byte (plus a newline if it lacks a final one; a UTF-8 byte-order
mark at its start is kept: ingest accepts one at the start of any line). A ledger records every file taken with its
sha256, its byte range in the combined file and its row count, so a crash between the append and the ledger write is
repaired on the next run (the combined file is cut back to the last recorded length). Because the combined file only
grows at its end, build-dataset recomputes only the chunks that the new rows fall into.

The ledger is the combined file's sources sidecar (`<work>/captions.jsonl.sources.json`, see `qtsplus.ingest`), so
every row stays traceable to its inbox file: ingest names the file (and the row in it) in every reject's detail, a
repeated id is rejected as `duplicate_id` naming the file that had it first, and `Inbox.locate` maps a record's
`source_row` back to its file. A ledger under its former name, `<work>/inbox-ledger.json`, is read, and renamed by
the next `take`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel

from qtsplus.atomic import write_text_atomic
from qtsplus.fingerprint import file_sha256
from qtsplus.ingest import count_jsonl_rows, sources_path

LEGACY_LEDGER = "inbox-ledger.json"


class InboxFile(BaseModel):
    name: str
    sha256: str
    rows: int  # rows ingest reads from it (non-blank lines)
    start: int  # combined file length before this file
    end: int  # combined file length after this file


class Inbox:
    def __init__(self, folder: Path | str, work: Path | str):
        self.folder = Path(folder)
        self.work = Path(work)
        self.combined = self.work / "captions.jsonl"
        self.ledger_path = sources_path(self.combined)

    def _ledger_file(self) -> Path:
        legacy = self.work / LEGACY_LEDGER
        return legacy if not self.ledger_path.is_file() and legacy.is_file() else self.ledger_path

    def ledger(self) -> list[InboxFile]:
        path = self._ledger_file()
        if not path.is_file():
            return []
        return [InboxFile.model_validate(x) for x in json.loads(path.read_text())]

    def locate(self, source_row: int) -> tuple[str, int]:
        """(inbox file, row in that file) of a row of the combined file (a record's `source_row`)."""
        first = 0
        for entry in self.ledger():
            if source_row < first + entry.rows:
                return entry.name, source_row - first
            first += entry.rows
        raise IndexError(f"row {source_row} is beyond the {first} rows that the inbox ledger records")

    def pending(self) -> list[Path]:
        """Caption files in the inbox that are not in the ledger (same name and content), oldest first."""
        if not self.folder.is_dir():
            raise FileNotFoundError(f"inbox {self.folder} does not exist")
        taken = {(f.name, f.sha256) for f in self.ledger()}
        files = sorted((p for p in self.folder.glob("*.jsonl") if p.is_file()), key=lambda p: (p.stat().st_mtime, p.name))
        return [p for p in files if (p.name, file_sha256(p)) not in taken]

    def take(self, files: list[Path]) -> list[InboxFile]:
        """Append `files` to the combined caption file and record them; returns the new ledger entries."""
        self.work.mkdir(parents=True, exist_ok=True)
        legacy = self._ledger_file()
        if legacy != self.ledger_path:
            legacy.replace(self.ledger_path)
        ledger = self.ledger()
        end = ledger[-1].end if ledger else 0
        size = self.combined.stat().st_size if self.combined.exists() else 0
        if size < end:
            raise RuntimeError(f"{self.combined} is shorter ({size} bytes) than its ledger says ({end}): rebuild it")
        with open(self.combined, "ab") as out:
            out.truncate(end)  # repair: drop bytes appended by a run that died before updating the ledger
        added = []
        for path in files:
            data = path.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()  # of the bytes appended, even if the file changes meanwhile
            if data and not data.endswith(b"\n"):
                data += b"\n"
            with open(self.combined, "ab") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            entry = InboxFile(name=path.name, sha256=sha256, rows=count_jsonl_rows(data), start=end,
                              end=end + len(data))
            end = entry.end
            ledger.append(entry)
            added.append(entry)
            write_text_atomic(self.ledger_path, json.dumps([e.model_dump() for e in ledger], indent=2) + "\n")
        return added
