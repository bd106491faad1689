"""StreamWorld: endless, seeded video streams from real photographs, with exact ground truth.

Example:
    >>> w = World(seed=0, preset="clean", size=64, frames=3)
    >>> frames = list(w)
    >>> len(frames), frames[0].image.shape, sorted(frames[0].info["gt"])[:3]
    (3, (64, 64, 3), ['boxes', 'camera', 'class_id'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import cv2
import numpy as np

from ..types import Frame
from .corruptions import LEVELS, Corruptor
from .objects import CLASSES, MOTIONS, SPEED_BUCKETS, ObjectSim, speed_bucket, sprite
from .scene import (
    POS_UNIT,
    CameraController,
    CameraState,
    Scene,
    action_name,
    action_vector,
    focal,
    intrinsics,
    plane_to_image,
)

__all__ = ["World", "Preset", "PRESETS", "Simulator", "SimFrame", "open_world"]


@dataclass(frozen=True)
class Preset:
    """Scene difficulty and corruption level of a preset."""

    n_objects: int
    n_foliage: int
    pan_speed: float  # world px per second, typical camera pan
    loop_prob: float  # chance that a new camera segment is a loop
    speed_mix: tuple[float, float, float]  # slow / medium / fast shares
    colour_rate: float  # colour changes per object per second
    vanish_rate: float  # disappearances per object per second
    corruption: str


PRESETS: dict[str, Preset] = {
    "clean": Preset(16, 6, 40.0, 0.25, (0.4, 0.4, 0.2), 1 / 30, 1 / 120, "clean"),
    "medium": Preset(24, 12, 60.0, 0.25, (0.3, 0.4, 0.3), 1 / 25, 1 / 90, "medium"),
    "hard": Preset(34, 20, 90.0, 0.25, (0.2, 0.4, 0.4), 1 / 20, 1 / 60, "hard"),
}


@dataclass
class SimFrame:
    """State of the simulation after one step (no pixels)."""

    index: int
    timestamp: float
    cam: CameraState
    delta: tuple[int, int, int, int]
    segment: str
    events: list[dict]


class Simulator:
    """Camera and objects of one world, stepped one frame at a time, without rendering.

    It is cheap (no pixels), so question generation runs its own Simulator over the whole
    stream. ``objects`` holds the live object arrays after each step; ``in_view`` marks the
    slots whose centre projects inside the image.
    """

    def __init__(self, seed: int, preset: Preset, size_hw: tuple[int, int], fps: float):
        self.size_hw = size_hw
        self.fps = fps
        self.cam_ctl = CameraController(np.random.default_rng([seed, 1]), fps, preset.pan_speed, preset.loop_prob)
        self.rng = np.random.default_rng([seed, 2])
        self.objects = ObjectSim(
            self.rng, preset.n_objects, fps, preset.speed_mix, preset.colour_rate, preset.vanish_rate
        )
        self.in_view = np.zeros(preset.n_objects, bool)
        self.index = -1

    def project(self) -> tuple[np.ndarray, float]:
        """Image positions (n, 2) of the object centres and the ground scale (px per world px)."""
        cam = self.cam_ctl.state
        m = plane_to_image(cam, self.size_hw, 0.0)
        return self.objects.pos @ m[:, :2].T + m[:, 2], focal(self.size_hw) / cam.dist

    def step(self) -> SimFrame:
        self.index += 1
        t = self.index / self.fps
        delta, segment = self.cam_ctl.step()
        ob = self.objects
        events = ob.step(self.rng, focus=self.in_view)
        uv, _ = self.project()
        h, w = self.size_hw
        now = ob.present & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        gone = {e["track_id"] for e in events if e["type"] in ("disappears", "exits_scene")}
        came = {e["track_id"] for e in events if e["type"] == "appears"}
        for i in np.nonzero(now != self.in_view)[0]:
            tid = int(ob.tid[i])
            if now[i] and tid not in came:
                events.append(ob._event("enters", int(i), x=float(uv[i, 0]), y=float(uv[i, 1])))
            elif not now[i] and self.in_view[i] and tid not in gone:
                events.append(ob._event("leaves", int(i), x=float(uv[i, 0]), y=float(uv[i, 1])))
        slot = {int(v): i for i, v in enumerate(ob.tid)}
        for e in events:
            e["time"] = t
            e["frame"] = self.index
            i = slot.get(e["track_id"])
            if e["type"] in ("disappears", "exits_scene", "leaves"):
                e["in_view"] = bool(self.in_view[i]) if i is not None else False
            else:
                e["in_view"] = bool(now[i]) if i is not None else False
        self.in_view = now
        return SimFrame(self.index, t, CameraState(*self.cam_ctl.state.key()), delta, segment, events)


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        hw = (int(size), int(size))
    else:
        hw = tuple(int(v) for v in size)
    if len(hw) != 2 or min(hw) < 16:
        raise ValueError(f"size must be an int or (H, W) of at least 16 px, got {size!r}")
    return hw  # type: ignore[return-value]


class World:
    """An iterable, seeded stream of :class:`~streammem.types.Frame` with exact ground truth.

    Args:
        seed: everything (canvas, camera path, objects, corruptions) follows from it.
        preset: ``"clean"``, ``"medium"`` or ``"hard"``: object density and speed, foliage,
            camera speed, and the corruption level.
        size: output side (int) or ``(H, W)``.
        fps: frames per second; timestamps are ``index / fps``.
        seconds / frames: length; endless when neither is given.
        corruption: override the preset's corruption level (``"clean"`` turns them off);
            corruptions change pixels, never ground truth.
        drop_frames: when False, ``drop`` bursts are ignored so every index is delivered.
        start: first index to deliver; earlier frames are simulated without rendering (cheap),
            so clips from late in a stream cost little.
        debug: also put ``info["id_mask"]``, an int32 ``(H, W)`` map of the track id drawn at
            each pixel (0 for background and foliage), before corruptions.

    Each frame has ``pose`` (camera-to-world 4x4; the ground is the plane z = 0 in canvas
    pixels, the camera looks along +z), ``action`` (float32 (13,), the relative motion that led
    to this frame, layout :data:`~streammem.world.scene.ACTION_LAYOUT`), and
    ``info["gt"]``, a dict with, for the N objects with at least one pixel in the image:

    - ``boxes``: float32 (N, 4) xyxy in output pixels; the object's whole silhouette (occluded
      parts included) clipped to the image; ``x1, y1`` are exclusive (a box ``[2, 3, 5, 7]``
      covers columns 2..4 and rows 3..6).
    - ``class_id``: int64 (N,) index into :data:`CLASSES`; ``class_name``: list of N str.
    - ``track_id``: int64 (N,), unique over the stream (a respawned slot gets a new id).
    - ``visible``: float32 (N,), drawn unoccluded pixels in the image / all silhouette pixels
      (off-image parts and parts hidden by other objects or foliage count as not visible).
    - ``speed``: list of N "slow" / "medium" / "fast" (ImageNet VID motion-IoU buckets, from the
      object's own current speed); ``velocity``: float32 (N, 2) own image motion, px per frame.
    - ``colour``: list of N colour names ("natural" for photo sprites); ``motion``: list of N
      motion kinds.
    - ``dynamic_mask``: bool (H, W), pixels of objects moving at this frame.
    - ``events``: list of dicts (``type``, ``track_id``, ``class_name``, ``colour``, ``time``,
      ``frame``, ``in_view``: whether the object's centre was in the image then, and per type
      ``from``/``to`` colours, ``other`` id, ``x``/``y`` image position). Types:
      appears, disappears, enters, leaves (the view; by the object's centre), changes_colour,
      collides, stops, starts, exits_scene, returns. Events of dropped frames are delivered
      with the next delivered frame (their ``frame`` field keeps their own index).
    - ``corruptions``: names applied to this frame's pixels.
    - ``camera``: dict with ``K`` (3x3 intrinsics), ``segment`` (hold, walk,
      ``loop_out:<k>``, ``loop_back:<k>``), ``action_name``, ``state`` (integer x, y, zoom,
      roll: equal states render equal backgrounds).
    """

    def __init__(
        self,
        seed: int = 0,
        preset: str = "medium",
        size: int | tuple[int, int] = 256,
        fps: float = 8.0,
        seconds: float | None = None,
        frames: int | None = None,
        corruption: str | None = None,
        drop_frames: bool = True,
        debug: bool = False,
        start: int = 0,
    ):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if corruption is not None and corruption not in LEVELS:
            raise ValueError(f"corruption must be one of {sorted(LEVELS)}, got {corruption!r}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if seconds is not None and frames is not None:
            raise ValueError("give seconds or frames, not both")
        if frames is not None and frames < 0:
            raise ValueError(f"frames must be >= 0, got {frames}")
        if seconds is not None and seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self.seed = int(seed)
        self.preset = preset
        self.params = PRESETS[preset]
        self.size_hw = _parse_size(size)
        self.size = size if isinstance(size, (int, np.integer)) else self.size_hw
        self.fps = float(fps)
        self.num_frames = int(frames) if frames is not None else (None if seconds is None else int(round(seconds * fps)))
        self.corruption = corruption or self.params.corruption
        self.drop_frames = drop_frames
        self.debug = debug
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start = int(start)
        self._scene: Scene | None = None

    def __repr__(self) -> str:
        return (f"World(seed={self.seed}, preset={self.preset!r}, size={self.size!r}, fps={self.fps}, "
                f"frames={self.num_frames}, corruption={self.corruption!r})")

    @property
    def scene(self) -> Scene:
        if self._scene is None:
            self._scene = _cached_scene(self.seed, self.params.n_foliage)
        return self._scene

    def simulator(self) -> Simulator:
        """A fresh pixel-free simulation of this world (the same as iteration uses)."""
        return Simulator(self.seed, self.params, self.size_hw, self.fps)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Frame]:
        sim = self.simulator()
        corr = Corruptor(self.seed, self.corruption, self.size_hw, self.fps)
        k = intrinsics(self.size_hw)
        prev_img: np.ndarray | None = None
        pending: list[dict] = []
        n = self.num_frames
        while n is None or sim.index + 1 < n:
            before = CameraState(*sim.cam_ctl.state.key())
            sf = sim.step()
            names = corr.step()
            if sf.index < self.start:
                continue
            if "drop" in names and self.drop_frames:
                pending.extend(sf.events)
                continue
            names = [c for c in names if c != "drop"]
            img, gt, id_mask = self._render(sim)
            motion = self._image_motion(sf)
            if "duplicate" in names and prev_img is not None:
                out = prev_img
                names = ["duplicate"]
            else:
                names = [c for c in names if c != "duplicate"]
                out = corr.filter(img, names, motion) if names else img
            prev_img = out
            gt["events"] = pending + sf.events if pending else sf.events
            pending = []
            gt["corruptions"] = names
            gt["camera"] = {
                "K": k,
                "segment": sf.segment,
                "action_name": action_name(sf.delta),
                "state": sf.cam.key(),
            }
            info: dict[str, Any] = {"gt": gt, "source": "world", "preset": self.preset, "seed": self.seed}
            if self.debug:
                info["id_mask"] = id_mask
            yield Frame(
                index=sf.index,
                timestamp=sf.timestamp,
                image=out,
                pose=sf.cam.pose(),
                action=action_vector(sf.delta, before),
                info=info,
            )

    def _image_motion(self, sf: SimFrame) -> tuple[float, float]:
        m = plane_to_image(sf.cam, self.size_hw, 0.0)
        d = -(m[:, :2] @ np.array([sf.delta[0], sf.delta[1]], float)) / POS_UNIT
        return float(d[0]), float(d[1])

    # ------------------------------------------------------------------ rendering
    def _render(self, sim: Simulator) -> tuple[np.ndarray, dict, np.ndarray]:
        h, w = self.size_hw
        cam = sim.cam_ctl.state
        ob = sim.objects
        img = self.scene.render_ground(cam, self.size_hw)
        lab = np.zeros((h, w), np.uint8)  # 1 + position in `slots` of the object drawn at each pixel
        m = plane_to_image(cam, self.size_hw, 0.0)
        lin = m[:, :2]
        scale = focal(self.size_hw) / cam.dist
        uv = ob.pos @ lin.T + m[:, 2]
        present = ob.present
        cand = np.nonzero(
            present
            & (uv[:, 0] + ob.r * scale * 1.5 > 0) & (uv[:, 0] - ob.r * scale * 1.5 < w)
            & (uv[:, 1] + ob.r * scale * 1.5 > 0) & (uv[:, 1] - ob.r * scale * 1.5 < h)
        )[0]
        order = sorted(cand.tolist(), key=lambda i: (ob.layer[i], ob.tid[i]))
        slots, boxes, areas = [], [], []
        for i in order:
            spr = sprite(CLASSES[ob.cls[i]], ob.colour_name(i))
            sh, sw = spr.shape[:2]
            k = 2.0 * ob.r[i] / max(sh, sw)  # world px per sprite px
            # sprite px -> world -> image
            a = lin * k
            t = uv[i] - a @ np.array([(sw - 1) / 2, (sh - 1) / 2])
            corners = np.array([[0, 0], [sw - 1, 0], [0, sh - 1], [sw - 1, sh - 1]], float) @ a.T + t
            x0, y0 = np.floor(corners.min(0)).astype(int) - 1
            x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                continue
            aff = np.hstack([a, (t - [x0, y0])[:, None]])
            warped = cv2.warpAffine(spr, aff, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            mask = warped[..., 3] >= 128
            full = int(np.count_nonzero(mask))
            if full == 0:
                continue
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            sub = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            rows = np.nonzero(sub.any(1))[0]
            if len(rows) == 0:
                continue
            cols = np.nonzero(sub.any(0))[0]
            np.copyto(img[cy0:cy1, cx0:cx1], warped[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, :3], where=sub[..., None])
            if len(slots) >= 255:
                break
            slots.append(i)
            lab[cy0:cy1, cx0:cx1][sub] = len(slots)
            boxes.append((cx0 + cols[0], cy0 + rows[0], cx0 + cols[-1] + 1, cy0 + rows[-1] + 1))
            areas.append(full)
        fg = self.scene.render_foreground(cam, self.size_hw)
        if fg is not None:
            fm = fg[..., 3] > 0
            np.copyto(img, fg[..., :3], where=fm[..., None])
            lab[fm] = 0
        sl = np.array(slots, np.int64)
        tids = ob.tid[sl] if len(sl) else np.zeros(0, np.int64)
        if len(sl):
            vis_px = np.bincount(lab.ravel(), minlength=len(sl) + 1)[1:]
            visible = (vis_px / np.array(areas, np.float64)).astype(np.float32)
        else:
            visible = np.zeros(0, np.float32)
        veff = ob.effective_velocity()[sl] if len(sl) else np.zeros((0, 2))
        speed = np.hypot(veff[:, 0], veff[:, 1])
        buckets = speed_bucket(speed, ob.r[sl]) if len(sl) else np.zeros(0, np.int64)
        dyn = np.concatenate([[False], speed > 0])[lab]
        ids = np.concatenate([[0], tids]).astype(np.int32)[lab] if self.debug else None
        gt = {
            "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "class_id": ob.cls[sl].astype(np.int64),
            "class_name": [CLASSES[c] for c in ob.cls[sl]],
            "track_id": tids.astype(np.int64),
            "visible": visible,
            "speed": [SPEED_BUCKETS[b] for b in buckets],
            "velocity": (veff @ lin.T / self.fps).astype(np.float32).reshape(-1, 2),
            "colour": [ob.colour_name(i) for i in slots],
            "motion": [MOTIONS[ob.motion[i]] for i in slots],
            "dynamic_mask": dyn,
        }
        return img, gt, ids

    # ------------------------------------------------------------------ questions
    def questions(self, **kw) -> list[dict]:
        """OVBench-shaped questions for this world; see :func:`streammem.world.questions.generate`."""
        from .questions import generate

        return generate(self, **kw)


_SCENES: dict[tuple[int, int], Scene] = {}


def _cached_scene(seed: int, n_foliage: int) -> Scene:
    key = (seed, n_foliage)
    if key not in _SCENES:
        if len(_SCENES) >= 4:
            _SCENES.pop(next(iter(_SCENES)))
        _SCENES[key] = Scene(seed, n_foliage)
    return _SCENES[key]


_SPEC_TYPES = {"seed": int, "preset": str, "fps": float, "size": int, "seconds": float, "frames": int,
               "corruption": str, "drop_frames": bool, "debug": bool}


def open_world(spec: str) -> World:
    """Build a World from ``"seed=3,preset=hard,fps=8,size=256,seconds=60"``.

    Keys are optional; ``size`` may be ``256`` or ``HxW`` (e.g. ``192x256``). Unknown keys and
    badly typed values raise ValueError naming the key.
    """
    kw: dict[str, Any] = {}
    spec = spec.strip()
    if spec.startswith("world:"):
        spec = spec[len("world:"):]
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ValueError(f"world spec entries must be key=value, got {part!r} in {spec!r}")
        key, val = (s.strip() for s in part.split("=", 1))
        if key not in _SPEC_TYPES:
            raise ValueError(f"unknown world spec key {key!r}; known keys: {', '.join(_SPEC_TYPES)}")
        typ = _SPEC_TYPES[key]
        try:
            if key == "size" and "x" in val.lower():
                hh, ww = val.lower().split("x")
                kw[key] = (int(hh), int(ww))
            elif typ is bool:
                if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(val)
                kw[key] = val.lower() in ("1", "true", "yes")
            elif typ is int:
                kw[key] = int(float(val)) if float(val).is_integer() else int(val)
            else:
                kw[key] = typ(val)
        except ValueError:
            raise ValueError(f"world spec key {key!r} needs a {typ.__name__}, got {val!r}") from None
    return World(**kw)


def world_source(spec: str) -> tuple[World, dict]:
    """The opener of ``world:`` URIs for :func:`streammem.io.open_source`: the World of ``spec``
    (:func:`open_world`) and the facts its :class:`~streammem.io.SourceInfo` reports."""
    world = open_world(spec)
    h, w = world.size_hw
    return world, {"kind": "world", "backend": "streamworld", "width": w, "height": h, "fps": world.fps,
                   "num_frames": world.num_frames, "codec": "procedural"}
