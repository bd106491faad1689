"""A folder of images, sorted by name in natural order, at ``input_fps``."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from streammem.io.errors import SourceOpenError, SourceReadError
from streammem.io.selection import _Selector

__all__ = ["IMAGE_EXTENSIONS", "_FolderReader"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class _FolderReader:
    """A folder of images sorted by name (natural order: 2 before 10), at ``input_fps``."""

    def __init__(self, path: str, input_fps: float) -> None:
        self.path = path
        self.fps = input_fps
        files = [p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not files:
            raise SourceOpenError(path, f"the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.files = sorted(files, key=lambda p: _natural_key(p.name))
        first = self._load(0)
        self.height, self.width = first.shape[:2]

    def _load(self, i: int) -> np.ndarray:
        bgr = cv2.imread(str(self.files[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SourceReadError(self.path, f"cannot decode image {self.files[i].name}", i, i / self.fps, i)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def frames(self, select):
        read = 0
        for i in range(len(self.files)):
            ts = i / self.fps
            verdict = select(i, ts)
            if verdict == _Selector.STOP:
                return
            if verdict:
                try:
                    img = self._load(i)
                except SourceReadError as exc:
                    exc.frames_read = read
                    raise
                read += 1
                yield i, ts, img
