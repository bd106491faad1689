"""StreamingQAPipeline: ask questions about a stream at any moment, answered from bounded memory.

Per frame: an encoder turns the frame into a token grid, the grid is written to a
``PyramidMemory`` (optionally also to a ``DualMemory``: static structure beside recent
motion, routed by camera-compensated motion scores). A question is answered by an answerer
reading the memory: answer, confidence and evidence (the stored frames that weighed most,
with their timestamps and, when ``keep_thumbnails`` is on, small thumbnails).

Causality: a question has a time ``at`` (seconds of stream time). It is answered from the
memory as it was after the last frame with ``timestamp <= at``, never later frames:

- :meth:`StreamingQAPipeline.schedule` registers a question for a future time and returns a
  ``concurrent.futures.Future``; :meth:`step` resolves it just before writing the first frame
  whose timestamp is past ``at`` (and :meth:`finish` at the end of the stream);
- :meth:`StreamingQAPipeline.ask` answers at the current stream time (the newest written
  frame), from any thread: writes and reads are serialised by a lock, so a question never sees
  a half-written frame. Asking for a time already streamed past is an error (the memory cannot
  be rewound); scheduling one in the future blocks until the stream gets there when
  ``block=True``.

Refusals (:class:`~streammem.models.answerer.refusal.Refusal`): a question the pipeline
cannot honestly answer gets a refusal that says why, never a forced answer and never evidence.
What is known before any frame is read is bad input, raised by ``schedule`` / ``ask`` as
:class:`~streammem.models.answerer.refusal.QuestionRefused` (a ``ValueError``; see
:meth:`StreamingQAPipeline.refusal`): words the answerer does not know (an answerer with a
``refusal(question, candidates)`` method, as ``SmallAnswerer`` has), a question without options
that is not a yes/no question (:func:`~streammem.models.answerer.refusal.is_yes_no`; a yes/no
question without options gets ``["yes", "no"]``; an answerer with ``free_form = True``, the
``hf:`` VLMs of :func:`load_hf_qa`, answers any question without options with generated
text instead), a negative time. What depends on the stream
comes back in place of the answer (a scheduled question's future resolves with it, ``ask``
returns it, ``step`` / ``finish`` / ``run`` yield it, ``records`` writes it with
``"refused": true``): no frame in memory at the question's time (``"no_memory"``), or, at
:meth:`~StreamingQAPipeline.finish`, a time after the stream's last frame plus one frame
interval (``"time"``).

Unlike VideoChat-Online's released evaluation, which rebuilds the memory from the first frame
for every question, the memory here is built once, incrementally: a question costs one read
and one answerer pass, whatever the stream's length.

Example:
    >>> import torch
    >>> from streammem.models.answerer import SmallAnswerer, Vocab
    >>> from streammem.models.grid_encoder import GridEncoder
    >>> from streammem.world import World
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> enc = GridEncoder(dim=16, width=8).eval()
    >>> ans = SmallAnswerer(vocab=Vocab.fit(["is there a cat?", "yes no"]).words, token_dim=16, d=16, heads=2).eval()
    >>> pipe = StreamingQAPipeline(enc, ans, memory="ovbench")
    >>> fut = pipe.schedule("is there a cat?", ["yes", "no"], at=0.3)
    >>> for f in World(seed=0, preset="clean", size=64, frames=6):
    ...     _ = pipe.step(f)
    >>> a = fut.result()
    >>> a.query_time, a.evidence[0]["timestamp"] <= 0.3
    (0.3, True)
"""

from __future__ import annotations

import heapq
import itertools
import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
import torch

from streammem.memory import PYRAMID_SPREAD, DualMemory, PyramidMemory
from streammem.memory import SupportsFrames
from streammem.memory.base import Memory
from streammem.models.answerer.refusal import YES_NO_STARTS, QuestionRefused, Refusal, is_yes_no
from streammem.pipelines.base import HeadBase, annotate_text
from streammem.types import Answer, Frame, Tokens

__all__ = ["StreamingQAPipeline", "QAConfig", "Question", "answer_record", "load_default_qa", "load_hf_qa", "RETENTIONS",
           "retention_overrides", "Refusal", "QuestionRefused"]

#: pyramid retention rules by name: PyramidConfig overrides.
RETENTIONS = {"reference": {}, "spread": dict(PYRAMID_SPREAD)}


def retention_overrides(name: str) -> dict:
    """The ``PyramidConfig`` overrides of a retention rule named in :data:`RETENTIONS` (a copy);
    an unknown name raises ``ValueError`` naming the choices."""
    if name not in RETENTIONS:
        raise ValueError(f"retention must be one of {sorted(RETENTIONS)}, got {name!r}")
    return dict(RETENTIONS[name])


@dataclass
class QAConfig:
    """What a :class:`StreamingQAPipeline` was built with (checked once; recorded in snapshots).

    Attributes:
        memory: a ``PyramidMemory`` preset (``"ovbench"``: 832 tokens, ``"offline"``: 9,984),
            or the class name of a memory passed as an object.
        retention: ``"spread"`` or ``"reference"`` (see :data:`RETENTIONS`).
        dual: whether a ``DualMemory`` is fed beside the pyramid.
        keep_thumbnails: keep thumbnails of the frames in memory, for evidence display.
        thumb_side: their longer side in pixels.
    """

    memory: str = "ovbench"
    retention: str = "spread"
    dual: bool = False
    keep_thumbnails: bool = False
    thumb_side: int = 96

    def __post_init__(self) -> None:
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {sorted(RETENTIONS)}, got {self.retention!r}")
        if not (isinstance(self.thumb_side, int) and self.thumb_side >= 8):
            raise ValueError(f"QAConfig.thumb_side must be an int >= 8, got {self.thumb_side!r}")


@dataclass
class Question:
    """A question scheduled for stream time ``at`` (seconds)."""

    question: str
    candidates: list[str]
    at: float
    id: Any = None


class StreamingQAPipeline(HeadBase):
    """Encoder -> memory -> answerer, with causal scheduling and thread-safe questions.

    Args:
        encoder: callable ``Frame -> Tokens`` (one square grid per frame), e.g.
            :class:`~streammem.models.grid_encoder.GridEncoder`.
        answerer: has ``answer_many(memory, questions, candidates, query_time)`` or
            ``answer(memory, question, candidates, query_time)`` returning :class:`Answer`. One
            with ``new_cache()`` (:class:`~streammem.models.answerer.SmallAnswerer`) gets this
            stream's cache passed as ``answer_many(..., cache=)``, so a question costs the frames
            stored since the last one plus a pass over the memory, not a re-encoding of it.
        memory: a :class:`~streammem.memory.base.Memory` or a ``PyramidMemory`` preset name
            (``"ovbench"``: 832 tokens, ``"offline"``: 9,984), built with the pooling the
            answerer was trained on (its ``memory_pool``, if it has one).
        retention: for a preset name, ``"spread"`` (the default: :data:`~streammem.memory.PYRAMID_SPREAD`;
            look-alike frames are still merged first, but the kept frames stay spread over the
            whole stream, so events minutes back keep frames around them; compared in
            ``docs/results/qa.md``) or ``"reference"`` (VideoChat-Online's
            rule, ``PyramidMemory``'s own default). A memory given as an object is used as it is.
        dual: optional :class:`DualMemory` fed beside the pyramid; its tokens are routed by
            :class:`~streammem.models.motion.MotionScorer` (static score = 1 - motion), and the
            answerer reads both memories' tokens.
        keep_thumbnails: keep a small JPEG-free RGB thumbnail (``thumb_side`` px) of every
            frame still in memory, for evidence display (bounded: only frames the memory holds).

    As a head (:class:`~streammem.pipelines.base.Head`): ``name = "qa"``; ``step`` returns the
    ``(question, answer)`` pairs resolved at that frame (an answer may be a
    :class:`~streammem.models.answerer.refusal.Refusal`: see the module docstring); ``records`` gives one JSON line per
    answer; ``annotate`` writes the latest answer on the frame. A snapshot (``state_dict``)
    holds the memories, the stream time and the counters; questions still pending and
    thumbnails are not part of it (loading one cancels this stream's pending questions), nor is
    the dual memory's motion scorer history (it restarts after a load).
    """

    name = "qa"
    records_file = "answers.jsonl"
    summary_records = True

    def __init__(self, encoder, answerer, memory: Memory | str = "ovbench", dual: DualMemory | None = None,
                 keep_thumbnails: bool = False, thumb_side: int = 96, retention: str = "spread") -> None:
        self.encoder, self.answerer = encoder, answerer
        self.free_form = bool(getattr(answerer, "free_form", False))
        dim = getattr(encoder, "dim", None)
        overrides = retention_overrides(retention)
        self.config = QAConfig(memory=memory if isinstance(memory, str) else type(memory).__name__,
                               retention=retention, dual=dual is not None, keep_thumbnails=keep_thumbnails,
                               thumb_side=thumb_side)
        if isinstance(memory, str):
            if dim is None:
                raise ValueError("memory given as a preset name needs an encoder with a .dim")
            memory = PyramidMemory.from_preset(memory, dim=dim, pool=getattr(answerer, "memory_pool", "mean"),
                                               **overrides)
        trained = getattr(answerer, "memory_pool", None)
        if isinstance(memory, PyramidMemory) and trained is not None and memory.config.pool != trained:
            warnings.warn(f"the answerer was trained on PyramidMemory(pool={trained!r}) reads; this pipeline's "
                          f"pyramid pools with {memory.config.pool!r}, so expect lower accuracy", stacklevel=2)
        self.memory = memory
        self.dual = dual
        self._scorer = None
        if dual is not None:
            from streammem.models.motion import MotionScorer

            self._scorer = MotionScorer(grid=getattr(encoder, "grid", 16))
        self.keep_thumbnails, self.thumb_side = keep_thumbnails, thumb_side
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._pending: list[tuple[float, int, Question, Future]] = []
        self._seq = itertools.count()
        # what the answerer keeps of this stream's memory between questions (SmallAnswerer's
        # MemoryCache: a question then only encodes the frames stored since the last one)
        self._cache = answerer.new_cache() if hasattr(answerer, "new_cache") else None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        with self._lock:
            self.memory.reset()
            if self._cache is not None:
                self._cache.clear()
            if self.dual is not None:
                self.dual.reset()
                self._scorer.reset() if hasattr(self._scorer, "reset") else None
            for _, _, _, fut in self._pending:
                fut.cancel()
            self._pending.clear()
            self.time: float | None = None  # timestamp of the newest written frame
            self._gap = 0.0  # the interval between the two newest frames (0 before the second)
            self.frames = 0
            self.questions = 0
            self.thumbs: dict[int, np.ndarray] = {}
            self._last_lines: list[str] = []

    def memories(self) -> dict:
        return {"memory": self.memory} if self.dual is None else {"memory": self.memory, "dual": self.dual}

    def state_dict(self) -> dict:
        """A snapshot taken between two frames (the stream's lock is held while it is made)."""
        with self._lock:
            return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            super().load_state_dict(state)

    def _extra_state(self) -> dict:
        return {"time": self.time, "frames": self.frames, "questions": self.questions, "gap": self._gap}

    def _load_extra_state(self, extra: dict) -> None:
        """The snapshot's stream replaces this one: questions pending here are cancelled (their
        times belong to the other stream) and thumbnails dropped."""
        with self._lock:
            self.time, self.frames, self.questions = extra["time"], int(extra["frames"]), int(extra["questions"])
            self._gap = float(extra.get("gap", 0.0))
            for _, _, _, fut in self._pending:
                fut.cancel()
            self._pending.clear()
            self.thumbs.clear()
            self._last_lines = []
            if self._scorer is not None:  # its frame history is not in the snapshot: it restarts
                self._scorer.reset()
            if self._cache is not None:
                self._cache.clear()

    def records(self, frame: Frame, output: list[tuple[Question, Answer | Refusal]]) -> list[dict]:
        return [answer_record(q, a) for q, a in output]

    def annotate(self, image: np.ndarray, output: list[tuple[Question, Answer | Refusal]]) -> np.ndarray:
        if output:
            q, a = output[-1]
            said = f"refused: {a.reason[:60]}" if isinstance(a, Refusal) else f"A: {a.text} ({a.confidence:.2f})"
            self._last_lines = [f"Q@{q.at:.1f}s {q.question[:60]}", said]
        return annotate_text(image, self._last_lines) if self._last_lines else image

    def stats(self) -> dict:
        with self._lock:
            out = {"frames": self.frames, "questions": self.questions, "time": self.time,
                   "pending": len(self._pending), "memory": self.memory.stats()}
            if self.dual is not None:
                out["dual"] = self.dual.stats()
            return out

    # ------------------------------------------------------------------ streaming
    def step(self, frame: Frame) -> list[tuple[Question, Answer | Refusal]]:
        """Answer the scheduled questions whose time comes before ``frame``, then write it.

        Returns the ``(question, answer)`` pairs resolved at this step (questions due before the
        first frame are refused: no frame in memory)."""
        tokens = self.encoder(frame)
        return self.write(frame, tokens)

    def write(self, frame: Frame, tokens: Tokens) -> list[tuple[Question, Answer | Refusal]]:
        """:meth:`step` with the frame already encoded (for batched encoding; build ``tokens``
        with ``GridEncoder.tokens`` so a salient pyramid gets the tokens' salience)."""
        with self._cv:
            if self.time is not None and frame.timestamp < self.time:
                raise ValueError(f"frame {frame.index} at {frame.timestamp:.3f}s is older than the stream's "
                                 f"newest frame ({self.time:.3f}s); frames must arrive in time order")
            done = self._resolve_due(frame.timestamp)
            self.memory.write(tokens)
            if self.dual is not None:
                motion = self._scorer(frame.image)
                t = Tokens(features=tokens.features, frame_index=tokens.frame_index, timestamp=tokens.timestamp,
                           grid=tokens.grid, level=tokens.level, pose=tokens.pose,
                           extras={"static": torch.from_numpy(1.0 - np.asarray(motion, np.float32).reshape(-1))})
                self.dual.write(t)
            if self.keep_thumbnails:
                self._keep_thumb(frame)
            if self.time is not None:
                self._gap = float(frame.timestamp) - self.time
            self.time = float(frame.timestamp)
            self.frames += 1
            self._cv.notify_all()
            return done

    def run(self, frames: Iterable[Frame],
            questions: Iterable[Question] = ()) -> Iterator[tuple[Question, Answer | Refusal]]:
        """Stream ``frames`` with ``questions`` scheduled up front; yields answers as they are due."""
        for q in questions:
            self.schedule(q.question, q.candidates, q.at, id=q.id)
        for f in frames:
            yield from self.step(f)
        yield from self.finish()

    def finish(self) -> list[tuple[Question, Answer | Refusal]]:
        """End of stream: answer every question still pending, over the final memory. A question
        for a time after the last frame plus one frame interval (the last gap between frames) is
        refused (``"time"``): the stream ended before it."""
        with self._cv:
            return self._resolve_due(float("inf"))

    # ------------------------------------------------------------------ questions
    def schedule(self, question: str, candidates: list[str] | None, at: float, id: Any = None) -> Future:
        """Answer ``question`` at stream time ``at`` (seconds); returns a Future of :class:`Answer`
        or of a :class:`Refusal` that depends on the stream (no frame in memory at ``at``, a
        stream that ends before ``at``). ``candidates=None`` (or empty): a yes/no question.

        Raises :class:`QuestionRefused` for what :meth:`refusal` refuses, ValueError for a
        malformed question or a time already streamed past."""
        refused = self.refusal(question, candidates, at)
        if refused is not None:
            raise QuestionRefused(refused)
        q = Question(question, self.candidates_for(candidates), float(at), id)
        fut: Future = Future()
        with self._cv:
            if self.time is not None and at < self.time:
                raise ValueError(f"the stream is already at {self.time:.3f}s; a question for {at:.3f}s cannot be "
                                 "answered causally (ask for now or a later time)")
            heapq.heappush(self._pending, (q.at, next(self._seq), q, fut))
        return fut

    def ask(self, question: str, candidates: list[str] | None = None, at: float | None = None, block: bool = True,
            timeout: float | None = None) -> Answer | Refusal:
        """Answer now (``at=None``: over every frame written so far) or at a future time.
        ``candidates=None`` (or empty): a yes/no question (:func:`is_yes_no`).

        Safe to call from another thread while :meth:`step` runs in the streaming thread.
        Raises :class:`QuestionRefused` for what :meth:`refusal` refuses; returns a
        :class:`Refusal` (``"no_memory"``) when asked now before any frame was written.
        """
        refused = self.refusal(question, candidates, at)
        if refused is not None:
            raise QuestionRefused(refused)
        if at is None:
            with self._lock:
                if self.time is None:
                    return Refusal("no_memory", "no frame in memory yet: nothing has been streamed")
                return self._answer([Question(question, self.candidates_for(candidates), self.time)], self.time)[0]
        fut = self.schedule(question, candidates, at)
        if not block:
            return fut  # type: ignore[return-value]
        return fut.result(timeout=timeout)

    def read_memory(self) -> Tokens:
        """What the answerer reads: the pyramid's tokens (plus DualMemory's, tagged level 3 for its
        persistent part and 4 for its transient part)."""
        mem = self.memory.read()
        if self.dual is not None:
            d = self.dual.read()
            if len(d):
                d = Tokens(features=d.features, frame_index=d.frame_index, timestamp=d.timestamp, grid=d.grid,
                           level=d.extras["part"] + 3)
                mem = Tokens(features=mem.features, frame_index=mem.frame_index, timestamp=mem.timestamp,
                             grid=mem.grid, level=mem.level)
                mem = Tokens.cat([mem, d])
        return mem

    def refusal(self, question: str, candidates: list[str] | None = None, at: float | None = None) -> Refusal | None:
        """The refusal of a question that is known before any frame is read, else None, checked
        in this order: words the answerer does not know (``"vocabulary"``: the answerer's own
        ``refusal(question, candidates)``, where it has one), no options for a question that is
        not yes/no (``"options"``, :func:`is_yes_no`), a negative ``at`` (``"time"``).

        Raises ValueError for a malformed question (empty, or options that are not a list of at
        least 2 non-empty strings)."""
        self._check(question, candidates)
        check = getattr(self.answerer, "refusal", None)
        refused = check(question, list(candidates or ())) if check is not None else None
        if refused is not None:
            return replace(refused, query_time=at)
        if not candidates and not self.free_form and not is_yes_no(question):
            starts = f"{', '.join(YES_NO_STARTS[:-1])} or {YES_NO_STARTS[-1]}"
            return Refusal("options", f'"{question}" needs options: a question is answered yes or no without options '
                           f'only when it starts with {starts} and has no "or" (for example "Is there a cat in view '
                           'now?"); give this one its options', query_time=at)
        if at is not None and at < 0:
            return Refusal("time", f"asked at {at:.2f} s, before the stream starts (stream time begins at 0 s)",
                           query_time=at)
        return None

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check(question: str, candidates: list[str] | None) -> None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if candidates is None or (isinstance(candidates, (list, tuple)) and len(candidates) == 0):
            return
        if not isinstance(candidates, (list, tuple)) or len(candidates) < 2 or not all(
                isinstance(c, str) and c.strip() for c in candidates):
            raise ValueError("candidates must be None (a yes/no question) or a list of at least 2 non-empty strings, "
                             f"got {candidates!r}")

    def candidates_for(self, candidates: list[str] | None) -> list[str]:
        """The options a question is answered with: its candidates, or yes / no (none: a free-form
        question, for a free-form answerer)."""
        return list(candidates) if candidates else [] if self.free_form else ["yes", "no"]

    def _stream_refusal(self, at: float, before: float) -> Refusal | None:
        """The refusal of a question due at ``at`` when the next frame is at ``before`` (``inf``:
        the stream ended), or None: no frame in memory yet, or a time after the stream's end."""
        if self.time is None:
            why = (f"the stream's first frame is at {before:.2f} s" if before != float("inf")
                   else "no frame was read from the stream")
            return Refusal("no_memory", f"no frame in memory at {at:.2f} s: {why}", query_time=at)
        if before == float("inf") and at > self.time + self._gap + 1e-9:
            return Refusal("time", f"asked at {at:.2f} s, after the end of the stream: its last frame is at "
                           f"{self.time:.2f} s", query_time=at)
        return None

    def _resolve_due(self, before: float) -> list[tuple[Question, Answer | Refusal]]:
        due: list[tuple[Question, Future]] = []
        while self._pending and self._pending[0][0] < before:
            _, _, q, fut = heapq.heappop(self._pending)
            if fut.set_running_or_notify_cancel():
                due.append((q, fut))
        if not due:
            return []
        out = []
        # questions due at the same time share one memory read
        groups: dict[float, list[tuple[Question, Future]]] = {}
        for q, fut in due:
            groups.setdefault(q.at, []).append((q, fut))
        for at, items in groups.items():
            refused = self._stream_refusal(at, before)
            try:
                if refused is not None:
                    self.questions += len(items)
                    answers = [refused] * len(items)
                else:
                    answers = self._answer([q for q, _ in items], at)
            except Exception as exc:  # noqa: BLE001 - delivered to the asker
                for q, fut in items:
                    fut.set_exception(exc)
                    # the stream's records keep the question, with what went wrong
                    out.append((q, Refusal("error", f"the answerer failed: {type(exc).__name__}: {exc}", query_time=at)))
                continue
            for (q, fut), a in zip(items, answers):
                fut.set_result(a)
                out.append((q, a))
        return out

    def _answer(self, qs: list[Question], at: float) -> list[Answer | Refusal]:
        mem = self.read_memory()
        self.questions += len(qs)
        if len(mem) == 0:
            return [Refusal("no_memory", f"no frame in memory at {at:.2f} s: the memory holds no token",
                            query_time=at)] * len(qs)
        if hasattr(self.answerer, "answer_many"):
            kw = {} if self._cache is None else {"cache": self._cache}
            answers = self.answerer.answer_many(mem, [q.question for q in qs], [q.candidates for q in qs], at, **kw)
        else:
            answers = [self.answerer.answer(mem, q.question, q.candidates, at) for q in qs]
        if self.keep_thumbnails:
            for a in answers:
                for ev in a.evidence:
                    th = self.thumbs.get(ev["frame_index"])
                    if th is not None:
                        ev["thumbnail"] = th
        return answers

    def _keep_thumb(self, frame: Frame) -> None:
        h, w = frame.height, frame.width
        s = self.thumb_side / max(h, w, 1)
        self.thumbs[frame.index] = cv2.resize(frame.image, (max(1, round(w * s)), max(1, round(h * s))),
                                              interpolation=cv2.INTER_AREA)
        # which frames the memory still holds: PyramidMemory lists them cheaply, others by a read
        held = ({fi for _, fi, _ in self.memory.frames()} if isinstance(self.memory, SupportsFrames)
                else set(self.memory.read().frame_index.unique().tolist()))
        if self.dual is not None:
            held |= set(self.dual.read().frame_index.unique().tolist())
        for k in [k for k in self.thumbs if k not in held]:
            del self.thumbs[k]


def answer_record(q: Question, a: Answer | Refusal) -> dict:
    """One JSON-able line for an answer: the question, its time, the answer, its confidence and
    evidence (without thumbnails); with the ground truth (``truth``, ``correct``, ``type``) when
    the question's ``id`` is a StreamWorld question dict. A refusal's line has ``refused``
    (true), ``kind`` and ``reason`` instead of the answer, and empty evidence (``correct`` is
    false)."""
    src = q.id if isinstance(q.id, dict) else {}
    if isinstance(a, Refusal):
        rec = {"at": q.at, "question": q.question, "candidates": q.candidates, "refused": True, "kind": a.kind,
               "reason": a.reason, "evidence": []}
    else:
        rec = {"at": q.at, "question": q.question, "candidates": q.candidates, "answer": a.text, "letter": a.letter,
               "confidence": round(a.confidence, 4),
               "evidence": [{k: v for k, v in e.items() if k != "thumbnail"} for e in a.evidence]}
    if "answer" in src:
        rec["truth"] = src["answer"]
        rec["correct"] = not isinstance(a, Refusal) and a.text == src["answer"]
        rec["type"] = src.get("sub_answer_type")
    return rec


def load_default_qa(memory: Memory | str = "ovbench", **kw) -> StreamingQAPipeline:
    """The shipped encoder and answerer (``streammem/checkpoints/{grid_encoder,answerer}``)."""
    from streammem.checkpoints import path
    from streammem.models.answerer import SmallAnswerer
    from streammem.models.grid_encoder import GridEncoder

    enc = GridEncoder.from_pretrained(str(path("grid_encoder"))).eval()
    ans = SmallAnswerer.from_pretrained(str(path("answerer"))).eval()
    return StreamingQAPipeline(enc, ans, memory=memory, **kw)


def load_hf_qa(spec: str, memory: Memory | str = "ovbench", press: str | None = None, press_ratio: float = 0.5,
               device: str | None = None, dtype: str | None = None, answerer_options: dict | None = None,
               **kw) -> StreamingQAPipeline:
    """A QA pipeline whose encoder and answerer are the VLM named ``hf:<model id or folder>``
    (:func:`~streammem.models.vlm.load_answerer`: LLaVA, LLaVA-OneVision, SmolVLM2, Idefics3):
    its vision tower writes the memory, its LM answers multiple-choice questions and, without
    options, free-form ones. ``press`` (``sink_window``, ``h2o``, ``kvmerger``, ``mikv``)
    compresses the key-value cache of the memory prefix to ``press_ratio`` of its memory
    entries before the question is decoded (:class:`~streammem.models.vlm_press.CachePress`).

    Raises :class:`~streammem.models.hf.HubUnavailable` when a hub id cannot be fetched,
    ValueError for an unknown press, ratio or model family.

    Example (downloads ~0.5 GB)::

        pipe = load_hf_qa("hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct", press="h2o", press_ratio=0.25)
    """
    from streammem.models.vlm import VLMFrameEncoder, load_answerer
    from streammem.models.vlm_press import CachePress

    cache_press = CachePress(press, press_ratio) if press is not None else None  # checked before any load
    qa = load_answerer(spec, device=device, dtype=dtype, press=cache_press, **(answerer_options or {}))
    return StreamingQAPipeline(VLMFrameEncoder(qa), qa, memory=memory, **kw)
