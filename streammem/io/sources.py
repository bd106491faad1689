"""The names that lived in ``streammem.io.sources`` before it was split, from where they live now:
:mod:`~streammem.io.source` (``Source``, ``open_source``, ``probe``), :mod:`~streammem.io.options`,
:mod:`~streammem.io.selection`, :mod:`~streammem.io.readers`, :mod:`~streammem.io.prefetch`
and :mod:`~streammem.io.diagnose`."""

from streammem.io.diagnose import _diagnose, _looks_like_text  # noqa: F401
from streammem.io.options import BACKENDS, DEFAULT_BACKEND_ORDER, SourceInfo, SourceOptions
from streammem.io.prefetch import _prefetch  # noqa: F401
from streammem.io.readers import IMAGE_EXTENSIONS, _FileReader, _FolderReader, _FrameReader, _LiveReader  # noqa: F401
from streammem.io.selection import _resize, _Selector  # noqa: F401
from streammem.io.source import Source, open_source, probe

__all__ = ["BACKENDS", "DEFAULT_BACKEND_ORDER", "IMAGE_EXTENSIONS", "Source", "SourceInfo", "SourceOptions",
           "open_source", "probe"]
