"""A watched folder of caption files, appended in arrival order to one growing caption file.

Each caption file that appears in the inbox (`*.jsonl`) is appended, once, to `<work>/captions.jsonl`, in order of
arrival (modification time, then name). A ledger records every file taken with its sha256 and the combined file's
length before and after it, so a crash between the append and the ledger write is repaired on the next run (the
combined file is cut back to the last recorded length). Because the combined file only grows at its end,
build-dataset recomputes only the chunks that the new rows fall into.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from qtsplus.fingerprint import file_sha256
from qtsplus.shards import write_text_atomic


class InboxFile(BaseModel):
    name: str
    sha256: str
    rows: int
    start: int  # combined file length before this file
    end: int  # combined file length after this file


class Inbox:
    def __init__(self, folder: Path | str, work: Path | str):
        self.folder = Path(folder)
        self.work = Path(work)
        self.combined = self.work / "captions.jsonl"
        self.ledger_path = self.work / "inbox-ledger.json"

    def ledger(self) -> list[InboxFile]:
        if not self.ledger_path.is_file():
            return []
        return [InboxFile.model_validate(x) for x in json.loads(self.ledger_path.read_text())]

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
            if data and not data.endswith(b"\n"):
                data += b"\n"
            with open(self.combined, "ab") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            entry = InboxFile(name=path.name, sha256=file_sha256(path), rows=sum(1 for line in data.splitlines()
                                                                                  if line.strip()),
                              start=end, end=end + len(data))
            end = entry.end
            ledger.append(entry)
            added.append(entry)
            write_text_atomic(self.ledger_path, json.dumps([e.model_dump() for e in ledger], indent=2) + "\n")
        return added
