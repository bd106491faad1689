"""Sinks: an mp4 writer whose output plays in a browser, and an atomic JSONL writer.

Both write under a temporary name beside the target and move the file into place only when
closed cleanly, so a crash never leaves a half-written file under the final name. What was
written before a crash stays in ``<name>.partial``.

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
from pathlib import Path
from typing import Any

import numpy as np

from streammem.io.errors import SinkError

__all__ = ["JsonlWriter", "VideoWriter", "ffmpeg_exe", "to_jsonable"]

log = logging.getLogger(__name__)


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


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


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

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        kept = self.close(commit=exc_type is None)
        if exc_type is not None:
            log.warning("%s: stopped by %s; the %d lines written are kept in %s", self.path, exc_type.__name__, self.count, kept)


class VideoWriter:
    """Write RGB frames to an mp4 that plays in browsers.

    Encodes H.264 (yuv420p, ``+faststart``) through ffmpeg (the system's, or the binary that
    ships with imageio-ffmpeg). Without ffmpeg it falls back to OpenCV's VP9-in-mp4, which
    browsers also play, then to MPEG-4 part 2 (plays in desktop players only; a warning says so).
    The size is fixed by the first frame; a frame of another size raises :class:`SinkError`.

    Args:
        path: the target ``.mp4``.
        fps: frame rate of the output.
        crf: H.264 quality (lower is better; 23 is ffmpeg's default).
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

    def _start(self, h: int, w: int) -> None:
        self.size = (h, w)
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

    def write(self, image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SinkError(f"{self.path}: frames must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        if self.size is None:
            self._start(h, w)
        elif (h, w) != self.size:
            raise SinkError(f"{self.path}: frame {self.count} is {w}x{h}, but the video is {self.size[1]}x{self.size[0]}")
        if self._proc is not None:
            try:
                self._proc.stdin.write(np.ascontiguousarray(image).tobytes())
            except BrokenPipeError as exc:
                err = self._proc.stderr.read().decode(errors="replace")[-500:]
                raise SinkError(f"{self.path}: ffmpeg stopped: {err}") from exc
        else:
            import cv2

            self._cv.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        self.count += 1

    def close(self) -> Path | None:
        """Finish the file and move it into place. Returns its path (None if no frame came)."""
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

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Frames written before an error are still a valid video: finish and keep it.
        self.close()
