"""Streaming sources: ``open_source(uri, **options)`` -> an iterable of :class:`~streammem.Frame`.

Supported inputs:

================================  ==========================================================
``path/to/video.mp4``             a video file, read by decord or OpenCV (``backend=``)
``camera:0``                      a local camera, through OpenCV
``rtsp://...``, ``http(s)://...`` a network stream or remote file, through OpenCV's FFmpeg
``path/to/folder/``               a folder of images, sorted by name, at ``input_fps``
``world:seed=3,preset=hard``      StreamWorld, the procedural world (``streammem.world``)
================================  ==========================================================

Options (all sources): ``stride`` (keep every n-th selected frame), ``start`` / ``end``
(seconds, ``start <= t < end``), ``fps`` (resample to a target rate by timestamps),
``max_side`` (downscale so the longer side is at most this), ``backend`` (``auto``,
``decord``, ``opencv``), ``prefetch`` (queue size of the decode thread; 0 decodes in the
caller's thread), ``input_fps`` (frame rate of an image folder).

Timestamps come from the container (presentation times), so variable-frame-rate files are
right. Reading is lazy and bounded: frames are decoded one at a time by a prefetch thread into
a bounded queue, never the whole video at once.

Example:
    >>> from streammem.io import open_source
    >>> src = open_source("world:seed=0,seconds=2,fps=4,size=64")  # doctest: +SKIP
    >>> [round(f.timestamp, 2) for f in src]                        # doctest: +SKIP
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]

Errors: every failure raises a :class:`~streammem.io.errors.SourceError` subclass whose message
names the input and what failed. A file that stops decoding mid-stream first yields every
frame it could decode, then raises :class:`~streammem.io.errors.SourceReadError` with the frame
index and time at which it stopped.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from streammem.io.errors import SourceError, SourceNotFoundError, SourceOpenError, SourceReadError
from streammem.types import Frame

import cv2

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND_ORDER",
    "IMAGE_EXTENSIONS",
    "Source",
    "SourceInfo",
    "SourceOptions",
    "open_source",
    "probe",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BACKENDS = ("auto", "decord", "opencv")
# Order tried by backend="auto" for video files. benchmarks/decode.py measured raw OpenCV
# faster than raw decord on H.264 here (see README), so OpenCV leads and decord is the
# fallback for files OpenCV cannot open.
DEFAULT_BACKEND_ORDER = ("opencv", "decord")
_CAMERA_RE = re.compile(r"^camera:(\d+)$")
_STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")
_NETWORK_TIMEOUT_MS = 8000
# Consecutive failed reads after which a camera or live stream counts as gone.
_LIVE_READ_RETRIES = 10


@dataclass
class SourceOptions:
    """Options shared by every source; validated at construction."""

    stride: int = 1
    start: float = 0.0
    end: float | None = None
    fps: float | None = None
    max_side: int | None = None
    backend: str = "auto"
    prefetch: int = 8
    input_fps: float = 25.0

    def __post_init__(self) -> None:
        if int(self.stride) != self.stride or self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}")
        self.stride = int(self.stride)
        if self.start < 0:
            raise ValueError(f"start must be >= 0 seconds, got {self.start!r}")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end must be > start ({self.start}), got {self.end!r}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.max_side is not None and (int(self.max_side) != self.max_side or self.max_side < 8):
            raise ValueError(f"max_side must be an integer >= 8, got {self.max_side!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if int(self.prefetch) != self.prefetch or self.prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0, got {self.prefetch!r}")
        if not self.input_fps > 0:
            raise ValueError(f"input_fps must be > 0, got {self.input_fps!r}")


@dataclass
class SourceInfo:
    """What is known about a source before reading it.

    ``num_frames``, ``fps`` and ``duration`` describe the whole input (None for live
    streams); ``selected_frames`` estimates how many frames the options keep.
    """

    uri: str
    kind: str
    backend: str
    width: int
    height: int
    fps: float | None
    num_frames: int | None
    duration: float | None
    codec: str | None = None
    selected_frames: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- selection
class _Selector:
    """Decides from (index, timestamp) which frames to keep: window, then fps, then stride."""

    STOP = "stop"

    def __init__(self, opts: SourceOptions) -> None:
        self.opts = opts
        self._origin: float | None = None
        self._tick = 0
        self._kept = 0

    def __call__(self, index: int, timestamp: float) -> bool | str:
        o = self.opts
        if o.end is not None and timestamp >= o.end - 1e-9:
            return self.STOP
        if timestamp < o.start - 1e-9:
            return False
        if o.fps is not None:
            # Keep the first frame at or after each tick origin + k / fps; ticks are counted
            # in integers so rounding never accumulates, and a gap skips whole periods.
            if self._origin is None:
                self._origin = timestamp
            rel = (timestamp - self._origin) * o.fps
            if rel < self._tick - 1e-6:
                return False
            self._tick = int(np.floor(rel + 1e-6)) + 1
        keep = self._kept % o.stride == 0
        self._kept += 1
        return keep

    def estimate(self, num_frames: int | None, fps: float | None, duration: float | None) -> int | None:
        if num_frames is None or not fps:
            return None
        o = self.opts
        t0 = min(o.start, duration or o.start)
        t1 = duration if o.end is None or duration is None else min(o.end, duration)
        if t1 is None:
            return None
        n = max(0.0, (t1 - t0)) * (min(fps, o.fps) if o.fps else fps)
        n = min(int(round(n)), num_frames)
        return max(0, -(-n // o.stride))


def _resize(img: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None:
        return img
    h, w = img.shape[:2]
    side = max(h, w)
    if side <= max_side:
        return img
    scale = max_side / side
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- readers
# A reader is a generator function (select) -> Iterator[(index, timestamp, rgb image)].


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


class _LiveReader:
    """A camera or network stream through OpenCV. Timestamps: the stream's own when it has
    them, else seconds since the first frame."""

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
                ts = pos if (pos > 0 or index == 0) and self.kind == "stream" else now - t0
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


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class _FolderReader:
    """A folder of images sorted by name (natural order: 2 before 10), at ``input_fps``."""

    def __init__(self, path: str, input_fps: float) -> None:
        self.path = path
        self.fps = input_fps
        files = [p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not files:
            raise SourceOpenError(path, f"the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.files = sorted(files, key=lambda p: _natural_key(p.name))
        first = self._load(0)
        self.height, self.width = first.shape[:2]

    def _load(self, i: int) -> np.ndarray:
        bgr = cv2.imread(str(self.files[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SourceReadError(self.path, f"cannot decode image {self.files[i].name}", i, i / self.fps, i)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def frames(self, select):
        read = 0
        for i in range(len(self.files)):
            ts = i / self.fps
            verdict = select(i, ts)
            if verdict == _Selector.STOP:
                return
            if verdict:
                try:
                    img = self._load(i)
                except SourceReadError as exc:
                    exc.frames_read = read
                    raise
                read += 1
                yield i, ts, img


# ----------------------------------------------------------------------------- the source
class Source:
    """An iterable of :class:`Frame` over one input. Iterating again starts from the beginning
    (for files, folders and the world); a live source is read once."""

    def __init__(self, uri: str, opts: SourceOptions) -> None:
        self.uri = str(uri)
        self.opts = opts
        self._reader, self.info = self._open()

    # -- opening
    def _open(self):
        uri, o = self.uri, self.opts
        if uri.startswith("world:"):
            from streammem.world import open_world  # the world is optional at import time

            try:
                world = open_world(uri[len("world:"):])
            except (ValueError, TypeError) as exc:
                raise SourceOpenError(uri, f"bad world spec: {exc}") from exc
            reader = _WorldReader(world)
            n = world.num_frames
            info = SourceInfo(
                uri, "world", "streamworld", reader.width, reader.height, world.fps, n,
                None if n is None else n / world.fps, "procedural",
            )
        elif (m := _CAMERA_RE.match(uri)) is not None:
            reader = _LiveReader(uri, int(m.group(1)))
            info = SourceInfo(uri, "camera", "opencv", reader.width, reader.height, reader.fps, None, None, reader.codec)
        elif uri.lower().startswith(_STREAM_PREFIXES):
            reader = _LiveReader(uri, uri)
            n, fps = reader.num_frames, reader.fps
            dur = n / fps if n and fps else None
            info = SourceInfo(uri, "stream", "opencv", reader.width, reader.height, fps, n, dur, reader.codec)
        else:
            path = Path(uri)
            if not path.exists():
                raise SourceNotFoundError(uri, "no such file or folder")
            if path.is_dir():
                reader = _FolderReader(uri, o.input_fps)
                n = len(reader.files)
                info = SourceInfo(uri, "folder", "opencv", reader.width, reader.height, o.input_fps, n, n / o.input_fps, "images")
            else:
                reader = self._open_file(path)
                info = SourceInfo(
                    uri, "file", reader.backend, reader.width, reader.height, reader.header_fps,
                    reader.header_frames, reader.duration, reader.codec,
                )
        info.selected_frames = _Selector(o).estimate(info.num_frames, info.fps, info.duration)
        if o.max_side is not None and max(info.width, info.height) > o.max_side:
            s = o.max_side / max(info.width, info.height)
            info.width, info.height = max(1, round(info.width * s)), max(1, round(info.height * s))
        return reader, info

    def _open_file(self, path: Path) -> _FileReader:
        uri = str(path)
        size = path.stat().st_size
        if size == 0:
            raise SourceOpenError(uri, "the file is empty (0 bytes)")
        order = DEFAULT_BACKEND_ORDER if self.opts.backend == "auto" else (self.opts.backend,)
        problems = []
        for backend in order:
            try:
                return _FileReader(uri, backend)
            except SourceOpenError as exc:
                problems.append(exc.problem)
        raise SourceOpenError(uri, f"cannot open as video ({_diagnose(path)}): " + "; ".join(problems))

    # -- iteration
    def _frames(self) -> Iterator[Frame]:
        select = _Selector(self.opts)
        max_side = self.opts.max_side
        reader = self._reader
        for index, ts, img in self._raw(reader, select):
            if isinstance(img, Frame):  # the world yields whole frames with ground truth
                frame = img
                if max_side is not None:
                    frame.image = _resize(frame.image, max_side)
                yield frame
                continue
            yield Frame(index=index, timestamp=float(ts), image=_resize(img, max_side))

    def _raw(self, reader, select):
        """The reader's frames. With ``backend="auto"``, a file that fails mid-stream is
        resumed with the other backend after the last frame delivered; if that fails too,
        the error reports the total frames read."""
        if not isinstance(reader, _FileReader) or self.opts.backend != "auto":
            yield from reader.frames(select)
            return
        last, read, error = -1, 0, None
        for backend in [reader.backend] + [b for b in DEFAULT_BACKEND_ORDER if b != reader.backend]:
            if error is not None:
                try:
                    reader = _FileReader(reader.path, backend)
                except SourceOpenError:
                    continue
            seen = last
            resume = select if seen < 0 else (lambda i, t, seen=seen: False if i <= seen else select(i, t))
            try:
                for item in reader.frames(resume):
                    last, read = item[0], read + 1
                    yield item
                return
            except SourceReadError as exc:
                if error is None or exc.frame_index > error.frame_index:
                    error = exc
        raise SourceReadError(error.uri, error.problem, error.frame_index, error.timestamp, read)

    def __iter__(self) -> Iterator[Frame]:
        if self.info.kind in ("camera", "stream"):
            if getattr(self, "_consumed", False):
                raise SourceError(self.uri, "a live source can be iterated only once")
            self._consumed = True
        if self.opts.prefetch == 0:
            return self._frames()
        return _prefetch(self._frames(), self.opts.prefetch)

    def __len__(self) -> int:
        if self.info.selected_frames is None:
            raise TypeError(f"{self.uri}: the number of frames of this source is not known")
        return self.info.selected_frames

    def __repr__(self) -> str:
        i = self.info
        return f"Source({self.uri!r}, kind={i.kind}, backend={i.backend}, {i.width}x{i.height}, fps={i.fps})"

    @property
    def live(self) -> bool:
        return self.info.kind in ("camera", "stream") and self.info.num_frames is None


class _WorldReader:
    def __init__(self, world) -> None:
        self.world = world
        size = world.size
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)

    def frames(self, select):
        for frame in self.world:
            verdict = select(frame.index, frame.timestamp)
            if verdict == _Selector.STOP:
                return
            if verdict:
                yield frame.index, frame.timestamp, frame


def _diagnose(path: Path) -> str:
    """Why a file that exists does not open: asks ffmpeg (when there is one) what it sees."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if _looks_like_text(head):
        return "it is text, not a video container"
    from streammem.io.sinks import ffmpeg_exe

    exe = ffmpeg_exe()
    if exe is None:
        return "not a supported video"
    try:
        proc = subprocess.run([exe, "-hide_banner", "-i", str(path)], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return "not a supported video"
    text = proc.stderr
    m = re.search(r"Video: (\S+)(?: \(([^)/]*?)\s*(?:/[^)]*)?\))?", text)
    if m and m.group(1) in ("none", "unknown"):
        tag = (m.group(2) or "").strip()
        return f"unknown video codec{f' {tag!r}' if tag else ''}"
    if "moov atom not found" in text:
        return "the mp4 index (moov atom) is missing: the file is truncated or was never finished"
    if m is None:
        if "Invalid data found" in text:
            return "not a video container (unrecognised data)"
        return "no video stream found"
    return f"ffmpeg sees video codec {m.group(1)!r} but it could not be decoded"


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95


_DONE = object()


def _prefetch(it: Iterator, size: int) -> Iterator:
    """Run ``it`` in a daemon thread, handing items through a queue of ``size``.
    Exceptions are re-raised in the consumer after every item before them; closing the
    consumer (break, garbage collection) stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None and stop.is_set():
                try:
                    close()
                except Exception:
                    pass

    thread = threading.Thread(target=work, name="streammem-prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator:
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            # Unblock a producer waiting on a full queue.
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            # Wait for the reader to release its decoder: a daemon thread killed inside native
            # decode code at interpreter exit aborts the process.
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)

    return consume()


def open_source(uri: str | os.PathLike, **options) -> Source:
    """Open any supported input as a :class:`Source` (an iterable of :class:`Frame`).

    Args:
        uri: a video file, an image folder, ``camera:N``, an ``rtsp://`` / ``http(s)://`` URL,
            or ``world:key=value,...``.
        **options: the fields of :class:`SourceOptions` (stride, start, end, fps, max_side,
            backend, prefetch, input_fps).

    Raises:
        ValueError: an option is out of range (the message names it).
        SourceError: the input cannot be opened (subclasses name the reason).
    """
    unknown = set(options) - set(SourceOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown source option(s) {sorted(unknown)}; allowed: {sorted(SourceOptions.__dataclass_fields__)}")
    return Source(os.fspath(uri), SourceOptions(**options))


def probe(uri: str | os.PathLike, **options) -> SourceInfo:
    """Facts about a source (frames, fps, duration, codec, resolution) without reading it."""
    src = open_source(uri, **options)
    reader = src._reader
    if isinstance(reader, _LiveReader):
        reader.cap.release()
    return src.info
