"""Streaming sources: ``open_source(uri, **options)`` -> an iterable of :class:`~streammem.Frame`.

Supported inputs:

================================  ==========================================================
``path/to/video.mp4``             a video file, read by decord or OpenCV (``backend=``)
``camera:0``                      a local camera, through OpenCV
``rtsp://...``, ``http(s)://...`` a network stream or remote file, through OpenCV's FFmpeg
``path/to/folder/``               a folder of images, sorted by name, at ``input_fps``
``world:seed=3,preset=hard``      StreamWorld, the procedural world (``streammem.world``)
``NAME:spec``                     any scheme registered with
                                  :func:`~streammem.io.schemes.register_scheme`
================================  ==========================================================

A URI ``NAME:...`` whose scheme is not registered (and is not an existing path) fails with the
known schemes listed. ``world:`` is registered by the package root, ``streammem``, and builds
its world on first use.

Options (all sources): ``stride`` (keep every n-th selected frame), ``start`` / ``end``
(seconds, ``start <= t < end``), ``fps`` (resample to a target rate by timestamps),
``max_side`` (downscale so the longer side is at most this), ``backend`` (``auto``,
``decord``, ``opencv``), ``prefetch`` (queue size of the decode thread; 0 decodes in the
caller's thread), ``input_fps`` (frame rate of an image folder).

Timestamps come from the container (presentation times), so variable-frame-rate files are
right, and are strictly increasing: a time that goes backwards or repeats is set from the frame
rate, and a header frame count that counts frames without picture data is accepted; each is
reported once per read as a :class:`~streammem.io.errors.SourceWarning`
(:mod:`streammem.io.readers.file`). Reading is lazy and bounded: frames are decoded one at a time by a prefetch thread into
a bounded queue, never the whole video at once.

Example:
    >>> from streammem.io import open_source
    >>> src = open_source("world:seed=0,seconds=2,fps=4,size=64")
    >>> [round(f.timestamp, 2) for f in src]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]

Errors: every failure raises a :class:`~streammem.io.errors.SourceError` subclass whose message
names the input and what failed. A file that stops decoding mid-stream first yields every
frame it could decode, then raises :class:`~streammem.io.errors.SourceReadError` with the frame
index and time at which it stopped.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Iterator

from streammem.io.diagnose import _diagnose
from streammem.io.errors import SourceError, SourceNotFoundError, SourceOpenError, SourceReadError
from streammem.io.options import DEFAULT_BACKEND_ORDER, SourceInfo, SourceOptions
from streammem.io.prefetch import _prefetch
from streammem.io.readers import _FileReader, _FolderReader, _FrameReader, _LiveReader
from streammem.io.schemes import known_schemes, scheme_opener
from streammem.io.selection import _resize, _Selector
from streammem.types import Frame

__all__ = ["Source", "open_source", "probe"]

_CAMERA_RE = re.compile(r"^camera:(\d+)$")
_STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")
_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]+):")  # two characters at least: "C:" is a drive


class Source:
    """An iterable of :class:`Frame` over one input. Iterating again starts from the beginning
    (for files, folders and the world); a live source is read once.

    :meth:`close` (or leaving a ``with open_source(...) as src:`` block) releases what it holds
    at once: a camera or stream opened and not read yet, and the iterations running (their
    decode threads and decoders); iterating a closed source raises :class:`SourceError`."""

    def __init__(self, uri: str, opts: SourceOptions) -> None:
        self.uri = str(uri)
        self.opts = opts
        self._iterations: list = []  # weak references to the running iterations, closed by close()
        self.closed = False
        self._reader, self.info = self._open()

    def close(self) -> None:
        """Stop every running iteration and release the camera or stream handle; idempotent."""
        for ref in self._iterations:
            it = ref()
            if it is not None:
                it.close()
        self._iterations.clear()
        cap = getattr(self._reader, "cap", None)
        if cap is not None:
            cap.release()
        self.closed = True

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- opening
    def _open(self):
        uri, o = self.uri, self.opts
        if (m := _CAMERA_RE.match(uri)) is not None:
            reader = _LiveReader(uri, int(m.group(1)))
            info = SourceInfo(uri, "camera", "opencv", reader.width, reader.height, reader.fps, None, None, reader.codec)
        elif uri.lower().startswith(_STREAM_PREFIXES):
            reader = _LiveReader(uri, uri)
            n, fps = reader.num_frames, reader.fps
            dur = n / fps if n and fps else None
            info = SourceInfo(uri, "stream", "opencv", reader.width, reader.height, fps, n, dur, reader.codec)
        elif (opener := _registered_opener(uri)) is not None:
            reader, info = _open_scheme(uri, *opener)
        else:
            path = Path(uri)
            if not path.exists():
                if (m := _SCHEME_RE.match(uri)) is not None:
                    known = ", ".join(f"{s}:" for s in ["camera", *known_schemes()])
                    raise SourceOpenError(uri, f"unknown source scheme {m.group(1)!r}; known schemes: {known}, "
                                               f"{', '.join(_STREAM_PREFIXES)}, or a file or folder path")
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
            if isinstance(img, Frame):  # a scheme opener's whole frames (the world's carry ground truth)
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
        if self.closed:
            raise SourceError(self.uri, "the source is closed")
        if self.info.kind in ("camera", "stream"):
            if getattr(self, "_consumed", False):
                raise SourceError(self.uri, "a live source can be iterated only once")
            self._consumed = True
        it = self._frames() if self.opts.prefetch == 0 else _prefetch(self._frames(), self.opts.prefetch)
        # weak: an iteration left behind (a loop broken out of) is still closed when it is dropped
        self._iterations = [r for r in self._iterations if r() is not None] + [weakref.ref(it)]
        return it

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


def _registered_opener(uri: str):
    """``(scheme, opener)`` for a URI of a registered scheme, else None."""
    m = _SCHEME_RE.match(uri)
    if m is None:
        return None
    opener = scheme_opener(m.group(1))
    return None if opener is None else (m.group(1), opener)


def _open_scheme(uri: str, scheme: str, opener) -> tuple[_FrameReader, SourceInfo]:
    """Run a scheme's opener (:mod:`streammem.io.schemes`) on the spec after ``scheme:``."""
    try:
        frames, facts = opener(uri[len(scheme) + 1:])
    except (ValueError, TypeError) as exc:
        raise SourceOpenError(uri, f"bad {scheme} spec: {exc}") from exc
    missing = {"width", "height", "fps", "num_frames"} - set(facts)
    if missing:
        raise SourceOpenError(uri, f"the {scheme}: opener's info lacks {sorted(missing)}")
    n, fps = facts["num_frames"], facts["fps"]
    info = SourceInfo(uri, facts.get("kind", scheme), facts.get("backend", scheme), int(facts["width"]),
                      int(facts["height"]), fps, n, None if n is None or not fps else n / fps, facts.get("codec"))
    return _FrameReader(frames, facts["width"], facts["height"]), info


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
