"""Readers, one per kind of input. A reader has ``width`` / ``height`` and
``frames(select) -> Iterator[(index, timestamp, image)]``: ``select(index, timestamp)`` (a
:class:`~streammem.io.selection._Selector`) says whether to decode a frame, skip it, or stop;
``image`` is RGB uint8 ``(H, W, 3)``, or a whole :class:`~streammem.types.Frame` from a scheme
opener (:class:`_FrameReader`)."""

from streammem.io.readers.file import _FileReader
from streammem.io.readers.folder import IMAGE_EXTENSIONS, _FolderReader
from streammem.io.readers.frames import _FrameReader
from streammem.io.readers.live import _LiveReader

__all__ = ["IMAGE_EXTENSIONS", "_FileReader", "_FolderReader", "_FrameReader", "_LiveReader"]
