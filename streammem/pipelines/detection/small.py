"""StreamingDetectionPipeline: MAMBA-style memory-bank aggregation on a stream of frames.

Per frame (MAMBA's ``test_frame``, causal by default):

1. check the frame (an empty image gives no detections; a resolution change resets the
   memories or raises, per ``on_resize``), resize its long side to ``image_size``, pad to a
   multiple of 8;
2. backbone features ``F``; with a ``fusion_radius`` detector in causal mode, fuse ``F`` with
   the previous frame's fused map (the *temporal state*, one ``C x h/8 x w/8`` map; not in
   MAMBA, see :class:`~streammem.models.fusion.LocalFusion`); read a pixel key set from the pixel memory and enhance ``F`` with
   the pixel-level GEO (an empty memory: the frame's own pixels);
3. proposals (top-K peaks) -> fc6 RoI features; read an instance key set from the instance
   memory (empty: the frame's own top proposals) -> GEO -> fc7 -> GEO -> class + box;
4. write: pixel level, pre-enhancement features inside detections scoring >= 0.8 (<= 100
   random pixels per box); instance level, pre-enhancement fc6 of the top-75 proposals;
5. return ``supervision.Detections`` (boxes in the frame's pixels, ``confidence``,
   ``class_id``, ``data["class_name"]``; ``metadata`` has the frame index and the mode).

Modes:

- ``"causal"`` (default): frames in stream order, only past frames in memory.
- ``"protocol"``: **MAMBA's published test protocol, not causal**: the frames of a video are
  processed in a shuffled order after a warm-up of 25 frames of the same video, and memory is
  reset per video. Use :meth:`StreamingDetectionPipeline.run_protocol` with the whole video;
  :meth:`step` refuses in this mode.

Memories: ``memory="feature_bank"`` (MAMBA's bank, :class:`~streammem.memory.FeatureBank`),
``"dual"`` (:class:`~streammem.memory.DualMemory`, for comparison), or ``"none"`` (the
single-frame detector: keys are the frame's own features).

Departures from MAMBA, named:

- the pixel bank stores *pre-enhancement* features (MAMBA: enhanced), as in our training;
  the pixel key set has ``detector.pixel_keys`` (256) entries, not 2000, and there is no
  per-frame side buffer of 0.5-0.8 boxes and high-norm pixels;
- instance writes skip proposals with objectness below ``instance_min_objectness`` (0.05), so
  a stream without objects does not fill the bank with background (MAMBA writes all 75);
- pixel writes are capped at ``max_pixel_tokens`` per frame (1000);
- with a ``geo_pos`` detector (:class:`~streammem.models.detector.SmallDetector`), each
  instance key also carries its box centre (``Tokens.grid``) and age (now minus
  ``Tokens.timestamp``), and the GEOs add a learned geometry prior to their attention logits
  (a proposal attends more to keys at its own place in recent frames); the frame's own keys
  have age 0;
- the instance bank stores each key's projections for the two instance-level GEOs
  (:meth:`~streammem.models.detector.SmallDetector.key_cache`, 4 x fc_dim wide) instead of
  the raw fc6 feature: the same result (tested), with the key projections done once at write
  time instead of for every key at every read.

DualMemory routing (ours): an instance token's static score is ``1 - objectness`` (object-like
proposals go to the transient FIFO of recent frames, background to the persistent store);
pixel tokens come from confident detections, so they are dynamic (score 0). Reads take a
random key set of the bank's size from everything DualMemory returns.

Example:
    >>> from streammem.models.detector import SmallDetector
    >>> from streammem.world import World
    >>> det = SmallDetector(width=16, fc_dim=32, heads=4, pixel_heads=4).eval()
    >>> pipe = StreamingDetectionPipeline(det, DetectionConfig(image_size=64))
    >>> outs = [pipe.step(f) for f in World(seed=0, preset="clean", size=64, frames=3)]
    >>> len(outs), pipe.stats()["frames"]
    (3, 3)
"""

from __future__ import annotations

import cv2
import numpy as np
import supervision as sv
import torch
import torch.nn.functional as F

from streammem.memory import SupportsRows
from streammem.models.detector import STRIDE, SmallDetector
from streammem.pipelines.detection.base import DetectionHead
from streammem.pipelines.detection.config import DetectionConfig
from streammem.types import Frame, Tokens

__all__ = ["StreamingDetectionPipeline", "load_default_detection"]


class StreamingDetectionPipeline(DetectionHead):
    """Detector + memories + GEO -> ``sv.Detections`` per frame (see the module docstring).

    State (explicit, reset by :meth:`reset`): ``pixel_memory``, ``instance_memory`` (None for
    ``memory="none"``), ``state`` (the previous frame's fused map for a temporal-fusion
    detector, else None), ``size_hw`` (the stream's resolution), counters in :meth:`stats`.
    """

    def __init__(self, detector: SmallDetector, config: DetectionConfig | None = None, tracker=None,
                 display_threshold: float = 0.3) -> None:
        self.detector = detector.eval()
        self.display_threshold = display_threshold
        self.config = config or DetectionConfig()
        self.tracker = tracker
        c = self.config
        self.pixel_key_size = c.pixel_key_size or detector.pixel_keys
        self.bank_proposals = c.bank_proposals or detector.bank_proposals
        self.pixel_memory = self._make_memory(detector.width, self.pixel_key_size, c.max_pixel_tokens, seed=c.seed)
        # the instance bank stores each key's GEO projections (detector.key_cache), 4 x fc_dim wide
        self.instance_dim = 4 * detector.fc_dim
        # the temporal fusion state is kept only for a fusion detector in causal mode with a memory
        self.stateful = (bool(detector.fusion_radius) and c.temporal_state and c.mode == "causal"
                         and c.memory != "none")
        self.instance_memory = self._make_memory(self.instance_dim, c.key_size, self.bank_proposals, seed=c.seed + 1,
                                                 recent=c.recent_keys)
        self.gen = torch.Generator()
        self.reset()

    def _make_memory(self, dim: int, key_size: int, per_frame: int, seed: int, recent: int = 0):
        c = self.config
        if c.memory == "none":
            return None
        if c.memory == "feature_bank":
            from streammem.memory import FeatureBank

            key_size = min(key_size, c.max_size)
            return FeatureBank(dim=dim, max_size=c.max_size, key_size=key_size, seed=seed, recent=min(recent, key_size))
        from streammem.memory import DualMemory

        return DualMemory(dim=dim, slots=c.dual_slots, fifo_frames=c.dual_fifo_frames, max_tokens_per_frame=per_frame,
                          seed=seed)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the memories and the stream's resolution; reseed pixel sampling."""
        for m in (self.pixel_memory, self.instance_memory):
            if m is not None:
                m.reset()
        if self.tracker is not None:
            self.tracker.reset()
        self.gen.manual_seed(self.config.seed + 2)
        self.rng = np.random.default_rng(self.config.seed + 2)  # pixel sampling inside boxes
        self.size_hw: tuple[int, int] | None = None
        self.state: torch.Tensor | None = None  # the previous frame's fused map (temporal fusion)
        self.counters = {"frames": 0, "pixel_writes": 0, "instance_writes": 0, "resets_on_resize": 0}

    def memories(self) -> dict:
        return {name: m for name, m in (("pixel_memory", self.pixel_memory), ("instance_memory", self.instance_memory))
                if m is not None}

    def _extra_state(self) -> dict:
        out = super()._extra_state()
        out["size_hw"] = None if self.size_hw is None else list(self.size_hw)
        out["rng"] = self.rng.bit_generator.state
        if self.state is not None:
            out["temporal_state"] = self.state
        return out

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.size_hw = None if extra["size_hw"] is None else tuple(extra["size_hw"])
        self.rng.bit_generator.state = extra["rng"]
        self.state = extra.get("temporal_state")

    def stats(self) -> dict:
        out = dict(self.counters)
        for name, m in (("pixel_memory", self.pixel_memory), ("instance_memory", self.instance_memory)):
            if m is not None:
                out[name] = {"num_tokens": m.num_tokens, "capacity": m.capacity, "nbytes": m.nbytes}
        if self.state is not None:
            out["temporal_state"] = {"shape": list(self.state.shape), "nbytes": self.state.numel() * self.state.element_size()}
        out["mode"] = self.config.mode
        out["memory"] = self.config.memory
        return out

    # ------------------------------------------------------------------ memory access
    def _read(self, memory, key_size: int) -> Tokens | None:
        """A key set of at most ``key_size`` tokens, or None when the memory is off or empty."""
        if memory is None or memory.num_tokens == 0:
            return None
        if isinstance(memory, SupportsRows):  # DualMemory holds more than a key set: draw one
            n = memory.num_tokens
            rows = torch.randperm(n, generator=self.gen)[:key_size] if n > key_size else torch.arange(n)
            return memory.read_rows(rows)
        return memory.read()

    def _write_pixels(self, feat: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, scale: float,
                      frame: Frame) -> None:
        c = self.config
        if self.pixel_memory is None or not c.pixel_level:
            return
        sel = scores >= c.pixel_write_score
        if not bool(sel.any()):
            return
        _, ch, h, w = feat.shape
        # cell ranges of the confident boxes; <= pixels_per_box random cells of each (all when fewer)
        b = (boxes[sel] * scale).numpy()
        s = scores[sel].numpy()
        x0 = (b[:, 0] // STRIDE).astype(np.int64).clip(0, w - 1)
        y0 = (b[:, 1] // STRIDE).astype(np.int64).clip(0, h - 1)
        x1 = np.minimum(w, np.maximum(x0 + 1, np.ceil(b[:, 2] / STRIDE).astype(np.int64)))
        y1 = np.minimum(h, np.maximum(y0 + 1, np.ceil(b[:, 3] / STRIDE).astype(np.int64)))
        bw, n = x1 - x0, (x1 - x0) * (y1 - y0)
        ys, xs, sc, total = [], [], [], 0
        for i in range(len(b)):
            cells = np.arange(n[i]) if n[i] <= c.pixels_per_box else self.rng.choice(n[i], c.pixels_per_box, replace=False)
            ys.append(y0[i] + cells // bw[i])
            xs.append(x0[i] + cells % bw[i])
            sc.append(np.full(len(cells), s[i], np.float32))
            total += len(cells)
            if total >= c.max_pixel_tokens:
                break
        ys_t = torch.from_numpy(np.concatenate(ys)[: c.max_pixel_tokens])
        xs_t = torch.from_numpy(np.concatenate(xs)[: c.max_pixel_tokens])
        sc_t = torch.from_numpy(np.concatenate(sc)[: c.max_pixel_tokens])
        f = torch.index_select(feat[0].reshape(ch, h * w), 1, ys_t * w + xs_t).t().contiguous()
        n_tok = f.shape[0]
        # DualMemory routes by a static score (object pixels are dynamic); the bank keeps confidence
        tag = {"extras": {"static": torch.zeros(n_tok)}} if c.memory == "dual" else {"score": sc_t}
        self.pixel_memory.write(Tokens(features=f, frame_index=torch.full((n_tok,), frame.index),
                                       timestamp=torch.full((n_tok,), float(frame.timestamp)),
                                       grid=torch.stack([ys_t, xs_t], 1).float(),
                                       level=torch.zeros(n_tok, dtype=torch.int64), **tag))
        self.counters["pixel_writes"] += n_tok

    def _write_instances(self, fc6: torch.Tensor, props: torch.Tensor, obj: torch.Tensor, frame: Frame) -> None:
        c = self.config
        if self.instance_memory is None or not c.instance_level:
            return
        k = self.bank_proposals
        keep = obj[:k] >= c.instance_min_objectness
        f, p, o = fc6[:k][keep], props[:k][keep], obj[:k][keep]
        n = f.shape[0]
        if n == 0:
            return
        centre = self.detector.box_centres(p)[:, [1, 0]] / STRIDE  # (row, col) cells
        # DualMemory routes background (low objectness) to its static store; the bank keeps objectness
        tag = {"extras": {"static": 1.0 - o}} if c.memory == "dual" else {"score": o}
        self.instance_memory.write(Tokens(features=self.detector.key_cache(f).contiguous(),
                                          frame_index=torch.full((n,), frame.index),
                                          timestamp=torch.full((n,), float(frame.timestamp)), grid=centre,
                                          level=torch.zeros(n, dtype=torch.int64), **tag))
        self.counters["instance_writes"] += n

    # ------------------------------------------------------------------ one frame
    def _prepare(self, frame: Frame) -> tuple[torch.Tensor, float]:
        h, w = frame.height, frame.width
        scale = self.config.image_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = frame.image if (nh, nw) == (h, w) else cv2.resize(frame.image, (nw, nh), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)[None]
        ph, pw = (-nh) % STRIDE, (-nw) % STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.45)
        return x, scale

    @torch.no_grad()
    def _process(self, frame: Frame, write: bool = True) -> sv.Detections:
        c, det = self.config, self.detector
        # 1. check the frame
        if frame.height == 0 or frame.width == 0:
            return self._empty(frame)
        if self.size_hw is not None and self.size_hw != (frame.height, frame.width):
            if c.on_resize == "error":
                raise ValueError(
                    f"frame {frame.index} is {frame.height}x{frame.width} but the stream started at "
                    f"{self.size_hw[0]}x{self.size_hw[1]}; call reset() first or use on_resize='reset'")
            self.reset_memories()
            self.counters["resets_on_resize"] += 1
        self.size_hw = (frame.height, frame.width)
        x, scale = self._prepare(frame)
        # 2. features, pixel-level enhancement
        feat = det.features(x)
        fused = det.fuse(feat, self.state) if self.stateful else feat
        pk = self._read(self.pixel_memory if c.pixel_level else None, self.pixel_key_size)
        enh = det.enhance_pixels(fused, feat.new_zeros(0, det.width) if pk is None else pk.features)
        # 3. proposals, fc6, instance-level enhancement, head
        props, obj = det.propose(enh)
        fc6 = det.roi_fc6(enh, props)
        ik = self._read(self.instance_memory if c.instance_level else None, c.key_size)
        if ik is None:  # the frame's own top proposals, age 0
            cache = det.key_cache(fc6[: self.bank_proposals])
            places = det.own_key_places(props) if det.geo_pos else None
        else:  # bank keys: their box centres (stored as (row, col) cells) and ages in seconds
            cache = ik.features
            places = (ik.grid[:, [1, 0]] * STRIDE, (float(frame.timestamp) - ik.timestamp).float()) if det.geo_pos else None
        bias = None if places is None else det.position_bias(props, *places)
        logits, deltas = det.head_cached(fc6, cache, bias)
        out = det.postprocess(props, logits, deltas, tuple(x.shape[2:]), c.score_threshold)
        # 4. memory writes
        if write:
            self._write_pixels(feat, out["boxes"] / scale, out["scores"], scale, frame)
            self._write_instances(fc6, props, obj, frame)
            if self.stateful:
                self.state = fused
        self.counters["frames"] += 1
        # 5. detections in frame pixels
        boxes = (out["boxes"] / scale).numpy().astype(np.float32)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, frame.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, frame.height)
        cls = out["class_id"].numpy().astype(int)
        names = np.array([det.class_names[i] for i in cls], dtype=object).astype(str) if len(cls) else np.zeros(0, str)
        return sv.Detections(xyxy=boxes.reshape(-1, 4), confidence=out["scores"].numpy().astype(np.float32),
                             class_id=cls, data={"class_name": names},
                             metadata={"frame_index": frame.index, "mode": self._mode_label()})

    def reset_memories(self) -> None:
        for m in (self.pixel_memory, self.instance_memory):
            if m is not None:
                m.reset()
        self.state = None


def load_default_detection(config: DetectionConfig | None = None, display_threshold: float = 0.3,
                           **fields) -> StreamingDetectionPipeline:
    """The shipped small detector (``streammem/checkpoints/detector``) in a
    :class:`StreamingDetectionPipeline` built from ``config`` or from ``DetectionConfig`` fields."""
    from streammem.checkpoints import path

    if config is not None and fields:
        raise TypeError("pass either a DetectionConfig or its fields, not both")
    det = SmallDetector.from_pretrained(str(path("detector"))).eval()
    return StreamingDetectionPipeline(det, config or DetectionConfig(**fields), display_threshold=display_threshold)
