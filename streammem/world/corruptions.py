"""Seeded, bursty image corruptions. They change pixels, never ground truth.

Each corruption type switches on in bursts: a burst starts with a rate per minute, lasts a
random duration, and draws its intensity (and, for occluders, its shape and place) once at the
start, so a burst looks like one event (a smudge, a dark stretch, a shaky camera). Random draws
per frame are a fixed number, whatever the image content, so the same seed gives the same
corruptions.

``drop`` and ``duplicate`` are not pixel filters: the world skips dropped frames (the stream has
a gap in ``Frame.index``) and shows the previous delivered image on duplicated frames, with the
current frame's ground truth.

Example:
    >>> import numpy as np
    >>> c = Corruptor(seed=0, level="hard", size_hw=(32, 32), fps=8.0)
    >>> img, names = c.apply(np.full((32, 32, 3), 128, np.uint8), motion=(1.0, 0.0))
    >>> img.shape, isinstance(names, list)
    ((32, 32, 3), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["LEVELS", "CORRUPTIONS", "PIXEL_CORRUPTIONS", "Corruptor", "corrupt_once"]

CORRUPTIONS = ["motion_blur", "defocus", "noise", "low_light", "occluder", "jpeg", "drop", "duplicate"]
#: The corruptions that change pixels (``drop`` and ``duplicate`` change the stream instead).
PIXEL_CORRUPTIONS = CORRUPTIONS[:6]


@dataclass(frozen=True)
class Burst:
    rate_per_min: float
    duration_s: tuple[float, float]
    intensity: tuple[float, float]


def _level(scale: float, strength: float) -> dict[str, Burst]:
    s = strength
    return {
        "motion_blur": Burst(2.0 * scale, (0.5, 2.0), (0.4 * s, 1.0 * s)),
        "defocus": Burst(1.5 * scale, (0.5, 2.5), (0.4 * s, 1.0 * s)),
        "noise": Burst(2.0 * scale, (1.0, 4.0), (0.4 * s, 1.0 * s)),
        "low_light": Burst(1.0 * scale, (2.0, 6.0), (0.4 * s, 1.0 * s)),
        "occluder": Burst(1.0 * scale, (1.0, 4.0), (0.5 * s, 1.0 * s)),
        "jpeg": Burst(2.0 * scale, (1.0, 4.0), (0.4 * s, 1.0 * s)),
        "drop": Burst(2.0 * scale, (0.1, 0.4), (1.0, 1.0)),
        "duplicate": Burst(2.0 * scale, (0.1, 0.5), (1.0, 1.0)),
    }


#: Corruption levels: rates of bursts and strength. ``clean`` has none.
LEVELS: dict[str, dict[str, Burst]] = {
    "clean": {},
    "medium": _level(1.0, 0.6),
    "hard": _level(3.0, 1.0),
}


class Corruptor:
    """Applies the bursts of one corruption level to a stream of images."""

    def __init__(self, seed: int, level: str, size_hw: tuple[int, int], fps: float):
        if level not in LEVELS:
            raise ValueError(f"corruption level must be one of {sorted(LEVELS)}, got {level!r}")
        self.level = level
        self.spec = LEVELS[level]
        self.fps = fps
        self.size_hw = size_hw
        self.rng = np.random.default_rng([seed, 202])
        self.left = {k: 0 for k in self.spec}
        self.inten = {k: 0.0 for k in self.spec}
        self._occ: tuple | None = None
        self._dir = 0.0
        self._last: list[str] = []
        h, w = size_hw
        if "noise" in self.spec:
            self._noise = np.random.default_rng([seed, 203]).standard_normal((h + 32, w + 32, 3)).astype(np.float32)

    def step(self) -> list[str]:
        """Advance the burst states one frame; return the names active at this frame."""
        rng = self.rng
        active = []
        for k, b in self.spec.items():
            u, dur, it, ex = rng.random(4)  # fixed draws per type per frame
            if self.left[k] <= 0 and u < b.rate_per_min / 60.0 / self.fps:
                lo, hi = b.duration_s
                self.left[k] = max(1, int(round((lo + dur * (hi - lo)) * self.fps)))
                self.inten[k] = b.intensity[0] + it * (b.intensity[1] - b.intensity[0])
                if k == "occluder":
                    self._occ = self._new_occluder(ex)
                if k == "motion_blur":
                    self._dir = ex * np.pi
            if self.left[k] > 0:
                self.left[k] -= 1
                active.append(k)
        return active

    def _new_occluder(self, u: float) -> tuple:
        h, w = self.size_hw
        r = np.random.default_rng(int(u * 2**31))
        cx, cy = r.uniform(0, w), r.uniform(0, h)
        ax, ay = r.uniform(0.12, 0.35) * w, r.uniform(0.12, 0.35) * h
        col = tuple(int(v) for v in r.integers(0, 90, 3))
        return (int(cx), int(cy)), (int(ax), int(ay)), float(r.uniform(0, 180)), col

    def apply(self, img: np.ndarray, motion: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, list[str]]:
        """Corrupt ``img`` (not modified in place) for the next frame.

        ``motion`` is the image-space motion of the background in px per frame, along which
        motion blur smears. Returns the image and the names of the corruptions active at this
        frame (``drop`` / ``duplicate`` are reported but handled by the caller).
        """
        return self.filter(img, self.step(), motion), self._last

    def filter(self, img: np.ndarray, names: list[str], motion: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """Apply the pixel corruptions in ``names`` (from :meth:`step`) to ``img``."""
        self._last = names
        out = img
        for k in names:
            a = self.inten[k]
            if k == "motion_blur":
                mx, my = motion
                speed = float(np.hypot(mx, my))
                ang = np.arctan2(my, mx) if speed > 0.5 else self._dir
                length = int(min(15, 3 + a * (4 + 2 * speed))) | 1
                kern = np.zeros((length, length), np.float32)
                c = length // 2
                dx, dy = np.cos(ang) * c, np.sin(ang) * c
                cv2.line(kern, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1)
                out = cv2.filter2D(out, -1, kern / kern.sum(), borderType=cv2.BORDER_REFLECT)
            elif k == "defocus":
                sigma = 0.8 + 2.5 * a
                out = cv2.GaussianBlur(out, (0, 0), sigma)
            elif k == "noise":
                h, w = out.shape[:2]
                oy = int(self.left[k] * 7 % 32)  # a different slice of the bank each frame
                ox = int(self.left[k] * 13 % 32)
                n = self._noise[oy : oy + h, ox : ox + w]
                out = np.clip(out.astype(np.float32) + n * (6 + 30 * a), 0, 255).astype(np.uint8)
            elif k == "low_light":
                gain = 1.0 - 0.75 * a
                lut = np.clip(255 * gain * (np.arange(256) / 255.0) ** (1 + a), 0, 255).astype(np.uint8)
                out = cv2.LUT(out, lut)
            elif k == "occluder" and self._occ is not None:
                out = out.copy()
                centre, axes, ang, col = self._occ
                cv2.ellipse(out, centre, axes, ang, 0, 360, col, -1)
            elif k == "jpeg":
                q = int(45 - 38 * a)
                ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
                out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        return out


def corrupt_once(img: np.ndarray, name: str, intensity: float, seed: int,
                 motion: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """One image with one pixel corruption at ``intensity`` in [0, 1] (the ``hard`` level's
    filters; a seeded occluder shape and place, blur direction and noise slice), outside any
    burst: for training augmentation. ``img`` is not modified.

    Example:
        >>> out = corrupt_once(np.full((32, 32, 3), 128, np.uint8), "low_light", 1.0, seed=0)
        >>> int(out.max()) < 128
        True
    """
    if name not in PIXEL_CORRUPTIONS:
        raise ValueError(f"corrupt_once: name must be one of {PIXEL_CORRUPTIONS}, got {name!r}")
    c = Corruptor(seed, "hard", img.shape[:2], fps=8.0)
    u = float(np.random.default_rng([seed, 204]).random())
    c.inten[name] = float(np.clip(intensity, 0.0, 1.0))
    c.left[name] = 1 + int(u * 32)
    if name == "occluder":
        c._occ = c._new_occluder(u)
    if name == "motion_blur":
        c._dir = u * np.pi
    return c.filter(img, [name], motion)
