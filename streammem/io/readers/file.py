"""A video file, read through OpenCV or decord; header facts from OpenCV's probe.

Frame times are the container's presentation times, made strictly increasing by
:class:`_Clock`: a time that goes backwards or repeats (an AVI's last B-frames come out of
OpenCV at 0.0 s) becomes the previous time + 1 / fps, with one :class:`SourceWarning` per read.
decord is used only when its frame-time table is finite and strictly increasing; otherwise its
frames do not match their times (it sorts by a broken table), so the file is read with OpenCV
and a warning says so. A read that ends before the header's frame count is an error
(truncated or corrupt) only when the frames also stop before the header's duration; when
they reach it, the header counted frames without picture data (an AVI's null frames) and a
warning says so.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import cv2
import numpy as np

from streammem.io.errors import SourceOpenError, SourceReadError, SourceWarning
from streammem.io.selection import _Selector

__all__ = ["_Clock", "_FileReader"]

_DEFAULT_FPS = 25.0  # the step of a repair when neither the header nor the file gives a rate

log = logging.getLogger(__name__)


@contextmanager
def _stderr_to_log(what: str) -> Iterator[None]:
    """What native code writes to stderr (file descriptor 2) during the block goes to the log
    (debug level), not the terminal: decord's C++ ``LOG(ERROR)`` lines, which its
    ``logging.set_level`` does not reach. Our own message reports the failure."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("%s wrote: %s", what, text)


class _Clock:
    """Strictly increasing frame times from a container's times.

    ``clock(index, t)`` returns ``t`` when it is finite and later than the previous time;
    otherwise (backwards, repeated, 0 after the start, NaN) the previous time + ``1 / fps``
    (``fps`` from the header; without one, the last forward step seen, else 25). The first
    repair of a read issues one :class:`SourceWarning` naming the file, the frame and both times;
    ``repaired`` counts them all.
    """

    def __init__(self, path: str, fps: float | None) -> None:
        self.path = path
        self.step = 1.0 / fps if fps and fps > 0 else None
        self.prev: float | None = None
        self._seen_step: float | None = None
        self.repaired = 0

    def __call__(self, index: int, t: float | None) -> float:
        ok = t is not None and math.isfinite(t)
        if self.prev is None:
            t = float(t) if ok else 0.0
        elif not ok or t <= self.prev + 1e-9:
            step = self.step or self._seen_step or 1.0 / _DEFAULT_FPS
            fixed = self.prev + step
            if self.repaired == 0:
                said = "no time" if not ok else f"{t:.3f}s"
                warnings.warn(
                    f"{self.path}: frame {index} has container time {said}, not after the previous frame's "
                    f"{self.prev:.3f}s; frame times that do not move forward are set to the previous time + "
                    f"{step:.4f}s (1 / frame rate), this one to {fixed:.3f}s", SourceWarning, stacklevel=2)
            self.repaired += 1
            t = fixed
        else:
            self._seen_step = t - self.prev
        self.prev = float(t)
        return self.prev


def _fourcc(cap: "cv2.VideoCapture") -> str | None:
    code = int(cap.get(cv2.CAP_PROP_FOURCC))
    if code <= 0:
        return None
    text = code.to_bytes(4, "little").decode("ascii", errors="replace").strip("\x00 ")
    return text or None


def _open_cv_file(path: str) -> "cv2.VideoCapture | None":
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        return None
    return cap


class _FileReader:
    """A video file, through OpenCV or decord. Header facts come from OpenCV's probe."""

    def __init__(self, path: str, backend: str) -> None:
        self.path = path
        self.backend = backend
        cap = _open_cv_file(path)
        self.header_frames: int | None = None
        self.header_fps: float | None = None
        self.codec: str | None = None
        self.width = self.height = 0
        if cap is not None:
            self.header_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
            self.header_fps = float(cap.get(cv2.CAP_PROP_FPS)) or None
            self.codec = _fourcc(cap)
            self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            cap.release()
        self._vr = None
        self._timestamps: np.ndarray | None = None
        if backend == "decord":
            self._open_decord(opencv_opens=cap is not None)
        elif cap is None:
            raise SourceOpenError(path, "OpenCV cannot open this file as video")

    def _open_decord(self, opencv_opens: bool) -> None:
        try:
            import decord
        except ImportError as exc:  # decord has no wheel on this platform
            raise SourceOpenError(self.path, "the decord backend is not installed") from exc
        try:  # its FFmpeg logs every decode warning; streammem reports failures itself
            decord.logging.set_level(decord.logging.QUIET)
        except AttributeError:
            pass
        try:
            with _stderr_to_log(f"decord opening {self.path}"):
                vr = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=1)
                n = len(vr)
                ts = vr.get_frame_timestamp(range(n))[:, 0] if n else np.zeros(0)
        except Exception as exc:
            raise SourceOpenError(self.path, f"decord cannot open this file: {_short(exc)}") from exc
        if n == 0:
            raise SourceOpenError(self.path, "decord found no video frames")
        ts = np.asarray(ts, dtype=np.float64)
        bad = _bad_times(ts)
        if bad is not None:
            # decord orders and seeks frames by this table: with it broken, frames would not
            # match their indices or times, so OpenCV reads the file instead.
            if not opencv_opens:
                raise SourceOpenError(self.path, f"decord's frame times for this file are unusable ({bad}) "
                                                 "and OpenCV cannot open it")
            warnings.warn(f"{self.path}: decord's frame times for this file are unusable ({bad}), so its frames "
                          "would not match their times; reading with OpenCV instead", SourceWarning, stacklevel=4)
            self.backend = "opencv"
            return
        self._vr = vr
        self._timestamps = np.round(ts, 6)
        first = vr[0].shape
        self.height, self.width = int(first[0]), int(first[1])
        vr.seek(0)
        fps = float(vr.get_avg_fps())
        self.header_fps = self.header_fps or fps
        self.header_frames = self.header_frames or n

    @property
    def duration(self) -> float | None:
        if self.header_frames and self.header_fps:
            return self.header_frames / self.header_fps
        return None

    def frames(self, select: Callable[[int, float], bool | str]) -> Iterator[tuple[int, float, np.ndarray]]:
        if self.backend == "decord":
            yield from self._frames_decord(select)
        else:
            yield from self._frames_opencv(select)

    def _truncated(self, last_index: int, last_ts: float | None, read: int) -> SourceReadError | None:
        """The end of a whole read against the header. Fewer frames than the header counts
        and a last frame well before the header's duration: a truncated or corrupt file (the
        error is returned). Fewer frames that still reach the header's duration (within one
        frame or 2 %): the header counted frames without picture data; a warning, no error."""
        expected = self.header_frames
        decoded = last_index + 1
        if expected is None or decoded >= expected - max(1, int(0.02 * expected)):
            return None
        step = 1.0 / self.header_fps if self.header_fps else 0.0
        if step and last_ts is not None:
            duration = expected * step
            if last_ts + step >= duration - max(step, 0.02 * duration) - 1e-6:
                warnings.warn(f"{self.path}: the header counts {expected} frames but {decoded} decode, and they "
                              f"run to the header's duration ({duration:.3f}s); the other {expected - decoded} hold "
                              "no picture data (null frames) and are skipped", SourceWarning, stacklevel=3)
                return None
        problem = f"the file ends early (header says {expected} frames); it is truncated or corrupt"
        ts = None if last_ts is None else last_ts + step
        return SourceReadError(self.path, problem, last_index + 1, ts, read)

    def _frames_opencv(self, select):
        cap = _open_cv_file(self.path)
        if cap is None:
            raise SourceOpenError(self.path, "OpenCV cannot open this file as video")
        index, ts, read = -1, None, 0
        clock = _Clock(self.path, self.header_fps)
        try:
            while True:
                if not cap.grab():
                    break
                index += 1
                ts = clock(index, cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
                verdict = select(index, ts)
                if verdict == _Selector.STOP:
                    return
                if not verdict:
                    continue
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    raise SourceReadError(self.path, "OpenCV could not decode a frame", index, ts, read)
                read += 1
                yield index, ts, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()
        if index < 0:
            problem = f"no frame could be decoded (codec {self.codec or 'unknown'})"
            if self.header_frames:
                problem += f" although the header lists {self.header_frames}: the file is truncated or corrupt"
            raise SourceReadError(self.path, problem, 0, 0.0, 0)
        err = self._truncated(index, ts, read)
        if err is not None:
            raise err

    def _frames_decord(self, select):
        vr, tss = self._vr, self._timestamps
        n = len(tss)
        start = self._first_index(select)
        read = 0
        if start > 0:
            vr.seek_accurate(start)
        else:
            vr.seek(0)
        index = start - 1
        clock = _Clock(self.path, self.header_fps)  # decord's table is strictly increasing: a safeguard
        for index in range(start, n):
            ts = clock(index, float(tss[index]))
            verdict = select(index, ts)
            if verdict == _Selector.STOP:
                return
            try:
                if not verdict:
                    vr.skip_frames(1)
                    continue
                img = vr.next().asnumpy()
            except Exception as exc:
                problem = f"decord could not decode the frame: {_short(exc)}"
                raise SourceReadError(self.path, problem, index, ts, read) from exc
            read += 1
            yield index, ts, img
        err = self._truncated(index, float(tss[index]) if index >= 0 else None, read)
        if err is not None:
            raise err

    def _first_index(self, select) -> int:
        opts = getattr(select, "opts", None)
        if opts is None or opts.start <= 0:
            return 0
        return int(np.searchsorted(self._timestamps, opts.start - 1e-9))


def _bad_times(ts: np.ndarray) -> str | None:
    """What is wrong with a frame-time table (seconds), or None when every time is finite,
    not negative, and later than the one before."""
    n = len(ts)
    finite = np.isfinite(ts) & (np.abs(ts) < 1e7)
    if not finite.all():
        return f"{int((~finite).sum())} of {n} are missing"
    if (ts < -1e-3).any():
        return f"{int((ts < -1e-3).sum())} of {n} are negative"
    back = int((np.diff(ts) <= 0).sum())
    if back:
        return f"{back} of {n} do not move forward"
    return None


#: decord's internal messages, in words (its C++ checks mean nothing to a user)
_DECORD_WORDS = (("cannot find video stream", "it finds no video stream it can decode"),
                 ("av_read_frame failed", "its data cannot be read (truncated or corrupt)"),
                 ("Cannot create buffer source", "it cannot set up decoding (truncated or corrupt)"))


def _short(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    for internal, words in _DECORD_WORDS:
        if internal in text:
            return words
    # decord prefixes its messages with "[hh:mm:ss] /its/source/file.cc:123: " and states a failed
    # check as "Check failed: <C++ expression> (<a> vs. <b>)"
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+:\s*", "", text)
    text = re.sub(r"Check failed: .*? \(-?\d+ vs\. -?\d+\)\s*", "", text)
    return text.strip()[-200:]
