"""The pipeline contract, and :class:`StatsPipeline`, the per-frame statistics job.

A pipeline has ``step(frame) -> output``, ``reset()``, and explicit state:
``state_dict()`` / ``load_state_dict()`` hold tensors and plain values only, so a snapshot
saves as safetensors + JSON. Heads (QA, detection, generation) implement the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from streammem.types import Frame

__all__ = ["Pipeline", "StatsOutput", "StatsPipeline", "annotate_text"]


@runtime_checkable
class Pipeline(Protocol):
    """What :func:`~streammem.pipelines.stream.run_stream` drives."""

    def step(self, frame: Frame) -> Any: ...

    def reset(self) -> None: ...


@dataclass
class StatsOutput:
    """Per-frame statistics: mean brightness (0-255), contrast (std), motion (mean absolute
    difference to the previous frame, on a 64-pixel thumbnail; 0 for the first frame)."""

    brightness: float
    contrast: float
    motion: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"brightness": self.brightness, "contrast": self.contrast, "motion": self.motion, **self.extra}


class StatsPipeline:
    """Cheap per-frame statistics; the main job's pipeline before any head is attached.

    State: the previous frame's grey thumbnail (bounded: one 64-pixel image).
    """

    thumb_side = 64

    def __init__(self) -> None:
        self._prev: np.ndarray | None = None

    def step(self, frame: Frame) -> StatsOutput:
        grey = cv2.cvtColor(frame.image, cv2.COLOR_RGB2GRAY)
        thumb = cv2.resize(grey, (self.thumb_side, self.thumb_side), interpolation=cv2.INTER_AREA).astype(np.float32)
        motion = 0.0 if self._prev is None else float(np.abs(thumb - self._prev).mean())
        self._prev = thumb
        return StatsOutput(brightness=float(grey.mean()), contrast=float(grey.std()), motion=motion)

    def reset(self) -> None:
        self._prev = None

    def state_dict(self) -> dict:
        return {} if self._prev is None else {"prev": self._prev.copy()}

    def load_state_dict(self, state: dict) -> None:
        prev = state.get("prev")
        self._prev = None if prev is None else np.asarray(prev, dtype=np.float32)


def annotate_text(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """A copy of ``image`` with ``lines`` of text in a dark box at the top left."""
    out = image.copy()
    h = out.shape[0]
    scale = max(0.35, min(1.0, h / 600))
    thick = 1
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    step = th + base + 4
    width = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for t in lines) + 8
    box = out[: step * len(lines) + 4, :width]
    box[:] = (box * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(out, text, (4, (i + 1) * step), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out
