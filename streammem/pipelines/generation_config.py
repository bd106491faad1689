"""The generation head's configuration (:class:`GenerationConfig`), action letters and memory
names: what the command line needs without loading the model code (see
:mod:`streammem.pipelines.generation`)."""

from __future__ import annotations

from dataclasses import dataclass

from streammem.types import field_checker

__all__ = ["GenerationConfig", "GENERATION_MEMORIES", "ACTION_LETTERS", "PROMPT_WORDS"]

GENERATION_MEMORIES = ("posekv", "window", "full", "dual")
PROMPT_WORDS = 4  # CausalVideoDiT.prompt_ids' default length
#: letter -> (pan x, pan y, zoom, roll) in steps of ``pan_px`` world px / one zoom unit
ACTION_LETTERS = {"F": (0, 0, 1, 0), "I": (0, 0, 1, 0), "B": (0, 0, -1, 0), "O": (0, 0, -1, 0),
                  "L": (-1, 0, 0, 0), "R": (1, 0, 0, 0), "U": (0, -1, 0, 0), "D": (0, 1, 0, 0), "S": (0, 0, 0, 0)}


@dataclass
class GenerationConfig:
    """Attributes:
    memory: ``"posekv"`` (default), ``"window"``, ``"full"`` or ``"dual"`` (see the module docstring).
    window: frames kept at full resolution (the rolling window).
    history_frames: older frames kept (pooled by RELIC's schedule for ``"posekv"``; a
        multiple of 18); ignored by ``"window"``, which keeps none.
    num_inference_steps: Euler steps per chunk.
    fps: frame rate of the generated stream (timestamps).
    pan_px: world pixels the camera pans per ``L`` / ``R`` / ``U`` / ``D`` frame (the shipped
        model was trained on StreamWorld pans of about 20 px per frame).
    use_pose: the pose embedding on (off: the ablation without it).
    seed: chunk ``k`` is sampled with seed ``seed + k``.
    chain_clip_frames: frames per clip when chaining clips (None: no chaining, one endless
        clip on the memory; see the module docstring).
    chain_frames: the last generated frames that condition the next clip (SVI: 1, or 5 for
        film).
    chain_ref_pad: the reference (first) image conditions every clip too (SVI's ``ref_pad``).
    reference_anchor: the newest observed real frame (the start image, or the last frame given
        to :meth:`StreamingGenerationPipeline.step`) is re-projected to each new frame too, and
        gives every pixel it covers; the newest generated frame gives the rest (for a model
        that re-projects its anchor; see :mod:`streammem.pipelines.generation`). With clip
        chaining, clips after the first use it only with ``chain_ref_pad``.
    """

    memory: str = "posekv"
    window: int = 4
    history_frames: int = 72
    num_inference_steps: int = 8
    fps: float = 4.0
    pan_px: float = 20.0
    use_pose: bool = True
    seed: int = 0
    chain_clip_frames: int | None = None
    chain_frames: int = 1
    chain_ref_pad: bool = False
    reference_anchor: bool = True

    def __post_init__(self) -> None:
        need = field_checker(self)
        need(self.memory in GENERATION_MEMORIES, "memory", f"one of {GENERATION_MEMORIES}")
        need(isinstance(self.window, int) and self.window >= 1, "window", "an int >= 1")
        need(isinstance(self.history_frames, int) and self.history_frames >= 0 and self.history_frames % 18 == 0,
             "history_frames", "an int >= 0, a multiple of 18")
        need(isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1, "num_inference_steps",
             "an int >= 1")
        need(self.fps > 0, "fps", "> 0")
        need(self.pan_px > 0, "pan_px", "> 0")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")
        need(self.chain_clip_frames is None or (isinstance(self.chain_clip_frames, int) and self.chain_clip_frames >= 1),
             "chain_clip_frames", "None or an int >= 1")
        need(isinstance(self.chain_frames, int) and 1 <= self.chain_frames <= self.window + self.history_frames,
             "chain_frames", f"an int in [1, window + history_frames = {self.window + self.history_frames}]")
