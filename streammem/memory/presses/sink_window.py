"""SinkWindowPress: StreamingLLM's attention sinks plus a recent window.

Rule (StreamingLLM, Xiao et al. 2023; ``mit-han-lab/streaming-llm`` ``kv_cache.py``): keep the
first ``n_sink`` tokens (attention sinks) and the ``window`` most recent tokens, drop the rest.
Reference defaults: ``start_size=4``, ``recent_size=512`` (kvpress ``StreamingLLMPress(n_sink=4)``).
Departure: positions are not re-rotated here (a memory stores positions in ``Tokens.grid`` and
the attention code re-indexes them; kvpress does it with ``KeyRerotationPress``).

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> t = Tokens.from_grid(torch.randn(1, 600, 2), frame_index=0, timestamp=0.0)
    >>> len(SinkWindowPress()(t))
    516
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammem.memory.base import check_field
from streammem.memory.presses.base import Press
from streammem.types import Tokens

__all__ = ["SinkWindowPress"]


@dataclass
class SinkWindowPress(Press):
    """Keep ``n_sink`` first and ``window`` last tokens (shapes: ``(N, D) -> (<= n_sink + window, D)``)."""

    n_sink: int = 4
    window: int = 512

    def __post_init__(self) -> None:
        check_field(isinstance(self.n_sink, int) and self.n_sink >= 0, "SinkWindowPress", "n_sink", "an int >= 0",
                    self.n_sink)
        check_field(isinstance(self.window, int) and self.window >= 0, "SinkWindowPress", "window", "an int >= 0",
                    self.window)

    def keep(self, tokens: Tokens) -> torch.Tensor:
        n = len(tokens)
        if n <= self.n_sink + self.window:
            return torch.arange(n)
        return torch.cat([torch.arange(self.n_sink), torch.arange(n - self.window, n)])

    def max_kept(self) -> int:
        return self.n_sink + self.window
