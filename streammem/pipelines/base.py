"""The pipeline and head contracts, and :class:`StatsPipeline`, the per-frame statistics job.

A **pipeline** is anything :func:`~streammem.pipelines.stream.run_stream` can drive:
``step(frame) -> output`` and ``reset()``.

A **head** is a pipeline that does one task on the stream (answer questions, detect objects,
generate frames) and can be run by any front end (the main job, the CLI, the web demo, batch
and webcam modes) without the front end knowing which head it is. :class:`Head` states what a
head has:

================================  ============================================================
``name``                          short key of its outputs (``"detection"``, ``"qa"``); the
                                  main job writes ``<records_file>`` and ``summary["heads"][name]``
``config``                        its config dataclass (every hyper-parameter, checked once)
``step(frame) -> output``         one frame in, the head's output for it out
``finish() -> output``            end of stream: what is still pending (may be empty)
``reset()``                       forget the stream
``stats() -> dict``               counters and memory occupancy, JSON-able
``state_dict()`` /                tensors only (``dict[str, torch.Tensor]``), so a snapshot is
``load_state_dict(state)``        a safetensors file and loading one never runs code
``records(frame, output)``        the output as JSON-able records (one JSONL line each);
                                  ``frame`` is None for what ``finish`` returned
``annotate(image, output)``       the output drawn on an RGB ``(H, W, 3)`` uint8 image
================================  ============================================================

:class:`HeadBase` implements the plumbing once: ``state_dict`` gathers the head's memories
(``memories()``, each under its own prefix) and the head's own extra state (``_extra_state``),
and ``load_state_dict`` restores both, refusing a snapshot of another head or configuration.

Example:
    >>> import numpy as np
    >>> from streammem.types import Frame
    >>> class Count(HeadBase):
    ...     name, records_file = "count", "count.jsonl"
    ...     def __init__(self): self.config, self.n = None, 0
    ...     def step(self, frame): self.n += 1; return self.n
    ...     def reset(self): self.n = 0
    ...     def stats(self): return {"frames": self.n}
    ...     def _extra_state(self): return {"n": self.n}
    ...     def _load_extra_state(self, extra): self.n = extra["n"]
    >>> head = Count(); _ = head.step(Frame(0, 0.0, np.zeros((2, 2, 3), np.uint8)))
    >>> other = Count(); other.load_state_dict(head.state_dict()); other.n
    1
    >>> isinstance(head, Head)
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import cv2
import numpy as np
import torch

from streammem.types import Frame

__all__ = ["Pipeline", "Head", "HeadBase", "StatsOutput", "StatsPipeline", "annotate_text", "json_tensor",
           "tensor_json"]


@runtime_checkable
class Pipeline(Protocol):
    """What :func:`~streammem.pipelines.stream.run_stream` drives."""

    def step(self, frame: Frame) -> Any: ...

    def reset(self) -> None: ...


@runtime_checkable
class Head(Pipeline, Protocol):
    """One task on the stream; see the module docstring for each member."""

    name: str
    records_file: str
    config: Any

    def finish(self) -> Any: ...

    def stats(self) -> dict: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def records(self, frame: Frame, output: Any) -> list[dict]: ...

    def annotate(self, image: np.ndarray, output: Any) -> np.ndarray: ...


def json_tensor(value: Any) -> torch.Tensor:
    """A JSON-able value as a ``uint8`` tensor (for plain values inside a tensor-only state)."""
    return torch.tensor(list(json.dumps(value, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def tensor_json(t: torch.Tensor) -> Any:
    """The value :func:`json_tensor` encoded."""
    return json.loads(bytes(t.tolist()).decode("utf-8"))


def _config_json(config: Any) -> Any:
    if config is None:
        return None
    return json.loads(json.dumps(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else str(config),
                                 default=str))


def _with_defaults(theirs: Any, config: Any) -> Any:
    """A snapshot's config with the fields it lacks (it predates them) at their defaults."""
    if not (isinstance(theirs, dict) and dataclasses.is_dataclass(config)):
        return theirs
    out = dict(theirs)
    for f in dataclasses.fields(config):
        if f.name not in out and f.default is not dataclasses.MISSING:
            out[f.name] = json.loads(json.dumps(f.default, default=str))
        elif f.name not in out and f.default_factory is not dataclasses.MISSING:
            out[f.name] = json.loads(json.dumps(f.default_factory(), default=str))
    return out


class HeadBase:
    """Shared plumbing of heads: snapshots, and empty defaults for ``finish``, ``records`` and
    ``annotate``. A subclass sets ``name``, ``records_file`` and ``config`` and implements
    ``step``, ``reset`` and ``stats``; it lists its memories in ``memories()`` and keeps any
    other stream state in ``_extra_state`` / ``_load_extra_state`` (JSON-able values, or
    tensors under their own keys)."""

    name: ClassVar[str] = "head"
    records_file: ClassVar[str] = "records.jsonl"
    #: the main job also lists this head's records in ``summary["heads"][name]["records"]``
    #: (for heads with few records, such as answers; not per-frame ones)
    summary_records: ClassVar[bool] = False
    config: Any = None

    def finish(self) -> Any:
        return []

    def records(self, frame: Frame, output: Any) -> list[dict]:
        return []

    def annotate(self, image: np.ndarray, output: Any) -> np.ndarray:
        return image

    def memories(self) -> dict:
        """The head's distinct memories by role (``{role: Memory}``)."""
        return {}

    def _extra_state(self) -> dict:
        """Stream state outside the memories: ``{key: JSON-able value or torch.Tensor}``."""
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        """Restore what :meth:`_extra_state` returned."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: each memory's state under ``"<role>."``, tensors of the extra state
        under ``"extra.<key>"``, the rest of it and the head's name and config as JSON bytes."""
        state: dict[str, torch.Tensor] = {}
        for role, memory in self.memories().items():
            state.update({f"{role}.{k}": v for k, v in memory.state_dict().items()})
        plain = {}
        for key, value in self._extra_state().items():
            if isinstance(value, torch.Tensor):
                state[f"extra.{key}"] = value.detach().clone()
            else:
                plain[key] = value
        state["head.meta"] = json_tensor({"name": self.name, "config": _config_json(self.config), "extra": plain})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a snapshot of the same head with the same configuration (a field the
        snapshot predates counts at its default); raises ValueError naming what differs."""
        me = type(self).__name__
        if "head.meta" not in state:
            raise ValueError(f"{me}.load_state_dict: not a streammem head snapshot (no 'head.meta')")
        meta = tensor_json(state["head.meta"])
        if meta.get("name") != self.name:
            raise ValueError(f"{me}.load_state_dict: snapshot is of head {meta.get('name')!r}, this is {self.name!r}")
        mine = _config_json(self.config)
        if _with_defaults(meta.get("config"), self.config) != mine:
            theirs = _with_defaults(meta.get("config"), self.config) or {}
            diff = sorted(k for k in set(theirs) | set(mine or {}) if theirs.get(k) != (mine or {}).get(k)) \
                if isinstance(theirs, dict) and isinstance(mine, dict) else ["config"]
            raise ValueError(f"{me}.load_state_dict: snapshot has another configuration (fields {diff})")
        for role, memory in self.memories().items():
            prefix = f"{role}."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                raise ValueError(f"{me}.load_state_dict: snapshot has no state for memory {role!r}")
            memory.load_state_dict(part)
        extra = dict(meta.get("extra", {}))
        extra.update({k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")})
        self._load_extra_state(extra)


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
        return {} if self._prev is None else {"prev": torch.from_numpy(self._prev.copy())}

    def load_state_dict(self, state: dict) -> None:
        prev = state.get("prev")
        self._prev = None if prev is None else np.asarray(prev, dtype=np.float32)


def annotate_text(image: np.ndarray, lines: list[str], corner: str = "top") -> np.ndarray:
    """A copy of ``image`` with ``lines`` of text in a dark box at the ``"top"`` or ``"bottom"``
    left corner."""
    out = image.copy()
    if not lines:
        return out
    h = out.shape[0]
    scale = max(0.35, min(1.0, h / 600))
    thick = 1
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    step = th + base + 4
    width = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for t in lines) + 8
    top = 0 if corner == "top" else max(0, h - step * len(lines) - 4)
    box = out[top: top + step * len(lines) + 4, :width]
    box[:] = (box * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(out, text, (4, top + (i + 1) * step), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out
