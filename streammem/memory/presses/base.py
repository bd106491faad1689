"""Press: a small KV-cache / token-set policy, in the style of NVIDIA kvpress.

A press maps the tokens a cache holds (oldest first) to the tokens it keeps:
``compress(tokens, values=None) -> (tokens, values)``. Keys are ``tokens.features (N, D)``;
values, when the memory keeps them apart from keys, are ``(N, Dv)`` and follow their keys.
Per-token statistics a policy needs (accumulated attention for H2O) travel in
``tokens.score``. Because it works on plain ``Tokens``, a press applies to any memory: to the
output of any ``read()`` (``press(memory.read())``), to ``PoseKVMemory.kv()`` outputs, or as
the over-budget policy of :class:`~streammem.memory.kvcache.KVCacheMemory`.

Eviction presses also expose ``keep(tokens) -> LongTensor`` (kept positions, ascending), which
:class:`MiKVPress` uses to decide what to keep at full precision.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> from streammem.memory.presses import SinkWindowPress, ComposedPress
    >>> t = Tokens.from_grid(torch.randn(1, 10, 4), frame_index=0, timestamp=0.0)
    >>> SinkWindowPress(n_sink=2, window=3)(t).grid[:, 1].tolist()
    [0.0, 1.0, 7.0, 8.0, 9.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streammem.types import Tokens

__all__ = ["Press", "ComposedPress"]


@dataclass
class Press:
    """Base press: subclasses implement ``keep`` (eviction) or override ``compress``."""

    def keep(self, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not select tokens by position")

    def compress(self, tokens: Tokens, values: torch.Tensor | None = None) -> tuple[Tokens, torch.Tensor | None]:
        idx = self.keep(tokens)
        return tokens.index(idx), None if values is None else values[idx]

    def __call__(self, tokens: Tokens) -> Tokens:
        return self.compress(tokens)[0]

    def max_kept(self) -> int | None:
        """Upper bound on the tokens ``compress`` returns, or None when it has none."""
        return None


@dataclass
class ComposedPress(Press):
    """Apply presses one after the other (kvpress ``ComposedPress``)."""

    presses: list = field(default_factory=list)

    def compress(self, tokens, values=None):
        for p in self.presses:
            tokens, values = p.compress(tokens, values)
        return tokens, values

    def max_kept(self):
        bounds = [p.max_kept() for p in self.presses if p.max_kept() is not None]
        return min(bounds) if bounds else None
