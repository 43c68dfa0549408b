"""What an export has finished, recorded as it goes, so that an interrupted export resumes.

An export writes `.export-progress.json` into its folder after each output it finishes (a GGUF,
the importance matrix), with the sha256 of the file and the figures the manifest needs, under the
settings that decide the outputs (the inputs' sha256 and the options). Run again with the same
settings, it keeps each finished file whose sha256 still matches and makes only the rest; with
other settings, or with --force, it starts over (existing outputs refused without --force, as
always). The record goes once the manifest is written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import EdgeloraError
from .files import atomic_write_json, read_json, refuse_overwrite

log = logging.getLogger("edgelora")

PROGRESS_FILE = ".export-progress.json"


@dataclass
class ExportProgress:
    folder: Path
    settings: dict  # what decides the outputs: the inputs' sha256 and the options
    done: dict[str, dict] = field(default_factory=dict)  # "merged:q4_k_m" -> {file, sha256, and its figures}

    @classmethod
    def start(cls, folder: Path, settings: dict, outputs: dict, force: bool) -> "ExportProgress":
        """The record to continue: an earlier export's into `folder` with the same `settings`, its
        finished files that are still whole; else a new one, existing `outputs` ({role: path})
        refused unless `force`."""
        earlier = None if force else cls._read(folder)
        if earlier is not None and earlier.settings != settings:
            refuse_overwrite(outputs.values(), force, "an export with other settings stopped here; use --force to "
                                                      "start over")
            earlier = None
        progress = cls(folder, settings)
        if earlier is not None:
            progress.done = {role: entry for role, entry in earlier.done.items() if _whole(folder, entry)}
        refuse_overwrite([p for role, p in outputs.items() if str(role) not in progress.done], force)
        if progress.done:
            log.info("resuming the export in %s: keeping %s, finished before", folder,
                     ", ".join(entry["file"] for entry in progress.done.values()))
        return progress

    @classmethod
    def _read(cls, folder: Path) -> Optional["ExportProgress"]:
        path = folder / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            data = read_json(path, "export progress", ("settings", "done"))
        except EdgeloraError as e:
            log.warning("%s; starting the export over", e)
            return None
        if not isinstance(data["settings"], dict) or not isinstance(data["done"], dict):
            return None
        return cls(folder, data["settings"], {k: v for k, v in data["done"].items() if isinstance(v, dict)})

    def get(self, role) -> Optional[dict]:
        """The figures recorded with `role`'s finished file, None if it is not finished."""
        return self.done.get(str(role))

    def finished(self, role, path: Path, **figures) -> None:
        """`role`'s file is complete at `path` (in the folder): record it, with `figures`."""
        from .bases import file_sha256

        self.done[str(role)] = {"file": path.name, "sha256": file_sha256(path), **figures}
        atomic_write_json(self.folder / PROGRESS_FILE, {"settings": self.settings, "done": self.done})

    def close(self) -> None:
        """The export is complete (its manifest written): the record goes."""
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)


def _whole(folder: Path, entry: dict) -> bool:
    from .bases import file_sha256

    path = folder / str(entry.get("file", ""))
    return path.is_file() and file_sha256(path) == entry.get("sha256")
