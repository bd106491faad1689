"""``MemoryCache``: what the answerer keeps of one stream's memory between questions, and the
helpers that cut a read into runs of one stored frame (``_run_starts``, ``_run_keys``) and
checksum them (``_checksums``)."""

from __future__ import annotations

import torch

from streammem.types import Tokens

__all__ = ["MemoryCache"]


class MemoryCache:
    """What :class:`SmallAnswerer` computes of a memory that does not depend on the question
    time, kept per stored frame between questions (one per stream: it holds that stream's data).

    A memory token's encoding is ``LayerNorm(static + age)``: ``static`` (features, level,
    grid cell, labels) never changes once a frame is stored, ``age`` is one vector per frame
    and query time. The LayerNorm is per token, so the key / value projections expand exactly:
    centring both parts and with ``W' = W diag(gamma)``,
    ``kv = (W' static_c + W' age_c) / sigma + W beta + b``. ``W' static_c`` is cached per
    frame; per question only the frame ages, ``sigma`` and a few passes over the tokens are
    computed (the logits match the uncached path to float rounding; the tests check it).

    Storage is a slot table: each run of a read's tokens sharing ``(level, frame_index,
    timestamp)`` owns a range of rows, a run the memory no longer holds frees its range, and a
    new run takes a free range of its length (or the end of the table), so a question copies
    only the frames stored since the last one. Attention does not depend on token order, so the
    answerer reads the table in slot order. A run is checked against checksums of its features
    and grid cells (a restored snapshot reusing a frame number is recomputed). The table's live
    rows are exactly the last read's (compacted when ranges of another length are left free) and
    its capacity is at most 1.25 times the largest read, so it is bounded by the memory it
    serves. A read that fails halfway clears it. It belongs to one answerer: used with another,
    or after the weights change, call :meth:`clear` (another model clears it automatically).

    Reads under ``min_tokens`` tokens (default 2,048), or whose runs average under ``min_run``
    tokens (default 16; DualMemory's persistent slots are runs of one or a few merged tokens),
    are encoded from scratch: there the per-run bookkeeping costs about what it saves
    (``benchmarks/qa.py``; the ``dual`` memory of ``streammem eval qa``).
    """

    def __init__(self, min_tokens: int = 2048, min_run: int = 16) -> None:
        self.min_tokens = min_tokens  # smaller reads skip the cache: re-encoding them is as cheap
        self.min_run = min_run  # so do reads whose runs average fewer tokens
        self.clear()
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._slots: dict[tuple, tuple[int, int, tuple]] = {}  # key -> (first row, rows, checksums)
        self._free: dict[int, list[int]] = {}  # run length -> first rows of free ranges
        self._top = 0  # rows in use (live or free)
        self._tables: list[torch.Tensor] = []  # per part (SmallAnswerer._static_rows), (capacity, width)
        self._ts = torch.zeros(0, dtype=torch.float64)
        self._fi = torch.zeros(0, dtype=torch.int64)
        self._level = torch.zeros(0, dtype=torch.int64)
        self._bufs: dict[str, torch.Tensor] = {}
        self._model: int | None = None

    def __len__(self) -> int:
        """Cached runs of tokens (frames, per level)."""
        return len(self._slots)

    def nbytes(self) -> int:
        """Bytes held: the slot table plus work buffers."""
        held = [*self._tables, *self._bufs.values(), self._ts, self._fi, self._level]
        return sum(t.numel() * t.element_size() for t in held)

    def _work(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """A reused float buffer of ``shape`` (fresh large tensors cost page faults on every
        question); it only grows to the largest read."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1] != shape[1]:
            buf = self._bufs[name] = torch.empty(max(shape[0], 0 if buf is None else buf.shape[0]), shape[1])
        return buf[: shape[0]]

    def _place(self, keys: list[tuple], lengths: list[int], sums: list[tuple]) -> tuple[list[int], list[int]]:
        """First row of each run, and which runs must be (re)computed."""
        live = set(keys)
        for k in [k for k in self._slots if k not in live]:
            first, n, _ = self._slots.pop(k)
            self._free.setdefault(n, []).append(first)
        firsts, missing = [], []
        for i, (k, n, h) in enumerate(zip(keys, lengths, sums)):
            got = self._slots.get(k)
            if got is not None and got[2] == h:
                firsts.append(got[0])
                continue
            if got is not None:  # same run key, other content: recompute in place
                first = got[0]
            elif self._free.get(n):
                first = self._free[n].pop()
            else:
                first = self._top
                self._top += n
            self._slots[k] = (first, n, h)
            firsts.append(first)
            missing.append(i)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if any(self._free.values()):  # free ranges of a length no run took: close the holes
            firsts = self._compact(keys, firsts, lengths)
        return firsts, missing

    def _compact(self, keys: list[tuple], firsts: list[int], lengths: list[int]) -> list[int]:
        """Move the read's runs to the front of the table, keeping their order; new first rows."""
        order = sorted(range(len(keys)), key=firsts.__getitem__)
        rows = torch.cat([torch.arange(firsts[i], firsts[i] + lengths[i]) for i in order]
                         or [torch.zeros(0, dtype=torch.int64)])
        rows = rows[rows < len(self._ts)]  # rows past the table are new runs' (last in order), not written yet
        self._tables = [t.index_select(0, rows) for t in self._tables]
        self._ts, self._fi, self._level = (v.index_select(0, rows) for v in (self._ts, self._fi, self._level))
        new, at = list(firsts), 0
        for i in order:
            new[i] = at
            self._slots[keys[i]] = (at, lengths[i], self._slots[keys[i]][2])
            at += lengths[i]
        self._free.clear()
        self._top = at
        return new

    def _ensure(self, widths: list[int]) -> None:
        """Grow the table to hold ``self._top`` rows (at most 1.25 times the largest read)."""
        cap = len(self._ts)
        if self._top <= cap and len(self._tables) == len(widths):
            return
        new = max(self._top + self._top // 4, 64)  # a quarter spare: few copies while a memory fills
        grow = lambda t, shape, dtype: torch.cat([t, torch.zeros(shape, dtype=dtype)])  # noqa: E731
        if len(self._tables) != len(widths):
            self._tables = [torch.zeros(0, w) for w in widths]
        self._tables = [grow(t, (new - len(t), t.shape[1]), t.dtype) for t in self._tables]
        self._ts = grow(self._ts, (new - cap,), torch.float64)
        self._fi = grow(self._fi, (new - cap,), torch.int64)
        self._level = grow(self._level, (new - cap,), torch.int64)


def _run_starts(t: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """First token and length of each run of consecutive tokens sharing (level, frame, time)."""
    m, fi, ts, level = len(t), t.frame_index, t.timestamp, t.level
    edge = torch.ones(m, dtype=torch.bool)
    edge[1:] = (fi[1:] != fi[:-1]) | (level[1:] != level[:-1]) | (ts[1:] != ts[:-1])
    starts = torch.nonzero(edge)[:, 0]
    return starts, torch.diff(starts, append=torch.tensor([m]))


def _run_keys(t: Tokens, starts: torch.Tensor, counts: torch.Tensor) -> list[tuple]:
    """:class:`MemoryCache`'s key of each run: ``(level, frame_index, timestamp, length,
    occurrence)`` (a run repeated in one read is told apart by its occurrence)."""
    seen: dict[tuple, int] = {}
    keys = []
    for k in zip(t.level[starts].tolist(), t.frame_index[starts].tolist(), t.timestamp[starts].tolist(),
                 counts.tolist()):
        seen[k] = seen.get(k, -1) + 1
        keys.append((*k, seen[k]))
    return keys


def _checksums(feats: torch.Tensor, grid: torch.Tensor, starts: torch.Tensor,
               counts: torch.Tensor) -> list[tuple[float, float]]:
    """Per run: two sums of a fixed random projection of each token's features and grid cell,
    plain and weighted by the token's place in the run (so reordered tokens change it too)."""
    u = torch.randn(feats.shape[1] + 2, generator=torch.Generator().manual_seed(0))
    dot = (feats @ u[:-2] + grid @ u[-2:]).double()
    run = torch.repeat_interleave(torch.arange(len(starts)), counts)
    place = (torch.arange(len(feats)) - starts[run]).double()
    sums = torch.zeros(len(starts), 2, dtype=torch.float64)
    sums.index_add_(0, run, torch.stack([dot, dot * torch.cos(1.7 * place + 0.3)], 1))
    return [tuple(r) for r in sums.tolist()]
