"""Box-level temporal baselines for detection: an IoU tracker and a track score smoother.

They are what memory aggregation is compared against in ``streammem eval detection``: the
single-frame detector's boxes, linked over frames and re-scored, without any feature memory.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import supervision as sv

__all__ = ["IoUTracker", "TrackScoreSmoother", "history_state", "load_history"]


def history_state(history: dict[int, tuple[deque, int]]) -> list:
    """Per-track score histories ``{id: (deque of scores, last frame)}`` as JSON-able lists."""
    return [[k, [float(v) for v in scores], last] for k, (scores, last) in history.items()]


def load_history(rows: list, length: int) -> dict[int, tuple[deque, int]]:
    """The inverse of :func:`history_state` (deques of at most ``length`` scores)."""
    return {int(k): (deque((float(v) for v in scores), maxlen=length), int(last)) for k, scores, last in rows}


class IoUTracker:
    """A small IoU tracker giving ``tracker_id`` (for :class:`TrackScoreSmoother` or
    ``sv.DetectionsSmoother``).

    Not ByteTrack: each frame's detections are matched to the live tracks by the assignment of
    highest total IoU (Hungarian, ``scipy.optimize.linear_sum_assignment``), a match needing
    IoU >= ``iou`` and, with ``class_aware`` (default), the same ``class_id``; unmatched
    detections start tracks; tracks unseen for ``max_lost`` frames are dropped, so the state is
    bounded by the detections of the last ``max_lost`` frames. (The ``trackers`` package's
    ByteTrack needs ``opencv-python``, which would replace our ``opencv-python-headless<5``.)
    """

    def __init__(self, iou: float = 0.3, max_lost: int = 8, class_aware: bool = True) -> None:
        self.iou, self.max_lost, self.class_aware = iou, max_lost, class_aware
        self.reset()

    def reset(self) -> None:
        self.tracks: dict[int, tuple[np.ndarray, int, int]] = {}  # id -> (last box, last frame, class)
        self.next_id, self.t = 1, 0

    def state(self) -> dict:
        """The tracks and counters, JSON-able (a head snapshot carries it)."""
        return {"tracks": [[k, [float(v) for v in box], last, cls] for k, (box, last, cls) in self.tracks.items()],
                "next_id": self.next_id, "t": self.t}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        self.tracks = {int(k): (np.asarray(box, dtype=np.float32), int(last), int(cls))
                       for k, box, last, cls in state["tracks"]}
        self.next_id, self.t = int(state["next_id"]), int(state["t"])

    def update(self, det: sv.Detections) -> sv.Detections:
        from scipy.optimize import linear_sum_assignment
        from supervision.detection.utils.iou_and_nms import box_iou_batch

        self.t += 1
        ids = np.zeros(len(det), dtype=int)
        tids = list(self.tracks)
        cls = det.class_id if det.class_id is not None else np.zeros(len(det), dtype=int)
        if tids and len(det):
            iou = box_iou_batch(det.xyxy, np.stack([self.tracks[i][0] for i in tids]))
            if self.class_aware:
                iou = iou * (cls[:, None] == np.array([self.tracks[i][2] for i in tids])[None])
            for d, j in zip(*linear_sum_assignment(iou, maximize=True)):
                if iou[d, j] >= self.iou:
                    ids[d] = tids[j]
        for d in range(len(det)):
            if ids[d] == 0:
                ids[d] = self.next_id
                self.next_id += 1
            self.tracks[int(ids[d])] = (det.xyxy[d].copy(), self.t, int(cls[d]))
        self.tracks = {k: v for k, v in self.tracks.items() if self.t - v[1] <= self.max_lost}
        det.tracker_id = ids
        return det


class TrackScoreSmoother:
    """Box-level temporal rescoring: each tracked detection's confidence becomes the mean of its
    track's last ``length`` confidences; boxes are left as detected. (``sv.DetectionsSmoother``
    also averages the boxes, which lags moving objects; this is the causal form of the track
    rescoring of Seq-NMS / tubelet methods.) Needs ``tracker_id`` (e.g. from
    :class:`IoUTracker`); detections without one pass unchanged. Tracks unseen for more than
    ``max_lost`` frames (the tracker's default, 8) are forgotten, so the state stays bounded.
    """

    def __init__(self, length: int = 5, max_lost: int = 8) -> None:
        if length < 1 or max_lost < 0:
            raise ValueError(f"TrackScoreSmoother needs length >= 1 and max_lost >= 0, got {length}, {max_lost}")
        self.length, self.max_lost = length, max_lost
        self.reset()

    def reset(self) -> None:
        self.history: dict[int, tuple[deque, int]] = {}  # id -> (last `length` confidences, last frame seen)
        self.t = 0

    def state(self) -> dict:
        """The per-track scores and the frame counter, JSON-able."""
        return {"history": history_state(self.history), "t": self.t}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        self.history, self.t = load_history(state["history"], self.length), int(state["t"])

    def update(self, det: sv.Detections) -> sv.Detections:
        self.t += 1
        self.history = {k: v for k, v in self.history.items() if self.t - v[1] <= self.max_lost}
        if det.tracker_id is None or det.confidence is None or len(det) == 0:
            return det
        conf = det.confidence.astype(np.float32)  # a copy: the input keeps its own scores
        for k, tid in enumerate(det.tracker_id.tolist()):
            past = self.history.get(tid, (deque(maxlen=self.length), 0))[0]
            past.append(float(det.confidence[k]))
            self.history[tid] = (past, self.t)
            conf[k] = float(np.mean(past))
        out = det[np.arange(len(det))]  # a copy with the same fields
        out.confidence = conf
        return out

