"""HFDetectionPipeline: a ``transformers`` detector (``hf:<model id or folder>``) with memory
aggregation, one ``sv.Detections`` per frame (the model: :mod:`streammem.models.hf_detector`).

Per frame (:meth:`HFDetectionPipeline.step`):

1. the model's candidates: boxes with score ``> candidate_threshold``, the best
   ``max_detections`` of them, with per-box features where the model has them;
2. feature-level aggregation (``memory="feature_bank"`` and a model with per-box features):
   :class:`~streammem.pipelines.detection.rescoring.FeatureRescorer`'s evidence from past
   frames, ``score = clip(s + beta * evidence, 0, 1)``; then this frame's boxes are written
   to its banks (causal: read before write);
3. open-vocabulary models (OWL) score every image patch, so overlapping boxes are merged by a
   class-aware NMS at ``nms_iou``; set-prediction models (DETR, RT-DETR, YOLOS) are used as
   they are;
4. detections with ``score >= score_threshold`` as ``sv.Detections`` in the frame's pixels:
   ``class_id`` the model's label, ``data["class_name"]`` its name (``config.id2label``, or
   ``--classes``), ``data["raw_score"]`` the model's score, ``data["support"]`` the memory term,
   ``data["features"]`` ``(K, D)`` the per-box features (when the model has them).

Track-level re-scoring (:class:`~streammem.pipelines.detection.rescoring.TrackRescorer`) is
the ``tracker`` of this head as of any other; ``streammem detect --detector hf:...`` uses it by
default (``--rescore track``).

Defaults are ours: ``beta=0.25`` and the write rules are HOG's rule brought to probability
scores; they are not calibrated here (no pretrained weights can be fetched where this project
is built), so measure on your footage before relying on them, and ``memory="none"`` gives the
model alone.

Example (a hub model, downloaded on first use; a folder written by ``save_pretrained`` works
the same way)::

    from streammem.pipelines.detection import HFDetectionPipeline, TrackRescorer
    pipe = HFDetectionPipeline.from_pretrained("hf:PekingU/rtdetr_r18vd", tracker=TrackRescorer())
    for det in pipe.run(frames):           # frames: streammem Frame objects
        print(det.xyxy, det.data["class_name"], det.confidence)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import supervision as sv
import torch

from streammem.models.hf import parse_spec
from streammem.models.hf_detector import HFDetector
from streammem.pipelines.base import tensor_json
from streammem.pipelines.detection.base import DetectionHead
from streammem.pipelines.detection.rescoring import FeatureRescorer
from streammem.types import Frame, field_checker

__all__ = ["HFConfig", "HFDetectionPipeline", "HF_MEMORIES"]

HF_MEMORIES = ("feature_bank", "none")


@dataclass
class HFConfig:
    """Attributes:
    memory: ``"feature_bank"`` (feature-level aggregation where the model has per-box
        features) or ``"none"`` (the model alone).
    mode: ``"causal"`` (step / run) or ``"protocol"`` (MAMBA's shuffled whole-video protocol).
    score_threshold: detections below this (re-scored) probability are dropped.
    candidate_threshold: boxes the model passes on (post-processing threshold, ``>``).
    max_detections: candidates kept per frame (best first).
    nms_iou: class-aware NMS of open-vocabulary models' boxes.
    beta: weight of the feature-level memory term.
    write_score / max_positive_writes: confident boxes written per frame (raw score).
    negative_max_score / negative_writes: rejected boxes written per frame (raw score).
    max_size / key_size: each FeatureBank's size and key set per read.
    tau: attention temperature (cosine units).
    warmup: protocol mode's warm-up frames. seed: the banks' seed and the protocol's order.
    """

    memory: str = "feature_bank"
    mode: str = "causal"
    score_threshold: float = 0.3
    candidate_threshold: float = 0.05
    max_detections: int = 100
    nms_iou: float = 0.5
    beta: float = 0.25
    write_score: float = 0.5
    max_positive_writes: int = 8
    negative_max_score: float = 0.1
    negative_writes: int = 16
    max_size: int = 2000
    key_size: int = 256
    tau: float = 0.1
    warmup: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        need = field_checker(self)
        need(self.memory in HF_MEMORIES, "memory", f"one of {HF_MEMORIES}")
        need(self.mode in ("causal", "protocol"), "mode", "'causal' or 'protocol'")
        need(0.0 <= self.score_threshold <= 1.0, "score_threshold", "in [0, 1]")
        need(0.0 <= self.candidate_threshold <= 1.0, "candidate_threshold", "in [0, 1]")
        need(isinstance(self.max_detections, int) and self.max_detections >= 1, "max_detections", "an int >= 1")
        need(0.0 < self.nms_iou <= 1.0, "nms_iou", "in (0, 1]")
        need(self.beta >= 0, "beta", ">= 0")
        need(isinstance(self.max_size, int) and self.max_size >= 1, "max_size", "an int >= 1")
        need(isinstance(self.key_size, int) and 1 <= self.key_size <= self.max_size, "key_size",
             "an int in [1, max_size]")
        need(self.tau > 0, "tau", "> 0")
        need(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "an int >= 0")


class HFDetectionPipeline(DetectionHead):
    """A :class:`~streammem.models.hf_detector.HFDetector` + feature-level memory ->
    ``sv.Detections`` per frame (module docstring).

    The API of the other detection heads: causal :meth:`step` / :meth:`run`, MAMBA's
    :meth:`run_protocol`, :meth:`reset`, :meth:`stats`, records and overlays. State (explicit,
    cleared by :meth:`reset`): ``rescorer`` (its two FeatureBanks; None for ``memory="none"``,
    or until the first frame shows the model has no per-box features) and the counters.
    """

    def __init__(self, detector: HFDetector, config: HFConfig | None = None, tracker=None) -> None:
        self.detector = detector
        self.config = config or HFConfig()
        self.tracker = tracker
        self.class_names = list(detector.class_names)
        self.display_threshold = self.config.score_threshold
        self.rescorer: FeatureRescorer | None = None
        self.reset()

    @classmethod
    def from_pretrained(cls, spec: str, classes: str | Sequence[str] | None = None, config: HFConfig | None = None,
                        tracker=None, device: str | None = None, dtype: str | None = None) -> HFDetectionPipeline:
        """Load ``hf:<model id or folder>`` (the ``hf:`` prefix is optional here) and wrap it."""
        name = parse_spec(spec) or spec
        return cls(HFDetector.from_pretrained(name, classes=classes, device=device, dtype=dtype), config, tracker)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the banks, the tracker and the counters."""
        if self.rescorer is not None:
            self.rescorer.reset()
        if self.tracker is not None:
            self.tracker.reset()
        self.counters = {"frames": 0, "candidates": 0, "positive_writes": 0, "negative_writes": 0, "rescued": 0}

    def _rescorer(self, dim: int) -> FeatureRescorer | None:
        c = self.config
        if c.memory == "none":
            return None
        if self.rescorer is None or self.rescorer.dim != dim:
            self.rescorer = FeatureRescorer(dim, max_size=c.max_size, key_size=c.key_size, tau=c.tau,
                                            write_score=c.write_score, max_positive_writes=c.max_positive_writes,
                                            negative_max_score=c.negative_max_score,
                                            negative_writes=c.negative_writes, seed=c.seed)
        return self.rescorer

    def memories(self) -> dict:
        if self.rescorer is None:
            return {}
        return {"positive_memory": self.rescorer.positive, "negative_memory": self.rescorer.negative}

    def _extra_state(self) -> dict:
        return {"counters": dict(self.counters), "feature_dim": None if self.rescorer is None else self.rescorer.dim,
                **self._tracker_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a snapshot (the banks are built first when the snapshot has them)."""
        if "head.meta" in state:
            dim = (tensor_json(state["head.meta"]).get("extra") or {}).get("feature_dim")
            if dim:
                self._rescorer(int(dim))
        super().load_state_dict(state)

    def stats(self) -> dict:
        out: dict = dict(self.counters)
        for name, m in self.memories().items():
            out[name] = {"num_tokens": m.num_tokens, "capacity": m.capacity, "nbytes": m.nbytes}
        out.update(memory=self.config.memory, mode=self.config.mode, detector=f"hf:{self.detector.name}",
                   model_type=self.detector.model_type)
        return out

    # ------------------------------------------------------------------ one frame
    @torch.no_grad()
    def _process(self, frame: Frame) -> sv.Detections:
        c = self.config
        if frame.height == 0 or frame.width == 0:
            return self._empty(frame)
        # 1. candidates
        boxes = self.detector(frame.image, threshold=c.candidate_threshold)
        top = np.argsort(-boxes.scores, kind="stable")[: c.max_detections]
        xyxy, raw, labels = boxes.boxes[top], boxes.scores[top], boxes.labels[top]
        feats = None if boxes.features is None else boxes.features[top]
        self.counters["frames"] += 1
        self.counters["candidates"] += len(top)
        # 2. feature-level memory: read, re-score, write
        term = np.zeros(len(top), np.float32)
        mem = self._rescorer(feats.shape[1]) if feats is not None else None
        if mem is not None:
            term = (c.beta * mem.evidence(feats)).astype(np.float32)
            p, n = mem.write(feats, raw, frame)
            self.counters["positive_writes"] += p
            self.counters["negative_writes"] += n
        score = np.clip(raw + term, 0.0, 1.0).astype(np.float32)
        names = np.array([self.class_names[i] if 0 <= i < len(self.class_names) else str(i) for i in labels], dtype=str)
        data = {"class_name": names.reshape(-1), "raw_score": raw.astype(np.float32), "support": term}
        if feats is not None:
            data["features"] = feats.astype(np.float32).reshape(len(top), -1)
        d = sv.Detections(xyxy=xyxy.reshape(-1, 4), confidence=score, class_id=labels.astype(int), data=data,
                          metadata={"frame_index": frame.index, "mode": self._mode_label()})
        # 3. NMS of open-vocabulary boxes; 4. threshold
        if self.detector.open_vocabulary and len(d):
            d = d.with_nms(threshold=c.nms_iou, class_agnostic=False)
        d = d[d.confidence >= c.score_threshold]
        self.counters["rescued"] += int((d.data["raw_score"] < c.score_threshold).sum()) if len(d) else 0
        d.metadata = {"frame_index": frame.index, "mode": self._mode_label()}
        return d
