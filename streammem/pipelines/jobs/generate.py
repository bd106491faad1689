"""The generation job (``streammem generate``): a first frame (a StreamWorld scene or an image
file), then frames generated chunk by chunk from camera actions and prompts; writes
``generated.mp4`` (the start frame, then the generated ones), ``generation.jsonl`` (one line
per generated frame: action, absolute pose, chunk, seed, prompt) and ``summary.json``. A
failure before the first generated frame leaves nothing behind; one after it keeps the frames
made before it, records the error in the summary and returns it in ``result.error``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

import cv2

from streammem.pipelines.generation import GenerationConfig, StreamingGenerationPipeline
from streammem.pipelines.jobs.base import JobResult, OutputDir, write_summary

__all__ = ["load_default_generator", "run_generate"]

log = logging.getLogger(__name__)


def load_default_generator(checkpoint: str | os.PathLike | None = None,
                           config: GenerationConfig | None = None) -> StreamingGenerationPipeline:
    """The shipped generator (``streammem/checkpoints/generator``) or ``checkpoint``, in a
    :class:`StreamingGenerationPipeline`."""
    from streammem.checkpoints import path
    from streammem.models.video_dit import CausalVideoDiT

    folder = Path(checkpoint) if checkpoint is not None else path("generator")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no generator checkpoint at {folder} (config.json + weights); train one with "
                                f"`streammem train generator --out {folder}`")
    return StreamingGenerationPipeline(CausalVideoDiT.from_pretrained(str(folder)), config)


def _start_frame(scene: int | None, image: str | os.PathLike | None, size: int):
    if (scene is None) == (image is None):
        raise ValueError("give exactly one of --scene SEED or --image PATH")
    if image is not None:
        img = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{image}: not a readable image (PNG, JPEG, ...)")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None
    from streammem.world import World

    frame = next(iter(World(seed=int(scene), preset="clean", size=size, frames=1)))
    return frame.image, frame.pose


def run_generate(out: str | os.PathLike, scene: int | None = None, image: str | os.PathLike | None = None,
                 actions: str = "RRRRUUUULLLLDDDD", prompts: Sequence[str] = ("",), num_frames: int | None = None,
                 checkpoint: str | os.PathLike | None = None, memory: str = "posekv", steps: int = 8, seed: int = 0,
                 reference_anchor: bool = True,
                 progress: bool = False) -> JobResult:
    """Generate from a start frame; see the module docstring. Raises ValueError on bad input
    (no or two starts, an unreadable image, an unknown action letter, zero frames) before
    anything is written; an error after the first generated frame is returned in
    ``result.error`` with what was made before it written."""
    # 1. check inputs, build the pipeline, the start frame
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"--frames must be >= 1, got {num_frames}")
    if not actions:
        raise ValueError("give at least one action")
    pipe = load_default_generator(checkpoint, GenerationConfig(memory=memory, num_inference_steps=steps, seed=seed,
                                                                     reference_anchor=reference_anchor))
    bad = sorted({a for a in actions.upper() if a not in "FBLRUDIOS"})
    if bad:
        raise ValueError(f"unknown action letters {''.join(bad)!r}; use F/B (forward/back), L/R/U/D (pan), "
                         "I/O (zoom in/out), S (stay)")
    if not prompts:
        raise ValueError("give at least one prompt (an empty string for none)")
    for prompt in prompts:  # every prompt before anything is written
        pipe.check_prompt(prompt)
    start_image, pose = _start_frame(scene, image, pipe.model.config.sample_size)
    n = num_frames or len(actions)
    acts = (actions * (n // len(actions) + 1))[:n]  # the actions repeat when fewer than the frames
    # 2. generate, writing as we go (nothing is left if the first frame is not made)
    made, error, t0 = 0, None, time.perf_counter()
    with OutputDir(out) as od:
        out = od.path
        video = od.video("generated.mp4", fps=pipe.config.fps)
        jsonl = od.jsonl(pipe.records_file)
        first = pipe.start(start_image, pose=pose, prompt=prompts[0])
        video.write(first.image)
        try:
            for frame in pipe.stream(acts, iter(prompts), num_frames=n, progress=progress):
                video.write(frame.image)
                for rec in pipe.records(frame, frame):
                    jsonl.write(rec)
                made += 1
                od.keep()
        except Exception as exc:  # noqa: BLE001 - kept in the summary and returned, like a source error
            if not od.kept:
                raise
            log.debug("generation stopped after %d frames", made, exc_info=True)
            error = exc
        od.close()
        video_path, jsonl_path = video.path, jsonl.path
        wall = time.perf_counter() - t0
        stats = pipe.stats()
        summary = {"start": {"scene": scene, "image": None if image is None else str(image)}, "actions": acts,
                   "prompts": list(prompts), "frames_generated": made, "chunks": stats["chunks"],
                   "wall_s": round(wall, 3), "seconds_per_chunk": wall / max(1, stats["chunks"]),
                   "memory_tokens": stats["memory_tokens"], "config": pipe.config.__dict__,
                   "outputs": {"video": str(video_path), "jsonl": str(jsonl_path)},
                   "error": None if error is None else f"{type(error).__name__}: {error}"}
        summary_path = write_summary(out / "summary.json", summary)
    return JobResult(summary, video_path, jsonl_path, summary_path, error)
