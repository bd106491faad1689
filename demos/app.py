"""The streammem web demo: a Gradio 6 app over the shipped heads (``python serve.py``).

Four tabs, each on the visitor's own memories:

- **Ask**: upload a video (or stream the webcam) into a Pyramid Memory Bank and ask questions
  at any moment; an answer comes with its confidence, the frames it rested on (thumbnails and
  stream times) or, for a question the answerer cannot honestly answer, the refusal and why.
  The pyramid's levels (which frames each holds, at which times) are shown live.
- **Detect**: upload a video (or stream the webcam) through a detection head (the shipped small
  detector, OpenCV's HOG people detector, or a ``transformers`` detector the server was started
  with: ``python serve.py --detector hf:<model id or folder> [--classes "person,car"]``) with a
  memory (none, FeatureBank, DualMemory; an hf: detector takes none or FeatureBank);
  annotated frames stream back as they are processed, with the memory banks' statistics, and
  the annotated mp4 can be downloaded.
- **Generate**: from a start image (an upload, or a StreamWorld scene by seed), the generation
  head (:class:`~streammem.pipelines.generation.StreamingGenerationPipeline` on the shipped
  small causal video model) generates frames chunk by chunk from camera actions (letters
  F/B/L/R/U/D/I/O/S) and a prompt, on a memory picked from posekv, window, full, dual; frames
  stream back as they are made, *Stop* ends the run at once (the pipeline's interrupt), and
  *Continue* goes on from where the visitor's stream stopped, its memory intact. The stream so
  far is offered as an mp4.
- **Memory**: tokens and bytes of every memory over the frames written (bounded memories stay
  flat), and a snapshot (safetensors) of the visitor's own Ask, Detect or Generate head to
  download or upload; an upload is checked against the head's own tensors (names, shapes, dtypes, bytes)
  from the file's header before anything is read, and refused with a message naming the file.

Sessions: every browser session (every ``gradio_client.Client``) gets its own :class:`Session`
(its own pipelines, stream times and history; its own generation pipeline too), found by Gradio's ``session_hash`` and kept in
a ``gr.State`` whose ``time_to_live`` and ``delete_callback`` free it when idle; closing the
page frees it at once (``demo.unload``). The models' weights are loaded once and shared
read-only. Handlers run in Gradio's queue with concurrency limits (heavy work: ``Limits.concurrency``
at a time; questions in their own, wider lane so they are answered while a video streams in).
A bad request (no video, a non-video or oversized upload, a too-long video, a question before
any video, a malformed snapshot) gets a ``gr.Error`` saying what was wrong; an unexpected
failure is logged and reported the same way, and the session stays usable.

API (``gradio_client``): every event has a stable ``api_name``: ``ask_process``,
``ask_question``, ``ask_webcam``, ``ask_pyramid``, ``detect_video``, ``detect_webcam``,
``generate``, ``generate_continue``, ``generate_stop``, ``generate_prompt``, ``memory_stats``,
``snapshot_save``, ``snapshot_load``.

Example::

    from demos.app import build_app
    demo = build_app()
    demo.queue(default_concurrency_limit=2).launch(max_file_size="50mb")
"""

import argparse
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import gradio as gr
import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streammem.io import SourceError, VideoWriter, open_source
from streammem.models.answerer.refusal import QuestionRefused, Refusal
from streammem.models.hf import HubUnavailable
from streammem.pipelines.base import tensor_json
from streammem.pipelines.generation import (
    ACTION_LETTERS,
    GENERATION_MEMORIES,
    GenerationConfig,
    StreamingGenerationPipeline,
)
from streammem.pipelines.jobs.base import fit_to
from streammem.pipelines.jobs.detect import DETECTORS, build_detection_head
from streammem.pipelines.qa import StreamingQAPipeline
from streammem.types import Frame

__all__ = ["Limits", "Models", "Session", "Sessions", "build_app", "check_snapshot", "main", "MODEL_NOTES"]

log = logging.getLogger("streammem.app")

#: Detect tab's memory choices: (label, value of ``build_detection_head(memory=)``)
DETECT_MEMORIES = [("none (single frame)", "none"), ("FeatureBank (MAMBA)", "feature_bank"),
                   ("DualMemory (Mem4D)", "dual")]
DETECTOR_LABELS = [("shipped small detector (StreamWorld's 11 classes)", "small"),
                   ("OpenCV HOG people detector (real footage)", "hog")]
#: Generate tab's memory choices: (label, ``GenerationConfig.memory``)
GENERATE_MEMORIES = [("PoseKVMemory (RELIC: window + pooled history)", "posekv"), ("rolling window only", "window"),
                     ("full history (unpooled)", "full"), ("DualMemory (Mem4D)", "dual")]
ACTION_HELP = ("F/B forward/back (zoom in/out), L/R/U/D pan left/right/up/down, I/O zoom in/out, S stay; "
               "one letter per frame, repeated when fewer than the frames")
SNAPSHOT_HEADS = ("ask", "detect", "generate")
#: torch dtype -> the dtype names of a safetensors header
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
#: the most elements a snapshot's variable-length tensor (JSON text, a detector's temporal state) may have
_MAX_EXTRA = 2 ** 24
#: a webcam frame arriving this long after the previous one starts a new stream
WEBCAM_GAP_S = 10.0

MODEL_NOTES = """\
**What the shipped models know.** They are small models this project trains on its own procedural
world, StreamWorld, on a CPU:

- the **answerer** (Ask) was trained on StreamWorld's vocabulary only: its 11 object classes (person, cat,
  cup, rocket, shuttle, motorcycle, horse, circle, square, triangle, star), its 8 colours and the wording of
  its questions, e.g. *Is there a cat in view now?*, *Has a red star been in view at any time so far?*,
  *Where in the frame is the red star now?* (options: top left, top right, bottom left, bottom right).
  It refuses, and says why, any question with other words. Free-form questions about real footage need a
  vision-language model: start the demo with `python serve.py --answerer hf:<model id or folder>` (LLaVA,
  LLaVA-OneVision, SmolVLM / SmolVLM2; `load_answerer` in streammem/models/vlm.py).
- the **small detector** (Detect) knows StreamWorld's 11 classes; for people in real footage pick the
  **OpenCV HOG people detector**. Pretrained `transformers` detectors (DETR, RT-DETR, YOLOS; OWLv2 with
  the classes to look for) join the detector picker when the demo is started with
  `python serve.py --detector hf:<model id or folder> [--classes "person,car"]`; they know their own
  classes, and take the memory *none* or *FeatureBank*.
- the **generator** (Generate) is a 1.5 M-parameter causal video model trained here on StreamWorld: it makes
  64 x 64 frames, 2 per chunk, from camera actions and a prompt of StreamWorld's scene styles (`clean`,
  `medium`, `hard`, or none); any start image is continued as if it were a StreamWorld ground seen from
  above. Fed only its own frames it drifts into blurred colour fields within a few seconds; its pose-aware
  memory (posekv) helps on revisits, by under 1 dB (its model card, streammem/checkpoints/generator/README.md).
- Memories are bounded: their tokens and bytes stay flat however long the stream (Memory tab).
"""

GENERATE_NOTES = """\
The shipped generator makes **64 x 64 StreamWorld-like frames** (shown enlarged), two per chunk, each
chunk conditioned on the memory, the newest frame, the camera actions and the prompt. Start from a
StreamWorld scene (its seed) or upload any image (continued as if it were a StreamWorld ground).
*Continue* goes on from where your stream stopped, with its memory intact; *Stop* ends a run at once.
Prompt words: `clean`, `medium`, `hard` (StreamWorld's scene styles) or none; press Enter in the prompt
box to change the prompt of a running stream from its next chunk. It is a small model that runs on a
CPU, not a model to judge the memory by (see its model card)."""


@dataclass
class Limits:
    """What one visitor may ask of the server.

    Attributes:
        max_upload_mb: largest upload (video or snapshot), in MB (also ``launch(max_file_size=)``).
        max_video_s: longest video accepted, in seconds.
        max_side: frames are downscaled to this longer side before processing.
        ask_fps: Ask resamples videos to this rate (the shipped answerer's 8 fps).
        session_ttl_s: an idle session's memories are freed after this many seconds.
        max_sessions: sessions held at once (each holds its own memories).
        concurrency: videos / webcam frames processed at once, over all sessions.
        question_concurrency: questions answered at once (their own lane).
        webcam_time_limit_s: longest webcam stream.
        stream_every_s: seconds between webcam frames sent by the browser.
        history: rows of the memory-over-time plot kept per session.
        yield_every_s: least time between two annotated frames streamed back (Detect).
        view_every_s: least time between two pyramid views streamed back (Ask).
        max_gen_frames: most frames one Generate or Continue press makes.
        max_gen_steps: most denoising steps per chunk a visitor may ask for.
        gen_keep_frames: frames of a generated stream kept for its mp4 (the newest; the stream's
            memory is bounded on its own).
        gen_view_side: side of the generated frame shown (nearest-neighbour enlargement).
    """

    max_upload_mb: float = 50.0
    max_video_s: float = 180.0
    max_side: int = 480
    ask_fps: float = 8.0
    session_ttl_s: int = 3600
    max_sessions: int = 32
    concurrency: int = 2
    question_concurrency: int = 4
    webcam_time_limit_s: int = 600
    stream_every_s: float = 0.25
    history: int = 6000
    yield_every_s: float = 0.1
    view_every_s: float = 1.0
    max_gen_frames: int = 64
    max_gen_steps: int = 16
    gen_keep_frames: int = 1024
    gen_view_side: int = 256

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_video_s", "ask_fps", "stream_every_s", "yield_every_s",
                     "view_every_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_side", "session_ttl_s", "max_sessions", "concurrency", "question_concurrency",
                     "webcam_time_limit_s", "history", "max_gen_frames", "max_gen_steps", "gen_keep_frames",
                     "gen_view_side"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"Limits.{name} must be an int >= 1, got {getattr(self, name)!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)


class VLMFrameEncoder:
    """``Frame -> Tokens`` through a :class:`~streammem.models.vlm.LlavaAnswerer`'s vision tower,
    so its features are what the pyramid stores."""

    def __init__(self, answerer) -> None:
        self.answerer, self.dim, self.grid = answerer, answerer.dim, answerer.grid

    def __call__(self, frame: Frame):
        return self.answerer.encode_frames([frame])[0]


@dataclass
class Models:
    """What every session shares, read-only: the QA encoder and answerer, where the small
    detector's checkpoint is (each session builds its own detection head from it: a head holds
    stream state), and the generator's model (loaded on first use, once; each session builds its
    own generation pipeline on it).

    ``answerer``: None for the shipped one, a checkpoint folder of a ``SmallAnswerer``, or
    ``hf:<model id or folder>`` for a vision-language model (:func:`~streammem.models.vlm.load_answerer`:
    LLaVA, LLaVA-NeXT(-Video), LLaVA-OneVision, SmolVLM / SmolVLM2, Idefics3).

    ``hf_detectors``: the Detect tab's ``transformers`` detectors, ``{picker value: head}``
    (:meth:`add_detector`). Each head is built once by
    :func:`~streammem.pipelines.jobs.build_detection_head` (as ``streammem detect --detector
    hf:...`` builds it) and serves as a template: a session's head shares its model weights
    (read-only, inference only) and gets its own memory banks and track re-scorer."""

    encoder: Any
    answerer: Any
    answerer_name: str = "shipped"
    detector_checkpoint: str | None = None
    generator_checkpoint: str | None = None
    hf_detectors: dict[str, Any] = field(default_factory=dict)
    hf_labels: dict[str, str] = field(default_factory=dict)
    _generator: Any = field(default=None, repr=False)
    _generator_lock: Any = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, answerer: str | None = None, detector_checkpoint: str | None = None,
             generator_checkpoint: str | None = None) -> "Models":
        from streammem.checkpoints import path
        from streammem.models.answerer import SmallAnswerer
        from streammem.models.grid_encoder import GridEncoder
        from streammem.models.hf import hub_errors, parse_spec

        hf = parse_spec(answerer)
        if hf is not None:
            from streammem.models.vlm import load_answerer

            with hub_errors(hf):
                ans = load_answerer("hf:" + (os.path.expanduser(hf) if Path(hf).expanduser().is_dir() else hf))
            return cls(VLMFrameEncoder(ans), ans, answerer, detector_checkpoint, generator_checkpoint)
        folder = Path(answerer) if answerer else path("answerer")
        if not (folder / "config.json").is_file():
            raise ValueError(f"--answerer: no answerer checkpoint (config.json) in {folder}; give a folder written by "
                             "`streammem train answerer` or hf:<model id or folder>")
        enc = GridEncoder.from_pretrained(str(path("grid_encoder"))).eval()
        ans = SmallAnswerer.from_pretrained(str(folder)).eval()
        return cls(enc, ans, "shipped" if answerer is None else str(folder), detector_checkpoint,
                   generator_checkpoint)

    def qa_pipeline(self) -> StreamingQAPipeline:
        """A fresh QA head on the shared models: a Pyramid Memory Bank of the OVBench budget
        (832 tokens), with thumbnails of the frames it holds."""
        return StreamingQAPipeline(self.encoder, self.answerer, memory="ovbench", keep_thumbnails=True, thumb_side=96)

    def add_detector(self, spec: str, classes: str | None = None) -> str:
        """Load the ``transformers`` detector ``spec`` (``hf:<model id or folder>``; ``classes``: what
        an open-vocabulary one looks for, e.g. ``"person,car"``) once, through
        :func:`~streammem.pipelines.jobs.build_detection_head` with its defaults, and offer it in the
        Detect tab's picker as ``"<id> (transformers)"``. Returns its picker value (``spec``).
        Raises ValueError on a bad spec or options, or a spec already added, and
        :class:`~streammem.models.hf.HubUnavailable` when it cannot be fetched."""
        from streammem.models.hf import parse_spec

        name = parse_spec(spec)
        if name is None:
            raise ValueError(f"--detector: the web demo adds transformers detectors, hf:<model id or folder>; "
                             f"got {spec!r} (small and hog are always offered)")
        name = os.path.expanduser(name) if Path(name).expanduser().is_dir() else name
        value = f"hf:{name}"
        if value in self.hf_detectors:
            raise ValueError(f"--detector {spec} is given twice")
        self.hf_detectors[value] = build_detection_head(value, classes=classes, memory="feature_bank")
        label = f"{name.rstrip('/')} (transformers"
        self.hf_labels[value] = label + (f"; {', '.join(self.hf_detectors[value].class_names)})" if classes else ")")
        return value

    def detector_choices(self) -> list[tuple[str, str]]:
        """The Detect tab's picker: ``(label, value)`` of the shipped detectors and the added hf: ones."""
        return DETECTOR_LABELS + [(self.hf_labels[v], v) for v in self.hf_detectors]

    def detection_head(self, detector: str, memory: str):
        """A fresh detection head for a session (ValueError on settings the detector does not take)."""
        template = self.hf_detectors.get(detector)
        if template is None:
            return build_detection_head(detector, self.detector_checkpoint if detector == "small" else None, memory)
        from streammem.pipelines.detection import HF_MEMORIES, HFDetectionPipeline, TrackRescorer

        if memory not in HF_MEMORIES:
            raise ValueError(f"a transformers detector takes the memory {' or '.join(HF_MEMORIES)}, got {memory!r}")
        tracker = None if template.tracker is None else TrackRescorer(template.tracker.config)
        head = HFDetectionPipeline(template.detector, replace(template.config, memory=memory), tracker=tracker)
        head.display_threshold = template.display_threshold
        return head

    def generator(self):
        """The generator's :class:`~streammem.models.video_dit.CausalVideoDiT`, loaded once (the
        shipped checkpoint, or ``generator_checkpoint``) and shared read-only by every session."""
        with self._generator_lock:
            if self._generator is None:
                from streammem.pipelines.jobs.generate import load_default_generator

                self._generator = load_default_generator(self.generator_checkpoint).model
            return self._generator

    def generation_pipeline(self, config: GenerationConfig) -> StreamingGenerationPipeline:
        """A fresh generation head (its own memory, camera and anchor) on the shared model."""
        return StreamingGenerationPipeline(self.generator(), config)


class Session:
    """One visitor's state: its QA head and detection head (built on first use), which stream each
    holds, its webcam clocks, and the memory-over-time history. Everything here belongs to this
    visitor alone; :meth:`close` frees it and removes its files."""

    def __init__(self, session_id: str, models: Models, limits: Limits) -> None:
        self.id, self.models, self.limits = session_id, models, limits
        self.dir = Path(tempfile.mkdtemp(prefix="streammem-app-"))
        self.lock = threading.RLock()
        self.qa: StreamingQAPipeline | None = None
        self.qa_source: str | None = None
        self.qa_run = 0  # bumped when a new stream starts, so an older processing loop stops
        self.det = None
        self.det_key: tuple[str, str] | None = None
        self.det_source: str | None = None
        self.det_run = 0
        self.gen: StreamingGenerationPipeline | None = None
        self.gen_source: str | None = None
        self.gen_run = 0
        self.gen_prompt = ""  # the prompt a running stream reads at its next chunk
        self.gen_frames: deque[np.ndarray] = deque(maxlen=limits.gen_keep_frames)  # the stream, for its mp4
        self.webcam: dict[str, list[float]] = {}  # "ask" / "detect" -> [t0, last arrival, frames]
        self.history: deque[dict] = deque(maxlen=limits.history)
        self.steps: dict[str, int] = {"ask": 0, "detect": 0, "generate": 0}
        self.closed = False
        self.created = time.time()

    # ------------------------------------------------------------------ heads
    def qa_head(self) -> StreamingQAPipeline:
        if self.qa is None:
            self.qa = self.models.qa_pipeline()
        return self.qa

    def start_qa(self, source: str) -> StreamingQAPipeline:
        """Forget the QA stream and start ``source`` (a new video or a webcam stream)."""
        with self.lock:
            qa = self.qa_head()
            qa.reset()
            self.qa_source, self.qa_run = source, self.qa_run + 1
            return qa

    def detection_head(self, detector: str, memory: str, source: str | None = None, restart: bool = False):
        """The detection head for these settings; other settings build a new one, and another
        ``source`` (or ``restart``) starts a new stream on it."""
        with self.lock:
            key = (detector, memory)
            if self.det is None or self.det_key != key:
                self.det, self.det_key = self.models.detection_head(detector, memory), key
                self.det_source = None
            if source is not None and (restart or source != self.det_source):
                self.det.reset()
                self.det_source, self.det_run = source, self.det_run + 1
            return self.det

    def webcam_clock(self, kind: str) -> tuple[int, float, bool]:
        """``(frame index, stream time, new stream)`` of a webcam frame arriving now."""
        now = time.monotonic()
        clock = self.webcam.get(kind)
        new = clock is None or now - clock[1] > WEBCAM_GAP_S
        if new:
            clock = self.webcam[kind] = [now, now, 0]
        index = int(clock[2])
        clock[1], clock[2] = now, clock[2] + 1
        return index, now - clock[0], new

    # ------------------------------------------------------------------ memory over time
    def record(self, kind: str, head, frames: int = 1) -> None:
        """Append one row per memory of ``head`` (tokens and bytes after these ``frames`` frames)."""
        self.steps[kind] += frames
        for role, m in head.memories().items():
            self.history.append({"frame": self.steps[kind], "memory": f"{kind}: {type(m).__name__} ({role})",
                                 "tokens": int(m.num_tokens), "bytes": int(m.nbytes)})

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.gen is not None:
                self.gen.interrupt.set()
            self.qa = self.det = self.gen = None
            self.history.clear()
            self.gen_frames.clear()
            shutil.rmtree(self.dir, ignore_errors=True)


class Sessions:
    """The live sessions by Gradio ``session_hash`` (at most ``limits.max_sessions``)."""

    def __init__(self, models: Models, limits: Limits) -> None:
        self.models, self.limits = models, limits
        self._live: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, request: gr.Request | None) -> Session:
        sid = getattr(request, "session_hash", None) or "local"
        with self._lock:
            s = self._live.get(sid)
            if s is not None and not s.closed:
                return s
            if len(self._live) >= self.limits.max_sessions:
                raise gr.Error(f"the demo is serving its maximum of {self.limits.max_sessions} visitors; "
                               "please try again in a few minutes")
            s = self._live[sid] = Session(sid, self.models, self.limits)
            return s

    def close(self, session: "Session | str | None") -> None:
        sid = session.id if isinstance(session, Session) else session
        with self._lock:
            s = self._live.pop(sid, None) if sid is not None else None
        if s is not None:
            s.close()
        if isinstance(session, Session):
            session.close()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, sid: str) -> bool:
        return sid in self._live


# ---------------------------------------------------------------------- checks
def _name(path: str | os.PathLike) -> str:
    return Path(path).name


def open_video(path: str | None, limits: Limits, **options):
    """The uploaded video at ``path`` opened as a source, or ``gr.Error`` saying what is wrong:
    nothing uploaded, too large, not a video, too long."""
    if not path:
        raise gr.Error("no video: upload one first (or use the webcam)")
    p = Path(path)
    if not p.is_file():
        raise gr.Error(f"{p.name}: the upload is not on the server any more; upload it again")
    size = p.stat().st_size
    if size > limits.max_upload_bytes:
        raise gr.Error(f"{p.name} is {size / 1e6:.1f} MB; this demo takes uploads up to {limits.max_upload_mb:g} MB")
    try:
        src = open_source(str(p), max_side=limits.max_side, **options)
    except SourceError as exc:
        raise gr.Error(f"{p.name} is not a video this demo can read ({exc})") from None
    dur = src.info.duration
    if dur is not None and dur > limits.max_video_s:
        raise gr.Error(f"{p.name} is {dur:.0f} s long; this demo takes videos up to {limits.max_video_s:g} s "
                       "(cut it, or run `streammem run` on it)")
    return src


def _snapshot_header(path: str | os.PathLike, max_bytes: int) -> tuple[dict, dict]:
    """``({tensor: (shape, dtype)}, head.meta)`` of a head snapshot, read from the file's header
    (and its small ``head.meta`` tensor) only; ValueError naming the file when it is too large,
    not a safetensors file or not a streammem head snapshot."""
    name = _name(path)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{name} is {size / 1e6:.1f} MB, more than the {max_bytes / 1e6:g} MB a snapshot may take")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            meta = f.get_tensor("head.meta") if "head.meta" in header and math.prod(header["head.meta"][0]) < 2 ** 20 \
                else None
    except Exception as err:  # the safetensors library raises its own error types
        raise ValueError(f"{name} is not a safetensors file ({type(err).__name__}); upload a snapshot saved "
                         "from the Memory tab") from None
    if meta is None:
        raise ValueError(f"{name} is not a streammem head snapshot (no 'head.meta' tensor); upload a snapshot "
                         "saved from the Memory tab")
    try:
        meta = tensor_json(meta)
        if not isinstance(meta, dict):
            raise TypeError
    except Exception:  # noqa: BLE001 - anything unreadable is a malformed file
        raise ValueError(f"{name}: its 'head.meta' is not readable; it is not a streammem snapshot") from None
    return header, meta


def generation_config_of(path: str | os.PathLike, max_bytes: int, limits: Limits) -> GenerationConfig:
    """The :class:`GenerationConfig` a Generate snapshot was made with, from its header: only
    what the Generate tab lets a visitor choose (memory, seed, denoising steps, within
    ``limits``) may differ from the defaults, so nothing larger than the tab builds is ever
    allocated. ValueError naming the file otherwise."""
    name = _name(path)
    _, meta = _snapshot_header(path, max_bytes)
    if meta.get("name") != StreamingGenerationPipeline.name:
        raise ValueError(f"{name} is a snapshot of the {meta.get('name')!r} head; this is the "
                         f"{StreamingGenerationPipeline.name!r} head (pick the other head to load it)")
    config = meta.get("config")
    default = GenerationConfig().__dict__
    if not isinstance(config, dict) or not set(config) <= set(default):
        raise ValueError(f"{name}: its generation config is not this demo's (fields {sorted(config or {})})")
    config = {**default, **config}  # a field the snapshot predates: its default
    other = sorted(k for k in default if k not in ("memory", "seed", "num_inference_steps") and config[k] != default[k])
    if other:
        raise ValueError(f"{name} was made with generation settings this demo does not offer (fields {other})")
    steps = config["num_inference_steps"]
    if not (isinstance(steps, int) and 1 <= steps <= limits.max_gen_steps):
        raise ValueError(f"{name}: num_inference_steps must be an int in [1, {limits.max_gen_steps}], got {steps!r}")
    try:
        return GenerationConfig(**config)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def check_snapshot(path: str | os.PathLike, head, max_bytes: int) -> dict:
    """Read a head snapshot (safetensors, written by the Memory tab) for ``head``, checking it
    before anything is loaded: the file's size, that it is a safetensors file, that it is a
    streammem head snapshot of this head's kind, and that its tensors are exactly ``head``'s
    own (names, shapes, dtypes) from the header. Returns the state dict; raises ValueError
    naming the file and what is wrong. ``head.load_state_dict`` then checks the configuration."""
    name = _name(path)
    header, meta = _snapshot_header(path, max_bytes)
    kind = meta.get("name")
    if kind != head.name:
        raise ValueError(f"{name} is a snapshot of the {kind!r} head; this is the {head.name!r} head "
                         f"(pick the other head to load it)")
    mine = {k: (tuple(v.shape), _ST_DTYPES.get(v.dtype, str(v.dtype))) for k, v in head.state_dict().items()
            if k != "head.meta" and not k.startswith("extra.")}
    theirs = {k: v for k, v in header.items() if k != "head.meta" and not k.startswith("extra.")}
    if set(mine) != set(theirs):
        extra, missing = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        raise ValueError(f"{name} does not match this head's memories (tensors it lacks: {missing[:6]}, "
                         f"tensors it has in excess: {extra[:6]}); was it saved with other Detect settings?")
    for k, (shape, dtype) in header.items():
        variable = k == "head.meta" or k.startswith("extra.") or k.endswith(("meta.config", "meta.kind"))
        if variable:  # lengths vary with the stream; their contents are checked by load_state_dict
            if math.prod(shape) > _MAX_EXTRA:
                raise ValueError(f"{name}: tensor {k!r} is oversized ({shape})")
        elif (shape, dtype) != mine[k]:
            raise ValueError(f"{name}: tensor {k!r} is {shape} {dtype} in the file, {mine[k][0]} {mine[k][1]} "
                             "in this head")
    return load_file(str(path))


# ---------------------------------------------------------------------- presentation
def _placeholder(text: str, side: int = 96) -> np.ndarray:
    img = np.full((side, side, 3), 60, np.uint8)
    cv2.putText(img, text, (6, side // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (230, 230, 230), 1, cv2.LINE_AA)
    return img


def pyramid_view(session: Session) -> tuple[str, list, dict]:
    """Status line, gallery (thumbnail, caption) and JSON of what the QA memory holds."""
    qa = session.qa
    if qa is None or qa.frames == 0:
        return ("No video yet: upload one and press **Process**, or start the webcam.", [],
                {"source": None, "levels": []})
    with qa._lock:
        held = qa.memory.frames()
        thumbs = dict(qa.thumbs)
        stats = qa.memory.stats()
        frames, now = qa.frames, qa.time
    levels: dict[int, list] = {}
    gallery = []
    for level, fi, ts in sorted(held, key=lambda r: (r[0], r[2])):
        levels.setdefault(level, []).append({"frame_index": int(fi), "timestamp": round(float(ts), 3)})
        img = thumbs.get(fi)
        gallery.append((img if img is not None else _placeholder(f"#{fi}"), f"L{level} · {ts:.2f} s · #{fi}"))
    data = {"source": session.qa_source, "frames": frames, "time": now,
            "tokens": stats["num_tokens"], "capacity": stats["capacity"],
            "levels": [{"level": lvl, "frames": fr} for lvl, fr in sorted(levels.items())]}
    per = ", ".join(f"L{lvl}: {len(fr)} frames" for lvl, fr in sorted(levels.items()))
    status = (f"**{session.qa_source}**: {frames} frames written, stream time {now:.2f} s. "
              f"Memory {stats['num_tokens']}/{stats['capacity']} tokens ({per}).")
    return status, gallery, data


def answer_view(question: str, options: list[str] | None, answer, source: str | None) -> tuple[str, list, dict]:
    """Markdown, evidence gallery and JSON of an answer or a refusal."""
    if isinstance(answer, Refusal):
        md = f"**Refused** ({answer.kind}): {answer.reason}"
        return md, [], {"question": question, "options": options, "source": source, **answer.to_dict()}
    ev = answer.evidence
    lines = [f"**{answer.text}**, confidence {answer.confidence:.0%}, asked at stream time {answer.query_time:.2f} s "
             f"of *{source}*."]
    if ev:
        lines.append("Evidence: " + ", ".join(f"{e['timestamp']:.2f} s (weight {e['weight']:.2f})" for e in ev))
    gallery = [(e["thumbnail"] if e.get("thumbnail") is not None else _placeholder(f"#{e['frame_index']}"),
                f"{e['timestamp']:.2f} s · weight {e['weight']:.2f}") for e in ev]
    data = answer.to_dict()
    data["evidence"] = [{k: v for k, v in e.items() if k != "thumbnail"} for e in ev]
    return "\n\n".join(lines), gallery, {"question": question, "options": options, "source": source, **data}


def parse_options(text: str | None) -> list[str] | None:
    """Options typed one per line or separated by commas; None when empty (a yes/no question)."""
    if not text or not text.strip():
        return None
    sep = "\n" if "\n" in text.strip() else ","
    return [o.strip() for o in text.split(sep) if o.strip()]


def _webcam_image(image: Any, max_side: int) -> np.ndarray:
    if image is None:
        raise gr.Error("no webcam frame arrived; allow the camera in the browser")
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise gr.Error(f"a webcam frame must be an RGB image, got {img.dtype} {img.shape}")
    img = np.ascontiguousarray(img[..., :3])
    h, w = img.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


def check_actions(actions: str | None) -> str:
    """The action letters typed (spaces and commas ignored, any case), upper-cased; gr.Error
    naming the unknown letters otherwise."""
    acts = "".join(ch for ch in str(actions or "") if not ch.isspace() and ch != ",").upper()
    if not acts:
        raise gr.Error(f"type at least one action letter ({ACTION_HELP})")
    bad = sorted({a for a in acts if a not in ACTION_LETTERS})
    if bad:
        raise gr.Error(f"unknown action letters {''.join(bad)!r} in {acts!r}; use {ACTION_HELP}")
    return acts


def _int_in(value, name: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]`` (a whole float is taken), or gr.Error naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}") from None
    if not (v == int(v) and lo <= v <= hi):
        raise gr.Error(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    return int(v)


def _start_image(image: Any) -> np.ndarray:
    """An uploaded start image as RGB uint8 (grey and RGBA converted), or gr.Error."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8 or min(img.shape[:2]) < 1:
        raise gr.Error(f"the start image must be an RGB image, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img[..., :3])


def _enlarge(image: np.ndarray, side: int) -> np.ndarray:
    """A generated frame shown at ``side`` pixels (nearest neighbour: the pixels as made)."""
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_NEAREST) if image.shape[0] < side else image


# ---------------------------------------------------------------------- failures
def _failed(what: str, exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, (ValueError, SourceError)):  # bad input: its message says what
        return gr.Error(f"{what}: {exc}")
    log.exception("%s failed", what)
    return gr.Error(f"{what} failed ({type(exc).__name__}: {exc}); the server and your session are fine, "
                    "try again or with another input")


def guarded(what: str):
    """Report any failure of a handler as a ``gr.Error`` (logged when unexpected): one request's
    failure never reaches the server's loop, and the session stays usable."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported to the visitor
                raise _failed(what, exc) from None
        return run
    return wrap


def guarded_stream(what: str):
    """:func:`guarded` for generator handlers."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported to the visitor
                raise _failed(what, exc) from None
        return run
    return wrap


# ---------------------------------------------------------------------- handlers
class App:
    """The handlers, on shared models and per-session state."""

    def __init__(self, models: Models, limits: Limits) -> None:
        self.models, self.limits = models, limits
        self.sessions = Sessions(models, limits)

    # ------------------------------------------------------------------ Ask
    def ask_process(self, video, state, request: gr.Request, progress=gr.Progress()):
        """Stream an uploaded video into the QA memory; yields the pyramid view as it fills."""
        session = self.sessions.get(request)
        src = open_video(video, self.limits, fps=self.limits.ask_fps)
        name = _name(video)
        qa = session.start_qa(f"video {name}")
        run = session.qa_run
        total = src.info.selected_frames or src.info.num_frames
        last = 0.0
        n = 0
        try:
            for frame in src:
                with session.lock:
                    if session.closed or session.qa_run != run:
                        return  # the visitor started another stream: this one is over
                    qa.step(frame)
                    session.record("ask", qa)
                n += 1
                if time.monotonic() - last > self.limits.view_every_s:
                    last = time.monotonic()
                    progress((n, total) if total else n, desc=f"reading {name}", unit="frames")
                    yield (*pyramid_view(session), session)
        except SourceError as exc:
            if n == 0:
                raise gr.Error(f"{name} is not a video this demo can read ({exc})") from None
            gr.Warning(f"{name}: reading stopped at frame {n} ({exc}); the memory holds what came before")
        if n == 0:
            raise gr.Error(f"{name} has no frame this demo can read")
        yield (*pyramid_view(session), session)

    def ask_question(self, question, options, state, request: gr.Request):
        """Answer a question now, from the memory as it is (while a video streams in too)."""
        session = self.sessions.get(request)
        if not question or not str(question).strip():
            raise gr.Error("type a question first")
        qa = session.qa
        if qa is None or qa.frames == 0:
            raise gr.Error("no video in memory yet: upload one and press Process (or start the webcam), "
                           "then ask")
        opts = parse_options(options)
        try:
            answer = qa.ask(question, opts)
        except QuestionRefused as exc:  # the answerer cannot honestly answer it: shown as the answer
            answer = exc.refusal
        return (*answer_view(question, opts, answer, session.qa_source), session)

    def ask_webcam(self, image, state, request: gr.Request):
        """One webcam frame into the QA memory (a gap of a few seconds starts a new stream)."""
        session = self.sessions.get(request)
        img = _webcam_image(image, self.limits.max_side)
        index, t, new = session.webcam_clock("ask")
        with session.lock:
            qa = session.start_qa("webcam") if new or session.qa_source != "webcam" else session.qa_head()
            qa.step(Frame(index=index, timestamp=t, image=img))
            session.record("ask", qa)
        return (*pyramid_view(session), session)

    def ask_pyramid(self, state, request: gr.Request):
        session = self.sessions.get(request)
        return (*pyramid_view(session), session)

    # ------------------------------------------------------------------ Detect
    def detect_video(self, video, detector, memory, state, request: gr.Request, progress=gr.Progress()):
        """Detect in an uploaded video; yields annotated frames as they are done, then the mp4."""
        session = self.sessions.get(request)
        detector, memory = self._detect_settings(detector, memory)
        src = open_video(video, self.limits)
        name = _name(video)
        head = session.detection_head(detector, memory, source=f"video {name}", restart=True)
        run = session.det_run
        total = src.info.selected_frames or src.info.num_frames
        out = session.dir / f"{Path(name).stem}_annotated.mp4"
        writer = VideoWriter(out, fps=src.info.fps or 8.0)
        n, last, t0, error = 0, 0.0, time.perf_counter(), None
        image, labels = None, Counter()
        try:
            for frame in src:
                with session.lock:
                    if session.closed or session.det_run != run:
                        writer.discard()
                        return  # the visitor started another stream: this one is over
                    det = head.step(frame)
                    session.record("detect", head)
                labels.update(_class_names(det))
                image = head.annotate(frame.image, det)
                writer.write(fit_to(image, writer.size), timestamp=frame.timestamp)
                n += 1
                if time.monotonic() - last > self.limits.yield_every_s:
                    last = time.monotonic()
                    progress((n, total) if total else n, desc=f"detecting in {name}", unit="frames")
                    yield image, self._detect_stats(head, n, t0, len(det), labels), None, session
        except SourceError as exc:
            error = exc
        except BaseException:
            writer.discard()
            raise
        if n == 0:
            writer.discard()
            raise gr.Error(f"{name} has no frame this demo can read" + (f" ({error})" if error else ""))
        if error is not None:
            gr.Warning(f"{name}: reading stopped at frame {n} ({error}); the video holds what came before")
        path = writer.close()
        yield image, self._detect_stats(head, n, t0, None, labels), str(path) if path else None, session

    def detect_webcam(self, image, detector, memory, state, request: gr.Request):
        """One webcam frame through the detection head; returns it annotated."""
        session = self.sessions.get(request)
        detector, memory = self._detect_settings(detector, memory)
        img = _webcam_image(image, self.limits.max_side)
        index, t, new = session.webcam_clock("detect")
        with session.lock:
            head = session.detection_head(detector, memory, source="webcam", restart=new)
            det = head.step(Frame(index=index, timestamp=t, image=img))
            session.record("detect", head)
        return head.annotate(img, det), self._detect_stats(head, head.counters.get("frames", index + 1),
                                                             None, len(det)), session

    def _detect_settings(self, detector, memory) -> tuple[str, str]:
        detector = detector or "small"
        memory = memory or "feature_bank"
        known = (*DETECTORS, *self.models.hf_detectors)
        if detector not in known:
            raise gr.Error(f"detector must be one of {', '.join(known)}, got {detector!r}")
        if memory not in {v for _, v in DETECT_MEMORIES}:
            raise gr.Error(f"memory must be one of {', '.join(v for _, v in DETECT_MEMORIES)}, got {memory!r}")
        if detector in self.models.hf_detectors and memory == "dual":
            raise gr.Error(f"{detector} takes the memory none or feature_bank (DualMemory needs the small "
                           "detector's pixel features)")
        return detector, memory

    @staticmethod
    def _detect_stats(head, frames: int, t0: float | None, last: int | None, labels: Counter | None = None) -> dict:
        """The Detect tab's JSON: frames done, speed, detections in the newest frame, ``labels``
        (detections per class name over the video so far) and the head's statistics."""
        out = {"frames": frames, **({"fps": round(frames / max(1e-9, time.perf_counter() - t0), 2)} if t0 else {}),
               **({"detections_in_frame": last} if last is not None else {}),
               **({"labels": dict(labels.most_common())} if labels is not None else {}), "pipeline": head.stats()}
        return json.loads(json.dumps(out, default=str))

    # ------------------------------------------------------------------ Generate
    def generate(self, image, scene, actions, prompt, memory, frames, seed, steps, state, request: gr.Request,
                 progress=gr.Progress()):
        """Start a new stream from the uploaded ``image`` (or, without one, StreamWorld scene
        ``scene``) and generate ``frames`` frames; yields each chunk's newest frame as it is made,
        then the stream's mp4."""
        session = self.sessions.get(request)
        acts, n, steps = self._generate_inputs(actions, frames, steps)
        memory = memory or "posekv"
        if memory not in GENERATION_MEMORIES:
            raise gr.Error(f"memory must be one of {', '.join(GENERATION_MEMORIES)}, got {memory!r}")
        seed = _int_in(0 if seed is None else seed, "seed", 0, 2 ** 31 - 1)
        head = self.models.generation_pipeline(GenerationConfig(memory=memory, num_inference_steps=steps, seed=seed))
        prompt = head.check_prompt(prompt or "")
        if image is not None:
            start, pose, source = _start_image(image), None, "uploaded image"
        else:
            from streammem.world import World

            scene = _int_in(0 if scene is None else scene, "scene seed", 0, 2 ** 31 - 1)
            first = next(iter(World(seed=scene, preset="clean", size=head.model.config.sample_size, frames=1)))
            start, pose, source = first.image, first.pose, f"StreamWorld scene {scene}"
        with session.lock:
            if session.gen is not None:
                session.gen.interrupt.set()  # an older run stops at once
            first = head.start(start, pose=pose, prompt=prompt)
            session.gen, session.gen_source, session.gen_prompt = head, source, prompt
            session.gen_run += 1
            session.gen_frames.clear()
            session.gen_frames.append(first.image)
            session.record("generate", head)
        yield from self._generate_run(session, head, acts, n, progress)

    def generate_continue(self, actions, prompt, frames, steps, state, request: gr.Request, progress=gr.Progress()):
        """Go on from where this visitor's stream stopped (its memory, camera and newest frame
        intact), ``frames`` more frames; the stream's memory and seed stay as they were."""
        session = self.sessions.get(request)
        acts, n, steps = self._generate_inputs(actions, frames, steps)
        with session.lock:
            head = session.gen
            if head is None or head.anchor is None:
                raise gr.Error("nothing to continue yet: press Generate first (or load a Generate snapshot)")
            prompt = head.check_prompt(prompt or "")
            head.interrupt.set()  # a run still going stops at its next step
            head.config.num_inference_steps = steps
            session.gen_prompt = prompt
            session.gen_run += 1
        yield from self._generate_run(session, head, acts, n, progress)

    def _generate_inputs(self, actions, frames, steps) -> tuple[str, int, int]:
        acts = check_actions(actions)
        n = _int_in(frames, "frames", 1, self.limits.max_gen_frames)
        steps = _int_in(8 if steps is None else steps, "steps", 1, self.limits.max_gen_steps)
        return acts, n, steps

    def _generate_run(self, session: Session, head: StreamingGenerationPipeline, acts: str, n: int, progress):
        """Generate ``n`` frames on ``head`` (the actions repeating), a chunk per step under the
        session lock; the prompt is read per chunk from ``session.gen_prompt``."""
        run = session.gen_run
        seq = (acts * (n // len(acts) + 1))[:n]
        prompts = iter(lambda: session.gen_prompt, None)  # endless: read when each chunk starts
        frames = head.stream(seq, prompts, num_frames=n, progress=False)
        made, chunk, t0, image = 0, [], time.perf_counter(), None
        while True:
            with session.lock:
                if session.closed or session.gen_run != run or session.gen is not head:
                    return  # the visitor started another run: this one is over
                chunk = []
                for frame in frames:  # one chunk (made at once): min(chunk_frames, frames left) frames
                    chunk.append(frame)
                    session.gen_frames.append(frame.image)
                    if len(chunk) >= head.model.config.chunk_frames or made + len(chunk) >= n:
                        break
                if chunk:
                    session.record("generate", head, frames=len(chunk))
            if not chunk:
                break
            made += len(chunk)
            image = _enlarge(chunk[-1].image, self.limits.gen_view_side)
            progress((made, n), desc="generating", unit="frames")
            yield image, self._generate_stats(session, head, made, n, t0), None, session
            if made >= n:
                break
        interrupted = head.interrupt.is_set() and made < n
        with session.lock:
            if session.gen_run != run:
                return
            images = list(session.gen_frames)
        path = self._write_stream(session, images, head.config.fps, run)
        if image is None and images:
            image = _enlarge(images[-1], self.limits.gen_view_side)
        yield image, self._generate_stats(session, head, made, n, t0, interrupted), str(path) if path else None, session

    @staticmethod
    def _write_stream(session: Session, images: list[np.ndarray], fps: float, run: int) -> Path | None:
        """The stream so far (the newest ``gen_keep_frames`` frames) as ``generated_<run>.mp4``;
        older runs' files are removed."""
        for old in session.dir.glob("generated_*.mp4"):
            old.unlink(missing_ok=True)
        writer = VideoWriter(session.dir / f"generated_{run}.mp4", fps=fps)
        for img in images:
            writer.write(img)
        return writer.close()

    @staticmethod
    def _generate_stats(session: Session, head: StreamingGenerationPipeline, made: int, n: int, t0: float,
                        interrupted: bool = False) -> dict:
        out = {"source": session.gen_source, "generated": made, "asked": n, "interrupted": interrupted,
               "prompt": head.prompt, "seconds": round(time.perf_counter() - t0, 3),
               "num_inference_steps": head.config.num_inference_steps, "seed": head.config.seed,
               "pipeline": head.stats()}
        return json.loads(json.dumps(out, default=str))

    def generate_stop(self, state, request: gr.Request):
        """Stop this visitor's running generation now (the pipeline's interrupt, checked between
        denoising steps); the stream keeps what was made and can be continued."""
        session = self.sessions.get(request)
        head = session.gen
        if head is None:
            return "Nothing is being generated.", session
        head.interrupt.set()
        return f"Stopped after {head.frames} frames in the stream; press Continue to go on.", session

    def generate_prompt(self, prompt, state, request: gr.Request):
        """Change the prompt of this visitor's stream from its next chunk (checked first)."""
        session = self.sessions.get(request)
        head = session.gen
        if head is None:
            raise gr.Error("no stream yet: press Generate first")
        session.gen_prompt = head.check_prompt(prompt or "")
        return f"Prompt {session.gen_prompt!r} from the next chunk.", session

    # ------------------------------------------------------------------ Memory
    def memory_stats(self, state, request: gr.Request):
        """Tokens and bytes over the frames written, per memory of this session, and current stats."""
        session = self.sessions.get(request)
        with session.lock:
            rows = list(session.history)
            stats = {"ask": session.qa.stats() if session.qa is not None else None,
                     "detect": session.det.stats() if session.det is not None else None,
                     "generate": session.gen.stats() if session.gen is not None else None,
                     "ask_source": session.qa_source, "detect_source": session.det_source,
                     "generate_source": session.gen_source}
        df = pd.DataFrame(rows, columns=["frame", "memory", "tokens", "bytes"])
        return df, df, json.loads(json.dumps(stats, default=str)), session

    def snapshot_save(self, head_name, state, request: gr.Request):
        """This session's Ask, Detect or Generate head as a safetensors snapshot to download."""
        session = self.sessions.get(request)
        head = self._snapshot_head(session, head_name)
        if head is None:
            raise gr.Error(f"nothing to save yet: run {head_name.capitalize()} first")
        with session.lock:
            state_dict = {k: v.contiguous() for k, v in head.state_dict().items()}
        path = session.dir / f"streammem_{head_name}_snapshot.safetensors"
        save_file(state_dict, str(path), metadata={"format": "streammem.head", "head": head.name})
        size = path.stat().st_size
        return str(path), f"Saved the {head_name} head's memory ({size / 1e6:.2f} MB).", session

    def snapshot_load(self, file, head_name, detector, memory, state, request: gr.Request):
        """Restore this session's Ask, Detect or Generate head from an uploaded snapshot (checked
        first). Detect takes the tab's detector and memory; Generate builds its head from the
        snapshot's own settings (only those the Generate tab offers)."""
        session = self.sessions.get(request)
        if not file:
            raise gr.Error("no snapshot: upload a .safetensors file saved from this tab")
        if head_name not in SNAPSHOT_HEADS:
            raise gr.Error(f"head must be one of {SNAPSHOT_HEADS}, got {head_name!r}")
        path = file if isinstance(file, str) else getattr(file, "name", file)
        with session.lock:
            try:
                if head_name == "ask":
                    head = session.qa_head()
                elif head_name == "detect":
                    head = session.detection_head(*self._detect_settings(detector, memory))
                else:
                    config = generation_config_of(path, self.limits.max_upload_bytes, self.limits)
                    head = self.models.generation_pipeline(config)
                state_dict = check_snapshot(path, head, self.limits.max_upload_bytes)
                if head_name == "generate":
                    side = head.model.config.sample_size
                    for key, what in (("extra.anchor", "newest frame"), ("extra.observed", "observed frame")):
                        frame = state_dict.get(key)
                        if frame is not None and (tuple(frame.shape) != (3, side, side) or frame.dtype != torch.float32
                                                  or not bool(torch.isfinite(frame).all())):
                            raise ValueError(f"its {what} is {tuple(frame.shape)} {frame.dtype}, "
                                             f"not finite (3, {side}, {side}) float32")
                    pose = (tensor_json(state_dict["head.meta"]).get("extra") or {}).get("observed_pose")
                    if pose is not None and not (np.asarray(pose).shape == (4, 4)
                                                 and np.isfinite(np.asarray(pose, dtype=float)).all()):
                        raise ValueError("its observed frame's pose is not a finite 4x4 matrix")
                head.load_state_dict(state_dict)
            except ValueError as exc:
                raise gr.Error(f"{_name(path)} was not loaded: {exc}") from None
            if head_name == "ask":
                session.qa_source, session.qa_run = f"snapshot {_name(path)}", session.qa_run + 1
            elif head_name == "generate":
                if session.gen is not None:
                    session.gen.interrupt.set()
                session.gen, session.gen_source, session.gen_prompt = head, f"snapshot {_name(path)}", head.prompt
                session.gen_run += 1
                session.gen_frames.clear()
                if head.anchor is not None:  # the stream's video starts at its newest frame
                    session.gen_frames.append(((head.anchor.clamp(-1, 1) + 1) * 127.5).round().byte()
                                              .permute(1, 2, 0).numpy())
            else:
                session.det_source, session.det_run = f"snapshot {_name(path)}", session.det_run + 1
        return f"Loaded {_name(path)} into your {head_name} head.", session

    @staticmethod
    def _snapshot_head(session: Session, head_name: str):
        if head_name not in SNAPSHOT_HEADS:
            raise gr.Error(f"head must be one of {SNAPSHOT_HEADS}, got {head_name!r}")
        return {"ask": session.qa, "detect": session.det, "generate": session.gen}[head_name]

    def unload(self, request: gr.Request) -> None:
        self.sessions.close(getattr(request, "session_hash", None))


def _class_names(det) -> list[str]:
    """The class name of each detection (``data["class_name"]``, else the class id)."""
    if not len(det):
        return []
    names = det.data.get("class_name") if det.data else None
    return [str(x) for x in (names if names is not None else det.class_id)]


# ---------------------------------------------------------------------- the page
def build_app(models: Models | None = None, limits: Limits | None = None,
              detectors: Sequence[str | tuple[str, str | None]] = ()) -> gr.Blocks:
    """The Gradio Blocks of the demo (not launched). ``demo.streammem`` is its :class:`App`
    (handlers and sessions). ``detectors``: ``transformers`` detectors added to the Detect tab's
    picker, each ``"hf:<model id or folder>"`` or ``("hf:...", classes)`` (:meth:`Models.add_detector`)."""
    models = models or Models.load()
    for d in detectors:
        spec, classes = (d, None) if isinstance(d, str) else d
        models.add_detector(spec, classes)
    limits = limits or Limits()
    app = App(models, limits)
    heavy = dict(concurrency_limit=limits.concurrency, concurrency_id="heavy")
    light = dict(concurrency_limit=limits.question_concurrency, concurrency_id="questions")

    with gr.Blocks(title="streammem") as demo:
        state = gr.State(None, time_to_live=limits.session_ttl_s,
                         delete_callback=lambda s: app.sessions.close(s) if isinstance(s, Session) else None)
        gr.Markdown("# streammem: streaming video memory\nEverything below runs on your own memories: "
                    "no other visitor sees or changes them.")
        with gr.Accordion("What the shipped models know", open=False):
            extra = "".join(f", **{lbl}**" for lbl in models.hf_labels.values())
            gr.Markdown(MODEL_NOTES + f"\n\nAnswerer in use: **{models.answerer_name}**. Detectors: small, HOG{extra}. "
                        f"Limits: uploads up to "
                        f"{limits.max_upload_mb:g} MB, videos up to {limits.max_video_s:g} s.")

        with gr.Tab("Ask", id="ask"):
            with gr.Row():
                with gr.Column():
                    ask_video = gr.Video(label="video", sources=["upload"], elem_id="ask-video")
                    ask_go = gr.Button("Process", variant="primary", elem_id="ask-process")
                    ask_cam = gr.Image(label="or stream the webcam", sources=["webcam"], streaming=True,
                                       type="numpy", elem_id="ask-webcam")
                with gr.Column():
                    question = gr.Textbox(label="question", placeholder="Is there a cat in view now?",
                                          elem_id="question")
                    options = gr.Textbox(label="options (comma-separated; empty for a yes/no question)",
                                         placeholder="top left, top right, bottom left, bottom right")
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="ask-button")
                    answer_md = gr.Markdown(elem_id="answer")
                    evidence = gr.Gallery(label="evidence", columns=4, height=160)
                    answer_json = gr.JSON(label="answer", open=False)
            ask_status = gr.Markdown("No video yet.", elem_id="ask-status")
            pyramid = gr.Gallery(label="memory pyramid: the frames each level holds", columns=8, height=260)
            pyramid_json = gr.JSON(label="pyramid levels", open=False)
            refresh_pyr = gr.Button("Refresh pyramid", size="sm")
            gr.Examples([["Is there a cat in view now?", ""],
                         ["Has a red star been in view at any time so far?", ""],
                         ["Where in the frame is the red star now?", "top left, top right, bottom left, bottom right"]],
                        [question, options], label="questions the shipped answerer knows")

        with gr.Tab("Detect", id="detect"):
            with gr.Row():
                with gr.Column():
                    det_video = gr.Video(label="video", sources=["upload"], elem_id="det-video")
                    detector = gr.Dropdown(models.detector_choices(), value="small", label="detector")
                    memory = gr.Dropdown(DETECT_MEMORIES, value="feature_bank", label="memory")
                    det_go = gr.Button("Detect", variant="primary", elem_id="det-go")
                    det_cam = gr.Image(label="or stream the webcam", sources=["webcam"], streaming=True,
                                       type="numpy", elem_id="det-webcam")
                with gr.Column():
                    det_image = gr.Image(label="annotated", type="numpy", format="jpeg", elem_id="det-image")
                    det_file = gr.File(label="annotated mp4")
                    det_stats = gr.JSON(label="memory banks", elem_id="det-stats")

        with gr.Tab("Generate", id="generate"):
            gr.Markdown(GENERATE_NOTES)
            with gr.Row():
                with gr.Column():
                    gen_start = gr.Image(label="start image (optional; without one, the StreamWorld scene below)",
                                         sources=["upload"], type="numpy", image_mode="RGB", elem_id="gen-start")
                    gen_scene = gr.Number(value=0, precision=0, minimum=0, label="StreamWorld scene seed",
                                          elem_id="gen-scene")
                    gen_actions = gr.Textbox(value="RRRRUUUULLLLDDDD", label=f"camera actions ({ACTION_HELP})",
                                             elem_id="gen-actions")
                    with gr.Row():
                        letters = {"F": "forward", "B": "back", "L": "left", "R": "right", "U": "up", "D": "down",
                                   "S": "stay"}
                        for letter, what in letters.items():
                            gr.Button(f"{letter} ({what})", size="sm", min_width=60).click(
                                None, [gen_actions], [gen_actions], js=f"(a) => (a || '') + '{letter}'",
                                api_visibility="private")
                        gr.Button("clear", size="sm", min_width=60).click(
                            None, [gen_actions], [gen_actions], js="(a) => ''", api_visibility="private")
                    gen_prompt = gr.Textbox(value="clean", label="prompt (clean, medium, hard or empty; press Enter "
                                            "to change it while a stream runs)", elem_id="gen-prompt")
                    gen_memory = gr.Dropdown(GENERATE_MEMORIES, value="posekv", label="memory")
                    with gr.Row():
                        gen_frames = gr.Slider(1, limits.max_gen_frames, value=min(16, limits.max_gen_frames), step=1,
                                               label="frames")
                        gen_seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                        gen_steps = gr.Slider(1, limits.max_gen_steps, value=8, step=1,
                                              label="denoising steps per chunk")
                    with gr.Row():
                        gen_go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                        gen_cont = gr.Button("Continue", elem_id="gen-continue")
                        gen_stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
                with gr.Column():
                    gen_image = gr.Image(label="generated (64 x 64, enlarged)", type="numpy", elem_id="gen-image")
                    gen_msg = gr.Markdown(elem_id="gen-msg")
                    gen_file = gr.File(label="the stream so far (mp4)", elem_id="gen-file")
                    gen_stats = gr.JSON(label="stream", elem_id="gen-stats")

        with gr.Tab("Memory", id="memory") as mem_tab:
            mem_btn = gr.Button("Refresh", elem_id="mem-refresh")
            with gr.Row():
                tokens_plot = gr.LinePlot(x="frame", y="tokens", color="memory", title="tokens held",
                                          x_title="frames written", y_title="tokens", elem_id="tokens-plot")
                bytes_plot = gr.LinePlot(x="frame", y="bytes", color="memory", title="bytes held",
                                         x_title="frames written", y_title="bytes")
            mem_json = gr.JSON(label="current statistics", open=False, elem_id="mem-json")
            gr.Markdown("**Snapshots** of your own memory (safetensors). A snapshot loads only into the head "
                        "it came from, with the same settings (Detect: the tab's detector and memory; Generate: "
                        "the snapshot's own memory, seed and steps); anything else is refused.")
            with gr.Row():
                snap_head = gr.Radio(list(SNAPSHOT_HEADS), value="ask", label="head")
                snap_save = gr.Button("Save snapshot")
                snap_file = gr.File(label="snapshot to download")
            with gr.Row():
                snap_upload = gr.File(label="snapshot to load", file_types=[".safetensors"])
                snap_load = gr.Button("Load snapshot")
            snap_msg = gr.Markdown()

        # --- events (each with a stable api_name for gradio_client)
        pyr_out = [ask_status, pyramid, pyramid_json, state]
        ask_go.click(guarded_stream("Process")(app.ask_process), [ask_video, state], pyr_out,
                     api_name="ask_process", **heavy)
        ask_cam.stream(guarded("Webcam")(app.ask_webcam), [ask_cam, state], pyr_out, api_name="ask_webcam",
                       stream_every=limits.stream_every_s, time_limit=limits.webcam_time_limit_s,
                       show_progress="hidden", **heavy)
        refresh_pyr.click(guarded("Pyramid")(app.ask_pyramid), [state], pyr_out, api_name="ask_pyramid", **light)
        ans_out = [answer_md, evidence, answer_json, state]
        ask_fn = guarded("Ask")(app.ask_question)
        ask_btn.click(ask_fn, [question, options, state], ans_out, api_name="ask_question", **light)
        question.submit(ask_fn, [question, options, state], ans_out, api_name="ask_question_submit",
                        api_visibility="undocumented", **light)
        det_out = [det_image, det_stats, det_file, state]
        det_go.click(guarded_stream("Detect")(app.detect_video), [det_video, detector, memory, state], det_out,
                     api_name="detect_video", **heavy)
        det_cam.stream(guarded("Webcam")(app.detect_webcam), [det_cam, detector, memory, state],
                       [det_image, det_stats, state], api_name="detect_webcam", stream_every=limits.stream_every_s,
                       time_limit=limits.webcam_time_limit_s, show_progress="hidden", **heavy)
        gen_out = [gen_image, gen_stats, gen_file, state]
        gen_go.click(guarded_stream("Generate")(app.generate),
                     [gen_start, gen_scene, gen_actions, gen_prompt, gen_memory, gen_frames, gen_seed, gen_steps, state],
                     gen_out, api_name="generate", **heavy)
        gen_cont.click(guarded_stream("Continue")(app.generate_continue),
                       [gen_actions, gen_prompt, gen_frames, gen_steps, state], gen_out, api_name="generate_continue",
                       **heavy)
        gen_stop.click(guarded("Stop")(app.generate_stop), [state], [gen_msg, state], api_name="generate_stop", **light)
        gen_prompt.submit(guarded("Prompt")(app.generate_prompt), [gen_prompt, state], [gen_msg, state],
                          api_name="generate_prompt", **light)
        mem_out = [tokens_plot, bytes_plot, mem_json, state]
        mem_fn = guarded("Memory")(app.memory_stats)
        mem_btn.click(mem_fn, [state], mem_out, api_name="memory_stats", **light)
        mem_tab.select(mem_fn, [state], mem_out, api_name="memory_stats_on_select", api_visibility="undocumented",
                       **light)
        snap_save.click(guarded("Snapshot")(app.snapshot_save), [snap_head, state], [snap_file, snap_msg, state],
                        api_name="snapshot_save", **light)
        snap_load.click(guarded("Snapshot")(app.snapshot_load), [snap_upload, snap_head, detector, memory, state],
                        [snap_msg, state], api_name="snapshot_load", **heavy)
        demo.unload(app.unload)
    demo.streammem = app
    return demo


def launch(demo: gr.Blocks, limits: Limits, **launch_kwargs):
    """Queue (concurrency limits) and launch ``demo`` with the upload cap of ``limits``."""
    demo.queue(default_concurrency_limit=limits.concurrency, max_size=64)
    launch_kwargs.setdefault("max_file_size", limits.max_upload_bytes)
    launch_kwargs.setdefault("show_error", True)
    return demo.launch(**launch_kwargs)


class _DetectorAction(argparse.Action):
    """``--detector SPEC``: appends ``[SPEC, None]`` (its classes come from a following ``--classes``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), [values, None]])


class _ClassesAction(argparse.Action):
    """``--classes NAMES``: the classes of the ``--detector`` just before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not namespace.detectors or namespace.detectors[-1][1] is not None:
            parser.error("--classes names what the --detector just before it looks for; put it after its --detector")
        namespace.detectors[-1][1] = values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Limits()
    p = argparse.ArgumentParser(prog="serve.py", description="the streammem web demo (Gradio)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--answerer", default=None,
                   help="QA answerer: a SmallAnswerer checkpoint folder, or hf:<model id or folder> of a "
                        "vision-language model (LLaVA, LLaVA-OneVision, SmolVLM/SmolVLM2) (default: the shipped "
                        "answerer, StreamWorld's vocabulary only)")
    p.add_argument("--detector", dest="detectors", action=_DetectorAction, default=[], metavar="hf:ID_OR_FOLDER",
                   help="add a transformers detector (DETR, RT-DETR, YOLOS, OWLv2) to the Detect tab's picker; "
                        "repeatable (the shipped small detector and HOG are always offered)")
    p.add_argument("--classes", action=_ClassesAction, default=None, metavar="NAMES",
                   help='what the preceding --detector looks for, comma-separated (open-vocabulary models such '
                        'as OWLv2), e.g. --classes "person,car"')
    p.add_argument("--detector-checkpoint", default=None, help="small detector checkpoint folder (default: shipped)")
    p.add_argument("--generator-checkpoint", default=None,
                   help="generator checkpoint folder (default: shipped; loaded on the first Generate)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help="largest upload in MB")
    p.add_argument("--max-video-s", type=float, default=d.max_video_s, help="longest video in seconds")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="videos processed at once")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help="visitors served at once")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python serve.py [--host H] [--port P] [--share] [--answerer SPEC] [--detector hf:ID [--classes NAMES]]``:
    build and serve the demo; a model that cannot be loaded or fetched is one line and exit code 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        limits = Limits(max_upload_mb=args.max_upload_mb, max_video_s=args.max_video_s,
                        concurrency=args.concurrency, max_sessions=args.max_sessions)
        models = Models.load(args.answerer, args.detector_checkpoint, args.generator_checkpoint)
        for spec, classes in args.detectors:
            models.add_detector(spec, classes)
    except (ValueError, OSError, ImportError, HubUnavailable) as exc:
        print(f"serve.py: {exc}", file=sys.stderr)
        return 2
    demo = build_app(models, limits)
    launch(demo, limits, server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
