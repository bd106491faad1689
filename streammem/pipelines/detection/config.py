"""DetectionConfig: every hyper-parameter of :class:`~streammem.pipelines.detection.StreamingDetectionPipeline`."""

from __future__ import annotations

from dataclasses import dataclass

from streammem.models.detector import STRIDE
from streammem.types import field_checker

__all__ = ["DetectionConfig", "MODES", "MEMORIES", "PROTOCOL_LABEL"]

MODES = ("causal", "protocol")
MEMORIES = ("feature_bank", "dual", "none")
PROTOCOL_LABEL = "protocol (MAMBA's published setting: shuffled frame order, 25-frame warm-up; NOT causal)"


@dataclass
class DetectionConfig:
    """Attributes:
    memory: ``"feature_bank"`` (default), ``"dual"`` or ``"none"`` (single-frame).
    mode: ``"causal"`` (default) or ``"protocol"`` (MAMBA's non-causal test protocol).
    pixel_level / instance_level: which levels use memory.
    temporal_state: keep the previous frame's fused feature map for a detector with temporal
        fusion (``SmallDetector(fusion_radius > 0)``), in causal mode with a memory. Off in
        protocol mode (shuffled frames have no previous frame) and for ``memory="none"``.
    max_size: bank size per level (MAMBA ``MAX_NUM=20000``).
    key_size: instance key set per read. MAMBA's ``KEY_NUM`` is 2000; ours defaults to 75 (a
        departure): one frame's proposals (``bank_proposals``), so the instance-level attention
        costs what the single-frame detector's attention over its own 75 keys does. The shipped
        detector was trained with 150 keys; AP50 at 75 and 150 keys is compared in
        ``docs/results/detection.md``.
    recent_keys: of each instance key set read from a FeatureBank, this many are the newest
        entries (the latest frames' proposals) and the rest a random draw (0: MAMBA's fully
        random key set; not in MAMBA). DualMemory ignores it (its FIFO is its recent part).
    pixel_key_size: pixel key set per read (None: the detector's ``pixel_keys``).
    pixel_write_score: detections at least this confident write pixels (MAMBA 0.8).
    pixels_per_box: random pixels written per box (MAMBA 100).
    max_pixel_tokens: cap on pixel tokens written per frame.
    bank_proposals: fc6 of this many top proposals are written (None: detector's, MAMBA 75).
    instance_min_objectness: proposals below this objectness are not written (ours).
    score_threshold: detections below this confidence are dropped.
    image_size: the long side frames are resized to (the detector's training size).
    warmup: protocol mode's warm-up frames (MAMBA 25).
    on_resize: ``"reset"`` (clear memories on a resolution change) or ``"error"``.
    dual_slots / dual_fifo_frames: DualMemory sizes.
    seed: seed of the memories and of pixel sampling.
    """

    memory: str = "feature_bank"
    mode: str = "causal"
    pixel_level: bool = True
    instance_level: bool = True
    temporal_state: bool = True
    max_size: int = 20000
    key_size: int = 75
    recent_keys: int = 0
    pixel_key_size: int | None = None
    pixel_write_score: float = 0.8
    pixels_per_box: int = 100
    max_pixel_tokens: int = 1000
    bank_proposals: int | None = None
    instance_min_objectness: float = 0.05
    score_threshold: float = 0.01
    image_size: int = 256
    warmup: int = 25
    on_resize: str = "reset"
    dual_slots: int = 1024
    dual_fifo_frames: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        need = field_checker(self)

        need(self.memory in MEMORIES, "memory", f"one of {MEMORIES}")
        need(self.mode in MODES, "mode", f"one of {MODES}")
        need(self.on_resize in ("reset", "error"), "on_resize", "'reset' or 'error'")
        need(isinstance(self.max_size, int) and self.max_size >= 1, "max_size", "an int >= 1")
        need(isinstance(self.key_size, int) and 1 <= self.key_size <= self.max_size, "key_size", "an int in [1, max_size]")
        need(isinstance(self.recent_keys, int) and 0 <= self.recent_keys <= self.key_size, "recent_keys",
             "an int in [0, key_size]")
        need(0.0 <= self.pixel_write_score <= 1.0, "pixel_write_score", "in [0, 1]")
        need(self.pixels_per_box >= 1, "pixels_per_box", ">= 1")
        need(self.max_pixel_tokens >= 1, "max_pixel_tokens", ">= 1")
        need(self.image_size >= STRIDE and self.image_size % STRIDE == 0, "image_size", f"a multiple of {STRIDE}")
        need(self.warmup >= 0, "warmup", ">= 0")
        need(0.0 <= self.score_threshold <= 1.0, "score_threshold", "in [0, 1]")

