"""KVCacheMemory: a bounded token / KV cache whose over-budget policy is a press.

Not a paper of its own: the container that lets the presses of ``memory/presses/``
(StreamingLLM sink + window, H2O / Scissorhands, KVMerger) run as a streaming memory. Writes
append; when the cache holds more than ``capacity`` tokens, the press compresses it back.
``attend(q)`` is attention over the cache (``softmax(q K^T / sqrt(D)) V``) and records, per
token, the attention received (H2O) and the number of steps in which it was below average
(Scissorhands); the press sees one of them as ``tokens.score`` (``-count`` for an H2O press
with ``persistence=True``). MiKV keeps every token, so it is not a budget policy: apply it to
reads (``MiKVPress(...)(cache.read())``).

Shapes: ``write(tokens, values=None)`` with ``tokens (n, dim)``, ``n <= max_write``, values
``(n, value_dim)`` when ``value_dim`` is set; ``read()`` returns ``(N <= capacity, dim)`` with
``score`` = the press statistic; ``attend(q (M, dim)) -> (M, value_dim or dim)``.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> cache = KVCacheMemory(dim=4, capacity=8, press=("sink_window", {"n_sink": 2, "window": 6}))
    >>> for t in range(5):
    ...     cache.write(Tokens.from_grid(torch.randn(1, 3, 4), frame_index=t, timestamp=t))
    >>> cache.read().frame_index.tolist()
    [0, 0, 3, 3, 3, 4, 4, 4]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from streammem.memory.base import Memory, MemoryConfig, TokenSlots, check_field
from streammem.memory.presses import H2OPress, MiKVPress, build_press
from streammem.types import Tokens

__all__ = ["KVCacheMemory", "KVCacheConfig"]


@dataclass
class KVCacheConfig(MemoryConfig):
    """Attributes:
    capacity: most tokens kept after a write.
    max_write: most tokens in one write.
    value_dim: width of values kept apart from keys, or None (values = keys).
    press: press spec: a name, ``[name, kwargs]`` or a list of those (see ``build_press``);
        it must keep at most ``capacity`` tokens.
    """

    dim: int = 128
    capacity: int = 1024
    max_write: int = 256
    value_dim: int | None = None
    press: Any = ("sink_window", {"n_sink": 4, "window": 1020})

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_field(isinstance(self.capacity, int) and self.capacity >= 1, name, "capacity", "an int >= 1",
                    self.capacity)
        check_field(isinstance(self.max_write, int) and self.max_write >= 1, name, "max_write", "an int >= 1",
                    self.max_write)
        check_field(self.value_dim is None or (isinstance(self.value_dim, int) and self.value_dim >= 1), name,
                    "value_dim", "None or an int >= 1", self.value_dim)
        self.press = json.loads(json.dumps(self.press))  # JSON form, so snapshots compare equal
        try:
            press = build_press(self.press)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}.press must be a valid press spec: {err}") from None
        bound = press.max_kept()
        check_field(not isinstance(press, MiKVPress) and bound is not None and bound <= self.capacity, name, "press",
                    f"a press keeping at most capacity={self.capacity} tokens (sink_window, h2o, kvmerger with "
                    "a budget, or a composition of them)", self.press)


class KVCacheMemory(Memory):
    """Bounded cache, compressed by a press when over capacity."""

    kind = "kvcache"
    Config = KVCacheConfig
    COUNTERS = ("writes", "evictions", "compressions", "attends")

    def _allocate(self) -> None:
        c = self.config
        n = c.capacity + c.max_write
        self.press = build_press(c.press)
        self.slots = TokenSlots(self, "cache", n, c.dim)
        self.values = self.buffer("cache.values", torch.zeros(n, c.value_dim or 0))
        self.attention = self.buffer("cache.attention", torch.zeros(n))
        self.below = self.buffer("cache.below_average", torch.zeros(n))
        self._size = self.buffer("cache.size", torch.zeros(1, dtype=torch.int64))

    def _on_state(self, event: str) -> None:
        """Python-side: the number of cached tokens (``cache.size`` in snapshots)."""
        if event == "save":
            self._size[0] = self._n
        else:
            self._n = int(self._size[0])

    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self.config.capacity

    def _persistence(self) -> bool:
        presses = getattr(self.press, "presses", [self.press])
        return any(isinstance(p, H2OPress) and p.persistence for p in presses)

    def _statistic(self) -> torch.Tensor:
        n = self._n
        return -self.below[:n] if self._persistence() else self.attention[:n]

    def write(self, tokens: Tokens, values: torch.Tensor | None = None) -> None:
        self._check_dim(tokens)
        c = self.config
        m = len(tokens)
        if m > c.max_write:
            raise ValueError(f"KVCacheMemory: {m} tokens in one write, more than max_write={c.max_write}")
        if c.value_dim is not None and (values is None or tuple(values.shape) != (m, c.value_dim)):
            raise ValueError(f"KVCacheMemory.write needs values of shape {(m, c.value_dim)}")
        s = slice(self._n, self._n + m)
        self.slots.put(s, tokens)
        if c.value_dim is not None:
            self.values[s] = values
        self.attention[s] = 0.0
        self.below[s] = 0.0
        self._n += m
        self.counters["writes"] += 1
        if self._n > c.capacity:
            self._compress()

    def _compress(self) -> None:
        n = self._n
        tokens = self.slots.get(slice(0, n))
        tokens.score = self._statistic().clone()
        values = self.values[:n].clone() if self.config.value_dim is not None else None
        # only the statistic the press ranks by travels through it (merges sum it); the other
        # one restarts at zero for the kept tokens
        kept, kept_v = self.press.compress(tokens, values)
        k = len(kept)
        self.slots.put(slice(0, k), kept)
        if kept_v is not None:
            self.values[:k] = kept_v
        if self._persistence():
            self.below[:k] = -kept.score
            self.attention[:k] = 0.0
        else:
            self.attention[:k] = kept.score
            self.below[:k] = 0.0
        self.counters["evictions"] += n - k
        self.counters["compressions"] += 1
        self._n = k

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """``softmax(q K^T / sqrt(D)) V`` over the cache; records attention statistics."""
        n = self._n
        q = q.reshape(-1, self.config.dim).float()
        if n == 0:
            return torch.zeros(q.shape[0], self.config.value_dim or self.config.dim)
        w = torch.softmax(q @ self.slots.features[:n].t() / self.config.dim ** 0.5, dim=1)
        self.attention[:n] += w.sum(0)
        self.below[:n] += (w < 1.0 / n).float().sum(0)
        self.counters["attends"] += 1
        v = self.values[:n] if self.config.value_dim is not None else self.slots.features[:n]
        return w @ v

    def read(self, query: None = None) -> Tokens:
        """The cached tokens, oldest first, ``score`` = the press statistic (no query)."""
        self._check_query(query)
        out = self.slots.get(slice(0, self._n))
        out.score = self._statistic().clone()
        return out
