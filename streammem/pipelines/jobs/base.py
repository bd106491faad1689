"""What every job shares: where its outputs go, and how a run that fails part-way keeps them.

A job streams a source through one or more heads and writes files into an output folder. Its
writers put each file under a temporary name and move it into place when closed, and a source
error mid-stream ends the run cleanly: everything before the error is written, the summary
records the error, and the error is returned in ``result.error`` rather than raised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from streammem.io import SourceError
from streammem.io.sinks import to_jsonable

__all__ = ["JobResult", "output_fps", "write_summary", "drain"]


@dataclass
class JobResult:
    """What a job wrote. ``error`` is the source error that stopped the run early (everything
    before it is written), or None. ``memory`` is the memory snapshot, where the job saves one."""

    summary: dict
    video: Path | None
    jsonl: Path
    summary_path: Path
    error: SourceError | None = None
    memory: Path | None = None


def output_fps(info, source_options: dict) -> float:
    """Frame rate of the annotated video: the source's (8 when unknown), capped by a requested
    ``fps`` resampling and divided by ``stride``."""
    fps = info.fps or 8.0
    if source_options.get("fps"):
        fps = min(fps, source_options["fps"])
    return fps / max(1, source_options.get("stride", 1))


def write_summary(path: Path, summary: dict) -> Path:
    """Write ``summary`` as JSON, atomically (a temporary file moved into place)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def drain(run: Iterable) -> SourceError | None:
    """Consume a stream run; a :class:`SourceError` ends it and is returned, not raised."""
    try:
        for _ in run:
            pass
    except SourceError as exc:
        return exc
    return None
