"""A video file, read through OpenCV or decord; header facts from OpenCV's probe."""

from __future__ import annotations

import re
from typing import Callable, Iterator

import cv2
import numpy as np

from streammem.io.errors import SourceOpenError, SourceReadError
from streammem.io.selection import _Selector

__all__ = ["_FileReader"]


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
            self._open_decord()
        elif cap is None:
            raise SourceOpenError(path, "OpenCV cannot open this file as video")

    def _open_decord(self) -> None:
        try:
            import decord
        except ImportError as exc:  # decord has no wheel on this platform
            raise SourceOpenError(self.path, "the decord backend is not installed") from exc
        try:  # its FFmpeg logs every decode warning; streammem reports failures itself
            decord.logging.set_level(decord.logging.QUIET)
        except AttributeError:
            pass
        try:
            vr = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=1)
            n = len(vr)
            ts = vr.get_frame_timestamp(range(n))[:, 0] if n else np.zeros(0)
        except Exception as exc:
            raise SourceOpenError(self.path, f"decord cannot open this file: {_short(exc)}") from exc
        if n == 0:
            raise SourceOpenError(self.path, "decord found no video frames")
        self._vr = vr
        self._timestamps = np.round(np.asarray(ts, dtype=np.float64), 6)
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
        """A read that ended well before the header's frame count means a truncated file."""
        expected = self.header_frames
        if expected is None or last_index + 1 >= expected - max(1, int(0.02 * expected)):
            return None
        problem = f"the file ends early (header says {expected} frames); it is truncated or corrupt"
        ts = None if last_ts is None else last_ts + (1.0 / self.header_fps if self.header_fps else 0.0)
        return SourceReadError(self.path, problem, last_index + 1, ts, read)

    def _frames_opencv(self, select):
        cap = _open_cv_file(self.path)
        if cap is None:
            raise SourceOpenError(self.path, "OpenCV cannot open this file as video")
        index, ts, read = -1, None, 0
        try:
            while True:
                if not cap.grab():
                    break
                index += 1
                ts = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
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
        for index in range(start, n):
            ts = float(tss[index])
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


def _short(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    # decord prefixes its messages with "[hh:mm:ss] /its/source/file.cc:123: "
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+:\s*", "", text)
    return text.strip()[-200:]
