"""A camera (``camera:N``) or a network stream (``rtsp://``, ``http(s)://``, ...) through OpenCV."""

from __future__ import annotations

import time

import cv2

from streammem.io.errors import SourceOpenError, SourceReadError
from streammem.io.readers.file import _Clock, _fourcc
from streammem.io.selection import _Selector

__all__ = ["_LiveReader"]

_NETWORK_TIMEOUT_MS = 8000
# Consecutive failed reads after which a camera or live stream counts as gone.
_LIVE_READ_RETRIES = 10


class _LiveReader:
    """A camera or network stream through OpenCV. Timestamps: the stream's own when it has
    them, else seconds since the first frame; made strictly increasing by :class:`_Clock`."""

    def __init__(self, uri: str, target) -> None:
        self.uri = uri
        self.kind = "camera" if isinstance(target, int) else "stream"
        if isinstance(target, int):
            cap = cv2.VideoCapture(target)
            what = f"camera {target} could not be opened (no such device or it is busy)"
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _NETWORK_TIMEOUT_MS]
            cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
            what = "the stream could not be opened (unreachable, refused, or not a video)"
        if not cap.isOpened():
            cap.release()
            raise SourceOpenError(uri, what)
        self.cap = cap
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or None
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.num_frames = n if n > 0 and self.kind == "stream" else None
        self.codec = _fourcc(cap)

    def frames(self, select):
        cap, index, read, t0, ts, failures = self.cap, -1, 0, None, None, 0
        clock = _Clock(self.uri, self.fps)
        try:
            while True:
                if not cap.grab():
                    failures += 1
                    if self.num_frames is not None and index + 1 >= self.num_frames:
                        return  # a finite remote file that ended normally
                    if failures >= _LIVE_READ_RETRIES:
                        raise SourceReadError(
                            self.uri, f"the {self.kind} stopped delivering frames", index + 1, ts, read
                        )
                    time.sleep(0.05)
                    continue
                failures = 0
                index += 1
                now = time.monotonic()
                t0 = now if t0 is None else t0
                pos = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                ts = clock(index, pos if (pos > 0 or index == 0) and self.kind == "stream" else now - t0)
                verdict = select(index, ts)
                if verdict == _Selector.STOP:
                    return
                if not verdict:
                    continue
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    raise SourceReadError(self.uri, f"the {self.kind} returned an undecodable frame", index, ts, read)
                read += 1
                yield index, ts, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()
