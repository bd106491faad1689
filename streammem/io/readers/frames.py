"""The frames of a scheme opener (:mod:`streammem.io.schemes`), passed through whole."""

from __future__ import annotations

from typing import Iterable

from streammem.io.selection import _Selector
from streammem.types import Frame

__all__ = ["_FrameReader"]


class _FrameReader:
    """Whole :class:`Frame` objects from an iterable (iterated afresh by each ``frames`` call)."""

    def __init__(self, frames: Iterable[Frame], width: int, height: int) -> None:
        self.source, self.width, self.height = frames, int(width), int(height)

    def frames(self, select):
        for frame in self.source:
            verdict = select(frame.index, frame.timestamp)
            if verdict == _Selector.STOP:
                return
            if verdict:
                yield frame.index, frame.timestamp, frame
