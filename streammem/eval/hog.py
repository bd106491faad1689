"""HOG people detector on a test bed of real photographs: working size (speed against recall)
and the memory re-scoring on clean and degraded frames.

The test bed (:func:`person_clip`): skimage photographs (StreamWorld's own photo set, resized
to the frame) as backgrounds, with standing-person silhouettes (head, torso, arms, legs; see
:func:`person_mask`) textured with the astronaut photo's pixels walking across them. Every
pixel outside the silhouettes is a real photo; the silhouette outline is drawn because
skimage has no full-body pedestrian photo and OpenCV's people detector is trained on full
bodies. StreamWorld's own ``person`` sprite is the astronaut's head and shoulders in an
ellipse (``streammem.world.objects``), which is not what this detector looks for.

Degraded frames use StreamWorld's own filters (:func:`~streammem.world.corruptions.corrupt_once`:
motion blur, defocus, noise, low light, occluder, jpeg) at a fixed intensity, in bursts of
consecutive frames; the ground truth is the pasted boxes (unchanged by corruptions).

- :func:`size_sweep`: recall at IoU 0.5 (HOG alone, margin >= 0) and time per frame for each
  ``max_side`` on large frames with people of given heights.
- :func:`rescoring_sweep`: AP50 (supervision) of the re-scored ranking over all windows
  (``score_threshold`` far below any margin, so AP compares rankings at every number of
  detections), separately on clean frames and on each corruption's frames, for HOG alone and
  the memory at each ``beta``. One causal pass per clip records each window's raw margin
  and memory evidence (:meth:`~streammem.pipelines.detection.HOGDetectionPipeline.window_scores`);
  every ``beta`` is scored from that record (the writes depend on raw margins only, so the
  memories are the same for every ``beta``).

    python -m streammem.eval.hog                 # both tables (docs/results/detection.md)
    python -m streammem.eval.hog --sizes-only --frame-size 1920x1080

Example:
    >>> frames, boxes, kinds = person_clip("brick", n=3, bursts=())
    >>> len(frames), boxes[0].shape, kinds
    (3, (2, 4), ['none', 'none', 'none'])
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import supervision as sv
import torch
from supervision.detection.utils.iou_and_nms import box_iou_batch

from streammem.models.detector import nms
from streammem.types import Frame

__all__ = ["PHOTOS", "DEGRADATIONS", "person_mask", "paste_person", "person_clip", "size_sweep", "rescoring_sweep",
           "clip_ap50"]

#: Backgrounds (skimage photos, as StreamWorld loads them).
PHOTOS = ("brick", "chelsea", "coffee", "rocket", "astronaut", "camera", "grass", "gravel")
#: The pixel corruptions of StreamWorld that the re-scoring sweep applies.
DEGRADATIONS = ("motion_blur", "defocus", "noise", "low_light", "occluder", "jpeg")


def person_mask(h: int) -> np.ndarray:
    """A standing person's silhouette, ``h`` pixels tall, as a uint8 mask ``(h, ~0.46 h)``."""
    w = int(0.46 * h) | 1
    m = np.zeros((h, w), np.uint8)
    cx, u = w / 2, h / 100.0

    def poly(pts):
        return np.array([[int(cx + x * u), int(y * u)] for x, y in pts], np.int32)

    cv2.ellipse(m, (int(cx), int(7 * u)), (max(2, int(5 * u)), max(2, int(6.5 * u))), 0, 0, 360, 255, -1)
    cv2.fillPoly(m, [poly([(-2.5, 12), (2.5, 12), (2.5, 16), (-2.5, 16)])], 255)
    cv2.fillPoly(m, [poly([(-11, 16), (11, 16), (12, 20), (9, 52), (-9, 52), (-12, 20)])], 255)
    for s in (-1, 1):
        cv2.fillPoly(m, [poly([(s * 11, 16), (s * 15.5, 21), (s * 17, 50), (s * 13.5, 51), (s * 11.5, 26)])], 255)
        cv2.fillPoly(m, [poly([(s * 1.0, 50), (s * 9, 50), (s * 9.5, 96), (s * 3.5, 96)])], 255)
        cv2.fillPoly(m, [poly([(s * 2.5, 95), (s * 10.5, 95), (s * 12, 99.5), (s * 2.5, 99.5)])], 255)
    return m


def paste_person(img: np.ndarray, h: int, x: int, y: int) -> tuple[int, int, int, int]:
    """Paste a person ``h`` tall at top-left ``(x, y)`` into ``img`` (in place); returns its box
    xyxy. The texture: dark clothes modulated by the astronaut photo's luminance, a skin-toned
    head."""
    from skimage import data

    m = person_mask(h)
    hh, ww = m.shape
    ast = data.astronaut()[180:480, 120:380].astype(np.float32)
    lum = cv2.resize(ast, (ww, hh)).mean(-1, keepdims=True) / 255.0
    rows = np.arange(hh)[:, None, None]
    tex = np.where(rows < hh // 2, np.float32([40, 50, 90]), np.float32([60, 55, 50])) * (0.6 + 0.8 * lum)
    tex[: int(0.12 * hh)] = np.float32([200, 160, 130]) * (0.8 + 0.4 * lum[: int(0.12 * hh)])
    a = (cv2.GaussianBlur(m, (3, 3), 0) / 255.0)[..., None]
    roi = img[y:y + hh, x:x + ww].astype(np.float32)
    img[y:y + hh, x:x + ww] = (roi * (1 - a) + tex.clip(0, 255) * a).astype(np.uint8)
    return x, y, x + ww, y + hh


def _photo(name: str, size_hw: tuple[int, int]) -> np.ndarray:
    from streammem.world.scene import load_photo

    img = load_photo(name)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return cv2.resize(img, size_hw[::-1], interpolation=cv2.INTER_AREA if img.shape[0] > size_hw[0]
                      else cv2.INTER_LINEAR)


def person_clip(photo: str, size_hw: tuple[int, int] = (360, 480), heights: tuple[int, ...] = (150, 110),
                n: int = 20, bursts: tuple[tuple[int, int, str], ...] = ((5, 8, "noise"),),
                intensity: float = 0.8, seed: int = 0) -> tuple[list[Frame], list[np.ndarray], list[str]]:
    """``n`` frames of people (one per height) walking across ``photo``.

    Person ``i`` walks right (even ``i``) or left, ``3 + 2 i`` pixels per frame, standing on a
    row near the bottom; a burst ``(first, stop, kind)`` applies ``corrupt_once(kind,
    intensity)`` to frames ``first..stop-1`` (one seed per burst: the same occluder and blur
    direction throughout it). Returns the frames, the ground-truth boxes per frame ``(P, 4)``
    float32 xyxy, and each frame's corruption (``"none"`` when clean).
    """
    from streammem.world.corruptions import corrupt_once

    h, w = size_hw
    base = _photo(photo, size_hw)
    rng = np.random.default_rng(seed)
    starts = [int(rng.integers(0, max(1, w // 3))) for _ in heights]
    frames, boxes, kinds = [], [], []
    for t in range(n):
        img = base.copy()
        b = []
        for i, ph in enumerate(heights):
            pw = int(0.46 * ph) | 1
            span = max(1, w - pw)
            pos = (starts[i] + (3 + 2 * i) * t) % (2 * span)
            x = pos if pos < span else 2 * span - pos  # bounce at the borders
            if i % 2:
                x = span - x
            y = h - 4 - ph - (i * 6)
            b.append(paste_person(img, ph, int(x), max(0, y)))
        kind = "none"
        for k, (first, stop, name) in enumerate(bursts):
            if first <= t < stop:
                img = corrupt_once(img, name, intensity, seed=seed * 100 + k)
                kind = name
        frames.append(Frame(index=t, timestamp=t / 8, image=img))
        boxes.append(np.float32(b).reshape(-1, 4))
        kinds.append(kind)
    return frames, boxes, kinds


def _dets(boxes: np.ndarray, score: np.ndarray, nms_iou: float) -> sv.Detections:
    if len(boxes) == 0:
        return sv.Detections.empty()
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(score), nms_iou).numpy()
    return sv.Detections(xyxy=boxes[keep], confidence=score[keep], class_id=np.zeros(len(keep), int))


def clip_ap50(preds: list[sv.Detections], gts: list[np.ndarray]) -> float:
    """AP50 in percent (supervision's MeanAveragePrecision), one class."""
    from streammem.eval.detection import ap50

    return ap50(preds, [sv.Detections(xyxy=g, class_id=np.zeros(len(g), int)) for g in gts])


def size_sweep(max_sides=(480, 640, 800, 960, 1280, None), size_hw=(720, 1280), heights=(70, 90, 120, 160, 240),
               photos=PHOTOS[:4], n: int = 3) -> list[dict]:
    """Recall (IoU >= 0.5, HOG alone at margin >= 0) and median seconds per frame for each
    ``max_side`` on ``size_hw`` frames of ``photos`` with one person of each height."""
    from streammem.pipelines.detection import HOGConfig, HOGDetectionPipeline

    clips = [person_clip(p, size_hw, heights, n=n, bursts=(), seed=s) for s, p in enumerate(photos)]
    rows = []
    for ms in max_sides:
        pipe = HOGDetectionPipeline(config=HOGConfig(memory="none", max_side=ms))
        found = np.zeros(len(heights))
        total = 0
        times = []
        for frames, boxes, _ in clips:
            for f, b in zip(frames, boxes):
                t0 = time.perf_counter()
                d = pipe.step(f)
                times.append(time.perf_counter() - t0)
                total += 1
                if len(d):
                    found += box_iou_batch(b, d.xyxy).max(1) >= 0.5
        rows.append({"max_side": ms, "recall": float(found.sum() / (total * len(heights))),
                     "recall_by_height": dict(zip(heights, (found / total).round(3).tolist())),
                     "s_per_frame": float(np.median(times))})
    return rows


def record(pipe, frames: list[Frame]) -> list:
    """One causal pass: each frame's :class:`WindowScores` (reads before writes)."""
    pipe.reset()
    return [pipe.window_scores(f) for f in frames]


def rescoring_sweep(betas=(0.0, 1.0, 2.0, 4.0, 8.0), photos=PHOTOS, size_hw=(360, 480), n: int = 24,
                    intensity: float = 0.8, memory: str = "feature_bank") -> dict:
    """AP50 by frame kind (``"none"``: clean; each degradation) for each ``beta`` (0 is HOG alone).

    Clip ``i`` (photo ``photos[i]``) has three 3-frame bursts, at frames 6, 12 and 18, of
    degradations ``i``, ``i + 1``, ``i + 2`` (cyclic over :data:`DEGRADATIONS`); frames 0-5 hold
    no degradation so the memory starts from clean frames, as a stream usually does.
    Returns ``{beta: {kind: AP50}}`` and ``"frames": {kind: count}``.
    """
    from streammem.pipelines.detection import HOGConfig, HOGDetectionPipeline

    cfg = HOGConfig(memory=memory)
    pipe = HOGDetectionPipeline(config=cfg)
    per_kind: dict = {b: {} for b in betas}
    gts: dict = {}
    for i, photo in enumerate(photos):
        kinds3 = [DEGRADATIONS[(i + j) % len(DEGRADATIONS)] for j in range(3)]
        bursts = tuple((6 + 6 * j, 9 + 6 * j, k) for j, k in enumerate(kinds3))
        frames, boxes, kinds = person_clip(photo, size_hw, n=n, bursts=bursts, intensity=intensity, seed=i)
        rec = record(pipe, frames)
        for ws, g, k in zip(rec, boxes, kinds):
            gts.setdefault(k, []).append(g)
            for b in betas:
                per_kind[b].setdefault(k, []).append(_dets(ws.boxes, ws.raw + ws.memory_term(b), cfg.nms_iou))
    out = {b: {k: clip_ap50(p, gts[k]) for k, p in per_kind[b].items()} for b in betas}
    out["frames"] = {k: len(v) for k, v in gts.items()}
    return out


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-only", action="store_true")
    ap.add_argument("--rescoring-only", action="store_true")
    ap.add_argument("--memory", default="feature_bank")
    ap.add_argument("--frame-size", default="1280x720", help="size sweep: frame WxH")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.rescoring_only:
        print("| max_side | recall (IoU 0.5) | recall by person height (px) | s / frame |\n|---|---:|---|---:|")
        w, h = (int(v) for v in args.frame_size.split("x"))
        for r in size_sweep(size_hw=(h, w)):
            print(f"| {r['max_side'] or 'native'} | {r['recall']:.2f} | "
                  + ", ".join(f"{h}: {v:.2f}" for h, v in r["recall_by_height"].items())
                  + f" | {r['s_per_frame']:.3f} |")
    if not args.sizes_only:
        res = rescoring_sweep(memory=args.memory)
        kinds = ["none", *DEGRADATIONS]
        nf = res.pop("frames")
        print("| beta | " + " | ".join(f"{'clean' if k == 'none' else k} ({nf.get(k, 0)})" for k in kinds) + " |")
        print("|---|" + "---:|" * len(kinds))
        for b, row in res.items():
            print(f"| {b:g}{' (HOG alone)' if b == 0 else ''} | "
                  + " | ".join(f"{row.get(k, float('nan')):.1f}" for k in kinds) + " |")


if __name__ == "__main__":
    _main()
