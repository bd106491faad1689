"""FeatureBank: MAMBA's flat memory bank with random eviction and a fresh random key set.

The rule (MAMBA, "Memory Enhanced Global-Local Aggregation..." AAAI 2021; reference code
``Duckduckgod/MAMBA`` ``mem_bank/memory_bank.py``, defaults in ``config/defaults.py``):

- a flat bank of feature vectors, ``MAX_NUM = 20000``;
- update: append until full, then evict ``len(new)`` entries chosen uniformly at random and
  append the new ones (``cat(feat[randperm[:len - len(new)]], new)``);
- sample: each read draws a fresh random key set of ``KEY_NUM = 2000`` entries
  (``feat[randperm[:KEY_NUM]]``), or the whole bank while it holds fewer;
- the bank is used at two levels (pixel features inside confident boxes, fc6 features of the
  top-75 proposals). The Generalized Enhancement Operation that attends to the key set is
  learned and lives in ``models/``.

Reference defaults: ``max_size=20000``, ``key_size=2000``, random sampling, random updating
(the only policies the reference implements; others raise ``NotImplementedError`` there).

Departures:

- the bank never exceeds ``max_size``: the reference appends whenever ``len < MAX_NUM`` and so
  can overshoot by up to one write; here free slots fill first and only the overflow evicts;
- a write larger than ``max_size`` keeps its last ``max_size`` tokens;
- storage order is slot order (evicted slots are overwritten in place) rather than the
  reference's reshuffled order; a read of the whole bank is in slot order;
- ``update="fifo"`` and ``sample="score"`` (top ``key_size`` by ``Tokens.score``) are offered
  and are **not in the reference code**.

Shapes: writes and reads are ``Tokens`` of width ``dim``; a read returns at most ``key_size``
tokens.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> bank = FeatureBank(dim=16, max_size=100, key_size=10)
    >>> for t in range(30):
    ...     bank.write(Tokens.from_grid(torch.randn(1, 5, 16), frame_index=t, timestamp=t))
    >>> bank.num_tokens, len(bank.read()), bank.stats()["evictions"]
    (100, 10, 50)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammem.memory.base import Memory, MemoryConfig, TokenSlots, check_field
from streammem.types import Tokens

__all__ = ["FeatureBank", "FeatureBankConfig"]


@dataclass
class FeatureBankConfig(MemoryConfig):
    """Attributes:
    dim: feature width (reference: 1024, fc6 / C4 features).
    max_size: bank size (reference ``MAX_NUM=20000``).
    key_size: entries per read (reference ``KEY_NUM=2000``).
    update: ``"random"`` (reference) or ``"fifo"`` (not in the reference).
    sample: ``"random"`` (reference) or ``"score"`` (top by score; not in the reference).
    recent: of each ``"random"`` key set, this many are the newest entries (highest
        ``frame_index``) and the rest a random draw from the others (0, the reference: all random;
        not in the reference). A detector trained with references from a few frames away finds
        the current objects among them.
    """

    dim: int = 1024
    max_size: int = 20000
    key_size: int = 2000
    update: str = "random"
    sample: str = "random"
    recent: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_field(isinstance(self.max_size, int) and self.max_size >= 1, name, "max_size", "an int >= 1",
                    self.max_size)
        check_field(isinstance(self.key_size, int) and 1 <= self.key_size <= self.max_size, name, "key_size",
                    f"an int in [1, max_size={self.max_size}]", self.key_size)
        check_field(self.update in ("random", "fifo"), name, "update", "'random' or 'fifo'", self.update)
        check_field(self.sample in ("random", "score"), name, "sample", "'random' or 'score'", self.sample)
        check_field(isinstance(self.recent, int) and 0 <= self.recent <= self.key_size, name, "recent",
                    f"an int in [0, key_size={self.key_size}]", self.recent)


class FeatureBank(Memory):
    """MAMBA memory bank (see the module docstring)."""

    kind = "feature_bank"
    Config = FeatureBankConfig
    COUNTERS = ("writes", "evictions", "reads")

    def _allocate(self) -> None:
        c = self.config
        self.slots = TokenSlots(self, "bank", c.max_size, c.dim)
        self._meta = self.buffer("bank.meta", torch.zeros(2, dtype=torch.int64))  # count, fifo pointer

    def _on_state(self, event: str) -> None:
        """Python-side: the fill count and the FIFO pointer (``bank.meta`` in snapshots)."""
        if event == "save":
            self._meta[0], self._meta[1] = self._count, self._next
        else:
            self._count, self._next = int(self._meta[0]), int(self._meta[1])

    @property
    def num_tokens(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return self.config.max_size

    def _distinct(self, n: int, k: int) -> torch.Tensor:
        """k distinct indices drawn uniformly from range(n) (a uniform k-subset, random order).

        For ``k <= n / 2``: draw with replacement, keep the distinct ones, top up until there are
        k. Every step treats all indices alike, so each k-subset is equally likely; it costs
        O(k) instead of a full O(n) permutation (0.02 ms instead of 0.2 ms at n = 20,000,
        k = 200, twice per detector frame).
        """
        if 2 * k <= n:
            idx = torch.unique(torch.randint(0, n, (k,), generator=self.generator))
            while idx.numel() < k:
                more = torch.randint(0, n, (k - idx.numel(),), generator=self.generator)
                idx = torch.unique(torch.cat([idx, more]))
            return idx[torch.randperm(k, generator=self.generator)]
        return torch.randperm(n, generator=self.generator)[:k]

    def write(self, tokens: Tokens) -> None:
        """Append ``tokens``; when full, evict ``len(tokens)`` entries (random or FIFO)."""
        self._check_dim(tokens)
        size = self.config.max_size
        if len(tokens) > size:
            tokens = tokens.index(slice(len(tokens) - size, None))
        n = len(tokens)
        free = min(size - self._count, n)
        if free > 0:
            self.slots.put(slice(self._count, self._count + free), tokens, slice(0, free))
            self._count += free
        rest = n - free
        if rest > 0:
            if self.config.update == "random":
                slots = self._distinct(size, rest)
            else:
                slots = (torch.arange(rest) + self._next) % size
                self._next = (self._next + rest) % size
            self.slots.put(slots, tokens, slice(free, None))
            self.counters["evictions"] += rest
        self.counters["writes"] += 1

    def read(self, query: None = None) -> Tokens:
        """A fresh key set: ``key_size`` entries (random, or top by score), or all while fewer.

        Takes no query (MAMBA's key set does not depend on the current frame).
        """
        self._check_query(query)
        self.counters["reads"] += 1
        n, k = self._count, self.config.key_size
        if n <= k:
            return self.slots.get(slice(0, n))
        if self.config.sample == "random" and self.config.recent:
            r = self.config.recent
            newest = torch.topk(self.slots.frame_index[:n], r).indices
            taken = torch.zeros(n, dtype=torch.bool)
            taken[newest] = True
            draw = self._distinct(n, min(n, k))  # k distinct candidates hold >= k - r untaken ones
            idx = torch.cat([newest, draw[~taken[draw]][: k - r]])
        elif self.config.sample == "random":
            idx = self._distinct(n, k)
        else:
            idx = torch.topk(self.slots.score[:n], k).indices
        return self.slots.get(idx)
