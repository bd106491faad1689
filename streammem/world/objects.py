"""Objects of StreamWorld: sprites cut from real photographs and coloured shapes, and their motion.

Every object has a track id, a class, a colour (``"natural"`` for photo sprites), a radius in
world px, a layer (ground or air: air objects draw over ground ones and do not collide with
them) and a motion:

- ``linear``: a straight line; when it leaves the arena it is gone and its slot respawns later
  with a new id.
- ``bouncing``: reflects off the arena walls and off other objects.
- ``stop_and_go``: bouncing, alternating moving and stopped phases.
- ``reenter``: straight, leaves the arena, stays away a while, comes back (same id) from an edge.
- ``parked``: never moves (a static object; others bounce off it).

Speed buckets follow ImageNet VID's motion IoU (IoU of an object's box with itself 10 frames at
25 fps, i.e. 0.4 s, later): slow > 0.9, medium 0.7-0.9, fast < 0.7. For a box of side 2r moving
by d, IoU = (2r - d) / (2r + d), so the bucket edges are speeds of 0.263 r/s and 0.882 r/s.

The state is kept in fixed-size numpy arrays (one slot per object), so stepping costs the same
at frame 10 and at frame 10 million.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .scene import ARENA, load_photo

__all__ = ["CLASSES", "COLOURS", "MOTIONS", "SPEED_BUCKETS", "ObjectSim", "sprite", "speed_bucket"]

#: Photo sprites: (source photo, crop y0, y1, x0, x1). The alpha is the inscribed ellipse.
_PHOTO_SPRITES = {
    "person": ("astronaut", 8, 180, 112, 268),
    "cat": ("chelsea", 5, 295, 95, 385),
    "cup": ("coffee", 8, 262, 140, 405),
    "rocket": ("rocket", 110, 412, 290, 350),
    "shuttle": ("astronaut", 0, 245, 352, 418),
    "motorcycle": ("motorcycle", 70, 460, 85, 690),
}
_SHAPES = ["horse", "circle", "square", "triangle", "star"]
#: Class names, in class-id order; detectors size their heads with ``len(CLASSES)``.
CLASSES: list[str] = list(_PHOTO_SPRITES) + _SHAPES
AIR_CLASSES = {"rocket", "shuttle"}
TINTABLE = set(_SHAPES)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 225, 40),
    "orange": (245, 140, 20),
    "purple": (150, 50, 200),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}
COLOUR_NAMES = list(COLOURS)
MOTIONS = ["linear", "bouncing", "stop_and_go", "reenter", "parked"]
SPEED_BUCKETS = ["slow", "medium", "fast"]
_SPEED_EDGES = (0.263, 0.882)  # r per second
_SPEED_SAMPLE = {"slow": (0.06, 0.22), "medium": (0.33, 0.8), "fast": (1.0, 2.4)}
SPRITE_SIDE = 96


def speed_bucket(speed: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Bucket index (0 slow, 1 medium, 2 fast) for speeds in world px/s and radii in world px."""
    rel = np.asarray(speed) / np.maximum(np.asarray(radius), 1e-9)
    return np.searchsorted(np.array(_SPEED_EDGES), rel, side="right")


def _shape_mask(name: str, side: int) -> np.ndarray:
    m = np.zeros((side, side), np.uint8)
    c = side // 2
    if name == "circle":
        cv2.circle(m, (c, c), c - 2, 255, -1)
    elif name == "square":
        m[6:-6, 6:-6] = 255
    elif name == "triangle":
        cv2.fillPoly(m, [np.array([[c, 3], [side - 3, side - 6], [3, side - 6]], np.int32)], 255)
    elif name == "star":
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, c - 2, (c - 2) * 0.45)
        pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(m, [pts], 255)
    elif name == "horse":
        h = load_photo("horse")
        ys, xs = np.nonzero(h)
        h = h[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        sc = (side - 4) / max(h.shape)
        hh, ww = max(1, int(h.shape[0] * sc)), max(1, int(h.shape[1] * sc))
        h = cv2.resize(h, (ww, hh), interpolation=cv2.INTER_AREA)
        y0, x0 = (side - hh) // 2, (side - ww) // 2
        m[y0 : y0 + hh, x0 : x0 + ww] = np.where(h >= 128, 255, 0)
    return m


@lru_cache(maxsize=None)
def sprite(cls_name: str, colour: str = "natural") -> np.ndarray:
    """RGBA uint8 sprite (longer side SPRITE_SIDE, alpha 0 or 255), cached and read-only."""
    if cls_name in _PHOTO_SPRITES:
        src, y0, y1, x0, x1 = _PHOTO_SPRITES[cls_name]
        img = load_photo(src)[y0:y1, x0:x1]
        sc = SPRITE_SIDE / max(img.shape[:2])
        h, w = max(1, round(img.shape[0] * sc)), max(1, round(img.shape[1] * sc))
        rgb = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        a = np.zeros((h, w), np.uint8)
        cv2.ellipse(a, (w // 2, h // 2), (max(1, w // 2 - 1), max(1, h // 2 - 1)), 0, 0, 360, 255, -1)
    else:
        a = _shape_mask(cls_name, SPRITE_SIDE)
        tex = load_photo("gravel")[:SPRITE_SIDE, :SPRITE_SIDE].astype(np.float32) / 255
        shade = 0.75 + 0.25 * tex
        col = np.array(COLOURS[colour if colour in COLOURS else "white"], np.float32)
        rgb = (shade[..., None] * col).astype(np.uint8)
    out = np.dstack([rgb, a])
    out[a == 0] = 0
    out.setflags(write=False)
    return out


class ObjectSim:
    """Fixed-slot simulation of the objects on the ground plane.

    ``step(rng)`` advances one frame and returns a list of event dicts (without view events,
    which need the camera and are added by the world).
    """

    def __init__(self, rng: np.random.Generator, n: int, fps: float, speed_mix: tuple[float, float, float],
                 colour_rate: float, vanish_rate: float):
        self.n, self.fps, self.dt = n, fps, 1.0 / fps
        self.speed_mix = np.asarray(speed_mix, np.float64) / np.sum(speed_mix)
        self.colour_p = colour_rate / fps  # per object per frame
        self.vanish_p = vanish_rate / fps
        self.next_id = 1
        self.tid = np.zeros(n, np.int64)
        self.cls = np.zeros(n, np.int64)
        self.colour = np.full(n, -1, np.int64)  # index in COLOUR_NAMES, -1 natural
        self.pos = np.zeros((n, 2))
        self.vel = np.zeros((n, 2))
        self.r = np.ones(n)
        self.layer = np.zeros(n, np.int64)
        self.motion = np.zeros(n, np.int64)
        self.moving = np.ones(n, bool)
        self.alive = np.zeros(n, bool)
        self.away = np.zeros(n, bool)
        self.timer = np.zeros(n, np.int64)  # respawn / away / stop-and-go countdown
        self.touching = np.zeros((n, n), bool)
        for i in range(n):
            self._spawn(rng, i)
        self.tintable = np.array([c in TINTABLE for c in CLASSES])

    # ---------------------------------------------------------------- helpers
    def _spawn(self, rng: np.random.Generator, i: int) -> None:
        c = int(rng.integers(len(CLASSES)))
        self.tid[i] = self.next_id
        self.next_id += 1
        self.cls[i] = c
        name = CLASSES[c]
        self.colour[i] = int(rng.integers(len(COLOUR_NAMES))) if name in TINTABLE else -1
        self.r[i] = rng.uniform(22, 56)
        self.layer[i] = 1 if name in AIR_CLASSES else 0
        self.motion[i] = int(rng.choice(len(MOTIONS), p=[0.2, 0.3, 0.2, 0.15, 0.15]))
        bucket = SPEED_BUCKETS[int(rng.choice(3, p=self.speed_mix))]
        lo, hi = _SPEED_SAMPLE[bucket]
        speed = rng.uniform(lo, hi) * self.r[i]
        ang = rng.uniform(0, 2 * np.pi)
        self.vel[i] = speed * np.cos(ang), speed * np.sin(ang)
        if MOTIONS[self.motion[i]] == "parked":
            self.vel[i] = 0.0
        self.pos[i] = rng.uniform(self.r[i], ARENA - self.r[i], 2)
        self.moving[i] = True
        self.timer[i] = int(rng.integers(int(1 * self.fps), int(4 * self.fps) + 1))
        self.alive[i] = True
        self.away[i] = False
        self.touching[i, :] = False
        self.touching[:, i] = False

    def _event(self, t: str, i: int, **kw) -> dict:
        e = {"type": t, "track_id": int(self.tid[i]), "class_name": CLASSES[self.cls[i]], "colour": self.colour_name(i)}
        e.update(kw)
        return e

    def colour_name(self, i: int) -> str:
        return COLOUR_NAMES[self.colour[i]] if self.colour[i] >= 0 else "natural"

    @property
    def present(self) -> np.ndarray:
        """Slots whose object exists on the ground plane now."""
        return self.alive & ~self.away

    def effective_velocity(self) -> np.ndarray:
        return self.vel * (self.moving & self.present)[:, None]

    # ---------------------------------------------------------------- step
    def step(self, rng: np.random.Generator, focus: np.ndarray | None = None) -> list[dict]:
        """``focus`` marks slots the camera sees: their colour changes and disappearances are
        4x as likely (and others' 0.5x), so events happen where the stream can show them."""
        ev: list[dict] = []
        boost = np.where(focus, 4.0, 0.5) if focus is not None else 1.0
        mot = self.motion
        sg = mot == MOTIONS.index("stop_and_go")
        # 1. timers: respawns, returns, stop-and-go phases
        self.timer -= 1
        due = self.timer <= 0
        for i in np.nonzero(due & ~self.alive)[0]:
            self._spawn(rng, int(i))
            ev.append(self._event("appears", int(i)))
        for i in np.nonzero(due & self.alive & self.away)[0]:
            self._reenter(rng, int(i))
            ev.append(self._event("returns", int(i)))
        for i in np.nonzero(due & self.present & sg)[0]:
            self.moving[i] = not self.moving[i]
            self.timer[i] = int(rng.integers(int(0.5 * self.fps), int(3 * self.fps) + 1))
            ev.append(self._event("starts" if self.moving[i] else "stops", int(i)))
        # 2. random colour changes and disappearances (one draw per slot, every frame)
        u_col = rng.random(self.n)
        u_van = rng.random(self.n)
        pick = rng.integers(1, len(COLOUR_NAMES), self.n)
        for i in np.nonzero((u_col < self.colour_p * boost) & self.present & self.tintable[self.cls])[0]:
            old = self.colour_name(int(i))
            self.colour[i] = (self.colour[i] + pick[i]) % len(COLOUR_NAMES)
            ev.append(self._event("changes_colour", int(i), **{"from": old, "to": self.colour_name(int(i))}))
        for i in np.nonzero((u_van < self.vanish_p * boost) & self.present)[0]:
            ev.append(self._event("disappears", int(i)))
            self._kill(rng, int(i))
        # 3. move
        self.pos += self.effective_velocity() * self.dt
        # 4. walls
        bounce = self.present & ((mot == 1) | sg | (mot == 4))
        r = self.r
        for ax in (0, 1):
            lo = bounce & (self.pos[:, ax] < r) & (self.vel[:, ax] < 0)
            hi = bounce & (self.pos[:, ax] > ARENA - r) & (self.vel[:, ax] > 0)
            self.vel[lo | hi, ax] *= -1
        out = self.present & ((self.pos < -r[:, None]) | (self.pos > ARENA + r[:, None])).any(1)
        for i in np.nonzero(out)[0]:
            ev.append(self._event("exits_scene", int(i)))
            if MOTIONS[mot[i]] == "reenter":
                self.away[i] = True
                self.timer[i] = int(rng.integers(int(2 * self.fps), int(10 * self.fps) + 1))
                self.touching[i, :] = False
                self.touching[:, i] = False
            else:
                self._kill(rng, int(i))
        # 5. collisions (onsets are events; approaching pairs get an elastic response)
        pres = self.present
        d = self.pos[None, :, :] - self.pos[:, None, :]
        dist = np.hypot(d[..., 0], d[..., 1])
        touch = (dist < (r[:, None] + r[None, :])) & pres[:, None] & pres[None, :]
        touch &= self.layer[:, None] == self.layer[None, :]
        np.fill_diagonal(touch, False)
        onset = touch & ~self.touching
        self.touching = touch
        ii, jj = np.nonzero(np.triu(touch))
        if len(ii):
            onset_pairs = set(zip(*np.nonzero(np.triu(onset))))
            veff = self.effective_velocity()
            movable = self.moving & (mot != 4)
            for i, j in zip(ii, jj):
                i, j = int(i), int(j)
                if (i, j) in onset_pairs:
                    a, b = (i, j) if self.tid[i] < self.tid[j] else (j, i)
                    ev.append(self._event("collides", a, other=int(self.tid[b]), other_class=CLASSES[self.cls[b]]))
                nrm = d[i, j] / max(dist[i, j], 1e-9)
                rel = float((veff[i] - veff[j]) @ nrm)
                if rel <= 0:
                    continue
                if movable[i] and movable[j]:
                    self.vel[i] -= rel * nrm
                    self.vel[j] += rel * nrm
                elif movable[i]:
                    self.vel[i] -= 2 * float(self.vel[i] @ nrm) * nrm
                elif movable[j]:
                    self.vel[j] -= 2 * float(self.vel[j] @ nrm) * nrm
        return ev

    def _kill(self, rng: np.random.Generator, i: int) -> None:
        self.alive[i] = False
        self.away[i] = False
        self.timer[i] = int(rng.integers(int(1 * self.fps), int(6 * self.fps) + 1))
        self.touching[i, :] = False
        self.touching[:, i] = False

    def _reenter(self, rng: np.random.Generator, i: int) -> None:
        self.away[i] = False
        r = self.r[i]
        speed = float(np.hypot(*self.vel[i]))
        edge = int(rng.integers(4))
        along = rng.uniform(r, ARENA - r)
        inward = rng.uniform(-0.6, 0.6)
        if edge == 0:  # left
            self.pos[i] = -r + 1, along
            ang = inward
        elif edge == 1:  # right
            self.pos[i] = ARENA + r - 1, along
            ang = np.pi + inward
        elif edge == 2:  # top
            self.pos[i] = along, -r + 1
            ang = np.pi / 2 + inward
        else:
            self.pos[i] = along, ARENA + r - 1
            ang = -np.pi / 2 + inward
        self.vel[i] = speed * np.cos(ang), speed * np.sin(ang)
        self.moving[i] = True
