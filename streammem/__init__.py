"""streammem: a streaming video memory pipeline.

Frames from any source (file, camera, URL, image folder, procedural world) stream through
bounded memories that feed video QA, detection aggregation and generation heads.
"""

import os as _os

# FFmpeg inside OpenCV prints every decode warning of a damaged file to stderr; streammem
# reports such problems itself (SourceReadError), so keep FFmpeg quiet unless asked.
_os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
_os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")

from streammem.types import Frame, Tokens  # noqa: E402
from streammem.io.schemes import register_scheme as _register_scheme  # noqa: E402


def _open_world(spec: str):
    """``world:`` URIs for ``streammem.io.open_source``; StreamWorld is imported on first use.
    (Registered here, at the package root: ``io`` and ``world`` do not import each other.)"""
    from streammem.world import world_source

    return world_source(spec)


_register_scheme("world", _open_world)

__version__ = "0.1.0"
__all__ = ["Frame", "Tokens", "__version__"]
