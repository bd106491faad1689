"""StreamWorld: endless procedural video streams from real photographs, with exact ground truth.

Example:
    >>> from streammem.world import open_world, CLASSES
    >>> w = open_world("seed=3,preset=hard,fps=8,size=64,frames=2")
    >>> [f.index for f in w], len(CLASSES) > 5
    ([0, 1], True)
"""

from .objects import CLASSES, COLOURS, MOTIONS, SPEED_BUCKETS
from .scene import ACTION_LAYOUT
from .world import PRESETS, World, open_world, world_source

__all__ = ["World", "open_world", "world_source", "CLASSES", "COLOURS", "MOTIONS", "SPEED_BUCKETS", "PRESETS", "ACTION_LAYOUT"]
