"""OpenCV's pretrained HOG people detector with a training-free memory aggregation.

OpenCV ships a linear SVM over HOG descriptors for standing people
(``cv2.HOGDescriptor_getDefaultPeopleDetector()``, Dalal & Triggs, a 64x128 window), so this
adapter detects people in real videos with nothing to download and nothing to train.

Per frame (:meth:`HOGDetectionPipeline.step`):

1. **Proposals** (:meth:`HOGPeopleDetector.propose`): ``detectMultiScale`` with a permissive
   ``hitThreshold`` (``proposal_threshold``, -1.5: far more windows than a detector would keep),
   no grouping, then greedy NMS of the windows at ``proposal_nms_iou`` and the top
   ``max_proposals`` -> windows ``(K, 4)`` xyxy and SVM scores ``(K,)`` (the signed margin).
2. **Features** (:meth:`HOGPeopleDetector.features`): each window is cropped (reflect-padded
   at the borders), resized to 64x128 and described by the same HOG (3780 values); the
   descriptor is centred (its own mean subtracted) and L2-normalised -> ``(K, 3780)``.
   Centring matters: raw HOG values are all positive, so raw cosines of unrelated windows
   sit around 0.7-0.9 and say little.
3. **Aggregation** (training-free, nothing is learned for it): two banks of features of past
   frames, both :class:`~streammem.memory.FeatureBank` (bounded, random replacement, a fresh
   random key set per read, as in MAMBA):

   - the *positive* bank holds the features of confident detections (raw SVM score
     ``>= write_score``, at most ``max_positive_writes`` per frame, after NMS);
   - the *negative* bank holds features of rejected windows of the same frames (raw score
     ``< negative_max_score`` and IoU < 0.1 with every confident detection; the
     ``negative_writes`` lowest-scoring per frame).

   Each proposal attends to each bank with GEO's attention and identity projections
   (``Wq = Wk = I``, raw keys as values, one head): ``A = softmax(q K^T / tau)``,
   ``support(q, K) = <q, A K>`` (the attention-weighted cosine to the bank). Its score becomes

       ``score = svm_score + beta * (support(q, K_pos) - support(q, K_neg))``

   i.e. the SVM margin plus a nonparametric vote of this stream's own past: a window that
   looks more like the people HOG was sure of in earlier frames than like this video's
   background is raised, and one that looks like the background is lowered. While either bank
   is empty the SVM score is kept. Reads happen before the frame's writes (causal).
4. **Detections**: windows are shrunk to the person inside them (``box_shrink``: the training
   windows hold a ~96-pixel person in 128 rows, ~40 of 64 columns), class-agnostic NMS at
   ``nms_iou``, and everything with ``score >= score_threshold`` is returned as
   ``sv.Detections`` (``confidence`` is the re-scored margin, ``data["hog_score"]`` the raw
   SVM margin, ``data["support"]`` the memory term).

With ``memory="dual"`` one :class:`~streammem.memory.DualMemory` replaces both banks and its
static/dynamic split carries the same meaning: rejected windows (background, static scene
structure) go to its persistent, compressed part, confident people (dynamic) to its
transient FIFO of the last frames; reads split the two by ``Tokens.extras["part"]``. With ``memory="none"``
the pipeline is HOG alone at the same thresholds.

Defaults are ours, not from a paper: ``tau=0.1`` and the write rules from a sweep on the
photo test bed of :mod:`streammem.eval.hog` (a person silhouette textured with the astronaut
photo, pasted on skimage photos), ``beta=2`` so that the re-scoring loses nothing against HOG
alone on clean frames at any number of detections (AP50 of the whole ranking; see
:class:`HOGConfig`), ``max_side=1280`` from a speed / recall sweep. Appearance is all the memory
compares; a window's position is not used.

Example:
    >>> import numpy as np
    >>> from streammem.types import field_checker, Frame
    >>> pipe = HOGDetectionPipeline()
    >>> det = pipe.step(Frame(index=0, timestamp=0.0, image=np.full((160, 120, 3), 128, np.uint8)))
    >>> len(det), pipe.stats()["frames"]
    (0, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import supervision as sv
import torch

from streammem.models.detector import box_iou, nms
from streammem.models.hog import WINDOW, HOGPeopleDetector, support
from streammem.pipelines.detection.base import DetectionHead
from streammem.types import Frame, Tokens, field_checker

__all__ = ["HOGConfig", "HOGDetectionPipeline", "HOG_MEMORIES", "WindowScores"]

HOG_MEMORIES = ("feature_bank", "dual", "none")


@dataclass
class HOGConfig:
    """Hyper-parameters of the HOG adapter and its aggregation (see the module docstring).

    Attributes:
        memory: ``"feature_bank"`` (two FeatureBanks), ``"dual"`` (one DualMemory) or ``"none"``.
        mode: ``"causal"`` (step / run) or ``"protocol"`` (MAMBA's shuffled whole-video
            protocol, :meth:`HOGDetectionPipeline.run_protocol`).
        proposal_threshold: ``hitThreshold`` of ``detectMultiScale`` (SVM margin of proposals).
        win_stride: window stride in pixels.
        padding: ``detectMultiScale`` padding in pixels.
        scale: pyramid scale step (> 1).
        max_proposals: windows kept per frame after proposal NMS.
        proposal_nms_iou: IoU of the proposal NMS (windows).
        nms_iou: IoU of the final NMS (person boxes).
        score_threshold: detections below this (re-scored) margin are dropped.
        write_score: raw SVM margin from which a detection is written as a positive.
        max_positive_writes: positives written per frame (best first).
        negative_writes: negatives written per frame (lowest score first).
        negative_max_score: a window is a negative only below this raw margin.
        max_size / key_size: FeatureBank size and key-set size (per bank).
        tau: softmax temperature of the attention (cosine units).
        beta: weight of the memory term (2). Chosen on the photo test bed of
            :mod:`streammem.eval.hog` (8 skimage photos, 2 walking people, 3-frame bursts of
            StreamWorld's corruptions): AP50 of the whole ranking on clean frames is 79.8 for HOG
            alone, 81.3 / 80.5 / 78.1 / 74.9 at beta 1 / 2 / 4 / 8, so from 4 up the memory costs
            clean-frame quality (it lifts background that resembles the stream's people above
            true people elsewhere); at 2 it loses nothing on clean frames and gains on every
            corruption (noise +7.9, jpeg +13.2, occluder +4.0, defocus +3.3, low light +2.6,
            motion blur +1.3 AP50).
        box_shrink: (width, height) factors from a detection window to the person box.
        max_side: the working size: a frame whose longer side exceeds it is downscaled to it
            (speed), a smaller one is processed at its native size (a frame too small for one
            64x128 window is upscaled to fit it); None always keeps the native size. Default
            1280: the detector finds people ~96 px tall in its 128-px window and none much
            smaller, so every downscale loses the smallest people. Measured by
            ``python -m streammem.eval.hog --sizes-only`` (photo frames, people 70-240 px tall,
            one CPU thread): on 1280x720, recall 0.20 / 0.27 / 0.40 / 0.50 / 0.67 at 480 / 640 /
            800 / 960 / 1280 (= native), 0.06 / 0.14 / 0.23 / 0.26 / 0.71 s per frame; on
            1920x1080, 0.35 at 1280 (0.84 s) against 0.68 native (1.85 s). 1280 keeps 720p and
            768x576 footage native and halves 1080p's cost, losing its people under ~140 px;
            pass None (``--hog-size 0``) to keep them.
        warmup: protocol mode's warm-up frames.
        dual_slots / dual_fifo_frames: DualMemory sizes.
        seed: seed of the memories.
    """

    memory: str = "feature_bank"
    mode: str = "causal"
    proposal_threshold: float = -1.5
    win_stride: int = 8
    padding: int = 16
    scale: float = 1.05
    max_proposals: int = 60
    proposal_nms_iou: float = 0.7
    nms_iou: float = 0.45
    score_threshold: float = 0.0
    write_score: float = 0.5
    max_positive_writes: int = 4
    negative_writes: int = 16
    negative_max_score: float = 0.0
    max_size: int = 1000
    key_size: int = 256
    tau: float = 0.1
    beta: float = 2.0
    box_shrink: tuple[float, float] = (0.62, 0.78)
    max_side: int | None = 1280
    warmup: int = 25
    dual_slots: int = 512
    dual_fifo_frames: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        need = field_checker(self)

        need(self.memory in HOG_MEMORIES, "memory", f"one of {HOG_MEMORIES}")
        need(self.mode in ("causal", "protocol"), "mode", "'causal' or 'protocol'")
        need(isinstance(self.win_stride, int) and self.win_stride >= 1, "win_stride", "an int >= 1")
        need(isinstance(self.padding, int) and self.padding >= 0, "padding", "an int >= 0")
        need(self.scale > 1.0, "scale", "> 1")
        need(isinstance(self.max_proposals, int) and self.max_proposals >= 1, "max_proposals", "an int >= 1")
        need(0.0 < self.proposal_nms_iou <= 1.0, "proposal_nms_iou", "in (0, 1]")
        need(0.0 < self.nms_iou <= 1.0, "nms_iou", "in (0, 1]")
        need(self.write_score >= self.proposal_threshold, "write_score", ">= proposal_threshold")
        need(isinstance(self.max_positive_writes, int) and self.max_positive_writes >= 1, "max_positive_writes",
             "an int >= 1")
        need(isinstance(self.negative_writes, int) and self.negative_writes >= 0, "negative_writes", "an int >= 0")
        need(isinstance(self.max_size, int) and self.max_size >= 1, "max_size", "an int >= 1")
        need(isinstance(self.key_size, int) and 1 <= self.key_size <= self.max_size, "key_size",
             "an int in [1, max_size]")
        need(self.tau > 0, "tau", "> 0")
        need(self.beta >= 0, "beta", ">= 0")
        need(len(self.box_shrink) == 2 and all(0 < f <= 1 for f in self.box_shrink), "box_shrink",
             "two factors in (0, 1]")
        need(self.max_side is None or self.max_side >= WINDOW[1], "max_side", f"None or >= {WINDOW[1]}")
        need(self.warmup >= 0, "warmup", ">= 0")



@dataclass
class WindowScores:
    """One frame's windows before NMS: person boxes ``(K, 4)`` xyxy in frame pixels, raw SVM
    margins ``(K,)``, memory evidence ``support(q, K_pos) - support(q, K_neg)`` ``(K,)`` (0
    while a bank is empty) and the frame's working scale (working pixels per frame pixel)."""

    boxes: np.ndarray
    raw: np.ndarray
    evidence: np.ndarray
    scale: float

    def memory_term(self, beta: float) -> np.ndarray:
        """``beta * evidence`` ``(K,)`` float32."""
        return (beta * self.evidence).astype(np.float32)


class HOGDetectionPipeline(DetectionHead):
    """HOG proposals + memory re-scoring -> ``sv.Detections`` per frame.

    The same streaming API as :class:`~streammem.pipelines.detection.StreamingDetectionPipeline`:
    :meth:`step` (causal), :meth:`run`, :meth:`run_protocol`, :meth:`reset`, :meth:`stats`.

    State (explicit, cleared by :meth:`reset`): ``positive_memory`` and ``negative_memory``
    (FeatureBanks; the same DualMemory for ``memory="dual"``; None for ``"none"``), the key
    generator and the counters. Features do not depend on the frame size (crops are resized to
    the window), so a change of resolution needs no reset.

    Args:
        detector: a :class:`HOGPeopleDetector` (default: built from ``config``).
        config: a :class:`HOGConfig`.
        tracker: optional object with ``update(sv.Detections)`` and ``reset()``.
    """

    def __init__(self, detector: HOGPeopleDetector | None = None, config: HOGConfig | None = None,
                 tracker=None) -> None:
        self.config = c = config or HOGConfig()
        self.detector = detector or HOGPeopleDetector.from_config(c)
        self.tracker = tracker
        self.class_names = list(self.detector.class_names)
        dim = self.detector.dim
        self.positive_memory = self.negative_memory = None
        if c.memory == "feature_bank":
            from streammem.memory import FeatureBank

            self.positive_memory = FeatureBank(dim=dim, max_size=c.max_size, key_size=c.key_size, seed=c.seed)
            self.negative_memory = FeatureBank(dim=dim, max_size=c.max_size, key_size=c.key_size, seed=c.seed + 1)
        elif c.memory == "dual":
            from streammem.memory import DualMemory

            per_frame = c.max_positive_writes + c.negative_writes
            self.positive_memory = self.negative_memory = DualMemory(
                dim=dim, slots=c.dual_slots, fifo_frames=c.dual_fifo_frames, max_tokens_per_frame=per_frame,
                seed=c.seed)
        self.gen = torch.Generator()
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the memories and counters; reseed key sampling."""
        for m in {id(m): m for m in (self.positive_memory, self.negative_memory) if m is not None}.values():
            m.reset()
        if self.tracker is not None:
            self.tracker.reset()
        self.gen.manual_seed(self.config.seed + 2)
        self.counters = {"frames": 0, "proposals": 0, "positive_writes": 0, "negative_writes": 0, "rescued": 0}

    def memories(self) -> dict:
        """The distinct memories by role (empty for ``memory="none"``)."""
        if self.positive_memory is None:
            return {}
        if self.positive_memory is self.negative_memory:
            return {"dual_memory": self.positive_memory}
        return {"positive_memory": self.positive_memory, "negative_memory": self.negative_memory}

    def stats(self) -> dict:
        out: dict = dict(self.counters)
        for name, m in self.memories().items():
            out[name] = {"num_tokens": m.num_tokens, "capacity": m.capacity, "nbytes": m.nbytes}
        out["mode"] = self.config.mode
        out["memory"] = self.config.memory
        out["detector"] = "hog"
        return out

    # ------------------------------------------------------------------ memory access
    def _keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key sets ``(Np, D)`` and ``(Nn, D)`` of positives and negatives."""
        empty = torch.zeros(0, self.detector.dim)
        c = self.config
        if self.positive_memory is None:
            return empty, empty
        if self.positive_memory is self.negative_memory:
            m = self.positive_memory
            if m.num_tokens == 0:
                return empty, empty
            toks = m.read()
            # DualMemory tags parts by level: 0 persistent (negatives), 1 transient (positives).
            part = toks.extras["part"]  # DualMemory: 1 transient (people), 0 persistent (background)
            pos, neg = toks.features[part == 1], toks.features[part == 0]
            out = []
            for f in (pos, neg):
                if f.shape[0] > c.key_size:
                    f = f[torch.randperm(f.shape[0], generator=self.gen)[: c.key_size]]
                out.append(f)
            return out[0], out[1]
        return tuple(m.read().features if m.num_tokens else empty
                     for m in (self.positive_memory, self.negative_memory))  # type: ignore[return-value]

    def _write(self, feats: np.ndarray, boxes: np.ndarray, raw: np.ndarray, frame: Frame) -> None:
        c = self.config
        if self.positive_memory is None or len(boxes) == 0:
            return
        b, s = torch.from_numpy(boxes), torch.from_numpy(raw)
        order = nms(b, s, c.nms_iou)
        pos = order[s[order] >= c.write_score][: c.max_positive_writes]
        ok = s < c.negative_max_score
        if len(pos):
            ok &= box_iou(b, b[pos]).max(1).values < 0.1
        neg = torch.nonzero(ok).flatten()
        neg = neg[torch.argsort(s[neg])][: c.negative_writes]

        def tokens(idx: torch.Tensor, static: float) -> Tokens:
            """Bank entries: score = the raw SVM margin, extras["static"] = DualMemory's routing."""
            n = len(idx)
            centre = torch.stack([(b[idx, 1] + b[idx, 3]) / 2, (b[idx, 0] + b[idx, 2]) / 2], 1)
            return Tokens(features=torch.from_numpy(feats[idx.numpy()]), frame_index=torch.full((n,), frame.index),
                          timestamp=torch.full((n,), float(frame.timestamp)), grid=centre,
                          level=torch.zeros(n, dtype=torch.int64), score=s[idx],
                          extras={"static": torch.full((n,), static)})

        if self.positive_memory is self.negative_memory:  # dual: negatives static, people dynamic
            both = Tokens.cat([tokens(pos, 0.0), tokens(neg, 1.0)])
            if len(both):
                self.positive_memory.write(both)
        else:
            if len(pos):
                self.positive_memory.write(tokens(pos, 1.0))
            if len(neg):
                self.negative_memory.write(tokens(neg, 1.0))
        self.counters["positive_writes"] += len(pos)
        self.counters["negative_writes"] += len(neg)

    # ------------------------------------------------------------------ one frame
    def working_image(self, frame: Frame) -> tuple[np.ndarray, float]:
        """The frame at the working size (``max_side``, see :class:`HOGConfig`) and its scale
        (working pixels per frame pixel)."""
        h, w = frame.height, frame.width
        s = 1.0
        if self.config.max_side is not None and max(h, w) > self.config.max_side:
            s = self.config.max_side / max(h, w)
        if h * s < WINDOW[1] or w * s < WINDOW[0]:  # too small for one window: upscale
            s = max(WINDOW[1] / h, WINDOW[0] / w)
        if s == 1.0:
            return frame.image, 1.0
        size = (max(1, round(w * s)), max(1, round(h * s)))
        return cv2.resize(frame.image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR), s

    @torch.no_grad()
    def window_scores(self, frame: Frame, write: bool = True) -> WindowScores:
        """Steps 1-3 and 5 of the module docstring for one frame: proposals, their raw SVM
        margins, the memory evidence (read before this frame's writes), then the writes.

        Returns a :class:`WindowScores` whose ``score(beta)`` is the re-scored margin; the
        pipeline uses ``beta = config.beta`` (0 on a frame the gate calls clean)."""
        c = self.config
        img, scale = self.working_image(frame)
        windows, raw = self.detector.propose(img)
        with_memory = self.positive_memory is not None
        feats = self.detector.features(img, windows) if with_memory else np.zeros((len(windows), 0), np.float32)
        self.counters["frames"] += 1
        self.counters["proposals"] += len(windows)
        kpos, kneg = self._keys()
        evidence = torch.zeros(len(windows))
        if with_memory and kpos.shape[0] and kneg.shape[0]:
            q = torch.from_numpy(feats)
            evidence = support(q, kpos, c.tau) - support(q, kneg, c.tau)
        boxes = self._shrink(windows)
        if write and with_memory:
            self._write(feats, boxes, raw, frame)
        xyxy = boxes / scale
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, frame.width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, frame.height)
        return WindowScores(boxes=xyxy.astype(np.float32).reshape(-1, 4), raw=raw.astype(np.float32),
                            evidence=evidence.numpy().astype(np.float32), scale=scale)

    @torch.no_grad()
    def _process(self, frame: Frame, write: bool = True) -> sv.Detections:
        c = self.config
        # 1. check the frame; 2.-3. proposals, raw margins, memory evidence (and the writes)
        if frame.height == 0 or frame.width == 0:
            return self._empty(frame)
        ws = self.window_scores(frame, write=write)
        raw = torch.from_numpy(ws.raw)
        mem = torch.from_numpy(ws.memory_term(c.beta))
        score = raw + mem
        # 4. NMS, threshold
        keep = nms(torch.from_numpy(ws.boxes), score, c.nms_iou) if len(ws.boxes) else torch.zeros(0, dtype=torch.long)
        keep = keep[score[keep] >= c.score_threshold]
        self.counters["rescued"] += int((raw[keep] < c.score_threshold).sum())
        # 5. detections in frame pixels
        k = keep.numpy()
        n = len(k)
        return sv.Detections(
            xyxy=ws.boxes[k].reshape(-1, 4), confidence=score[keep].numpy().astype(np.float32),
            class_id=np.zeros(n, int),
            data={"class_name": np.array(["person"] * n, dtype=str).reshape(-1),
                  "hog_score": ws.raw[k].astype(np.float32), "support": mem[keep].numpy().astype(np.float32)},
            metadata={"frame_index": frame.index, "mode": self._mode_label()})

    def _shrink(self, windows: np.ndarray) -> np.ndarray:
        fw, fh = self.config.box_shrink
        cx, cy = (windows[:, 0] + windows[:, 2]) / 2, (windows[:, 1] + windows[:, 3]) / 2
        w, h = (windows[:, 2] - windows[:, 0]) * fw, (windows[:, 3] - windows[:, 1]) * fh
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32).reshape(-1, 4)
