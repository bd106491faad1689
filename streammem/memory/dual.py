"""DualMemory: Mem4D-style static/dynamic decoupling, with Spann3R/Point3R/XMem compression.

Mem4D (arXiv 2508.07908) pairs a Transient Dynamics Memory (high-frequency detail from recent
frames) with a Persistent Structure Memory (compressed long-term static structure), queried in
alternation. Only its abstract is public and it has no code, so **every knob here is ours**,
taken from its code-bearing predecessors:

- transient part (``extras["part"]`` 1 in reads): a FIFO of the full-detail tokens of the last
  ``fifo_frames`` frames (each frame owns one block of ``max_tokens_per_frame`` slots);
- persistent part (``extras["part"]`` 0 in reads): ``slots`` fixed slots of static structure. While
  slots are free a static token takes one; when full it is compressed either by merging into
  its nearest slot (``compress="merge"``: running mean in feature and grid-position space, as
  Point3R averages a new pointer into its nearest one; the slot keeps the newest frame index
  and timestamp) or by pruning the slot with the lowest accumulated attention over age
  (``compress="prune"``: usage = attention received / age, as Spann3R's and XMem's pruning);
- routing: each written token carries a static/dynamic score in ``Tokens.extras["static"]``
  supplied by the caller (frame difference after pose compensation, a model's confidence, a
  mask); a token with ``static >= threshold`` is static and goes to the persistent part, the
  others to the FIFO (a token without it follows ``missing_score``);
- a static token nearly identical to a stored slot (cosine > ``skip_cos`` = 0.95, Spann3R's
  working-memory rule) is skipped;
- ``read()`` returns both parts tagged by ``extras["part"]`` (0 persistent, 1 transient), with
  each token's static score in ``extras["static"]`` (a merged slot: the running mean);
  ``read(FeatureQuery(q, k))`` = ``query(q, k)`` returns the best ``k`` tokens of both by cosine similarity and adds the
  attention the persistent slots receive (softmax over slots of ``q k^T / sqrt(D)``) to their
  accumulated attention, which drives ``prune``.

Batch semantics (ours): the skip test compares a write's static tokens with the slots as they
were before the write; free slots are then filled in token order, and the remaining tokens
merge into (or replace) their nearest / least-used slot among all slots after that fill.

Shapes: ``write(tokens)`` takes ``(N, D)`` tokens of one frame with ``extras["static"] (N,)``;
a read returns ``(M, D)`` tokens, ``M <= slots + fifo_frames * max_tokens_per_frame``, with the
written ``level`` kept (a merged slot keeps its first token's) and ``score`` None (this memory
keeps no importance).

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> mem = DualMemory(dim=8, slots=16, fifo_frames=2, max_tokens_per_frame=16)
    >>> static = torch.tensor([1.0] * 12 + [0.0] * 4)      # 12 static, 4 dynamic tokens
    >>> tokens = Tokens.from_grid(torch.randn(4, 4, 8), frame_index=0, timestamp=0.0)
    >>> tokens.extras["static"] = static
    >>> mem.write(tokens)
    >>> out = mem.read()
    >>> out.extras["part"].bincount().tolist(), mem.stats()["routed_static"]
    ([12, 4], 12)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streammem.memory.base import Memory, MemoryConfig, TokenSlots, check_field
from streammem.memory.protocols import FeatureQuery
from streammem.types import Tokens

__all__ = ["DualMemory", "DualConfig"]

STATIC, DYNAMIC = 0, 1


@dataclass
class DualConfig(MemoryConfig):
    """Attributes (all our choices; Mem4D publishes none):
    slots: persistent slots K.
    fifo_frames: frames N kept in the transient FIFO.
    max_tokens_per_frame: FIFO slots per frame; a write with more dynamic tokens fails.
    threshold: ``extras["static"] >= threshold`` routes a token to the persistent part.
    compress: ``"merge"`` (Point3R-style running mean) or ``"prune"`` (attention / age).
    skip_cos: a static token whose cosine to its nearest slot exceeds this is skipped
        (Spann3R 0.95; 1.0 disables).
    missing_score: what to do with tokens without a static score: ``"error"``, ``"static"``,
        ``"dynamic"``.
    query_k: tokens returned by ``read(FeatureQuery(q))`` (a query's own ``k`` wins).
    keep_pose: store each token's camera pose (``Tokens.pose``, 4x4) and return it in reads, for
        readers that need it (the generation head); a merged slot keeps its first token's pose.
    """

    dim: int = 256
    slots: int = 1024
    fifo_frames: int = 8
    max_tokens_per_frame: int = 256
    threshold: float = 0.5
    compress: str = "merge"
    skip_cos: float = 0.95
    missing_score: str = "error"
    query_k: int = 256
    keep_pose: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for f in ("slots", "fifo_frames", "max_tokens_per_frame", "query_k"):
            v = getattr(self, f)
            check_field(isinstance(v, int) and v >= 1, name, f, "an int >= 1", v)
        check_field(isinstance(self.threshold, (int, float)), name, "threshold", "a number", self.threshold)
        check_field(self.compress in ("merge", "prune"), name, "compress", "'merge' or 'prune'", self.compress)
        check_field(isinstance(self.skip_cos, (int, float)) and -1 <= self.skip_cos <= 1, name, "skip_cos",
                    "a number in [-1, 1]", self.skip_cos)
        check_field(self.missing_score in ("error", "static", "dynamic"), name, "missing_score",
                    "'error', 'static' or 'dynamic'", self.missing_score)


class DualMemory(Memory):
    """Transient FIFO + persistent compressed store, routed by a per-token score."""

    kind = "dual"
    Config = DualConfig
    QUERIES = (FeatureQuery,)
    COUNTERS = ("writes", "routed_static", "routed_dynamic", "skipped", "merges", "prunes", "evictions")

    def _allocate(self) -> None:
        c = self.config
        self.static = TokenSlots(self, "static", c.slots, c.dim, with_pose=c.keep_pose)
        self.mass = self.buffer("static.mass", torch.zeros(c.slots))  # tokens merged into a slot
        self.usage = self.buffer("static.attention", torch.zeros(c.slots))  # accumulated attention
        self.birth = self.buffer("static.birth", torch.zeros(c.slots, dtype=torch.int64))
        self.fifo = TokenSlots(self, "fifo", c.fifo_frames * c.max_tokens_per_frame, c.dim, with_pose=c.keep_pose)
        self.fifo_len = self.buffer("fifo.len", torch.zeros(c.fifo_frames, dtype=torch.int64))
        self._meta = self.buffer("meta.sizes", torch.zeros(2, dtype=torch.int64))  # static count, frames
        # derived, not saved: the slots' unit-norm features (a write compares its tokens with all)
        self._unit_cache = torch.zeros(c.slots, c.dim)

    def _on_state(self, event: str) -> None:
        """Python-side: the persistent count, frames written, FIFO lengths (``meta.sizes``,
        ``fifo.len`` in snapshots); the slot ``score`` buffers hold the static scores."""
        if event == "save":
            self._meta[0], self._meta[1] = self._n, self._frames
            self.fifo_len.copy_(torch.tensor(self._fifo_len, dtype=torch.int64))
            return
        self._n, self._frames = int(self._meta[0]), int(self._meta[1])
        self._fifo_len = self.fifo_len.tolist()
        self._unit_valid = False  # after a load or reset the cache is rebuilt on first use
        self._fifo_rows: torch.Tensor | None = None  # _fifo_index() until the next write

    @property
    def nbytes(self) -> int:
        """Bytes of every state tensor plus the preallocated unit-norm slot cache."""
        return super().nbytes + self._unit_cache.numel() * self._unit_cache.element_size()

    def _units(self) -> torch.Tensor:
        """The persistent slots' features normalised to unit length ``(slots, D)``: a derived
        cache (preallocated, not in snapshots), updated row by row as slots change."""
        if not self._unit_valid:
            self._unit_cache.copy_(F.normalize(self.static.features.float(), dim=1))
            self._unit_valid = True
        return self._unit_cache

    def _touch(self, rows: torch.Tensor | slice) -> None:
        """Refresh the unit-norm cache for slots whose features changed."""
        if self._unit_valid:
            self._unit_cache[rows] = F.normalize(self.static.features[rows].float(), dim=1)

    @property
    def num_tokens(self) -> int:
        return self._n + sum(self._fifo_len)

    @property
    def capacity(self) -> int:
        return self.config.slots + self.config.fifo_frames * self.config.max_tokens_per_frame

    def write(self, tokens: Tokens) -> None:
        """Route one frame's tokens by ``tokens.extras["static"]`` (static if ``>= threshold``)."""
        self._check_dim(tokens)
        c = self.config
        score = tokens.extras.get("static")
        if score is None:
            if c.missing_score == "error":
                raise ValueError("DualMemory.write needs Tokens.extras['static'] (static/dynamic score per "
                                 "token), or set DualConfig.missing_score to 'static' or 'dynamic'")
            fill = c.threshold if c.missing_score == "static" else c.threshold - 1.0
            score = torch.full((len(tokens),), float(fill))
        static = score >= c.threshold
        if not bool(static.any()):  # all dynamic (e.g. object pixels): the whole write goes to the FIFO
            self._write_fifo(tokens, score, None)
        else:
            self._write_fifo(tokens, score, (~static).nonzero().flatten())
            self._write_static(tokens, score, static.nonzero().flatten())
        self.counters["writes"] += 1

    def _write_fifo(self, tokens: Tokens, score: torch.Tensor, idx: torch.Tensor | None) -> None:
        """The dynamic tokens ``idx`` (None: all of them) become the newest FIFO frame."""
        c = self.config
        n = len(tokens) if idx is None else len(idx)
        if n > c.max_tokens_per_frame:
            raise ValueError(f"DualMemory: {n} dynamic tokens in one write, more than "
                             f"max_tokens_per_frame={c.max_tokens_per_frame}")
        block = self._frames % c.fifo_frames
        self.counters["evictions"] += self._fifo_len[block]
        base = block * c.max_tokens_per_frame
        if n:
            s = slice(base, base + n)
            self.fifo.put(s, tokens, idx)
            self.fifo.score[s] = score if idx is None else score[idx]
        self._fifo_len[block] = n
        self._frames += 1
        self._fifo_rows = None
        self.counters["routed_dynamic"] += n

    def _write_static(self, tokens: Tokens, score: torch.Tensor, idx: torch.Tensor) -> None:
        c = self.config
        if len(idx) == 0:
            return
        self.counters["routed_static"] += len(idx)
        feats = torch.index_select(tokens.features, 0, idx).float()
        unit_new = F.normalize(feats, dim=1)
        sim = None  # cosines of the tokens to the first _n slots, shared by the skip test and a merge
        if self._n > 0 and c.skip_cos < 1:
            sim = unit_new @ self._units()[: self._n].t()
            keep = sim.amax(1) <= c.skip_cos
            n_keep = int(keep.sum())
            if n_keep < len(idx):
                self.counters["skipped"] += len(idx) - n_keep
                if n_keep == 0:  # all near-copies of stored slots (common once the scene is covered)
                    return
                k = keep.nonzero().flatten()  # then index_select: ~3x faster than 4 boolean-mask gathers
                idx, feats, unit_new, sim = (torch.index_select(t, 0, k) for t in (idx, feats, unit_new, sim))
        free = min(c.slots - self._n, len(idx))
        if free > 0:
            s = slice(self._n, self._n + free)
            self.static.put(s, tokens, idx[:free])
            self.static.score[s] = score[idx[:free]]
            self.mass[s], self.usage[s], self.birth[s] = 1.0, 0.0, self.counters["writes"]
            self._n += free
            self._touch(s)
            sim = None  # the slots changed
        if free == len(idx):
            return
        idx, feats, unit_new = idx[free:], feats[free:], unit_new[free:]
        if c.compress == "merge":
            if sim is None:  # the store is full now: compare with every slot
                sim = unit_new @ self._units().t()
            self._merge(tokens, score, idx, feats, sim)
        else:
            self._prune(tokens, score, idx)

    def _merge(self, tokens: Tokens, score: torch.Tensor, idx: torch.Tensor, feats: torch.Tensor,
               sim: torch.Tensor) -> None:
        """Running mean of each token into its nearest slot (cosine ``sim`` to every slot),
        Point3R-style."""
        near = sim.argmax(1)
        slots, inverse, added = torch.unique(near, return_inverse=True, return_counts=True)
        m = self.mass[slots]
        total = m + added
        w_old = (m / total).unsqueeze(1)
        w_new = (1.0 / total).unsqueeze(1)
        k = len(slots)
        sums = torch.zeros(k, feats.shape[1]).index_add_(0, inverse, feats)
        self.static.features[slots] = self.static.features[slots] * w_old + sums * w_new
        self.static.grid[slots] = self.static.grid[slots] * w_old + \
            torch.zeros(k, 2).index_add_(0, inverse, tokens.grid[idx]) * w_new
        self.static.score[slots] = self.static.score[slots] * w_old[:, 0] + \
            torch.zeros(k).index_add_(0, inverse, score[idx]) * w_new[:, 0]
        # one write is one frame: merged slots take its frame index and timestamp
        self.static.frame_index[slots] = tokens.frame_index[idx[0]]
        self.static.timestamp[slots] = tokens.timestamp[idx[0]]
        self.mass[slots] = total.float()
        self._touch(slots)
        self.counters["merges"] += len(idx)

    def _prune(self, tokens: Tokens, score: torch.Tensor, idx: torch.Tensor) -> None:
        """Replace the slots of lowest attention-per-age (XMem/Spann3R usage) by new tokens; among
        slots of equal usage (e.g. none ever queried) the oldest goes first."""
        k = self.config.slots
        if len(idx) > k:
            idx = idx[len(idx) - k:]
        age = (self.counters["writes"] - self.birth + 1).float()
        oldest_first = torch.argsort(age, descending=True, stable=True)
        victims = oldest_first[torch.argsort((self.usage / age)[oldest_first], stable=True)[:len(idx)]]
        self.static.put(victims, tokens, idx)
        self._touch(victims)
        self.static.score[victims] = score[idx]
        self.mass[victims], self.usage[victims], self.birth[victims] = 1.0, 0.0, self.counters["writes"]
        self.counters["prunes"] += len(idx)
        self.counters["evictions"] += len(idx)

    def _fifo_index(self) -> torch.Tensor:
        """FIFO slots of live tokens, oldest frame first (cached until the next write)."""
        if self._fifo_rows is None:
            c = self.config
            first = max(self._frames - c.fifo_frames, 0)
            idx = [torch.arange(b * c.max_tokens_per_frame, b * c.max_tokens_per_frame + self._fifo_len[b])
                   for b in (f % c.fifo_frames for f in range(first, self._frames))]
            self._fifo_rows = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        return self._fifo_rows

    @staticmethod
    def _tag(out: Tokens, part: torch.Tensor) -> Tokens:
        """The slots' score buffer holds the static score: give it as ``extras["static"]``,
        with the part tag, and no importance ``score``."""
        out.extras = {"part": part, "static": out.score}
        out.score = None
        return out

    def read(self, query: FeatureQuery | None = None) -> Tokens:
        """Both parts, persistent (``extras["part"]`` 0) then transient (1, oldest first); with a
        :class:`FeatureQuery`, the best ``query.k`` (default ``query_k``) of them (see :meth:`query`)."""
        self._check_query(query)
        if query is not None:
            return self.query(query.features, query.k or self.config.query_k)
        fifo = self._fifo_index()
        out = Tokens.cat([self.static.get(slice(0, self._n)), self.fifo.get(fifo)])
        part = torch.cat([torch.full((self._n,), STATIC), torch.full((len(fifo),), DYNAMIC)])
        return self._tag(out, part)

    def read_rows(self, rows: torch.Tensor) -> Tokens:
        """``read().index(rows)`` without building the whole read: only the chosen rows are
        gathered (``rows``: int64 positions in :meth:`read`'s order, persistent slots first).
        A random key set of k tokens then costs O(k), not O(slots + FIFO)."""
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        total = self.num_tokens
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= total):
            raise IndexError(f"DualMemory.read_rows: rows must be in [0, {total}), got {rows.min()}..{rows.max()}")
        fifo = self._fifo_index()
        in_static = rows < self._n
        n_static = int(in_static.sum())
        part = torch.where(in_static, STATIC, DYNAMIC)
        if n_static == rows.numel():  # only persistent slots (or no rows): one gather
            return self._tag(self.static.get(rows), part)
        if n_static == 0:  # only FIFO tokens (e.g. a pixel memory of dynamic tokens): one gather
            return self._tag(self.fifo.get(torch.index_select(fifo, 0, rows - self._n)), part)
        # one gather per store and field (rows of the other store read a dummy slot 0), then pick
        at_static = torch.where(in_static, rows, 0)
        at_fifo = fifo[torch.where(in_static, 0, rows - self._n)] if fifo.numel() else torch.zeros_like(rows)
        pick = in_static.unsqueeze(1)

        def gather(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            x, y = torch.index_select(a, 0, at_static), torch.index_select(b, 0, at_fifo)
            return torch.where(pick if x.ndim == 2 else in_static, x, y)

        st, ff = self.static, self.fifo
        out = Tokens(features=gather(st.features, ff.features).float(), frame_index=gather(st.frame_index, ff.frame_index),
                     timestamp=gather(st.timestamp, ff.timestamp), grid=gather(st.grid, ff.grid),
                     level=gather(st.level, ff.level), score=gather(st.score, ff.score))
        return self._tag(out, part)

    def query(self, q: torch.Tensor | Tokens, k: int) -> Tokens:
        """The ``k`` stored tokens most similar (max cosine over the rows of ``q (M, D)``) to the
        query, best first; the persistent slots' accumulated attention grows by what ``q``
        gives them."""
        q = q.features if isinstance(q, Tokens) else q
        q = q.reshape(-1, self.config.dim).float()
        if self._n:
            attn = torch.softmax(q @ self.static.features[: self._n].t() / self.config.dim ** 0.5, dim=1)
            self.usage[: self._n] += attn.sum(0)
        everything = self.read()
        if len(everything) == 0:
            return everything
        sim = (F.normalize(q, dim=1) @ F.normalize(everything.features, dim=1).t()).amax(0)
        return everything.index(torch.topk(sim, min(k, len(everything))).indices)

    def stats(self) -> dict:
        out = super().stats()
        out["static_tokens"] = self._n
        out["dynamic_tokens"] = sum(self._fifo_len)
        return out
