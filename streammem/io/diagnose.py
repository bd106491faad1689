"""Why a file that exists does not open as video, in words (asks ffmpeg when there is one)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

__all__ = ["_diagnose"]


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
        if re.search(r"Stream #\S+.*: Audio: ", text):
            return "it has no video stream, only audio"
        if "Invalid data found" in text:
            return "not a video container (unrecognised data)"
        return "no video stream found"
    return f"ffmpeg sees video codec {m.group(1)!r} but it could not be decoded"


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95
