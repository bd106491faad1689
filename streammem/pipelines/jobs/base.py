"""What every job shares: where its outputs go, and what a failed job leaves behind.

A job streams a source through one or more heads and writes files into an output folder
(:class:`OutputDir`). Every file is written under a temporary name and moved into place whole.
The rule on failure:

- before the job's first output frame (bad options, a source that cannot be opened or whose
  first frame does not decode): the job raises, and nothing it created is left, the folder
  included when the job made it;
- after it: everything written so far is kept and finished. A source error ends the run
  cleanly (the summary records it and it is returned in ``result.error``); any other error
  is raised once the files are finished.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from streammem.io import JsonlWriter, SourceError, VideoWriter
from streammem.io.sinks import atomic_path, to_jsonable

__all__ = ["fit_to", "JobResult", "OutputDir", "output_fps", "write_summary", "drain"]

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What a job wrote. ``error`` is the source error that stopped the run early (everything
    before it is written), or None. ``memory`` is the memory snapshot, where the job saves one."""

    summary: dict
    video: Path | None
    jsonl: Path
    summary_path: Path
    error: Exception | None = None
    memory: Path | None = None


class OutputDir:
    """A job's output folder: what the job creates in it, and removing it all when the job
    fails before producing anything.

    Entering creates the folder (and missing parents) and remembers which of them it created.
    The job opens its writers through :meth:`jsonl` and :meth:`video` and calls :meth:`keep`
    once its first output frame is written. Leaving by an exception before :meth:`keep`
    discards every writer's temporary file and removes the folders it created (only when
    empty: files that were there before are never touched); after :meth:`keep`, the writers
    are finished and moved into place, so a failure mid-stream keeps what was written.
    :meth:`close` finishes the writers on a job's normal path.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> try:
        ...     with OutputDir(root / "out") as od:
        ...         w = od.jsonl("frames.jsonl")
        ...         raise ValueError("the first frame does not decode")
        ... except ValueError:
        ...     pass
        >>> (root / "out").exists()
        False
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.kept = False
        self._made: list[Path] = []  # folders this job created, deepest first
        self._writers: list[JsonlWriter | VideoWriter] = []

    def __enter__(self) -> "OutputDir":
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; the output must be a folder")  # a bad --out
        p = self.path.absolute()
        while not p.exists():
            self._made.append(p)
            p = p.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a bad --out: read-only, a file on the way, ...
            self.discard()
            raise ValueError(f"cannot create the output folder {self.path}: {exc.strerror or exc}") from exc
        return self

    def jsonl(self, name: str, **kw) -> JsonlWriter:
        """A :class:`JsonlWriter` for ``name`` in this folder."""
        return self._add(JsonlWriter(self.path / name, **kw))

    def video(self, name: str, fps: float, **kw) -> VideoWriter:
        """A :class:`VideoWriter` for ``name`` in this folder."""
        return self._add(VideoWriter(self.path / name, fps, **kw))

    def _add(self, writer):
        self._writers.append(writer)
        return writer

    def keep(self) -> None:
        """From now on, what was written is kept even if the job fails (its first output frame
        is written)."""
        self.kept = True

    def close(self) -> None:
        """Finish every writer and move its file into place."""
        for w in self._writers:
            w.close()

    def discard(self) -> None:
        """Remove what this job created: its writers' temporary files and, when empty, the
        folders it made."""
        for w in self._writers:
            w.discard()
        for d in self._made:
            try:
                d.rmdir()
            except OSError:  # not empty: something else wrote there
                break

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if not self.kept:
            self.discard()
            return
        for w in self._writers:  # a mid-stream failure keeps what was written
            try:
                w.close()
            except Exception as err:  # noqa: BLE001 - the job's own error is the one raised
                log.warning("%s: could not finish after %s: %s", w.path, exc_type.__name__, err)


def fit_to(image, size_hw: tuple[int, int] | None):
    """``image`` resized to ``size_hw`` (the annotated video's size, fixed by its first frame)
    when it differs, so a source whose resolution changes mid-stream still makes one video."""
    if size_hw is None or tuple(image.shape[:2]) == tuple(size_hw):
        return image
    import cv2

    return cv2.resize(image, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_AREA)


def output_fps(info, source_options: dict) -> float:
    """Frame rate of the annotated video: the source's (8 when unknown), capped by a requested
    ``fps`` resampling and divided by ``stride``."""
    fps = info.fps or 8.0
    if source_options.get("fps"):
        fps = min(fps, source_options["fps"])
    return fps / max(1, source_options.get("stride", 1))


def write_summary(path: Path, summary: dict) -> Path:
    """Write ``summary`` as JSON, atomically (a temporary file moved into place)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False, default=str) + "\n")
    return path


def drain(run: Iterable) -> SourceError | None:
    """Consume a stream run; a :class:`SourceError` ends it and is returned, not raised."""
    try:
        for _ in run:
            pass
    except SourceError as exc:
        return exc
    return None
