"""Baseline memories for evaluation at equal token budgets: window, uniform, empty, full.

Not from a paper: the reference points a memory mechanism is measured against (the
sliding-window baseline is VideoChat-Online's ``evaluate_online_sliding_window.py``: the last
frames, capped to a count). Each keeps whole frames of ``side x side`` tokens, pooled from the
written ``s x s`` grid by adaptive average pooling (``pool="salient"``: weighted by
``Tokens.salience`` as ``PyramidMemory(pool="salient")`` pools):

- :class:`WindowMemory` (``window``): the newest ``frames`` frames;
- :class:`UniformMemory` (``uniform``): at most ``frames`` frames spread uniformly over the whole
  past: frame ``t`` is kept when ``t % stride == 0``; when more than ``frames`` are kept, every
  other one is dropped (the first stays) and the stride doubles;
- :class:`EmptyMemory` (``empty``): holds nothing (what an answerer knows from the question);
- :class:`FullMemory` (``full``): every frame, up to ``frames`` frames (the ceiling of a
  budget-free memory; a write beyond ``frames`` raises, so it stays bounded).

A read returns the kept frames oldest first, each as ``side * side`` tokens with ``grid`` at
cell centres in units of a ``top_side x top_side`` grid (16: the pyramid's level 0) and
``level`` the scale level ``log2(top_side / side)`` (16 -> 0, 8 -> 1, 4 -> 2, as
``PyramidMemory``'s levels).

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> mem = WindowMemory(dim=4, frames=3)
    >>> for t in range(10):
    ...     mem.write(Tokens.from_grid(torch.randn(16, 16, 4), frame_index=t, timestamp=t / 8))
    >>> mem.read().frame_index.unique().tolist(), mem.num_tokens, mem.capacity
    ([7, 8, 9], 768, 768)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streammem.memory.base import Memory, MemoryConfig, check_field, pool_grid, pool_grid_salient
from streammem.types import Tokens

__all__ = ["FramesConfig", "FullConfig", "WindowMemory", "UniformMemory", "EmptyMemory", "FullMemory"]


@dataclass
class FramesConfig(MemoryConfig):
    """Attributes:
    frames: most frames kept (window length, uniform budget, full memory's bound).
    side: token-grid side a kept frame is pooled to.
    top_side: side of the full-resolution grid that ``grid`` and ``level`` refer to.
    pool: ``"mean"`` (adaptive average pooling) or ``"salient"`` (needs ``Tokens.salience``).
    temperature: of the salient pooling.
    """

    dim: int = 256
    frames: int = 3
    side: int = 16
    top_side: int = 16
    pool: str = "mean"
    temperature: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for f in ("frames", "side", "top_side"):
            v = getattr(self, f)
            check_field(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, f, "an int >= 1", v)
        check_field(self.pool in ("mean", "salient"), name, "pool", "'mean' or 'salient'", self.pool)
        check_field(isinstance(self.temperature, (int, float)) and self.temperature > 0, name, "temperature",
                    "a number > 0", self.temperature)


class _Frames(Memory):
    """Whole frames in ``slots`` preallocated rows; subclasses choose which frames stay.

    Buffers: ``frames.features (slots, side*side, D)``, ``frames.frame_index (slots,)``,
    ``frames.timestamp (slots,)`` (slot order = time order) and ``frames.state (2,)``: the number
    of kept frames and the keeping stride."""

    Config = FramesConfig
    #: rows preallocated beyond ``frames`` (UniformMemory holds one more before it halves).
    EXTRA_SLOTS = 0

    def _allocate(self) -> None:
        c = self.config
        n = c.frames + self.EXTRA_SLOTS
        self.feats = self.buffer("frames.features", torch.zeros(n, c.side * c.side, c.dim))
        self.fi = self.buffer("frames.frame_index", torch.zeros(n, dtype=torch.int64))
        self.ts = self.buffer("frames.timestamp", torch.zeros(n, dtype=torch.float64))
        self.state = self.buffer("frames.state", torch.zeros(2, dtype=torch.int64))
        cell = c.top_side / c.side
        ys, xs = torch.meshgrid(torch.arange(c.side), torch.arange(c.side), indexing="ij")
        self._cells = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float() * cell + (cell - 1) / 2
        self._level = max(0, round(math.log2(c.top_side / c.side)))

    def _on_state(self, event: str) -> None:
        """``frames.state`` holds the kept count and the stride; a reset sets the stride to 1.
        A read is cached until the next write (derived, not state)."""
        if event == "reset":
            self.state[1] = 1
        self._cache: Tokens | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.state[0]) * self.config.side ** 2

    @property
    def capacity(self) -> int:
        return self.config.frames * self.config.side ** 2

    def _pool(self, tokens: Tokens) -> torch.Tensor:
        """One frame's ``(s*s, D)`` tokens pooled to ``(side*side, D)``."""
        c = self.config
        s = math.isqrt(len(tokens))
        if len(tokens) == 0 or s * s != len(tokens):
            raise ValueError(f"{type(self).__name__}.write takes one frame on a square grid, got {len(tokens)} tokens")
        x = tokens.features.float().reshape(s, s, -1)
        if c.pool == "salient" and s != c.side:
            if tokens.salience is None:
                raise ValueError(f"{type(self).__name__}(pool='salient') needs Tokens.salience")
            x = pool_grid_salient(x, tokens.salience.reshape(s, s), c.side, c.side, c.temperature)[0]
        else:
            x = pool_grid(x, c.side, c.side)
        return x.reshape(c.side * c.side, -1)

    def _put(self, slot: int, tokens: Tokens) -> None:
        self.feats[slot] = self._pool(tokens)
        self.fi[slot] = int(tokens.frame_index[0])
        self.ts[slot] = float(tokens.timestamp[0])

    def _order(self) -> torch.Tensor:
        """Slots of the kept frames, oldest first."""
        return torch.arange(int(self.state[0]))

    def write(self, tokens: Tokens) -> None:
        self._check_dim(tokens)
        self._keep(tokens)
        self.counters["writes"] += 1
        self._cache = None

    def _keep(self, tokens: Tokens) -> None:
        raise NotImplementedError

    def read(self, query: None = None) -> Tokens:
        """The kept frames' tokens, oldest first (no query)."""
        self._check_query(query)
        if self._cache is None:
            self._cache = self._read()
        return self._cache

    def _read(self) -> Tokens:
        c = self.config
        slots = self._order()
        n, s2 = len(slots), c.side * c.side
        if n == 0:
            return Tokens.empty(c.dim)
        return Tokens(
            features=torch.index_select(self.feats, 0, slots).reshape(n * s2, c.dim),
            frame_index=torch.index_select(self.fi, 0, slots).repeat_interleave(s2),
            timestamp=torch.index_select(self.ts, 0, slots).repeat_interleave(s2),
            grid=self._cells.repeat(n, 1),
            level=torch.full((n * s2,), self._level, dtype=torch.int64),
        )


class WindowMemory(_Frames):
    """The newest ``frames`` frames (a sliding window; a ring of ``frames`` slots)."""

    kind = "window"

    def _keep(self, tokens: Tokens) -> None:
        w, n = self.counters["writes"], self.config.frames
        self._put(w % n, tokens)
        self.state[0] = min(w + 1, n)

    def _order(self) -> torch.Tensor:
        k, n = int(self.state[0]), self.config.frames
        start = self.counters["writes"] % n if k == n else 0
        return (torch.arange(k) + start) % n


class UniformMemory(_Frames):
    """At most ``frames`` frames spread uniformly over the past (stride doubling when full)."""

    kind = "uniform"
    EXTRA_SLOTS = 1

    def _keep(self, tokens: Tokens) -> None:
        k, stride = int(self.state[0]), int(self.state[1])
        if self.counters["writes"] % stride:
            return
        self._put(k, tokens)
        k += 1
        if k > self.config.frames:  # keep every other frame from the first, double the stride
            idx = torch.arange(0, k, 2)
            m = len(idx)
            self.feats[:m] = self.feats[idx]
            self.fi[:m] = self.fi[idx]
            self.ts[:m] = self.ts[idx]
            k, stride = m, 2 * stride
        self.state[0], self.state[1] = k, stride


class EmptyMemory(Memory):
    """Holds nothing: a reader sees only what it brings (a prior-only baseline)."""

    kind = "empty"

    def _allocate(self) -> None:
        pass

    @property
    def num_tokens(self) -> int:
        return 0

    @property
    def capacity(self) -> int:
        return 0

    def write(self, tokens: Tokens) -> None:
        self._check_dim(tokens)
        self.counters["writes"] += 1

    def read(self, query: None = None) -> Tokens:
        self._check_query(query)
        return Tokens.empty(self.config.dim)


@dataclass
class FullConfig(FramesConfig):
    """:class:`FramesConfig` with the full memory's defaults: 4 x 4 tokens per frame, at most
    14,400 frames (30 minutes at 8 fps; buffers are zero-filled lazily by the OS, so unused
    rows cost address space, not memory)."""

    frames: int = 14400
    side: int = 4


class FullMemory(_Frames):
    """Every frame at ``side x side`` (default 4 x 4), up to ``frames`` frames; the write of
    one frame more raises ``ValueError`` (it never silently forgets)."""

    kind = "full"
    Config = FullConfig

    def _keep(self, tokens: Tokens) -> None:
        k = int(self.state[0])
        if k >= self.config.frames:
            raise ValueError(f"FullMemory holds at most frames={self.config.frames} frames and is full; "
                             "build it with a larger FramesConfig.frames for longer streams")
        self._put(k, tokens)
        self.state[0] = k + 1
