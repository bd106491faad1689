"""StreamingGenerationPipeline: endless, steerable image-to-video generation on a bounded memory.

From a first frame (a StreamWorld scene, or any image), the pipeline generates the stream chunk
by chunk (``model.config.chunk_frames`` frames each) with a
:class:`~streammem.models.video_dit.CausalVideoDiT`. Per chunk, in numbered steps:

1. take the next actions (one per frame) and prompt; integrate the actions into absolute camera
   poses (StreamWorld's integer camera: pan, zoom, roll);
2. read the memory: every past frame it holds, as pixel-patch tokens with their poses (a rolling
   window at full resolution plus the history pooled by RELIC's schedule, for ``"posekv"``);
3. denoise the chunk (flow matching, ``num_inference_steps`` Euler steps, a fresh seed per
   chunk: ``seed + chunk index``), conditioned on the memory, the newest frame (the anchor), the
   actions, the poses and the prompt; with ``reference_anchor`` (default) the newest *observed*
   frame is a second anchor ahead of it: re-projected to each new pose, it gives every pixel it
   covers, so what the camera saw is carried over from the true frame rather than re-generated
   from the model's own (the model corrects both with its residual);
4. write the new frames to the memory and yield them.

The memory is bounded (``window + history_frames`` frames at most), so the cost of a chunk is the
same at chunk 10 and at chunk 10,000. Its state (memory, camera, anchor, counters) is a
snapshot like any head's (``state_dict`` / ``load_state_dict``): restored mid-rollout, the same
seed gives the same continuation.

Actions: letters, one per frame: ``F`` forward and ``B`` back (the camera moves towards / away
from the ground: zoom in / out; ``I`` / ``O`` are the same), ``L`` / ``R`` / ``U`` / ``D`` pan
left / right / up / down, ``S`` stay; or raw camera-to-world 4x4 poses. Memories:
``"posekv"`` (RELIC: window + pooled history), ``"window"`` (the rolling window only),
``"full"`` (the history unpooled, as many frames as ``"posekv"`` keeps), ``"dual"``
(:class:`~streammem.memory.DualMemory`, Mem4D's split: the window's frames whole in the
transient FIFO, and the patches that stayed put under the camera's motion in persistent slots,
as many tokens in all as ``"posekv"`` holds; no pooling). For ``"dual"`` a patch's static score
is ``1 - min(1, d / 0.25)``, ``d`` the mean absolute difference (in [-1, 1] units) between the
patch and the previous frame re-projected to this frame's pose through the ground plane
(:func:`~streammem.models.video_dit.reproject`), over the pixels the previous frame covers; a
patch it covers less than half of is new ground, scored 1 (static). Slots are replaced oldest
first once full (``compress="prune"``: generation reads the whole memory, so no slot gathers
more attention than another); every token keeps its pose.

Clip chaining (Stable Video Infinity; off by default): with ``chain_clip_frames = n`` the
stream is made of clips of ``n`` new frames each. A clip starts from a fresh memory that holds
only the last ``chain_frames`` generated frames (with their own indices, times and poses) and,
with ``chain_ref_pad``, the reference image (the first frame) before them; those conditioning
frames were already yielded by the clip before, so they are not generated or yielded again
(SVI generates them again as the clip's first frames and drops the overlap: the same output).
Every chunk has its own seed, so every clip does; a prompt stream gives one prompt per clip.
Clips after the first read the observed frame as an anchor (``reference_anchor``) only with
``chain_ref_pad``, like their memory.

Example:
    >>> import numpy as np
    >>> from streammem.models.video_dit import CausalVideoDiT
    >>> model = CausalVideoDiT(sample_size=16, patch_size=4, dim=32, num_layers=1, num_heads=2)
    >>> pipe = StreamingGenerationPipeline(model, GenerationConfig(num_inference_steps=2))
    >>> out = pipe(np.zeros((16, 16, 3), np.uint8), actions="RRLL", progress=False)
    >>> [f.index for f in out.frames], out.frames[-1].image.shape, out.chunks
    ([1, 2, 3, 4], (16, 16, 3), 2)
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from streammem.memory import DualMemory, PoseKVMemory
from streammem.models.video_dit import CausalVideoDiT, ChunkContext, reproject, sample_chunk
from streammem.pipelines.base import HeadBase, annotate_text
from streammem.pipelines.generation_config import (
    ACTION_LETTERS,
    GENERATION_MEMORIES,
    PROMPT_WORDS,
    GenerationConfig,
)
from streammem.types import Frame
from streammem.world.scene import (
    POS_UNIT,
    ROLL_UNIT,
    ZOOM_RANGE,
    ZOOM_UNIT,
    CameraState,
    action_vector,
)

__all__ = ["GenerationConfig", "GenerationOutput", "StreamingGenerationPipeline", "ACTION_LETTERS", "GENERATION_MEMORIES"]


@dataclass
class GenerationOutput:
    """What :meth:`StreamingGenerationPipeline.__call__` made: the generated ``frames`` (RGB
    uint8, each with its ``pose``, ``action`` letter and ``info`` = chunk, seed, prompt), the
    number of ``chunks``, and whether it was ``interrupted``."""

    frames: list[Frame] = field(default_factory=list)
    chunks: int = 0
    interrupted: bool = False


def _to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` -> ``(3, size, size)`` in [-1, 1] (resized, not cropped)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the start image must be an RGB uint8 (H, W, 3) array, got "
                         f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}")
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _to_image(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def camera_from_pose(pose: np.ndarray) -> CameraState:
    """The integer StreamWorld camera closest to a camera-to-world ``pose`` (4x4)."""
    pose = np.asarray(pose, np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"a pose must be 4x4, got {pose.shape}")
    dist = max(-float(pose[2, 3]), 1e-6)
    zoom = int(round(-ZOOM_UNIT * math.log2(dist / 1000.0)))
    roll = int(round(math.degrees(math.atan2(pose[1, 0], pose[0, 0])) * ROLL_UNIT))
    return CameraState(x=int(round(pose[0, 3] * POS_UNIT)), y=int(round(pose[1, 3] * POS_UNIT)), zoom=zoom, roll=roll)


class StreamingGenerationPipeline(HeadBase):
    """Chunk-by-chunk generation on a memory (see the module docstring).

    Args:
        model: a :class:`~streammem.models.video_dit.CausalVideoDiT`.
        config: a :class:`GenerationConfig`.

    As a head: ``step(frame)`` *observes* a real frame (it becomes memory and the anchor the
    next chunk continues from), so a real stream can prime the memory before generation;
    ``records`` gives one JSON line per generated frame.
    """

    name = "generation"
    records_file = "generation.jsonl"

    def __init__(self, model: CausalVideoDiT, config: GenerationConfig | None = None) -> None:
        self.model = model.eval()
        self.config = c = config or GenerationConfig()
        history = 0 if c.memory == "window" else c.history_frames
        schedule = (1,) if c.memory == "full" else None
        kw = {} if schedule is None else {"schedule": schedule}
        self.memory = PoseKVMemory(dim=model.patch_dim, height=model.grid_side, width=model.grid_side, window=c.window,
                                   history_frames=history, retrieval="all", seed=c.seed, **kw)
        if c.memory == "dual":  # the same token budget as "posekv"
            hw = model.grid_side ** 2
            self.memory = DualMemory(dim=model.patch_dim, slots=max(1, self.memory.capacity - c.window * hw),
                                     fifo_frames=c.window, max_tokens_per_frame=hw, compress="prune",
                                     keep_pose=True, skip_cos=1.0)
        self.interrupt = threading.Event()
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the stream: memory, camera, anchor, counters."""
        self.memory.reset()
        self.interrupt.clear()
        self.camera: CameraState | None = None
        self.anchor: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, np.ndarray] | None = None  # the newest written frame and pose ("dual")
        self.frames = 0
        self.chunks = 0
        self.prompt = ""
        # clip chaining: clip index, frames made in it, the last frames (x, pose, index, time), the reference
        self.clip, self.clip_made = 0, 0
        self.recent: list[tuple[torch.Tensor, np.ndarray, int, float]] = []
        self.reference: tuple[torch.Tensor, np.ndarray] | None = None
        self.observed: tuple[torch.Tensor, np.ndarray] | None = None  # the newest observed real frame

    def memories(self) -> dict:
        return {"memory": self.memory}

    def _extra_state(self) -> dict:
        cam = None if self.camera is None else list(self.camera.key())
        out: dict[str, Any] = {"camera": cam, "frames": self.frames, "chunks": self.chunks, "prompt": self.prompt}
        if self.anchor is not None:
            out["anchor"] = self.anchor
        if self.observed is not None:
            out["observed"], out["observed_pose"] = self.observed[0], np.asarray(self.observed[1]).tolist()
        if self.config.chain_clip_frames is not None:
            out["clip"], out["clip_made"] = self.clip, self.clip_made
            out["recent"] = [[np.asarray(p).tolist(), i, t] for _, p, i, t in self.recent]
            out.update({f"recent_{j}": r[0] for j, r in enumerate(self.recent)})
            if self.reference is not None:
                out["reference"], out["reference_pose"] = self.reference[0], np.asarray(self.reference[1]).tolist()
        return out

    def _load_extra_state(self, extra: dict) -> None:
        self.camera = None if extra["camera"] is None else CameraState(*extra["camera"])
        self.frames, self.chunks, self.prompt = int(extra["frames"]), int(extra["chunks"]), extra["prompt"]
        self.anchor = extra.get("anchor")
        seen = extra.get("observed")
        self.observed = None if seen is None else (seen, np.asarray(extra["observed_pose"]))
        # between chunks the newest written frame is the anchor, at the camera's pose
        self._last = None if self.anchor is None or self.camera is None else (self.anchor, self.camera.pose())
        if self.config.chain_clip_frames is not None:
            self.clip, self.clip_made = int(extra["clip"]), int(extra["clip_made"])
            self.recent = [(extra[f"recent_{j}"], np.asarray(p), int(i), float(t))
                           for j, (p, i, t) in enumerate(extra["recent"])]
            ref = extra.get("reference")
            self.reference = None if ref is None else (ref, np.asarray(extra["reference_pose"]))

    def stats(self) -> dict:
        s = self.memory.stats()
        return {"frames": self.frames, "chunks": self.chunks, "memory": self.config.memory,
                "memory_tokens": s["num_tokens"], "memory_capacity": s["capacity"], "memory_bytes": s["bytes"]}

    # ------------------------------------------------------------------ frames in
    def start(self, image: np.ndarray | Frame, pose: np.ndarray | None = None, prompt: str = "") -> Frame:
        """Begin a stream from ``image`` (RGB uint8, any size: resized to the model's) at camera
        ``pose`` (default: the middle of StreamWorld's canvas, zoom 0). Returns frame 0."""
        self.reset()
        if isinstance(image, Frame):
            pose = image.pose if pose is None else pose
            image = image.image
        self.camera = CameraState(x=768 * POS_UNIT, y=768 * POS_UNIT) if pose is None else camera_from_pose(pose)
        self.prompt = self.check_prompt(prompt)
        return self._observe(image, action=None)

    def step(self, frame: Frame) -> Frame:
        """Observe a real frame: it becomes memory and the anchor (the camera follows its pose,
        when it has one). Returns the frame as the pipeline holds it (the model's size)."""
        if self.camera is None:
            return self.start(frame)
        if frame.pose is not None:
            self.camera = camera_from_pose(frame.pose)
        return self._observe(frame.image, action=frame.action if isinstance(frame.action, str) else None)

    def check_prompt(self, prompt: str) -> str:
        """``prompt`` if the model knows every word of it; else ValueError naming the unknown
        words and the model's vocabulary (the model would ignore them)."""
        known = [w for w in self.model.config.vocab if not w.startswith("<")]
        words = str(prompt).split()
        if len(words) > PROMPT_WORDS:
            raise ValueError(f"the generator reads at most {PROMPT_WORDS} prompt words, got {len(words)}: {prompt!r}")
        unknown = [w for w in words if w.lower() not in self.model.word_index]
        if unknown:
            raise ValueError(f"the generator does not know the prompt words {unknown}; it knows {known} "
                             "(StreamWorld's scene styles; an empty prompt is allowed)")
        return prompt

    def _observe(self, image: np.ndarray, action: str | None) -> Frame:
        x = _to_tensor(image, self.model.config.sample_size)
        pose = self.camera.pose()
        t = self.frames / self.config.fps
        self._write(x, pose, t)
        self.anchor = x
        self.observed = (x, pose)
        if self.config.chain_clip_frames is not None:
            self._remember(x, pose, self.frames, t)
            if self.reference is None:
                self.reference = (x, pose)
        out = Frame(index=self.frames, timestamp=t, image=_to_image(x), pose=pose, action=action,
                    info={"observed": True})
        self.frames += 1
        return out

    def _write(self, x: torch.Tensor, pose: np.ndarray, t: float, index: int | None = None) -> None:
        """Write frame ``x (3, H, W)`` (index ``index``, default the next one) to the memory, with
        static scores for "dual"."""
        tokens = self.model.frame_tokens(x, pose, self.frames if index is None else index, t)
        if isinstance(self.memory, DualMemory):
            tokens.extras["static"] = self.static_scores(x, pose)
            self._last = (x, np.asarray(pose))
        self.memory.write(tokens)

    def static_scores(self, x: torch.Tensor, pose: np.ndarray) -> torch.Tensor:
        """Per patch (row-major, ``(h*w,)``): how well frame ``x`` is explained by the newest
        written frame moved with the camera (see the module docstring); all 1 for a first frame."""
        m = self.model
        p, s = m.config.patch_size, m.grid_side
        if self._last is None:
            return torch.ones(s * s)
        prev, prev_pose = self._last
        warped, valid = reproject(prev[None], torch.as_tensor(prev_pose)[None].float(),
                                  torch.as_tensor(np.asarray(pose))[None].float(), m.config.focal_px, m.config.plane_z)
        diff = (x[None].float() - warped).abs().mean(1, keepdim=True) * valid
        pool = lambda a: torch.nn.functional.avg_pool2d(a, p)[0, 0].reshape(-1)  # noqa: E731
        cover = pool(valid)
        d = pool(diff) / cover.clamp_min(1e-6)
        return torch.where(cover < 0.5, torch.ones_like(d), 1 - (d / 0.25).clamp(max=1.0))

    # ------------------------------------------------------------------ generation
    def _delta(self, action, cam: CameraState) -> tuple[tuple[int, int, int, int], str]:
        """One action (a letter or a 4x4 pose) taken from camera ``cam`` -> the integer camera
        delta and its label."""
        if isinstance(action, str):
            key = action.upper()
            if key not in ACTION_LETTERS:
                raise ValueError(f"unknown action {action!r}; use one of {''.join(ACTION_LETTERS)} "
                                 "(forward, back, left, right, up, down, zoom in/out, stay) or 4x4 poses")
            ux, uy, dz, dr = ACTION_LETTERS[key]
            step = int(round(self.config.pan_px * POS_UNIT))
            if not ZOOM_RANGE[0] <= cam.zoom + dz <= ZOOM_RANGE[1]:
                dz = 0  # the camera's zoom range, as in StreamWorld
            return (ux * step, uy * step, dz, dr), key
        target = camera_from_pose(np.asarray(action))
        return (target.x - cam.x, target.y - cam.y, target.zoom - cam.zoom, target.roll - cam.roll), "pose"

    def stream(self, actions: str | Iterable, prompts: str | Iterable[str] | None = None,
               num_frames: int | None = None, callback: Callable[[int, list[Frame]], None] | None = None,
               progress: bool = True) -> Iterator[Frame]:
        """Generate frames as they are made, a chunk at a time, until the actions run out,
        ``num_frames`` frames are made or :attr:`interrupt` is set (checked between chunks and
        between denoising steps). ``prompts``: one prompt for all, or an iterable read once per
        chunk (the last one holds when it runs out). ``callback(chunk_index, frames)`` after each
        chunk. Call :meth:`start` (or :meth:`step` with a real frame) first."""
        # 1. check inputs
        if self.camera is None or self.anchor is None:
            raise RuntimeError("start(image) first: generation continues from a first frame")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        acts = iter(actions)
        prompt_iter = iter([prompts]) if isinstance(prompts, str) else (iter(prompts) if prompts is not None else None)
        f, model, c = self.model.config.chunk_frames, self.model, self.config
        bar = tqdm(total=num_frames, unit="frame", disable=not progress, desc="generate")
        made = 0
        self.interrupt.clear()
        try:
            while (num_frames is None or made < num_frames) and not self.interrupt.is_set():
                # 2. the chunk's actions, poses and prompt
                want = f if num_frames is None else min(f, num_frames - made)
                chunk = []
                for a in acts:
                    chunk.append(a)
                    if len(chunk) == want:
                        break
                if not chunk:
                    break
                chaining = c.chain_clip_frames is not None
                if chaining and self.clip_made >= c.chain_clip_frames:
                    self._next_clip()
                if prompt_iter is not None and (not chaining or self.clip_made == 0):
                    self.prompt = self.check_prompt(next(prompt_iter, self.prompt))
                if chaining:
                    # the clip's frames left in this chunk
                    chunk, rest = chunk[:c.chain_clip_frames - self.clip_made], chunk[c.chain_clip_frames - self.clip_made:]
                    acts = itertools.chain(rest, acts)
                cam, labels, poses, vecs = self.camera, [], [], []
                for a in chunk:
                    d, label = self._delta(a, cam)
                    vecs.append(action_vector(d, cam))
                    cam = CameraState(cam.x + d[0], cam.y + d[1], cam.zoom + d[2], cam.roll + d[3])
                    poses.append(cam.pose())
                    labels.append(label)
                # 3. read the memory; denoise the chunk with a fresh seed
                ctx = ChunkContext.from_tokens([self.memory.read()])
                anchors, anchor_poses = self._anchors()
                seed = c.seed + self.chunks
                x = sample_chunk(model, torch.from_numpy(np.stack(vecs))[None].float(),
                                 torch.from_numpy(np.stack(poses))[None].float(), model.prompt_ids(self.prompt)[None],
                                 ctx, anchor=anchors, num_inference_steps=c.num_inference_steps,
                                 generator=torch.Generator().manual_seed(seed), use_pose=c.use_pose,
                                 callback=self._check_interrupt, anchor_pose=anchor_poses)
                # 4. write the new frames, yield them
                out = []
                for j in range(len(chunk)):
                    t = self.frames / c.fps
                    self._write(x[0, j], poses[j], t)
                    info = {"chunk": self.chunks, "seed": seed, "prompt": self.prompt}
                    if chaining:
                        info["clip"] = self.clip
                        self._remember(x[0, j].clone(), poses[j], self.frames, t)
                    out.append(Frame(index=self.frames, timestamp=t, image=_to_image(x[0, j]), pose=poses[j],
                                     action=labels[j], info=info))
                    self.frames += 1
                if chaining:
                    self.clip_made += len(chunk)
                self.camera, self.anchor = cam, x[0, len(chunk) - 1].clone()
                self.chunks += 1
                if callback is not None:
                    callback(self.chunks - 1, out)
                bar.update(len(out))
                made += len(out)
                yield from out
        except _Interrupted:
            return
        finally:
            bar.close()

    def _anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's anchors and their poses: ``(1, 3, H, W)`` and ``(1, 4, 4)`` (the newest
        frame), or with ``reference_anchor``, while the newest frame is a generated one,
        ``(1, 2, 3, H, W)`` and ``(1, 2, 4, 4)``: the newest observed frame, then the newest frame.
        A chained clip after the first reads the observed frame only with ``chain_ref_pad``."""
        anchor, pose = self.anchor[None], torch.from_numpy(self.camera.pose())[None].float()
        c, seen = self.config, self.observed
        chained_away = c.chain_clip_frames is not None and self.clip > 0 and not c.chain_ref_pad
        if (not (c.reference_anchor and self.model.config.reproject) or seen is None or chained_away
                or seen[0] is self.anchor or torch.equal(seen[0], self.anchor)):
            return anchor, pose
        return (torch.stack([seen[0], self.anchor])[None],
                torch.stack([torch.from_numpy(np.asarray(seen[1])).float(), pose[0]])[None])

    def _remember(self, x: torch.Tensor, pose: np.ndarray, index: int, t: float) -> None:
        """Keep the last ``chain_frames`` frames (the next clip's conditioning)."""
        self.recent = (self.recent + [(x, pose, index, t)])[-self.config.chain_frames:]

    def _next_clip(self) -> None:
        """Start a clip: a fresh memory holding the reference image (``chain_ref_pad``) and the
        last ``chain_frames`` frames, with their own indices, times and poses; the anchor is
        the newest of them."""
        self.memory.reset()
        self._last = None
        if self.config.chain_ref_pad and self.reference is not None:
            self._write(self.reference[0], self.reference[1], 0.0, index=0)
        for x, pose, index, t in self.recent:
            self._write(x, pose, t, index=index)
        self.anchor = self.recent[-1][0]
        self.clip += 1
        self.clip_made = 0

    def _check_interrupt(self, step: int, x: torch.Tensor) -> None:
        if self.interrupt.is_set():
            raise _Interrupted

    def __call__(self, image: np.ndarray | Frame, actions: str | Iterable, prompt: str | Iterable[str] = "",
                 num_frames: int | None = None, pose: np.ndarray | None = None,
                 callback: Callable[[int, list[Frame]], None] | None = None, progress: bool = True) -> GenerationOutput:
        """Start from ``image`` and generate (see :meth:`stream`); returns every frame made."""
        first = prompt if isinstance(prompt, str) else ""
        self.start(image, pose=pose, prompt=first)
        frames = list(self.stream(actions, prompt, num_frames=num_frames, callback=callback, progress=progress))
        return GenerationOutput(frames=frames, chunks=self.chunks, interrupted=self.interrupt.is_set())

    # ------------------------------------------------------------------ presentation
    def records(self, frame: Frame | None, output: Any) -> list[dict]:
        if frame is None or not isinstance(output, Frame):
            return []
        return [{"frame": output.index, "timestamp": round(output.timestamp, 6), "action": output.action,
                 "pose": np.round(output.pose, 4).tolist(), **{k: v for k, v in output.info.items()}}]

    def annotate(self, image: np.ndarray, output: Any) -> np.ndarray:
        if not isinstance(output, Frame):
            return image
        return annotate_text(image, [f"{output.action or ''} {self.prompt}".strip()]) if output.action else image


class _Interrupted(Exception):
    """Raised inside a denoising step when the interrupt flag is set."""
