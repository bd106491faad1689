"""Sinks: an mp4 writer whose output plays in a browser, an atomic JSONL writer, and
:func:`atomic_path` for any other file.

All write under a temporary name beside the target and move the file into place only when
closed cleanly, so a crash never leaves a half-written file under the final name. What was
written before a crash stays in ``<name>.partial``; ``discard()`` removes it instead.

Example:
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with JsonlWriter(os.path.join(d, "stats.jsonl")) as w:
    ...     w.write({"frame": 0, "latency_ms": 1.5})
    >>> open(os.path.join(d, "stats.jsonl")).read()
    '{"frame": 0, "latency_ms": 1.5}\\n'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from streammem.io.errors import SinkError

__all__ = ["JsonlWriter", "VideoWriter", "atomic_path", "ffmpeg_exe", "to_jsonable"]

log = logging.getLogger(__name__)

_TIME_BASE = Fraction(1, 90000)  # of timed mp4 output: 1/90000 s, exact for 24, 25, 30 and 30000/1001 fps


def ffmpeg_exe() -> str | None:
    """Path of an ffmpeg binary: ``$STREAMMEM_FFMPEG``, the one on PATH, or imageio-ffmpeg's."""
    env = os.environ.get("STREAMMEM_FFMPEG")
    if env:
        return env
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        return None


def _av_error() -> type[Exception]:
    """PyAV's error class (its FFmpeg errors)."""
    import av

    return av.error.FFmpegError


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` (``<name>.partial``) to write a whole file to: moved to
    ``path`` when the block ends cleanly, removed when it ends by an exception, so ``path`` is
    either the old file or the complete new one.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "summary.json"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("{}")
    >>> target.read_text(), tmp.exists()
    ('{}', False)
    """
    path = Path(path)
    tmp = _partial(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def to_jsonable(value: Any) -> Any:
    """numpy / torch values and dataclass-ish containers to plain JSON types."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # torch.Tensor
        return value.detach().cpu().tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Append JSON objects, one per line; atomic on close.

    Lines go to ``<path>.partial`` (flushed after each line, so a crash keeps every complete
    line there); :meth:`close` moves the file to ``path``. Leaving a ``with`` block by an
    exception keeps the ``.partial`` file and does not create ``path``.
    """

    def __init__(self, path: str | os.PathLike, flush_every: int = 1) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _partial(self.path)
        self._fh = open(self.tmp, "w", encoding="utf-8")
        self.flush_every = max(1, int(flush_every))
        self.count = 0

    def write(self, record: dict) -> None:
        if self._fh is None:
            raise SinkError(f"{self.path}: write after close")
        line = json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False)
        self._fh.write(line + "\n")
        self.count += 1
        if self.count % self.flush_every == 0:
            self._fh.flush()

    def close(self, commit: bool = True) -> Path:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            if commit:
                os.replace(self.tmp, self.path)
        return self.path if commit else self.tmp

    def discard(self) -> None:
        """Close without committing and remove the ``.partial`` file: nothing is left."""
        self.close(commit=False)
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        kept = self.close(commit=exc_type is None)
        if exc_type is not None:
            log.warning("%s: stopped by %s; the %d lines written are kept in %s", self.path, exc_type.__name__, self.count, kept)


class VideoWriter:
    """Write RGB frames to an mp4 that plays in browsers, at a constant rate or at the frames' own times.

    Encodes H.264 (yuv420p, ``+faststart``) through ffmpeg (the system's, or the binary that
    ships with imageio-ffmpeg). Without ffmpeg it falls back to OpenCV's VP9-in-mp4, which
    browsers also play, then to MPEG-4 part 2 (plays in desktop players only; a warning says so).
    The size is fixed by the first frame (odd sides are padded with black to even); a frame of
    another size raises :class:`SinkError`.

    Timing: ``write(image)`` without timestamps plays the frames at ``fps``. ``write(image,
    timestamp=t)`` (seconds, strictly increasing; every frame of a video has one or none does)
    shows each frame at ``t - t_first`` and for ``t_next - t``, the last one for ``1 / fps``, so
    the video plays as long as the stream it came from, variable frame rate included. Those
    frames are encoded by PyAV (a dependency of supervision) with their presentation times as
    the mp4's (time base 1/90000, no B-frames, which keeps the mp4's duration exact); without
    PyAV they go to ffmpeg at ``fps``, each frame repeated or dropped so that output frame
    ``k`` shows the last frame with ``t - t_first <= k / fps`` (timing within ``1 / fps``).

    Args:
        path: the target ``.mp4``.
        fps: frame rate of the output (with timestamps: the rate of the fallback encoding and
            ``1 / fps`` is the last frame's duration).
        crf: H.264 quality (lower is better; 23 is ffmpeg's default).
        preset: the x264 speed preset.
    """

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 23, preset: str = "veryfast") -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.stem + ".partial" + self.path.suffix)
        self.fps = float(fps)
        self.crf = int(crf)
        self.preset = preset
        self.size: tuple[int, int] | None = None
        self.codec: str | None = None
        self.count = 0
        self._proc: subprocess.Popen | None = None
        self._cv = None
        self._timed: bool | None = None  # whether frames carry timestamps (fixed by the first frame)
        self._av = None  # (container, stream) of the PyAV encoder for timed frames
        self._held: tuple[np.ndarray, float] | None = None  # a timed frame waiting for its duration
        self._t0 = 0.0
        self._last_t: float | None = None
        self._slots = 0  # frames sent to ffmpeg by the timed fallback

    def _start(self, h: int, w: int) -> None:
        self.size = (h, w)
        if self._timed and self._start_pyav(h, w):
            return
        exe = ffmpeg_exe()
        if exe is not None:
            cmd = [
                exe, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                "-s", f"{w}x{h}", "-r", f"{self.fps:g}", "-i", "-",
                "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
                "-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf),
                "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", str(self.tmp),
            ]
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
            self.codec = "h264"
            return
        import cv2

        for fourcc, name in (("vp09", "vp9"), ("mp4v", "mpeg4")):
            cv = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*fourcc), self.fps, (w, h))
            if cv.isOpened():
                self._cv, self.codec = cv, name
                if name == "mpeg4":
                    log.warning("%s: no ffmpeg and no VP9 encoder; writing MPEG-4 part 2, which browsers do not play", self.path)
                return
        raise SinkError(f"{self.path}: no video encoder available (install ffmpeg or imageio-ffmpeg)")

    def _start_pyav(self, h: int, w: int) -> bool:
        """Open the PyAV encoder for timed frames; False when PyAV or its libx264 is missing."""
        try:
            import av
        except ImportError:
            return False
        if "libx264" not in av.codecs_available:
            return False
        container = av.open(str(self.tmp), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            stream = container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(100000))
            stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
            stream.time_base = stream.codec_context.time_base = _TIME_BASE
            stream.options = {"crf": str(self.crf), "preset": self.preset, "bf": "0"}
        except Exception:
            container.close()
            raise
        self._av, self.codec = (container, stream), "h264"
        return True

    def write(self, image: np.ndarray, timestamp: float | None = None) -> None:
        """Add one RGB ``(H, W, 3)`` uint8 frame, shown at ``timestamp`` (seconds) when given."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SinkError(f"{self.path}: frames must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        timed = timestamp is not None
        if self._timed is None:
            self._timed = timed
        elif timed != self._timed:
            raise SinkError(f"{self.path}: frame {self.count} {'has' if timed else 'lacks'} a timestamp, unlike the "
                            "frames before it; give every frame a timestamp or none")
        if timed:
            timestamp = float(timestamp)
            if not np.isfinite(timestamp) or (self._last_t is not None and timestamp <= self._last_t):
                raise SinkError(f"{self.path}: frame {self.count} has timestamp {timestamp!r}, not after the previous "
                                f"frame's {self._last_t!r}; timestamps must increase")
        h, w = image.shape[:2]
        if self.size is None:
            self._t0 = timestamp if timed else 0.0
            self._start(h, w)
        elif (h, w) != self.size:
            raise SinkError(f"{self.path}: frame {self.count} is {w}x{h}, but the video is {self.size[1]}x{self.size[0]}")
        if self._av is not None:
            if self._held is not None:
                self._encode_held(timestamp)
            self._held = (np.array(image, copy=True), timestamp)  # the caller may reuse its buffer
        elif timed:
            # the constant-rate fallback: repeat the previous frame up to this one's slot, drop a frame
            # whose slot is already filled
            slot = round((timestamp - self._t0) * self.fps)
            if self._held is not None:
                while self._slots < slot:
                    self._send(self._held[0])
            if self._slots <= slot:
                self._send(image)
            self._held = (image, timestamp)
        else:
            self._send(image)
        self._last_t = timestamp
        self.count += 1

    def _send(self, image: np.ndarray) -> None:
        """One frame to ffmpeg or OpenCV, at the constant rate."""
        if self._proc is not None:
            try:
                self._proc.stdin.write(np.ascontiguousarray(image).tobytes())
            except BrokenPipeError as exc:
                err = self._proc.stderr.read().decode(errors="replace")[-500:]
                raise SinkError(f"{self.path}: ffmpeg stopped: {err}") from exc
        else:
            import cv2

            self._cv.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        self._slots += 1

    def _encode_held(self, next_t: float | None) -> None:
        """Encode the held timed frame, lasting until ``next_t`` (None: ``1 / fps``)."""
        import av

        container, stream = self._av
        image, t = self._held
        self._held = None
        h, w = image.shape[:2]
        if (h % 2) or (w % 2):
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        pts = round((t - self._t0) / _TIME_BASE)
        end = round(((next_t - self._t0) if next_t is not None else (t - self._t0 + 1.0 / self.fps)) / _TIME_BASE)
        frame.pts, frame.time_base, frame.duration = pts, _TIME_BASE, max(1, end - pts)
        try:
            for packet in stream.encode(frame):
                container.mux(packet)
        except _av_error() as exc:
            raise SinkError(f"{self.path}: encoding failed: {exc}") from exc

    def close(self) -> Path | None:
        """Finish the file and move it into place. Returns its path (None if no frame came)."""
        if self._av is not None:
            container, stream = self._av
            try:
                if self._held is not None:
                    self._encode_held(None)
                for packet in stream.encode(None):
                    container.mux(packet)
            except _av_error() as exc:
                raise SinkError(f"{self.path}: encoding failed: {exc}") from exc
            finally:
                container.close()
                self._av = None
        if self._proc is not None:
            self._proc.stdin.close()
            rc = self._proc.wait()
            err = self._proc.stderr.read().decode(errors="replace")
            self._proc = None
            if rc != 0:
                raise SinkError(f"{self.path}: ffmpeg failed (exit {rc}): {err[-500:]}")
        if self._cv is not None:
            self._cv.release()
            self._cv = None
        if self.count == 0:
            return None
        if self.tmp.exists():
            os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Stop encoding and remove the ``.partial`` file; ``path`` is not created or touched."""
        if self._av is not None:
            try:
                self._av[0].close()
            except _av_error():
                pass
            self._av = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for fh in (self._proc.stdin, self._proc.stderr):
                try:
                    fh.close()
                except OSError:
                    pass
            self._proc = None
        if self._cv is not None:
            self._cv.release()
            self._cv = None
        self._held = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Frames written before an error are still a valid video: finish and keep it.
        self.close()
