"""streammem.memory: bounded, snapshot-able memories behind one contract (see ``base.py``)."""

from streammem.memory.base import MEMORY_KINDS, Memory, MemoryConfig
from streammem.memory.pyramid import PYRAMID_PRESETS, PyramidConfig, PyramidMemory

__all__ = ["Memory", "MemoryConfig", "MEMORY_KINDS", "PyramidMemory", "PyramidConfig", "PYRAMID_PRESETS"]
