"""What every source takes and tells: :class:`SourceOptions` (validated at construction) and
:class:`SourceInfo` (known before reading)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["BACKENDS", "DEFAULT_BACKEND_ORDER", "SourceOptions", "SourceInfo"]

BACKENDS = ("auto", "decord", "opencv")
# Order tried by backend="auto" for video files. benchmarks/decode.py measured raw OpenCV
# faster than raw decord on H.264 here (docs/results/decode.md), so OpenCV leads and decord is the
# fallback for files OpenCV cannot open.
DEFAULT_BACKEND_ORDER = ("opencv", "decord")


@dataclass
class SourceOptions:
    """Options shared by every source; validated at construction."""

    stride: int = 1
    start: float = 0.0
    end: float | None = None
    fps: float | None = None
    max_side: int | None = None
    backend: str = "auto"
    prefetch: int = 8
    input_fps: float = 25.0

    def __post_init__(self) -> None:
        if int(self.stride) != self.stride or self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}")
        self.stride = int(self.stride)
        if self.start < 0:
            raise ValueError(f"start must be >= 0 seconds, got {self.start!r}")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end must be > start ({self.start}), got {self.end!r}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.max_side is not None and (int(self.max_side) != self.max_side or self.max_side < 8):
            raise ValueError(f"max_side must be an integer >= 8, got {self.max_side!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if int(self.prefetch) != self.prefetch or self.prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0, got {self.prefetch!r}")
        if not self.input_fps > 0:
            raise ValueError(f"input_fps must be > 0, got {self.input_fps!r}")


@dataclass
class SourceInfo:
    """What is known about a source before reading it.

    ``num_frames``, ``fps`` and ``duration`` describe the whole input (None for live
    streams); ``selected_frames`` estimates how many frames the options keep.
    """

    uri: str
    kind: str
    backend: str
    width: int
    height: int
    fps: float | None
    num_frames: int | None
    duration: float | None
    codec: str | None = None
    selected_frames: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
