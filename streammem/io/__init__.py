"""Sources (``open_source(uri) -> iterable of Frame``) and sinks (mp4, JSONL).

Modules: :mod:`~streammem.io.source` (``Source``, ``open_source``, ``probe``),
:mod:`~streammem.io.options` (``SourceOptions``, ``SourceInfo``), :mod:`~streammem.io.readers`
(file, live, folder and scheme readers), :mod:`~streammem.io.schemes` (``register_scheme``),
:mod:`~streammem.io.prefetch`, :mod:`~streammem.io.diagnose`, :mod:`~streammem.io.sinks`,
:mod:`~streammem.io.errors`.
"""

from streammem.io.errors import (
    SinkError,
    SourceError,
    SourceNotFoundError,
    SourceOpenError,
    SourceReadError,
    SourceWarning,
)
from streammem.io.options import SourceInfo, SourceOptions
from streammem.io.schemes import known_schemes, register_scheme, unregister_scheme
from streammem.io.sinks import JsonlWriter, VideoWriter, ffmpeg_exe
from streammem.io.source import Source, open_source, probe

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
    "SourceWarning",
    "known_schemes",
    "open_source",
    "probe",
    "register_scheme",
    "unregister_scheme",
]
