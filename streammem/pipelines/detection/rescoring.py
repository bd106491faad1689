"""Memory re-scoring that works for any detector: track level (boxes only) and feature level
(where the detector gives per-box features).

:class:`TrackRescorer` (box and track level; any head, plugged in as its ``tracker``):

1. each frame's detections are linked to tracks by :class:`~streammem.pipelines.detection.IoUTracker`
   (Hungarian matching, IoU >= ``iou``, same class with ``class_aware``);
2. each track keeps a bounded bank of its last ``history`` raw scores (a deque), and a track
   unseen for more than ``max_lost`` frames is forgotten, so the state is bounded by the
   detections of the last ``max_lost`` frames;
3. a detection with raw score ``s`` whose track has past scores ``H`` (before this frame) gets

       ``s' = (1 - alpha) * s + alpha * mean(H)``

   and one that starts a track keeps ``s``; then ``s`` (raw, so the bank never feeds on its own
   output) joins the track's bank. A weak box on a track that was confident is lifted, a
   confident flicker on a track that was weak is lowered;
4. detections with ``s' < score_threshold`` are dropped (None keeps all). For a weak box to be
   lifted above the threshold at all, the head in front must pass candidates below it: the
   CLI's ``--rescore track`` sets the head's threshold to the detector's candidate threshold
   (``CANDIDATE_THRESHOLDS`` in :mod:`streammem.pipelines.jobs.detect`) and this one to the
   requested threshold.

Defaults (ours, a Seq-NMS-style causal blend, not calibrated on a benchmark): ``alpha=0.5``,
``history=8``, ``iou=0.3``, ``max_lost=8``. The blend is convex, so scores stay in the range
the detector gives (probabilities stay in [0, 1], HOG's SVM margins stay margins).

:class:`FeatureRescorer` (feature level; a detector that gives per-box features ``(K, D)``):
HOG's training-free aggregation (:mod:`streammem.pipelines.detection.hog`) over any features.
Two :class:`~streammem.memory.FeatureBank` s hold the unit-normalised features of past
confident detections (raw score ``>= write_score``, best ``max_positive_writes`` per frame)
and of rejected boxes (raw score ``< negative_max_score``, lowest ``negative_writes`` per
frame); each box's evidence is ``support(q, K_pos) - support(q, K_neg)`` (GEO's attention with
identity projections, one head, temperature ``tau``: the attention-weighted cosine to each
bank), 0 while either bank is empty, read before the frame's writes (causal). The pipeline
adds ``beta * evidence`` to the score.

Example:
    >>> import numpy as np, supervision as sv
    >>> r = TrackRescorer(TrackRescoreConfig(alpha=0.5, score_threshold=0.3))
    >>> box = np.array([[10, 10, 50, 50]], np.float32)
    >>> for s in (0.9, 0.9, 0.2):
    ...     d = r.update(sv.Detections(xyxy=box.copy(), confidence=np.array([s], np.float32), class_id=np.array([0])))
    >>> round(float(d.confidence[0]), 3)   # 0.5 * 0.2 + 0.5 * mean(0.9, 0.9)
    0.55
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import supervision as sv
import torch

from streammem.models.hog import support
from streammem.pipelines.detection.tracking import IoUTracker, history_state, load_history
from streammem.types import Frame, Tokens, field_checker

__all__ = ["RESCORERS", "TrackRescoreConfig", "TrackRescorer", "FeatureRescorer"]

#: ``--rescore`` choices: ``"none"`` (the head's own output) or ``"track"`` (:class:`TrackRescorer`)
RESCORERS = ("none", "track")


@dataclass
class TrackRescoreConfig:
    """Attributes (see the module docstring for the rule):
    alpha: weight of the track's history in the blend, in [0, 1] (0: no change).
    history: raw scores kept per track (>= 1).
    iou: IoU a detection needs to continue a track.
    max_lost: frames a track survives unseen.
    class_aware: tracks link boxes of one class only.
    score_threshold: drop re-scored detections below this (None: keep all).
    """

    alpha: float = 0.5
    history: int = 8
    iou: float = 0.3
    max_lost: int = 8
    class_aware: bool = True
    score_threshold: float | None = None

    def __post_init__(self) -> None:
        need = field_checker(self)
        need(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]")
        need(isinstance(self.history, int) and self.history >= 1, "history", "an int >= 1")
        need(0.0 < self.iou <= 1.0, "iou", "in (0, 1]")
        need(isinstance(self.max_lost, int) and self.max_lost >= 0, "max_lost", "an int >= 0")


class TrackRescorer:
    """Track-level re-scoring from a bounded per-track score bank (module docstring).

    Has the ``tracker`` interface of every detection head (``update(sv.Detections) ->
    sv.Detections``, ``reset()``), so ``SomePipeline(..., tracker=TrackRescorer())`` adds it to
    any of them; the output carries ``tracker_id`` and ``data["raw_score"]`` (the score before
    re-scoring). The input is not changed. State: ``tracker`` (its tracks), ``history``
    (``{track id: (deque of raw scores, last frame seen)}``), the frame counter ``t``.
    """

    def __init__(self, config: TrackRescoreConfig | None = None) -> None:
        self.config = c = config or TrackRescoreConfig()
        self.tracker = IoUTracker(iou=c.iou, max_lost=c.max_lost, class_aware=c.class_aware)
        self.reset()

    def reset(self) -> None:
        self.tracker.reset()
        self.history: dict[int, tuple[deque, int]] = {}
        self.t = 0

    def state(self) -> dict:
        """Its tracks, per-track scores and frame counter, JSON-able (a head snapshot carries it)."""
        return {"tracker": self.tracker.state(), "history": history_state(self.history), "t": self.t}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        self.tracker.load_state(state["tracker"])
        self.history, self.t = load_history(state["history"], self.config.history), int(state["t"])

    def update(self, det: sv.Detections) -> sv.Detections:
        c = self.config
        self.t += 1
        self.history = {k: v for k, v in self.history.items() if self.t - v[1] <= c.max_lost}
        if det.confidence is None or len(det) == 0:
            return det
        out = self.tracker.update(det[np.arange(len(det))])  # a copy: the input keeps its fields
        raw = out.confidence.astype(np.float32)
        score = raw.copy()
        for k, tid in enumerate(out.tracker_id.tolist()):
            past = self.history.get(tid, (deque(maxlen=c.history), 0))[0]
            if past:
                score[k] = (1.0 - c.alpha) * raw[k] + c.alpha * float(np.mean(past))
            past.append(float(raw[k]))
            self.history[tid] = (past, self.t)
        out.confidence = score.astype(np.float32)
        out.data["raw_score"] = raw
        if c.score_threshold is not None:
            out = out[score >= c.score_threshold]
        return out


class FeatureRescorer:
    """Feature-level evidence from two FeatureBanks of past boxes' features (module docstring).

    Args:
        dim: feature width D.
        max_size / key_size: each bank's size and key set per read.
        tau: attention temperature (cosine units).
        write_score / max_positive_writes: confident boxes written per frame.
        negative_max_score / negative_writes: rejected boxes written per frame.
        seed: the banks' seed.
    """

    def __init__(self, dim: int, max_size: int = 2000, key_size: int = 256, tau: float = 0.1,
                 write_score: float = 0.5, max_positive_writes: int = 8, negative_max_score: float = 0.1,
                 negative_writes: int = 16, seed: int = 0) -> None:
        from streammem.memory import FeatureBank

        self.dim, self.tau = dim, tau
        self.write_score, self.max_positive_writes = write_score, max_positive_writes
        self.negative_max_score, self.negative_writes = negative_max_score, negative_writes
        self.positive = FeatureBank(dim=dim, max_size=max_size, key_size=key_size, seed=seed)
        self.negative = FeatureBank(dim=dim, max_size=max_size, key_size=key_size, seed=seed + 1)

    def reset(self) -> None:
        self.positive.reset()
        self.negative.reset()

    @staticmethod
    def _unit(features: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(features, np.float32)), dim=1)

    def evidence(self, features: np.ndarray) -> np.ndarray:
        """``support(q, K_pos) - support(q, K_neg)`` ``(K,)`` float32; zeros while a bank is empty."""
        if not len(features) or not self.positive.num_tokens or not self.negative.num_tokens:
            return np.zeros(len(features), np.float32)
        q = self._unit(features)
        e = support(q, self.positive.read().features, self.tau) - support(q, self.negative.read().features, self.tau)
        return e.numpy().astype(np.float32)

    def write(self, features: np.ndarray, scores: np.ndarray, frame: Frame) -> tuple[int, int]:
        """Write this frame's confident and rejected boxes; returns how many of each."""
        if not len(features):
            return 0, 0
        order = np.argsort(-scores, kind="stable")
        pos = order[scores[order] >= self.write_score][: self.max_positive_writes]
        neg = order[::-1][scores[order[::-1]] < self.negative_max_score][: self.negative_writes]
        q = self._unit(features)
        for bank, idx in ((self.positive, pos), (self.negative, neg)):
            if len(idx):
                n = len(idx)
                bank.write(Tokens(features=q[torch.from_numpy(idx)], frame_index=torch.full((n,), frame.index),
                                  timestamp=torch.full((n,), float(frame.timestamp)), grid=torch.zeros(n, 2),
                                  level=torch.ones(n, dtype=torch.int64),
                                  score=torch.from_numpy(scores[idx].astype(np.float32))))
        return len(pos), len(neg)
