"""Which frames a source keeps (:class:`_Selector`: window, then fps, then stride) and the
downscale to ``max_side`` (:func:`_resize`)."""

from __future__ import annotations

import cv2
import numpy as np

from streammem.io.options import SourceOptions

__all__ = ["_Selector", "_resize"]


class _Selector:
    """Decides from (index, timestamp) which frames to keep: window, then fps, then stride."""

    STOP = "stop"

    def __init__(self, opts: SourceOptions) -> None:
        self.opts = opts
        self._origin: float | None = None
        self._tick = 0
        self._kept = 0

    def __call__(self, index: int, timestamp: float) -> bool | str:
        o = self.opts
        if o.end is not None and timestamp >= o.end - 1e-9:
            return self.STOP
        if timestamp < o.start - 1e-9:
            return False
        if o.fps is not None:
            # Keep the first frame at or after each tick origin + k / fps; ticks are counted
            # in integers so rounding never accumulates, and a gap skips whole periods.
            if self._origin is None:
                self._origin = timestamp
            rel = (timestamp - self._origin) * o.fps
            if rel < self._tick - 1e-6:
                return False
            self._tick = int(np.floor(rel + 1e-6)) + 1
        keep = self._kept % o.stride == 0
        self._kept += 1
        return keep

    def estimate(self, num_frames: int | None, fps: float | None, duration: float | None) -> int | None:
        if num_frames is None or not fps:
            return None
        o = self.opts
        t0 = min(o.start, duration or o.start)
        t1 = duration if o.end is None or duration is None else min(o.end, duration)
        if t1 is None:
            return None
        n = max(0.0, (t1 - t0)) * (min(fps, o.fps) if o.fps else fps)
        n = min(int(round(n)), num_frames)
        return max(0, -(-n // o.stride))


def _resize(img: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None:
        return img
    h, w = img.shape[:2]
    side = max(h, w)
    if side <= max_side:
        return img
    scale = max_side / side
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)
