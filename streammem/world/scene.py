"""The static scene and the camera of StreamWorld.

The scene is 2.5D: a **ground plane** (world ``z = 0``) textured with real photographs from
``skimage.data``, and a sparse **foreground layer** of foliage cut-outs on a plane closer to the
camera (``z = FG_DEPTH * BASE_DIST``, negative), which moves faster than the ground when the
camera pans (parallax). World units are canvas pixels; ``x`` right, ``y`` down, ``z`` away from
the camera.

The camera is a pinhole looking along ``+z`` at distance ``dist`` above the ground, rolled about
its optical axis. Its state is kept in integers (1/16 px, 0.1 degree, 1/64 of a zoom octave) so
that a loop of actions followed by their inverses returns to exactly the same pose, and the
background rendered there is bit-identical.

Example:
    >>> cam = CameraState(x=768 * 16, y=768 * 16)
    >>> cam.pose()[:3, 3].tolist()
    [768.0, 768.0, -1000.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

__all__ = [
    "ARENA",
    "BASE_DIST",
    "FG_DEPTH",
    "VIEW_WORLD",
    "CameraState",
    "CameraController",
    "Scene",
    "ACTION_LAYOUT",
    "load_photo",
]

ARENA = 1536  # side of the square ground canvas and of the objects' arena, world px
BASE_DIST = 1000.0  # camera distance to the ground at zoom 0
VIEW_WORLD = 512.0  # world px spanned by the shorter image side at zoom 0
FG_DEPTH = -0.3  # foreground plane at z = FG_DEPTH * BASE_DIST (closer to the camera)
POS_UNIT = 16  # camera position stored in 1/16 world px
ROLL_UNIT = 10  # camera roll stored in 0.1 degree
ZOOM_UNIT = 64  # zoom stored in 1/64 octave; dist = BASE_DIST * 2 ** (-zoom / 64)
ZOOM_RANGE = (-40, 30)  # dist in [0.72, 1.54] * BASE_DIST
ROLL_RANGE = (-200, 200)  # +-20 degrees

#: Meaning of the 13 entries of an action vector (RELIC layout: 6 translational and
#: 6 rotational relative velocities, plus "static"). Translations in world px per frame
#: (forward/backward change the camera's distance), rotations in degrees per frame.
ACTION_LAYOUT = (
    "right", "left", "down", "up", "forward", "backward",
    "pitch_up", "pitch_down", "yaw_left", "yaw_right", "roll_cw", "roll_ccw", "static",
)


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """An RGB uint8 photograph from ``skimage.data`` (grey ones are returned 2-D), cached."""
    import skimage.data as data

    if name == "motorcycle":
        img = data.stereo_motorcycle()[0]
    else:
        img = getattr(data, name)()
    if img.dtype == bool:
        img = (~img).astype(np.uint8) * 255  # horse: True is background
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


# ---------------------------------------------------------------------------------- camera
@dataclass
class CameraState:
    """Integer camera state; see the module docstring for units."""

    x: int = 0
    y: int = 0
    zoom: int = 0
    roll: int = 0

    @property
    def center(self) -> tuple[float, float]:
        return self.x / POS_UNIT, self.y / POS_UNIT

    @property
    def dist(self) -> float:
        return BASE_DIST * 2.0 ** (-self.zoom / ZOOM_UNIT)

    @property
    def roll_rad(self) -> float:
        return np.deg2rad(self.roll / ROLL_UNIT)

    def key(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.zoom, self.roll)

    def pose(self) -> np.ndarray:
        """Camera-to-world 4x4 (OpenCV axes: x right, y down, z forward)."""
        c, s = np.cos(self.roll_rad), np.sin(self.roll_rad)
        p = np.eye(4)
        p[:2, :2] = [[c, -s], [s, c]]
        cx, cy = self.center
        p[:3, 3] = [cx, cy, -self.dist]
        return p


def focal(size_hw: tuple[int, int]) -> float:
    """Focal length in pixels: the shorter image side spans VIEW_WORLD at BASE_DIST."""
    return min(size_hw) / VIEW_WORLD * BASE_DIST


def intrinsics(size_hw: tuple[int, int]) -> np.ndarray:
    h, w = size_hw
    f = focal(size_hw)
    return np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], np.float64)


def plane_to_image(cam: CameraState, size_hw: tuple[int, int], plane_z: float = 0.0) -> np.ndarray:
    """2x3 affine mapping (x, y) on the plane ``z = plane_z`` to image pixels."""
    h, w = size_hw
    depth = cam.dist + plane_z
    s = focal(size_hw) / depth
    c, sn = np.cos(cam.roll_rad), np.sin(cam.roll_rad)
    rt = np.array([[c, sn], [-sn, c]]) * s  # s * R^T
    cx, cy = cam.center
    m = np.empty((2, 3))
    m[:, :2] = rt
    m[:, 2] = np.array([w / 2, h / 2]) - rt @ np.array([cx, cy])
    return m


class CameraController:
    """Seeded trajectory program: holds, random walks, and loops that come back.

    A loop records ``K`` frames of walking and then plays the negated deltas in reverse,
    so the camera returns to the exact integer state where the loop began.
    ``step()`` returns ``(delta, segment)`` where delta is the applied integer
    ``(dx, dy, dzoom, droll)`` and segment names the part of the program.
    """

    def __init__(self, rng: np.random.Generator, fps: float, pan_speed: float, loop_prob: float):
        self.rng = rng
        self.fps = fps
        self.pan_speed = pan_speed  # world px per second, typical
        self.loop_prob = loop_prob
        self.state = CameraState(
            x=int(rng.integers(ARENA // 3, 2 * ARENA // 3)) * POS_UNIT,
            y=int(rng.integers(ARENA // 3, 2 * ARENA // 3)) * POS_UNIT,
        )
        self._mode = "hold"
        self._left = 0
        self._delta = (0, 0, 0, 0)
        self._loop_id = 0
        self._record: list[tuple[int, int, int, int]] = []
        self._record_len = 0
        self._sub_left = 0

    def _new_walk_delta(self) -> tuple[int, int, int, int]:
        rng = self.rng
        cx, cy = self.state.center
        ang = rng.uniform(0, 2 * np.pi)
        # steer back towards the middle of the arena when far from it
        to_mid = np.array([ARENA / 2 - cx, ARENA / 2 - cy])
        if np.hypot(*to_mid) > ARENA * 0.3:
            ang = np.arctan2(to_mid[1], to_mid[0]) + rng.uniform(-0.6, 0.6)
        speed = self.pan_speed * rng.uniform(0.3, 1.6) / self.fps * POS_UNIT
        dx = int(round(speed * np.cos(ang))) if rng.random() < 0.85 else 0
        dy = int(round(speed * np.sin(ang))) if rng.random() < 0.85 else 0
        dz = int(rng.choice([0, 0, 0, 1, -1]))
        dr = int(rng.choice([0, 0, 0, 0, 2, -2, 1, -1]))
        return dx, dy, dz, dr

    def _clamp(self, d: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        dx, dy, dz, dr = d
        if not ZOOM_RANGE[0] <= self.state.zoom + dz <= ZOOM_RANGE[1]:
            dz = 0
        if not ROLL_RANGE[0] <= self.state.roll + dr <= ROLL_RANGE[1]:
            dr = 0
        return dx, dy, dz, dr

    def _apply(self, d: tuple[int, int, int, int]) -> None:
        s = self.state
        s.x += d[0]
        s.y += d[1]
        s.zoom += d[2]
        s.roll += d[3]

    def step(self) -> tuple[tuple[int, int, int, int], str]:
        rng = self.rng
        if self._left <= 0:
            r = rng.random()
            if r < self.loop_prob:
                self._mode = "loop_out"
                self._loop_id += 1
                self._left = int(rng.integers(int(2 * self.fps), int(6 * self.fps) + 1))
                self._record_len = self._left
                self._record = []
                self._sub_left = 0
            elif r < self.loop_prob + 0.2:
                self._mode = "hold"
                self._left = int(rng.integers(int(0.5 * self.fps), int(3 * self.fps) + 1))
                self._delta = (0, 0, 0, 0)
            else:
                self._mode = "walk"
                self._left = int(rng.integers(int(1 * self.fps), int(5 * self.fps) + 1))
                self._delta = self._new_walk_delta()
        mode = self._mode
        if mode == "walk":
            d = self._clamp(self._delta)
        elif mode == "hold":
            d = (0, 0, 0, 0)
        elif mode == "loop_out":
            if self._sub_left <= 0:
                self._delta = self._new_walk_delta()
                self._sub_left = int(rng.integers(int(0.5 * self.fps), int(2 * self.fps) + 1))
            self._sub_left -= 1
            d = self._clamp(self._delta)
            self._record.append(d)
        else:  # loop_back
            d0 = self._record.pop()
            d = (-d0[0], -d0[1], -d0[2], -d0[3])
        self._apply(d)
        self._left -= 1
        segment = mode if not mode.startswith("loop") else f"{mode}:{self._loop_id}"
        if self._left <= 0 and mode == "loop_out":
            self._mode = "loop_back"
            self._left = self._record_len
        return d, segment


def action_vector(delta: tuple[int, int, int, int], cam_before: CameraState) -> np.ndarray:
    """13-d action vector (see ACTION_LAYOUT) for an integer delta applied to ``cam_before``."""
    dx, dy, dz, dr = delta
    v = np.zeros(13, np.float32)
    tx, ty = dx / POS_UNIT, dy / POS_UNIT
    v[0], v[1] = max(tx, 0), max(-tx, 0)
    v[2], v[3] = max(ty, 0), max(-ty, 0)
    if dz:
        ddist = BASE_DIST * (2.0 ** (-(cam_before.zoom + dz) / ZOOM_UNIT) - 2.0 ** (-cam_before.zoom / ZOOM_UNIT))
        v[4], v[5] = max(-ddist, 0), max(ddist, 0)
    rd = dr / ROLL_UNIT
    v[10], v[11] = max(rd, 0), max(-rd, 0)
    v[12] = float(not any(delta))
    return v


def action_name(delta: tuple[int, int, int, int]) -> str:
    dx, dy, dz, dr = delta
    parts = []
    if dx:
        parts.append("pan_right" if dx > 0 else "pan_left")
    if dy:
        parts.append("pan_down" if dy > 0 else "pan_up")
    if dz:
        parts.append("zoom_in" if dz > 0 else "zoom_out")
    if dr:
        parts.append("roll_cw" if dr > 0 else "roll_ccw")
    return "+".join(parts) or "static"


# ---------------------------------------------------------------------------------- canvas
_BG_PHOTOS = ["hubble_deep_field", "retina", "immunohistochemistry"]
_BG_TEXTURES = ["grass", "brick", "gravel", "moon", "coins"]


def _tinted(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    tint = rng.uniform(0.35, 1.0, 3)
    tint /= tint.max()
    return (gray[..., None].astype(np.float32) * tint).astype(np.uint8)


def _patch(rng: np.random.Generator, side: int) -> np.ndarray:
    if rng.random() < 0.45:
        img = load_photo(str(rng.choice(_BG_PHOTOS)))
    else:
        img = _tinted(load_photo(str(rng.choice(_BG_TEXTURES))), rng)
    h, w = img.shape[:2]
    crop = int(min(h, w) * rng.uniform(0.5, 1.0))
    y0 = int(rng.integers(0, h - crop + 1))
    x0 = int(rng.integers(0, w - crop + 1))
    p = img[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        p = p[:, ::-1]
    if rng.random() < 0.5:
        p = p[::-1]
    return cv2.resize(np.ascontiguousarray(p), (side, side), interpolation=cv2.INTER_AREA)


def blob_alpha(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random blob (union of ellipses) as a uint8 0/255 mask."""
    a = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        ax, ay = rng.uniform(0.15, 0.3) * w, rng.uniform(0.15, 0.3) * h
        cv2.ellipse(a, (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return a


class Scene:
    """Ground canvas (RGB, ARENA x ARENA) and foreground layer (RGBA), built once per seed."""

    def __init__(self, seed: int, n_foliage: int):
        rng = np.random.default_rng([seed, 101])
        cell = ARENA // 3
        g = np.zeros((ARENA, ARENA, 3), np.uint8)
        for i in range(3):
            for j in range(3):
                g[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = _patch(rng, cell)
        # extra patches across the seams, soft-edged, so the canvas is not a plain grid
        for _ in range(10):
            side = int(rng.integers(160, 360))
            p = _patch(rng, side).astype(np.float32)
            a = cv2.GaussianBlur(blob_alpha(rng, side, side), (0, 0), side / 20).astype(np.float32)[..., None] / 255
            y0, x0 = (int(v) for v in rng.integers(0, ARENA - side, 2))
            roi = g[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
            g[y0 : y0 + side, x0 : x0 + side] = (roi * (1 - a) + p * a).astype(np.uint8)
        self.ground = g
        # foreground foliage: tinted texture blobs, crisp alpha
        fg = np.zeros((ARENA, ARENA, 4), np.uint8)
        for _ in range(n_foliage):
            h, w = (int(v) for v in rng.integers(70, 170, 2))
            tex = load_photo(str(rng.choice(["grass", "gravel"])))
            y0, x0 = int(rng.integers(0, 512 - h)), int(rng.integers(0, 512 - w))
            col = np.array([rng.uniform(0.1, 0.4), rng.uniform(0.35, 0.8), rng.uniform(0.05, 0.3)])
            rgb = (tex[y0 : y0 + h, x0 : x0 + w, None].astype(np.float32) * col).astype(np.uint8)
            a = blob_alpha(rng, h, w)
            py, px = int(rng.integers(0, ARENA - h)), int(rng.integers(0, ARENA - w))
            roi = fg[py : py + h, px : px + w]
            m = a > 0
            roi[..., :3][m] = rgb[m]
            roi[..., 3][m] = 255
        self.foreground = fg
        self.has_foreground = n_foliage > 0

    def render_ground(self, cam: CameraState, size_hw: tuple[int, int]) -> np.ndarray:
        h, w = size_hw
        m = plane_to_image(cam, size_hw, 0.0)
        return cv2.warpAffine(self.ground, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)

    def render_foreground(self, cam: CameraState, size_hw: tuple[int, int]) -> np.ndarray | None:
        """Warped RGBA foreground, or None when the layer is empty."""
        if not self.has_foreground:
            return None
        h, w = size_hw
        m = plane_to_image(cam, size_hw, FG_DEPTH * BASE_DIST)
        return cv2.warpAffine(self.foreground, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
