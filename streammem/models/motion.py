"""Static/dynamic scores per token from frame differences after camera-motion compensation.

The camera's motion between two frames is estimated from the image alone (corners tracked with
pyramidal Lucas-Kanade, a similarity transform fitted with RANSAC, so moving objects are
outliers); the previous frame is warped onto the current one and the absolute difference,
averaged over each token cell, is the cell's dynamic score in [0, 1]. Static background
cancels out; moving objects (and parallax layers the similarity cannot explain) remain.

This is the caller-supplied score that :class:`~streammem.memory.DualMemory` routes by.

Example:
    >>> import numpy as np
    >>> scorer = MotionScorer(grid=16)
    >>> a = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    >>> scorer(a).shape, float(scorer(a).max())  # the first frames have nothing to compare with
    ((16, 16), 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["MotionScorer", "estimate_camera_motion"]


def estimate_camera_motion(prev_grey: np.ndarray, grey: np.ndarray, max_corners: int = 300) -> np.ndarray:
    """2x3 similarity transform mapping ``prev_grey`` pixels onto ``grey`` (identity if unknown)."""
    eye = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float64)
    pts = cv2.goodFeaturesToTrack(prev_grey, maxCorners=max_corners, qualityLevel=0.01, minDistance=6, blockSize=7)
    if pts is None or len(pts) < 8:
        return eye
    nxt, status, _ = cv2.calcOpticalFlowPyrLK(prev_grey, grey, pts, None, winSize=(21, 21), maxLevel=3)
    ok = status.reshape(-1) == 1
    if ok.sum() < 8:
        return eye
    m, _ = cv2.estimateAffinePartial2D(pts[ok], nxt[ok], method=cv2.RANSAC, ransacReprojThreshold=2.0)
    return eye if m is None else m


@dataclass
class MotionScorer:
    """Per-cell dynamic score of each frame against the frame ``gap`` frames before it.

    The residual at a pixel is how far the current value lies outside the range of the warped
    earlier frame's 3x3 neighbourhood, so a misalignment of one pixel on a textured background
    costs nothing, while an object that moved does.

    Args:
        grid: output cells per side (the token grid).
        scale: mean residual (grey levels, 0-255) per cell that maps to a score of 1.
        gap: compare with the frame this many frames earlier (larger: slow motion shows more).
        work_side: frames are scored at this side length.
    """

    grid: int = 16
    scale: float = 8.0
    gap: int = 2
    work_side: int = 256
    _history: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.grid < 1 or self.gap < 1 or self.work_side < 16 or not self.scale > 0:
            raise ValueError(f"bad MotionScorer settings: grid={self.grid}, gap={self.gap}, "
                             f"work_side={self.work_side}, scale={self.scale}")

    def reset(self) -> None:
        self._history.clear()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``(grid, grid)`` float32 dynamic scores in [0, 1] for an RGB uint8 frame."""
        side = self.work_side
        grey = cv2.cvtColor(cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
        grey = cv2.GaussianBlur(grey, (3, 3), 0)
        self._history.append(grey)
        if len(self._history) <= self.gap:
            return np.zeros((self.grid, self.grid), np.float32)
        prev = self._history.pop(0)  # bounded: gap + 1 frames at most
        m = estimate_camera_motion(prev, grey)
        warped = cv2.warpAffine(prev, m, (side, side), flags=cv2.INTER_LINEAR).astype(np.float32)
        valid = cv2.warpAffine(np.ones_like(prev), m, (side, side), flags=cv2.INTER_NEAREST, borderValue=0)
        kernel = np.ones((3, 3), np.uint8)
        lo, hi = cv2.erode(warped, kernel), cv2.dilate(warped, kernel)
        cur = grey.astype(np.float32)
        residual = np.maximum(0.0, np.maximum(lo - cur, cur - hi)) * valid
        cell = cv2.resize(residual, (self.grid, self.grid), interpolation=cv2.INTER_AREA)
        cover = cv2.resize(valid.astype(np.float32), (self.grid, self.grid), interpolation=cv2.INTER_AREA)
        score = np.where(cover > 0.2, cell / np.maximum(cover, 1e-6), 0.0) / self.scale
        return np.clip(score, 0.0, 1.0).astype(np.float32)
