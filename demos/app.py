"""The streammem web demo: a Gradio 6 app over the shipped heads (``python serve.py``).

Three tabs, each on the visitor's own memories:

- **Ask**: upload a video (or stream the webcam) into a Pyramid Memory Bank and ask questions
  at any moment; an answer comes with its confidence, the frames it rested on (thumbnails and
  stream times) or, for a question the answerer cannot honestly answer, the refusal and why.
  The pyramid's levels (which frames each holds, at which times) are shown live.
- **Detect**: upload a video (or stream the webcam) through a detection head (the shipped small
  detector or OpenCV's HOG people detector) with a memory (none, FeatureBank, DualMemory);
  annotated frames stream back as they are processed, with the memory banks' statistics, and
  the annotated mp4 can be downloaded.
- **Memory**: tokens and bytes of every memory over the frames written (bounded memories stay
  flat), and a snapshot (safetensors) of the visitor's own Ask or Detect head to download or
  upload; an upload is checked against the head's own tensors (names, shapes, dtypes, bytes)
  from the file's header before anything is read, and refused with a message naming the file.

Sessions: every browser session (every ``gradio_client.Client``) gets its own :class:`Session`
(its own pipelines, stream times and history), found by Gradio's ``session_hash`` and kept in
a ``gr.State`` whose ``time_to_live`` and ``delete_callback`` free it when idle; closing the
page frees it at once (``demo.unload``). The models' weights are loaded once and shared
read-only. Handlers run in Gradio's queue with concurrency limits (heavy work: ``Limits.concurrency``
at a time; questions in their own, wider lane so they are answered while a video streams in).
A bad request (no video, a non-video or oversized upload, a too-long video, a question before
any video, a malformed snapshot) gets a ``gr.Error`` saying what was wrong; an unexpected
failure is logged and reported the same way, and the session stays usable.

API (``gradio_client``): every event has a stable ``api_name``: ``ask_process``,
``ask_question``, ``ask_webcam``, ``ask_pyramid``, ``detect_video``, ``detect_webcam``,
``memory_stats``, ``snapshot_save``, ``snapshot_load``.

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
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
SNAPSHOT_HEADS = ("ask", "detect")
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
  vision-language model: start the demo with `python serve.py --answerer hf:<LLaVA-family model id or
  folder>` (`LlavaAnswerer`, streammem/models/vlm.py).
- the **small detector** (Detect) knows StreamWorld's 11 classes; for people in real footage pick the
  **OpenCV HOG people detector**. Bigger detectors plug in as detection heads
  (`TorchvisionDetectionPipeline` in streammem/pipelines/detection/torchvision.py).
- Memories are bounded: their tokens and bytes stay flat however long the stream (Memory tab).
"""


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

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_video_s", "ask_fps", "stream_every_s", "yield_every_s",
                     "view_every_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_side", "session_ttl_s", "max_sessions", "concurrency", "question_concurrency",
                     "webcam_time_limit_s", "history"):
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
    """What every session shares, read-only: the QA encoder and answerer, and where the small
    detector's checkpoint is (each session builds its own detection head from it: a head holds
    stream state).

    ``answerer``: None for the shipped one, a checkpoint folder of a ``SmallAnswerer``, or
    ``hf:<model id or folder>`` for a LLaVA-family vision-language model."""

    encoder: Any
    answerer: Any
    answerer_name: str = "shipped"
    detector_checkpoint: str | None = None

    @classmethod
    def load(cls, answerer: str | None = None, detector_checkpoint: str | None = None) -> "Models":
        from streammem.checkpoints import path
        from streammem.models.answerer import SmallAnswerer
        from streammem.models.grid_encoder import GridEncoder
        from streammem.models.hf import hub_errors, parse_spec

        hf = parse_spec(answerer)
        if hf is not None:
            from streammem.models.vlm import LlavaAnswerer

            with hub_errors(hf):
                ans = LlavaAnswerer.from_pretrained(os.path.expanduser(hf) if Path(hf).expanduser().is_dir() else hf)
            return cls(VLMFrameEncoder(ans), ans, answerer, detector_checkpoint)
        folder = Path(answerer) if answerer else path("answerer")
        if not (folder / "config.json").is_file():
            raise ValueError(f"--answerer: no answerer checkpoint (config.json) in {folder}; give a folder written by "
                             "`streammem train answerer` or hf:<model id or folder>")
        enc = GridEncoder.from_pretrained(str(path("grid_encoder"))).eval()
        ans = SmallAnswerer.from_pretrained(str(folder)).eval()
        return cls(enc, ans, "shipped" if answerer is None else str(folder), detector_checkpoint)

    def qa_pipeline(self) -> StreamingQAPipeline:
        """A fresh QA head on the shared models: a Pyramid Memory Bank of the OVBench budget
        (832 tokens), with thumbnails of the frames it holds."""
        return StreamingQAPipeline(self.encoder, self.answerer, memory="ovbench", keep_thumbnails=True, thumb_side=96)

    def detection_head(self, detector: str, memory: str):
        return build_detection_head(detector, self.detector_checkpoint if detector == "small" else None, memory)


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
        self.webcam: dict[str, list[float]] = {}  # "ask" / "detect" -> [t0, last arrival, frames]
        self.history: deque[dict] = deque(maxlen=limits.history)
        self.steps: dict[str, int] = {"ask": 0, "detect": 0}
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
    def record(self, kind: str, head) -> None:
        """Append one row per memory of ``head`` (tokens and bytes after this frame)."""
        self.steps[kind] += 1
        for role, m in head.memories().items():
            self.history.append({"frame": self.steps[kind], "memory": f"{kind}: {type(m).__name__} ({role})",
                                 "tokens": int(m.num_tokens), "bytes": int(m.nbytes)})

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.qa = self.det = None
            self.history.clear()
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


def check_snapshot(path: str | os.PathLike, head, max_bytes: int) -> dict:
    """Read a head snapshot (safetensors, written by the Memory tab) for ``head``, checking it
    before anything is loaded: the file's size, that it is a safetensors file, that it is a
    streammem head snapshot of this head's kind, and that its tensors are exactly ``head``'s
    own (names, shapes, dtypes) from the header. Returns the state dict; raises ValueError
    naming the file and what is wrong. ``head.load_state_dict`` then checks the configuration."""
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
        kind = tensor_json(meta).get("name")
    except Exception:  # noqa: BLE001 - anything unreadable is a malformed file
        raise ValueError(f"{name}: its 'head.meta' is not readable; it is not a streammem snapshot") from None
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
        image = None
        try:
            for frame in src:
                with session.lock:
                    if session.closed or session.det_run != run:
                        writer.discard()
                        return  # the visitor started another stream: this one is over
                    det = head.step(frame)
                    session.record("detect", head)
                image = head.annotate(frame.image, det)
                writer.write(fit_to(image, writer.size), timestamp=frame.timestamp)
                n += 1
                if time.monotonic() - last > self.limits.yield_every_s:
                    last = time.monotonic()
                    progress((n, total) if total else n, desc=f"detecting in {name}", unit="frames")
                    yield image, self._detect_stats(head, n, t0, len(det)), None, session
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
        yield image, self._detect_stats(head, n, t0, None), str(path) if path else None, session

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

    @staticmethod
    def _detect_settings(detector, memory) -> tuple[str, str]:
        detector = detector or "small"
        memory = memory or "feature_bank"
        if detector not in DETECTORS:
            raise gr.Error(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        if memory not in {v for _, v in DETECT_MEMORIES}:
            raise gr.Error(f"memory must be one of {', '.join(v for _, v in DETECT_MEMORIES)}, got {memory!r}")
        return detector, memory

    @staticmethod
    def _detect_stats(head, frames: int, t0: float | None, last: int | None) -> dict:
        out = {"frames": frames, **({"fps": round(frames / max(1e-9, time.perf_counter() - t0), 2)} if t0 else {}),
               **({"detections_in_frame": last} if last is not None else {}), "pipeline": head.stats()}
        return json.loads(json.dumps(out, default=str))

    # ------------------------------------------------------------------ Memory
    def memory_stats(self, state, request: gr.Request):
        """Tokens and bytes over the frames written, per memory of this session, and current stats."""
        session = self.sessions.get(request)
        with session.lock:
            rows = list(session.history)
            stats = {"ask": session.qa.stats() if session.qa is not None else None,
                     "detect": session.det.stats() if session.det is not None else None,
                     "ask_source": session.qa_source, "detect_source": session.det_source}
        df = pd.DataFrame(rows, columns=["frame", "memory", "tokens", "bytes"])
        return df, df, json.loads(json.dumps(stats, default=str)), session

    def snapshot_save(self, head_name, state, request: gr.Request):
        """This session's Ask or Detect head as a safetensors snapshot to download."""
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
        """Restore this session's Ask or Detect head from an uploaded snapshot (checked first)."""
        session = self.sessions.get(request)
        if not file:
            raise gr.Error("no snapshot: upload a .safetensors file saved from this tab")
        if head_name not in SNAPSHOT_HEADS:
            raise gr.Error(f"head must be one of {SNAPSHOT_HEADS}, got {head_name!r}")
        path = file if isinstance(file, str) else getattr(file, "name", file)
        with session.lock:
            if head_name == "ask":
                head = session.qa_head()
            else:
                head = session.detection_head(*self._detect_settings(detector, memory))
            try:
                state_dict = check_snapshot(path, head, self.limits.max_upload_bytes)
                head.load_state_dict(state_dict)
            except ValueError as exc:
                raise gr.Error(f"{_name(path)} was not loaded: {exc}") from None
            if head_name == "ask":
                session.qa_source, session.qa_run = f"snapshot {_name(path)}", session.qa_run + 1
            else:
                session.det_source, session.det_run = f"snapshot {_name(path)}", session.det_run + 1
        return f"Loaded {_name(path)} into your {head_name} head.", session

    @staticmethod
    def _snapshot_head(session: Session, head_name: str):
        if head_name not in SNAPSHOT_HEADS:
            raise gr.Error(f"head must be one of {SNAPSHOT_HEADS}, got {head_name!r}")
        return session.qa if head_name == "ask" else session.det

    def unload(self, request: gr.Request) -> None:
        self.sessions.close(getattr(request, "session_hash", None))


# ---------------------------------------------------------------------- the page
def build_app(models: Models | None = None, limits: Limits | None = None) -> gr.Blocks:
    """The Gradio Blocks of the demo (not launched). ``demo.streammem`` is its :class:`App`
    (handlers and sessions)."""
    models = models or Models.load()
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
            gr.Markdown(MODEL_NOTES + f"\n\nAnswerer in use: **{models.answerer_name}**. Limits: uploads up to "
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
                    detector = gr.Dropdown(DETECTOR_LABELS, value="small", label="detector")
                    memory = gr.Dropdown(DETECT_MEMORIES, value="feature_bank", label="memory")
                    det_go = gr.Button("Detect", variant="primary", elem_id="det-go")
                    det_cam = gr.Image(label="or stream the webcam", sources=["webcam"], streaming=True,
                                       type="numpy", elem_id="det-webcam")
                with gr.Column():
                    det_image = gr.Image(label="annotated", type="numpy", format="jpeg", elem_id="det-image")
                    det_file = gr.File(label="annotated mp4")
                    det_stats = gr.JSON(label="memory banks", elem_id="det-stats")

        with gr.Tab("Memory", id="memory") as mem_tab:
            mem_btn = gr.Button("Refresh", elem_id="mem-refresh")
            with gr.Row():
                tokens_plot = gr.LinePlot(x="frame", y="tokens", color="memory", title="tokens held",
                                          x_title="frames written", y_title="tokens", elem_id="tokens-plot")
                bytes_plot = gr.LinePlot(x="frame", y="bytes", color="memory", title="bytes held",
                                         x_title="frames written", y_title="bytes")
            mem_json = gr.JSON(label="current statistics", open=False, elem_id="mem-json")
            gr.Markdown("**Snapshots** of your own memory (safetensors). A snapshot loads only into the head "
                        "it came from, with the same settings; anything else is refused.")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Limits()
    p = argparse.ArgumentParser(prog="serve.py", description="the streammem web demo (Gradio)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--answerer", default=None,
                   help="QA answerer: a SmallAnswerer checkpoint folder, or hf:<LLaVA-family model id or folder> "
                        "(default: the shipped answerer, StreamWorld's vocabulary only)")
    p.add_argument("--detector-checkpoint", default=None, help="small detector checkpoint folder (default: shipped)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help="largest upload in MB")
    p.add_argument("--max-video-s", type=float, default=d.max_video_s, help="longest video in seconds")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="videos processed at once")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help="visitors served at once")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python serve.py [--host H] [--port P] [--share] [--answerer SPEC]``: build and serve the demo."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        limits = Limits(max_upload_mb=args.max_upload_mb, max_video_s=args.max_video_s,
                        concurrency=args.concurrency, max_sessions=args.max_sessions)
        models = Models.load(args.answerer, args.detector_checkpoint)
    except (ValueError, OSError, ImportError, HubUnavailable) as exc:
        print(f"serve.py: {exc}", file=sys.stderr)
        return 2
    demo = build_app(models, limits)
    launch(demo, limits, server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
