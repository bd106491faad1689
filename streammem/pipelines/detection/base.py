"""DetectionHead: what every detection pipeline shares (the streaming API, records, overlays,
snapshots). A pipeline provides ``config`` (``mode``, ``warmup``, ``seed``), ``tracker`` (or
None), ``reset()``, ``stats()``, ``memories()`` and ``_process(frame) -> sv.Detections``."""

from __future__ import annotations

import functools
from typing import Iterable, Iterator, Sequence

import numpy as np
import supervision as sv

from streammem.pipelines.base import HeadBase, tensor_json
from streammem.pipelines.detection.config import PROTOCOL_LABEL
from streammem.types import Frame

__all__ = ["DetectionHead", "detection_records"]


def detection_records(det: sv.Detections) -> list[dict]:
    """One JSON-able dict per detection: ``xyxy``, ``confidence``, ``class_id``, ``class_name``
    (and ``tracker_id`` when tracked)."""
    names = det.data.get("class_name") if len(det) else None
    out = []
    for i in range(len(det)):
        d = {"xyxy": [round(float(v), 2) for v in det.xyxy[i]], "confidence": round(float(det.confidence[i]), 5),
             "class_id": int(det.class_id[i]), "class_name": str(names[i]) if names is not None else None}
        if det.tracker_id is not None:
            d["tracker_id"] = int(det.tracker_id[i])
        out.append(d)
    return out


@functools.lru_cache(maxsize=8)
def _annotators(thickness: int) -> tuple[sv.BoxAnnotator, sv.LabelAnnotator]:
    """supervision's box and label annotators for a line thickness (built once, not per frame)."""
    return sv.BoxAnnotator(thickness=thickness), sv.LabelAnnotator(text_scale=0.3 * thickness + 0.1, text_padding=2)


class DetectionHead(HeadBase):
    """The head contract for detectors: ``step(frame) -> sv.Detections`` (causal), ``run``,
    MAMBA's ``run_protocol``, JSONL records and box overlays.

    ``annotate`` draws the detections at or above ``display_threshold`` (default: everything
    the pipeline returned)."""

    name = "detection"
    records_file = "detections.jsonl"
    display_threshold: float = 0.0

    # ------------------------------------------------------------------ streaming
    def _empty(self, frame: Frame) -> sv.Detections:
        d = sv.Detections.empty()
        d.metadata = {"frame_index": frame.index, "mode": self._mode_label()}
        return d

    def _mode_label(self) -> str:
        return "causal" if self.config.mode == "causal" else PROTOCOL_LABEL

    def step(self, frame: Frame) -> sv.Detections:
        """Causal mode: detect in ``frame`` with the memories of past frames, then write it."""
        if self.config.mode != "causal":
            raise RuntimeError("step() is causal; in mode='protocol' call run_protocol(frames) with a whole video")
        d = self._process(frame)
        if self.tracker is not None:
            d = self.tracker.update(d)
        return d

    def run(self, frames: Iterable[Frame]) -> Iterator[sv.Detections]:
        """Causal mode over a stream: a generator of one ``sv.Detections`` per frame."""
        for f in frames:
            yield self.step(f)

    def run_protocol(self, frames: Sequence[Frame], seed: int | None = None) -> list[sv.Detections]:
        """MAMBA's test protocol on one whole video (**not causal**): reset; warm the memories up
        with ``warmup`` frames of the video in shuffled order (their outputs discarded); then
        detect every frame in a shuffled order. Returns the detections in the video's order."""
        frames = list(frames)
        self.reset()
        if not frames:
            return []
        rng = np.random.default_rng(self.config.seed if seed is None else seed)
        order = rng.permutation(len(frames))
        for i in order[: self.config.warmup]:
            self._process(frames[int(i)])
        out: list[sv.Detections | None] = [None] * len(frames)
        for i in order:
            out[int(i)] = self._process(frames[int(i)])
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ presentation
    def records(self, frame: Frame | None, output: sv.Detections) -> list[dict]:
        if frame is None:  # end of stream: detection has nothing pending
            return []
        return [{"frame": frame.index, "timestamp": round(float(frame.timestamp), 6), "num_detections": len(output),
                 "detections": detection_records(output)}]

    def annotate(self, image: np.ndarray, output: sv.Detections) -> np.ndarray:
        det = output if output.confidence is None else output[output.confidence >= self.display_threshold]
        if not len(det):
            return image
        boxes, label = _annotators(max(1, round(max(image.shape[:2]) / 400)))
        img = boxes.annotate(image.copy(), det)
        names = det.data.get("class_name", [str(c) for c in det.class_id])
        labels = [f"{n} {c:.2f}" for n, c in zip(names, det.confidence)]
        return label.annotate(img, det, labels=labels)

    # ------------------------------------------------------------------ snapshots
    def _tracker_state(self) -> dict:
        """``{"tracker": {"kind", "state"}}`` for a tracker with ``state()`` / ``load_state()``
        (``IoUTracker``, ``TrackScoreSmoother``, ``TrackRescorer``), else nothing."""
        tr = getattr(self, "tracker", None)
        if tr is None or not hasattr(tr, "state"):
            return {}
        return {"tracker": {"kind": type(tr).__name__, "state": tr.state()}}

    def _check_tracker_state(self, extra: dict) -> None:
        """ValueError when a snapshot's tracker state is not for this head's tracker."""
        saved, tr = extra.get("tracker"), getattr(self, "tracker", None)
        if saved is not None and (tr is None or type(tr).__name__ != saved.get("kind") or not hasattr(tr, "load_state")):
            have = "no tracker" if tr is None else f"a {type(tr).__name__}"
            raise ValueError(f"{type(self).__name__}.load_state_dict: the snapshot carries a {saved.get('kind')}'s "
                             f"state, this head has {have}")

    def _load_tracker_state(self, extra: dict) -> None:
        """Restore the tracker from a snapshot's extra state; a snapshot without one resets it."""
        self._check_tracker_state(extra)
        saved, tr = extra.get("tracker"), getattr(self, "tracker", None)
        if saved is None:
            if tr is not None:
                tr.reset()
            return
        tr.load_state(saved["state"])

    def load_state_dict(self, state: dict) -> None:
        """:meth:`HeadBase.load_state_dict`, the tracker checked before anything is restored."""
        if "head.meta" in state:
            self._check_tracker_state(tensor_json(state["head.meta"]).get("extra") or {})
        super().load_state_dict(state)

    def _extra_state(self) -> dict:
        out: dict = {"counters": dict(self.counters), **self._tracker_state()}
        gen = getattr(self, "gen", None)
        if gen is not None:
            out["generator"] = gen.get_state()
        return out

    def _load_extra_state(self, extra: dict) -> None:
        self.counters = dict(extra["counters"])
        if "generator" in extra and getattr(self, "gen", None) is not None:
            self.gen.set_state(extra["generator"])
        self._load_tracker_state(extra)
