"""The webcam job (``streammem webcam``): one head on a live source, in real time, that
survives the camera going away.

Per frame: a reader thread keeps only the newest frame (:func:`~streammem.pipelines.stream.run_stream`
in real-time mode: a frame that arrives while the head is busy replaces the waiting one and is
counted as dropped); the head steps on it; its overlay (``head.annotate``) plus a status line is
shown in an OpenCV window where a display exists (:func:`display_available`), otherwise written
to ``OUT/annotated.mp4``. With a QA head, lines given in ``questions`` (the CLI passes stdin)
are asked at the current stream time from another thread (``StreamingQAPipeline.ask`` is
thread-safe), each answered with its confidence and evidence.

When the source fails after its first frame (a camera unplugged: :class:`~streammem.io.SourceReadError`)
the job reports it, waits by :class:`Backoff` (the ``k``-th wait since the last frame is
``min(max_wait_s, initial_s * factor**k)``), reopens the source, and streams on into the
**same head**: its memory is never reset. Frames of a reopened source are renumbered to
continue the stream: indices go on from the last one, and times from the last frame's time plus
the time spent disconnected, so the head sees one stream, in time order, with a gap.

Outputs in ``out``: ``summary.json`` (frames processed and dropped, latency, every loss with its
waits, why the run stopped, the memory's occupancy), ``annotated.mp4`` (when not shown in a
window), the head's records (``detections.jsonl`` or ``answers.jsonl``).

Stopping: the source ending (a file), ``max_frames``, setting ``interrupt`` (the CLI's Ctrl-C;
``q`` or Esc in the window), a ``KeyboardInterrupt``, or ``backoff.max_retries`` failed reopens
(``stopped="gave_up"``, the last error in ``result.error``). Every way writes the summary.

Example (a file replayed in real time; ``opener`` may replace the source, as the tests do):
    >>> import tempfile
    >>> from streammem.pipelines.jobs.webcam import run_webcam
    >>> from streammem.pipelines import HeadBase
    >>> class Count(HeadBase):
    ...     name, records_file = "count", "count.jsonl"
    ...     def step(self, frame): return frame.index
    ...     def reset(self): pass
    ...     def stats(self): return {}
    >>> res = run_webcam(Count(), "world:seed=0,size=64,frames=4,fps=20", tempfile.mkdtemp(), view="file")
    >>> res.summary["frames_processed"] + res.summary["frames_dropped"], res.summary["stopped"]
    (4, 'end')
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from streammem.io import SourceError, open_source
from streammem.pipelines.base import annotate_text
from streammem.pipelines.jobs.base import OutputDir, fit_to, write_summary
from streammem.pipelines.stream import StreamItem, run_stream
from streammem.types import Frame

__all__ = ["VIEWS", "Backoff", "WebcamResult", "display_available", "parse_question", "run_webcam", "stop_on_sigint"]

VIEWS = ("auto", "window", "file")


@dataclass
class Backoff:
    """How a lost source is retried: the ``k``-th wait (``k = 0, 1, ...`` since the last frame
    processed) is ``min(max_wait_s, initial_s * factor**k)`` seconds; after ``max_retries``
    failed reopens the job gives up (None: it retries until stopped).

    >>> [Backoff(initial_s=0.5, factor=2.0, max_wait_s=3.0).wait(k) for k in range(5)]
    [0.5, 1.0, 2.0, 3.0, 3.0]
    """

    initial_s: float = 0.5
    factor: float = 2.0
    max_wait_s: float = 30.0
    max_retries: int | None = None

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ValueError(f"Backoff.initial_s must be > 0 seconds, got {self.initial_s!r}")
        if not self.factor >= 1:
            raise ValueError(f"Backoff.factor must be >= 1, got {self.factor!r}")
        if not self.max_wait_s >= self.initial_s:
            raise ValueError(f"Backoff.max_wait_s must be >= initial_s ({self.initial_s}), got {self.max_wait_s!r}")
        if self.max_retries is not None and (int(self.max_retries) != self.max_retries or self.max_retries < 0):
            raise ValueError(f"Backoff.max_retries must be None (forever) or an integer >= 0, got {self.max_retries!r}")

    def wait(self, attempt: int) -> float:
        """Seconds to wait before reopen number ``attempt`` (0-based)."""
        return float(min(self.max_wait_s, self.initial_s * self.factor ** attempt))


@dataclass
class WebcamResult:
    """What a webcam run did. ``answers``: one dict per question typed (question, candidates,
    ``at``, the answer or refusal); ``losses``: one dict per time the source went away (see
    ``summary["losses"]``); ``error``: the last source error when the job gave up, else None."""

    summary: dict
    summary_path: Path
    video: Path | None = None
    records: Path | None = None
    answers: list[dict] = field(default_factory=list)
    losses: list[dict] = field(default_factory=list)
    error: SourceError | None = None


# ---------------------------------------------------------------------------- display
def _cv2_gui() -> str:
    """The GUI backend OpenCV was built with (``"NONE"`` for opencv-python-headless)."""
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip() == "GUI":
            return value.strip() or "NONE"
    return "NONE"


def display_available(environ: dict | None = None, gui: str | None = None) -> tuple[bool, str]:
    """Whether an OpenCV window can be shown, and why not: on Linux a ``DISPLAY`` or
    ``WAYLAND_DISPLAY`` must be set, and OpenCV must have a GUI backend (the
    ``opencv-python-headless`` wheel has none; ``opencv-python`` has one).

    >>> display_available({}, gui="GTK3")[0], display_available({"DISPLAY": ":0"}, gui="NONE")
    (False, (False, 'OpenCV has no GUI support (opencv-python-headless); install opencv-python for a window'))
    """
    env = os.environ if environ is None else environ
    if sys.platform.startswith("linux") and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY is not set)"
    gui = _cv2_gui() if gui is None else gui
    if gui.upper().startswith("NONE"):
        return False, "OpenCV has no GUI support (opencv-python-headless); install opencv-python for a window"
    return True, gui


class _Window:
    """An OpenCV window; ``q`` or Esc in it sets ``interrupt``."""

    def __init__(self, title: str, interrupt: threading.Event) -> None:
        import cv2

        self.cv2, self.title, self.interrupt = cv2, title, interrupt
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)

    def show(self, image: np.ndarray) -> None:
        self.cv2.imshow(self.title, image[:, :, ::-1])
        if self.cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.interrupt.set()

    def close(self) -> None:
        self.cv2.destroyWindow(self.title)


# ---------------------------------------------------------------------------- questions
def parse_question(line: str) -> tuple[str, list[str]]:
    """``"question | option | option ..."`` -> ``(question, options)``; no options: a yes/no
    question.

    >>> parse_question("Which colour is the car? | red | blue")
    ('Which colour is the car?', ['red', 'blue'])
    """
    parts = [p.strip() for p in line.split("|")]
    return parts[0], [p for p in parts[1:] if p]


def _ask_loop(lines: Iterable[str], head, parse: Callable[[str], tuple[str, list[str]]], ready: threading.Event,
              stop: threading.Event, record: Callable[[str, list[str], Any], None]) -> None:
    """Ask each line at the current stream time (waiting for the first frame); ``record`` gets
    ``(question, candidates, answer or Refusal)``; a malformed question is recorded as its
    ``ValueError``."""
    from streammem.models.answerer.refusal import QuestionRefused

    for line in lines:
        if stop.is_set():
            return
        line = line.strip()
        if not line:
            continue
        while not ready.wait(0.05):
            if stop.is_set():
                return
        q, cands = parse(line)
        try:
            a = head.ask(q, cands or None)
        except QuestionRefused as exc:
            a = exc.refusal
        except ValueError as exc:
            a = exc
        record(q, cands, a)


# ---------------------------------------------------------------------------- the stream
class _Continued:
    """A reopened source's frames renumbered to continue the stream: index ``index0 + k`` for
    its ``k``-th frame, time ``t0 + (t - t_first)``. ``last`` holds the last frame's
    ``(index, timestamp)``. ``live`` is the source's (real-time pacing reads it)."""

    def __init__(self, source: Iterable[Frame], index0: int, t0: float | None) -> None:
        self.source, self.index0, self.t0 = source, index0, t0
        self.live = getattr(source, "live", False)
        self.last: tuple[int, float] | None = None

    def __iter__(self) -> Iterator[Frame]:
        first = None
        for k, f in enumerate(self.source):
            if self.t0 is None:  # the first segment keeps the source's own numbering
                frame = f
            else:
                first = f.timestamp if first is None else first
                frame = dataclasses.replace(f, index=self.index0 + k, timestamp=self.t0 + f.timestamp - first)
            self.last = (frame.index, frame.timestamp)
            yield frame


def _memory_stats(head) -> dict[str, dict]:
    mems = head.memories() if hasattr(head, "memories") else {}
    return {role: m.stats() for role, m in mems.items()}


@contextmanager
def stop_on_sigint(interrupt: threading.Event) -> Iterator[None]:
    """Within the block, a first Ctrl-C sets ``interrupt`` (the job stops after the current frame
    and writes its summary); a second one raises ``KeyboardInterrupt`` as usual. Only in the
    main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if interrupt.is_set():
            raise KeyboardInterrupt
        interrupt.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def run_webcam(
    head,
    source: str = "camera:0",
    out: str | os.PathLike = "outputs/webcam",
    view: str = "auto",
    backoff: Backoff | None = None,
    questions: Iterable[str] | None = None,
    parse: Callable[[str], tuple[str, list[str]]] = parse_question,
    on_event: Callable[[str], None] | None = None,
    on_answer: Callable[[str, float, Any], None] | None = None,
    interrupt: threading.Event | None = None,
    max_frames: int | None = None,
    realtime: bool = True,
    opener: Callable[[], Iterable[Frame]] | None = None,
    sleep: Callable[[float], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    video_fps: float = 15.0,
    **source_options,
) -> WebcamResult:
    """Run ``head`` (any :class:`~streammem.pipelines.base.Head`) on ``source`` in real time.

    Args:
        head: the head; never reset here, so its memory lives through every reconnection.
        source: ``camera:N`` or any :func:`~streammem.io.open_source` URI (a file is replayed
            at its own pace).
        out: output folder (summary, records, and the annotated mp4 when not shown).
        view: ``"window"``, ``"file"`` or ``"auto"`` (a window when :func:`display_available`).
        backoff: the retry rule (default :class:`Backoff`).
        questions: lines to ask at the current time (a QA head, one with ``ask``, only).
        parse: a line -> ``(question, options)`` (default :func:`parse_question`).
        on_event: called with each message for the user (the source lost, a retry, back).
        on_answer: called with ``(question, stream time, answer)`` for each answer, where
            the answer is an ``Answer``, a ``Refusal`` or the ``ValueError`` of a malformed one.
        interrupt: set it to stop after the current frame (or during a wait).
        max_frames: stop after this many processed frames.
        realtime: drop frames that arrive while the head is busy (False: process every frame).
        opener: returns a fresh iterable of frames; default ``open_source(source, prefetch=0,
            **source_options)``. Called again after each loss.
        sleep / clock: the wait between retries and the time it measures (injectable for tests;
            default: waiting on ``interrupt``, ``time.monotonic``).
        video_fps: the annotated mp4's nominal rate (frames carry their own times).

    Raises ValueError (bad options, questions for a head without ``ask``) and SourceError (the
    source cannot be opened, or fails before its first frame), leaving nothing behind.
    """
    # 1. check inputs, open the source
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    if questions is not None and not hasattr(head, "ask"):
        raise ValueError(f"questions need a QA head (one with ask()); {type(head).__name__} has none")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")
    backoff = backoff or Backoff()
    interrupt = interrupt or threading.Event()
    sleep = sleep or interrupt.wait
    say = on_event or (lambda msg: None)
    if view == "window":
        ok, why = display_available()
        if not ok:
            raise ValueError(f"cannot show a window: {why}; use --view file")
    if opener is None:
        opener = lambda: open_source(source, **{"prefetch": 0, **source_options})  # noqa: E731
    src = opener()  # a source that cannot be opened is bad input: reported before anything is written
    use_window = view == "window" or (view == "auto" and display_available()[0])

    # 2. outputs, the view, the question thread
    totals = {"processed": 0, "dropped": 0}
    latencies: list[float] = []
    counts: Counter = Counter()
    losses: list[dict] = []
    answers: list[dict] = []
    lock, closed = threading.Lock(), [False]
    ready, stop_asking = threading.Event(), threading.Event()
    t_wall = clock()
    with OutputDir(out) as od:
        video = None if use_window else od.video("annotated.mp4", fps=video_fps)
        records = od.jsonl(head.records_file, flush_every=16) if questions is None else None
        answers_jsonl = od.jsonl("answers.jsonl") if questions is not None else None
        window = _Window(f"streammem {getattr(head, 'name', 'head')}", interrupt) if use_window else None

        def record_answer(q: str, cands: list[str], a: Any) -> None:
            t = getattr(a, "query_time", None)
            t = getattr(head, "time", None) if t is None else t
            rec = {"question": q, "candidates": head.candidates_for(cands), "at": t}
            rec.update({"error": str(a)} if isinstance(a, ValueError) else a.to_dict())
            with lock:
                if closed[0]:
                    return  # the run is over and its files are closed
                answers.append(rec)
                answers_jsonl.write(rec)
            if on_answer is not None:
                on_answer(q, t if t is not None else 0.0, a)

        asker = None
        if questions is not None:
            asker = threading.Thread(target=_ask_loop, args=(questions, head, parse, ready, stop_asking, record_answer),
                                     name="streammem-questions", daemon=True)
            asker.start()

        def sink(item: StreamItem) -> None:
            f, o = item.frame, item.output
            totals["processed"] += 1
            latencies.append(item.latency_ms)
            state["attempt"] = 0  # a frame went through: the next loss starts the back-off again
            if records is not None:
                for r in head.records(f, o):
                    records.write(r)
            if hasattr(o, "data") and len(o):  # sv.Detections
                counts.update(str(n) for n in o.data.get("class_name", []))
            mem = _memory_stats(head)
            tokens = sum(m["num_tokens"] for m in mem.values())
            cap = sum(m["capacity"] for m in mem.values())
            dropped = totals["dropped"] + run.stats.dropped
            lines = [f"frame {f.index}  t={f.timestamp:7.2f}s  {item.latency_ms:5.1f} ms",
                     f"dropped {dropped}  lost {len(losses)}x" + (f"  memory {tokens}/{cap} tokens" if mem else "")]
            image = annotate_text(head.annotate(f.image, o), lines, corner="bottom")
            if window is not None:
                window.show(image)
            else:
                video.write(fit_to(image, video.size), timestamp=f.timestamp)
            od.keep()
            ready.set()

        # 3. stream; after a loss, wait, reopen and stream on into the same head
        state = {"attempt": 0}
        stopped, error = "end", None
        segment = _Continued(src, 0, None)
        try:
            while True:
                left = None if max_frames is None else max_frames - totals["processed"]
                run = run_stream(segment, head, sink=sink, realtime=realtime, max_frames=left, progress=False,
                                 interrupt=interrupt)
                loss = None
                try:
                    for _ in run:
                        pass
                except SourceError as exc:
                    if not od.kept:
                        raise  # not one frame: bad input, nothing is left
                    loss = exc
                finally:
                    totals["dropped"] += run.stats.dropped
                if loss is None:
                    if interrupt.is_set():
                        stopped = "interrupt"
                    elif max_frames is not None and totals["processed"] >= max_frames:
                        stopped = "max_frames"
                    break
                # the source is gone: report, back off, reopen
                last_index, last_t = segment.last or (-1, 0.0)
                lost = {"frame": last_index, "at": last_t, "error": str(loss), "waits_s": [], "resumed": False}
                losses.append(lost)
                t_lost = clock()
                say(f"source lost after frame {last_index} (t={last_t:.2f}s): {loss}")
                src = None
                while src is None:
                    if backoff.max_retries is not None and len(lost["waits_s"]) >= backoff.max_retries:
                        break
                    wait = backoff.wait(state["attempt"])
                    state["attempt"] += 1
                    lost["waits_s"].append(wait)
                    say(f"retrying in {wait:.1f} s (attempt {len(lost['waits_s'])})")
                    sleep(wait)
                    if interrupt.is_set():
                        break
                    try:
                        src = opener()
                    except SourceError as exc:
                        say(f"still gone: {exc}")
                if src is None:
                    lost["down_s"] = round(clock() - t_lost, 3)
                    stopped = "interrupt" if interrupt.is_set() else "gave_up"
                    error = loss if stopped == "gave_up" else None
                    break
                down = clock() - t_lost
                lost.update(resumed=True, down_s=round(down, 3))
                gap = max(down, 1e-3)
                segment = _Continued(src, last_index + 1, last_t + gap)
                say(f"source back after {down:.1f} s; resuming with the memory intact "
                    f"({sum(m['num_tokens'] for m in _memory_stats(head).values())} tokens held)")
        except KeyboardInterrupt:
            stopped = "interrupt"
        finally:
            stop_asking.set()
            if window is not None:
                window.close()
            if asker is not None:  # a question being answered now is kept; later lines are not asked
                asker.join(timeout=1.0)
            with lock:
                closed[0] = True
        # 4. finish the files, the summary
        od.close()
        wall = clock() - t_wall
        lat = np.asarray(latencies, dtype=np.float64)
        n, dropped = totals["processed"], totals["dropped"]
        summary = {
            "source": source,
            "head": getattr(head, "name", type(head).__name__),
            "view": "window" if window is not None else "file",
            "stopped": stopped,
            "frames_processed": n,
            "frames_dropped": dropped,
            "drop_rate": dropped / max(1, n + dropped),
            "wall_s": round(wall, 3),
            "fps": n / wall if wall > 0 else float("nan"),
            "latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "latency_ms_p95": float(np.percentile(lat, 95)) if lat.size else float("nan"),
            "losses": losses,
            "reconnects": sum(x["resumed"] for x in losses),
            "memory": _memory_stats(head),
            "head_stats": head.stats() if hasattr(head, "stats") else {},
            **({"per_class": dict(sorted(counts.items()))} if counts else {}),
            **({"answers": len(answers)} if questions is not None else {}),
            "outputs": {"video": str(video.path) if video is not None and video.count else None,
                        "records": str((records or answers_jsonl).path)},
            "error": None if error is None else str(error),
        }
        summary_path = write_summary(od.path / "summary.json", summary)
    return WebcamResult(summary, summary_path, video.path if video is not None and video.count else None,
                        (records or answers_jsonl).path, answers, losses, error)
