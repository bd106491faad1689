"""The streaming loop: ``run_stream(source, pipeline, sink=None, realtime=False)``.

It pulls frames from a source, runs ``pipeline.step(frame)`` on each, times it, and yields a
:class:`StreamItem` per processed frame. The run's totals are in ``run.stats``.

Real-time mode: frames *arrive* on their own clock (a live source's delivery; a file's or the
world's timestamps, played back at 1x). A frame that arrives while the pipeline is busy waits in
a one-frame slot; a newer arrival replaces it (the newest frame wins) and the replaced frame is
counted as dropped. Offline mode (the default) processes every frame.

Example:
    >>> from streammem.pipelines import StatsPipeline, run_stream
    >>> from streammem.world import World
    >>> run = run_stream(World(seed=0, size=64, frames=4), StatsPipeline(), progress=False)
    >>> [(item.frame.index, item.output.motion >= 0) for item in run]
    [(0, True), (1, True), (2, True), (3, True)]
    >>> run.stats.summary()["frames_processed"]
    4
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from streammem.types import Frame

__all__ = ["StreamItem", "StreamRun", "StreamStats", "run_stream"]


@dataclass
class StreamItem:
    """One processed frame.

    Attributes:
        frame: the input frame.
        output: what ``pipeline.step`` returned.
        latency_ms: time spent in ``pipeline.step``.
        lag_ms: real-time mode only: time from the frame's arrival to the end of its step.
        dropped: frames dropped (real-time mode) since the previous processed frame.
    """

    frame: Frame
    output: Any
    latency_ms: float
    lag_ms: float | None = None
    dropped: int = 0


@dataclass
class StreamStats:
    """Totals of a run. Latency percentiles use a bounded reservoir of the last 10,000 frames."""

    processed: int = 0
    dropped: int = 0
    dropped_indices: deque = field(default_factory=lambda: deque(maxlen=1000))
    wall_s: float = 0.0
    stream_s: float = 0.0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))
    error: str | None = None

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
        return {
            "frames_processed": self.processed,
            "frames_dropped": self.dropped,
            "drop_rate": self.dropped / max(1, self.processed + self.dropped),
            "wall_s": round(self.wall_s, 3),
            "stream_s": round(self.stream_s, 3),
            "fps": self.processed / self.wall_s if self.wall_s > 0 else float("nan"),
            "latency_ms_mean": float(lat.mean()) if lat.size else float("nan"),
            "latency_ms_p50": pct(50),
            "latency_ms_p95": pct(95),
            "latency_ms_max": float(lat.max()) if lat.size else float("nan"),
            "error": self.error,
        }


class StreamRun:
    """An iterator of :class:`StreamItem` with the run's :class:`StreamStats` in ``stats``."""

    def __init__(self, gen_factory: Callable[["StreamRun"], Iterator[StreamItem]]) -> None:
        self.stats = StreamStats()
        self._gen = gen_factory(self)

    def __iter__(self) -> "StreamRun":
        return self

    def __next__(self) -> StreamItem:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


def run_stream(
    source: Iterable[Frame],
    pipeline,
    sink: Callable[[StreamItem], None] | None = None,
    realtime: bool = False,
    max_frames: int | None = None,
    progress: bool = True,
    speed: float = 1.0,
    interrupt: threading.Event | None = None,
) -> StreamRun:
    """Stream ``source`` through ``pipeline``.

    Args:
        source: any iterable of :class:`Frame` (see :func:`streammem.io.open_source`).
        pipeline: an object with ``step(frame) -> output``.
        sink: called with every :class:`StreamItem` (write video, JSONL, UI updates).
        realtime: drop frames that arrive while the pipeline is busy (newest frame wins).
        max_frames: stop after this many processed frames.
        progress: show a tqdm bar (with a total when the source's length is known).
        speed: real-time playback speed of non-live sources (2.0 = twice as fast).
        interrupt: set this event to stop the run after the current frame.

    Returns:
        a :class:`StreamRun`: iterate it for the items; ``run.stats`` holds the totals.
        An error from the source (for example a truncated file) is raised after every
        frame before it has been yielded, and is recorded in ``run.stats.error``.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed!r}")

    def gen(run: StreamRun) -> Iterator[StreamItem]:
        stats = run.stats
        total = None
        try:
            total = len(source)  # type: ignore[arg-type]
        except TypeError:
            pass
        if max_frames is not None:
            total = max_frames if total is None else min(total, max_frames)
        bar = tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True, leave=True)
        frames = _realtime(source, stats, speed, getattr(source, "live", False)) if realtime else _offline(source)
        t_start = time.perf_counter()
        try:
            for frame, arrived, dropped in frames:
                if interrupt is not None and interrupt.is_set():
                    break
                t0 = time.perf_counter()
                output = pipeline.step(frame)
                t1 = time.perf_counter()
                item = StreamItem(
                    frame=frame,
                    output=output,
                    latency_ms=(t1 - t0) * 1e3,
                    lag_ms=None if arrived is None else (t1 - arrived) * 1e3,
                    dropped=dropped,
                )
                stats.processed += 1
                stats.latencies_ms.append(item.latency_ms)
                stats.stream_s = frame.timestamp
                stats.wall_s = t1 - t_start
                if sink is not None:
                    sink(item)
                bar.update(1)
                if stats.dropped:
                    bar.set_postfix(dropped=stats.dropped, refresh=False)
                yield item
                if max_frames is not None and stats.processed >= max_frames:
                    break
        except Exception as exc:
            stats.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            stats.wall_s = time.perf_counter() - t_start
            close = getattr(frames, "close", None)
            if close is not None:
                close()
            bar.close()

    return StreamRun(gen)


def _offline(source: Iterable[Frame]) -> Iterator[tuple[Frame, None, int]]:
    for frame in source:
        yield frame, None, 0


_END = object()


def _realtime(source: Iterable[Frame], stats: StreamStats, speed: float, live: bool):
    """Frames as they arrive; a one-frame slot where the newest arrival replaces a waiting one.

    Non-live sources are paced by their timestamps (divided by ``speed``); live sources arrive
    when they deliver.
    """
    cond = threading.Condition()
    slot: list = []  # at most one (frame, arrival time)
    done: list = []  # [_END] or [exception]
    stop = threading.Event()

    def producer() -> None:
        t0 = None
        try:
            for frame in source:
                if stop.is_set():
                    return
                if not live:
                    if t0 is None:
                        t0 = time.perf_counter() - frame.timestamp / speed
                    wait = t0 + frame.timestamp / speed - time.perf_counter()
                    if wait > 0:
                        stop.wait(wait)
                        if stop.is_set():
                            return
                with cond:
                    if slot:
                        old = slot.pop()
                        stats.dropped += 1
                        stats.dropped_indices.append(old[0].index)
                        slot_dropped[0] += 1
                    slot.append((frame, time.perf_counter()))
                    cond.notify()
            with cond:
                done.append(_END)
                cond.notify()
        except BaseException as exc:
            with cond:
                done.append(exc)
                cond.notify()

    slot_dropped = [0]
    thread = threading.Thread(target=producer, name="streammem-realtime", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                while not slot and not done:
                    cond.wait()
                if slot:
                    frame, arrived = slot.pop()
                    dropped, slot_dropped[0] = slot_dropped[0], 0
                else:
                    end = done[0]
                    if end is _END:
                        return
                    raise end
            yield frame, arrived, dropped
    finally:
        stop.set()
        with cond:
            slot.clear()
        thread.join(timeout=5.0)
