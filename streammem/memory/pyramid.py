"""PyramidMemory: VideoChat-Online's Pyramid Memory Bank (PMB), with cached descriptors.

The rule (VideoChat-Online, "Online Video Understanding"; reference code
``MCG-NJU/VideoChat-Online`` ``HierarchicalMemoryBank``):

- three levels with fixed square token grids, sides ``16, 8, 4`` (256, 64, 16 tokens);
- frame ``t`` (its position in the written stream, 0-based) enters level 0 if ``t % 8 == 0``,
  else level 1 if ``t % 4 == 0``, else level 2 (``reverse_memory_sample_ratio = [8, 4, 1]``),
  pooled to that level's grid with adaptive average pooling;
- when a level is full, take each stored frame's spatial-mean descriptor, find the adjacent
  pair (in the level's list order) with the highest cosine similarity, pop the *earlier* frame
  of that pair, pool it by 2 (the reference's x2 bilinear resize with ``align_corners=False``
  equals 2x2 average pooling) and append it to the next level, cascading (the paper: a frame
  pushed out of level 0 makes room in level 1, whose evicted frame moves to level 2); the last
  level drops it; a capacity of 0 means unbounded in the reference;
- a read returns every kept frame's tokens sorted by time, each with its level and timestamp.

Reference defaults: capacities are runtime arguments (argparse default 64/64/64); the
published runs use ``ovbench`` = 2/2/12 (832 tokens, at 8 fps) and ``offline`` = 24/24/144
(9,984 tokens, VideoMME/MVBench); features are 4096-d (InternViT after pixel shuffle).

The reference code promotes one level only: its recursive ``_update_group`` call does not
pass ``next_group``, so a frame pushed out of level 1 *by a promotion* is dropped instead of
being pooled into level 2 (first difference at write 16 of the 2/2/12 preset). The default
here is the paper's cascade (``promotion="cascade"``); ``promotion="released"`` is the released
code's behaviour. Both are tested against a naive per-write restatement of their rule.

Order quirk: in the reference a promoted frame is appended at the *end* of the next level, so
levels 1 and 2 are not in time order and "adjacent" means adjacent in list order. That is the
default here (``order="list"``); ``order="time"`` keeps each level sorted by time so adjacent
means adjacent in time (not in the reference code).

Departures from the reference:

- promotions cascade by default, as the paper describes; the released code's one-level
  promotion is ``promotion="released"`` (see above);
- descriptors (spatial means) are computed once when a frame enters a level and cached, so a
  write costs O(capacity x D) instead of re-reducing every stored token (same retention);
- the frame position ``t`` is this memory's own count of written frames (as in the reference's
  enumeration of sampled frames), not ``Tokens.frame_index``;
- promotion uses adaptive average pooling to the next level's side (identical to 2x2 average
  pooling when the side halves);
- optional salient pooling (``pool="salient"``, off by default): blocks are pooled weighted
  by a per-token salience (an encoder's objectness) instead of averaged, so a small object
  is not washed out at the 4 x 4 level;
- optional spread retention (``time_penalty > 0``, ``evict="shorter_gap"``, ``order="time"``;
  :data:`PYRAMID_SPREAD`, off by default): an adjacent pair's merge score is its cosine
  similarity less a penalty per second between the two frames, and the frame of the pair
  whose removal leaves the shorter time gap goes. The reference's rule thins whatever looks
  alike, so long calm stretches lose every frame and an event minutes back (a small object
  appearing barely moves a whole-frame mean) may keep no frame on one side of it; spread
  retention keeps the stream covered while still merging look-alikes first;
- token positions in reads are pooled-cell centres in the input grid's units;
- every level is bounded (capacity >= 1; the reference's capacity 0, unbounded, is refused)
  and preallocates its buffers, so ``nbytes`` never changes.

Shapes: a write takes the ``s*s`` tokens of one frame laid out row-major on an ``s x s`` grid
(``Tokens.from_grid`` of an ``(s, s, D)`` tensor); a read returns ``(N, D)`` tokens with
``level`` in ``{0, 1, 2}`` and ``grid`` at cell centres.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> mem = PyramidMemory.from_preset("ovbench", dim=8)
    >>> for t in range(40):
    ...     mem.write(Tokens.from_grid(torch.randn(16, 16, 8), frame_index=t, timestamp=t / 8))
    >>> out = mem.read()
    >>> len(out), mem.capacity, sorted(set(out.level.tolist()))
    (832, 832, [0, 1, 2])
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import torch

from streammem.memory.base import Memory, MemoryConfig, check_field, pool_grid, pool_grid_salient
from streammem.types import Tokens

__all__ = ["PyramidMemory", "PyramidConfig", "PYRAMID_PRESETS", "PYRAMID_SPREAD"]

PYRAMID_PRESETS = {"ovbench": (2, 2, 12), "offline": (24, 24, 144)}
#: config overrides of the spread retention (not in the reference; see the module docstring).
PYRAMID_SPREAD = {"order": "time", "time_penalty": 0.03, "evict": "shorter_gap"}


@dataclass
class PyramidConfig(MemoryConfig):
    """Attributes:
    dim: feature width D (reference: 4096).
    capacities: frames per level, each >= 1 (default: the ``ovbench`` preset 2/2/12; the
        reference's argparse default is 64/64/64; its 0 = unbounded is refused here).
    sides: token-grid side of each level (reference 16/8/4).
    ratios: entry rule; frame t enters the first level L with ``t % ratios[L] == 0``
        (reference [8, 4, 1]; the last ratio must be 1).
    order: ``"list"`` (reference quirk: promoted frames appended at the end) or ``"time"``.
    pool: ``"mean"`` (the reference: average pooling) or ``"salient"``: pool each block
        weighted by ``softmax(salience / temperature)`` (:func:`pool_grid_salient`), so small
        objects survive in the coarse levels; writes then need ``Tokens.salience`` (the shipped
        ``GridEncoder`` gives its objectness), kept per stored token. Not in the reference.
    temperature: of the salient pooling (``pool="salient"`` only).
    time_penalty: per second of time between an adjacent pair, subtracted from its cosine
        similarity (``cos - time_penalty * |dt|``), so frames far apart in time are merged
        last and the kept frames spread over the whole stream (0 = the reference). Not in the
        reference; use it with ``order="time"``.
    promotion: ``"cascade"`` (the paper: an evicted frame moves down, and the frame it pushes
        out of the next level moves down too) or ``"released"`` (the released reference code:
        a frame pushed out by a promotion is dropped, so each write promotes at most once).
    evict: which frame of the chosen pair leaves: ``"earlier"`` (the reference) or
        ``"shorter_gap"``: the one whose removal leaves the shorter time gap between the
        frames around it (needs ``order="time"``; the last level never drops its oldest frame
        this way). Not in the reference.
    """

    dim: int = 4096
    capacities: tuple = (2, 2, 12)
    sides: tuple = (16, 8, 4)
    ratios: tuple = (8, 4, 1)
    order: str = "list"
    pool: str = "mean"
    temperature: float = 0.1
    time_penalty: float = 0.0
    evict: str = "earlier"
    promotion: str = "cascade"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        self.capacities, self.sides, self.ratios = tuple(self.capacities), tuple(self.sides), tuple(self.ratios)
        n = len(self.sides)
        check_field(n >= 1 and all(isinstance(s, int) and s >= 1 for s in self.sides), name, "sides",
                    "a non-empty tuple of ints >= 1", self.sides)
        check_field(len(self.capacities) == n and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                                      for c in self.capacities),
                    name, "capacities", f"{n} ints >= 1, one per level (every level is bounded; the "
                    "reference's 0 = unbounded is not offered)", self.capacities)
        check_field(len(self.ratios) == n and all(isinstance(r, int) and r >= 1 for r in self.ratios)
                    and self.ratios[-1] == 1, name, "ratios", f"{n} ints >= 1 ending in 1", self.ratios)
        check_field(self.order in ("list", "time"), name, "order", "'list' or 'time'", self.order)
        check_field(self.pool in ("mean", "salient"), name, "pool", "'mean' or 'salient'", self.pool)
        check_field(isinstance(self.temperature, (int, float)) and self.temperature > 0, name, "temperature",
                    "a number > 0", self.temperature)
        check_field(isinstance(self.time_penalty, (int, float)) and not isinstance(self.time_penalty, bool)
                    and math.isfinite(self.time_penalty) and self.time_penalty >= 0, name, "time_penalty",
                    "a finite number >= 0 (per second)", self.time_penalty)
        check_field(self.evict in ("earlier", "shorter_gap"), name, "evict", "'earlier' or 'shorter_gap'", self.evict)
        check_field(self.promotion in ("cascade", "released"), name, "promotion", "'cascade' or 'released'",
                    self.promotion)
        if self.evict == "shorter_gap":
            check_field(self.order == "time", name, "order", "'time' (evict='shorter_gap' compares time gaps)",
                        self.order)
        if self.pool == "salient":
            check_field(all(a % b == 0 for a, b in zip(self.sides[:-1], self.sides[1:])), name, "sides",
                        "sides that each divide the previous one (salient pooling)", self.sides)


class PyramidMemory(Memory):
    """Pyramid Memory Bank with cached spatial-mean descriptors (see the module docstring)."""

    kind = "pyramid"
    Config = PyramidConfig
    COUNTERS = ("writes", "evictions", "promotions", "drops")

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "PyramidMemory":
        """``"ovbench"`` (2/2/12) or ``"offline"`` (24/24/144), plus any config overrides."""
        if preset not in PYRAMID_PRESETS:
            raise ValueError(f"PyramidMemory preset must be one of {sorted(PYRAMID_PRESETS)}, got {preset!r}")
        return cls(PyramidConfig(capacities=PYRAMID_PRESETS[preset], **overrides))

    # ------------------------------------------------------------------ storage
    def _allocate(self) -> None:
        c = self.config
        for lvl, (cap, side) in enumerate(zip(c.capacities, c.sides)):
            side2, d = side ** 2, c.dim
            self.buffer(f"L{lvl}.features", torch.zeros(cap, side2, d))
            self.buffer(f"L{lvl}.descriptor", torch.zeros(cap, d))
            self.buffer(f"L{lvl}.frame_index", torch.zeros(cap, dtype=torch.int64))
            self.buffer(f"L{lvl}.timestamp", torch.zeros(cap, dtype=torch.float64))
            self.buffer(f"L{lvl}.order", torch.zeros(cap, dtype=torch.int64))  # slots in list order, -1 after
            if c.pool == "salient":
                self.buffer(f"L{lvl}.salience", torch.zeros(cap, side2))

    def _on_state(self, event: str) -> None:
        """Python-side bookkeeping, per level: slots in list order, free slots (lowest last),
        per-slot frame index and timestamp, ``(timestamp, frame_index)`` per list position, and
        the merge score (:meth:`_score`) of each adjacent pair in list order (``sims[i]``:
        ``order[i]``, ``order[i + 1]``). ``"save"`` copies it into the buffers; ``"reset"`` and
        ``"load"`` rebuild it from them."""
        levels = range(len(self.config.sides))
        if event == "save":
            for lvl, order in enumerate(self._order):
                buf = self._buffers[f"L{lvl}.order"]
                buf.fill_(-1)
                if order:
                    buf[: len(order)] = torch.tensor(order, dtype=torch.int64)
                self._buffers[f"L{lvl}.frame_index"].copy_(torch.tensor(self._fi[lvl], dtype=torch.int64))
                self._buffers[f"L{lvl}.timestamp"].copy_(torch.tensor(self._ts[lvl], dtype=torch.float64))
            return
        if event == "reset":
            for lvl in levels:
                self._buffers[f"L{lvl}.order"].fill_(-1)
        self._order, self._free, self._fi, self._ts, self._keys, self._sims = [], [], [], [], [], []
        self._norms = [self._buffers[f"L{lvl}.descriptor"].norm(dim=1).tolist() for lvl in levels]
        for lvl in levels:
            buf = self._buffers[f"L{lvl}.order"]
            order = [int(s) for s in buf.tolist() if s >= 0]
            used = set(order)
            fi = self._buffers[f"L{lvl}.frame_index"].tolist()
            ts = self._buffers[f"L{lvl}.timestamp"].tolist()
            self._order.append(order)
            self._free.append(sorted((s for s in range(buf.numel()) if s not in used), reverse=True))
            self._fi.append(fi)
            self._ts.append(ts)
            self._keys.append([(ts[s], fi[s]) for s in order])
            self._sims.append([self._score(lvl, a, b) for a, b in zip(order[:-1], order[1:])])

    def _score(self, lvl: int, a: int, b: int) -> float:
        """Merge score of two slots: the cosine similarity of their cached descriptors (as
        ``F.cosine_similarity``), less ``time_penalty`` per second between them."""
        d, norms = self._buffers[f"L{lvl}.descriptor"], self._norms[lvl]
        cos = float(torch.dot(d[a], d[b])) / max(norms[a] * norms[b], 1e-8)
        lam = self.config.time_penalty
        return cos - lam * abs(self._ts[lvl][a] - self._ts[lvl][b]) if lam else cos

    # ------------------------------------------------------------------ contract
    @property
    def num_tokens(self) -> int:
        return sum(len(o) * s * s for o, s in zip(self._order, self.config.sides))

    @property
    def capacity(self) -> int:
        return sum(c * s * s for c, s in zip(self.config.capacities, self.config.sides))

    def entry_level(self, t: int) -> int:
        """Level that frame position ``t`` enters: first L with ``t % ratios[L] == 0``."""
        for lvl, r in enumerate(self.config.ratios):
            if t % r == 0:
                return lvl
        return len(self.config.ratios) - 1

    def write(self, tokens: Tokens) -> None:
        """Add one frame: ``s*s`` tokens of an ``s x s`` grid, row-major."""
        self._check_dim(tokens)
        n = len(tokens)
        s = math.isqrt(n)
        if n == 0 or s * s != n:
            raise ValueError(f"PyramidMemory.write takes one frame on a square grid, got {n} tokens")
        salient = self.config.pool == "salient"
        if salient and tokens.salience is None:
            raise ValueError("PyramidMemory(pool='salient') needs Tokens.salience on every write "
                             "(GridEncoder tokens carry their objectness); got tokens without it")
        t = self.counters["writes"]
        lvl = self.entry_level(t)
        side = self.config.sides[lvl]
        frame = tokens.features.float()
        sal = tokens.salience if salient else None
        if s != side:
            frame, sal = self._pool(frame, sal, s, side)
        self._put(lvl, frame, int(tokens.frame_index[0]), float(tokens.timestamp[0]), sal)
        self.counters["writes"] = t + 1

    def _pool(self, frame: torch.Tensor, sal: torch.Tensor | None, side: int,
              out: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One frame's ``(side*side, D)`` tokens (and ``(side*side,)`` salience, or None for
        average pooling) pooled to ``out x out``, flattened the same way."""
        if sal is None:
            return pool_grid(frame.reshape(side, side, -1), out, out).reshape(out * out, -1), None
        x, sal = pool_grid_salient(frame.reshape(side, side, -1), sal.reshape(side, side), out, out,
                                   self.config.temperature)
        return x.reshape(out * out, -1), sal.reshape(-1)

    def _remove(self, lvl: int, j: int) -> int:
        """Pop list position j; keep the adjacent-pair merge scores in step."""
        order, sims = self._order[lvl], self._sims[lvl]
        n = len(order)
        if 0 < j < n - 1:
            sims[j - 1] = self._score(lvl, order[j - 1], order[j + 1])
            del sims[j]
        elif sims:
            del sims[0 if j == 0 else j - 1]
        self._keys[lvl].pop(j)
        return order.pop(j)

    def _insert(self, lvl: int, pos: int, slot: int) -> None:
        order, sims = self._order[lvl], self._sims[lvl]
        n = len(order)
        if 0 < pos < n:
            sims[pos - 1] = self._score(lvl, order[pos - 1], slot)
            sims.insert(pos, self._score(lvl, slot, order[pos]))
        elif pos == n and n > 0:
            sims.append(self._score(lvl, order[n - 1], slot))
        elif pos == 0 and n > 0:
            sims.insert(0, self._score(lvl, slot, order[0]))
        order.insert(pos, slot)
        self._keys[lvl].insert(pos, (self._ts[lvl][slot], self._fi[lvl][slot]))

    def _put(self, lvl: int, frame: torch.Tensor, frame_index: int, timestamp: float,
             sal: torch.Tensor | None = None, promote: bool = True) -> None:
        """Insert a frame at ``lvl``; a full level first evicts one, which moves to the next
        level when ``promote`` (else, and from the last level, it is dropped). With
        ``promotion="released"`` a promoted frame's own insertion does not promote."""
        cap = self.config.capacities[lvl]
        if len(self._order[lvl]) >= cap:
            slot = self._remove(lvl, self._victim(lvl))
            self.counters["evictions"] += 1
            if promote and lvl + 1 < len(self.config.sides):
                old = self._buffers[f"L{lvl}.features"][slot]
                side, nxt = self.config.sides[lvl], self.config.sides[lvl + 1]
                old_sal = self._buffers[f"L{lvl}.salience"][slot] if self.config.pool == "salient" else None
                pooled, psal = self._pool(old, old_sal, side, nxt)
                self.counters["promotions"] += 1
                self._put(lvl + 1, pooled, self._fi[lvl][slot], self._ts[lvl][slot], psal,
                          promote=self.config.promotion == "cascade")
            else:
                self.counters["drops"] += 1
        else:
            slot = self._free[lvl].pop()
        self._buffers[f"L{lvl}.features"][slot] = frame
        if sal is not None:
            self._buffers[f"L{lvl}.salience"][slot] = sal
        desc = self._buffers[f"L{lvl}.descriptor"][slot]
        torch.mean(frame, 0, out=desc)  # the spatial-mean descriptor
        self._norms[lvl][slot] = float(desc.norm())
        self._fi[lvl][slot] = frame_index
        self._ts[lvl][slot] = timestamp
        if self.config.order == "list":
            pos = len(self._order[lvl])
        else:
            pos = bisect.bisect_right(self._keys[lvl], (timestamp, frame_index))
        self._insert(lvl, pos, slot)

    def _victim(self, lvl: int) -> int:
        """List position to evict from a full level: a frame of the adjacent pair with the highest
        merge score (the first maximum, as argmax); the earlier one unless
        ``evict="shorter_gap"``, which drops the one whose removal leaves the shorter time gap."""
        sims = self._sims[lvl]
        j = max(range(len(sims)), key=sims.__getitem__) if sims else 0
        keys = self._keys[lvl]
        n = len(keys)
        if self.config.evict == "earlier" or j + 1 >= n:
            return j
        last = lvl == len(self.config.sides) - 1
        return j + 1 if self._gap_left(keys, j + 1, last) < self._gap_left(keys, j, last) else j

    @staticmethod
    def _gap_left(keys: list, r: int, last_level: bool) -> float:
        """Seconds between the frames around list position ``r`` once it is removed (time order):
        its two neighbours', or at an end the one neighbour's distance to it. The last level
        never drops its oldest frame this way (it would be lost, shortening the span the memory
        covers); a lower level's oldest frame may go, since it moves one level down."""
        n = len(keys)
        if 0 < r < n - 1:
            return keys[r + 1][0] - keys[r - 1][0]
        if r == 0:
            return math.inf if last_level else keys[1][0] - keys[0][0]
        return keys[r][0] - keys[r - 1][0]

    def frames(self) -> list[tuple[int, int, float]]:
        """``(level, frame_index, timestamp)`` of each kept frame, per level in list order."""
        return [(lvl, fi, ts) for lvl, keys in enumerate(self._keys) for ts, fi in keys]

    def read(self, query: None = None) -> Tokens:
        """All kept frames' tokens sorted by time (no query: PMB has no retrieval).

        Returns ``Tokens`` with ``features (N, D)``, ``level`` (pyramid level), ``frame_index``,
        ``timestamp`` and ``grid`` at pooled-cell centres in units of the level-0 grid (and
        ``salience`` with ``pool="salient"``).
        Frames are ordered by ``(timestamp, frame_index)`` first and their features gathered in
        one copy (a read costs one pass over the kept tokens).
        """
        self._check_query(query)
        items = [(self._ts[lvl][s], self._fi[lvl][s], lvl, s) for lvl, order in enumerate(self._order) for s in order]
        if not items:
            return Tokens.empty(self.config.dim)
        items.sort(key=lambda r: (r[0], r[1]))
        sides = self.config.sides
        top = sides[0]
        bufs = [self._buffers[f"L{lvl}.features"] for lvl in range(len(sides))]
        feats = torch.cat([bufs[lvl][s] for _, _, lvl, s in items])
        sal = None
        if self.config.pool == "salient":
            sal = torch.cat([self._buffers[f"L{lvl}.salience"][s] for _, _, lvl, s in items])
        counts = torch.tensor([sides[lvl] ** 2 for _, _, lvl, _ in items])
        cells = []
        for side in sides:
            cell = top / side
            ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            cells.append(torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float() * cell + (cell - 1) / 2)
        return Tokens(
            features=feats,
            frame_index=torch.tensor([r[1] for r in items], dtype=torch.int64).repeat_interleave(counts),
            timestamp=torch.tensor([r[0] for r in items], dtype=torch.float64).repeat_interleave(counts),
            grid=torch.cat([cells[lvl] for _, _, lvl, _ in items]),
            level=torch.tensor([r[2] for r in items], dtype=torch.int64).repeat_interleave(counts),
            salience=sal,
        )

    def stats(self) -> dict:
        out = super().stats()
        out["frames_per_level"] = [len(o) for o in self._order]
        out["tokens_per_level"] = [len(o) * s * s for o, s in zip(self._order, self.config.sides)]
        return out
