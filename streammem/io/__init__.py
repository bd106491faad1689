"""Sources (``open_source(uri) -> iterable of Frame``) and sinks (mp4, JSONL)."""

from streammem.io.errors import SinkError, SourceError, SourceNotFoundError, SourceOpenError, SourceReadError
from streammem.io.sinks import JsonlWriter, VideoWriter, ffmpeg_exe
from streammem.io.sources import Source, SourceInfo, SourceOptions, open_source, probe

__all__ = [
    "JsonlWriter",
    "VideoWriter",
    "ffmpeg_exe",
    "SinkError",
    "Source",
    "SourceError",
    "SourceInfo",
    "SourceNotFoundError",
    "SourceOpenError",
    "SourceOptions",
    "SourceReadError",
    "open_source",
    "probe",
]
