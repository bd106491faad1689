"""streammem: a streaming video memory pipeline.

Frames from any source (file, camera, URL, image folder, procedural world) stream through
bounded memories that feed video QA, detection aggregation and generation heads.
"""

from streammem.types import Frame, Tokens

__version__ = "0.1.0"
__all__ = ["Frame", "Tokens", "__version__"]
