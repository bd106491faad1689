"""KVMergerPress: merge runs of similar consecutive keys with Gaussian-kernel weights.

Rule (KVMerger, Wang et al. 2024; third-party re-implementations only): walk the cache in
order; consecutive keys whose adjacent cosine similarity exceeds ``threshold`` form a merging
set; in each set the pivot is the token with the most accumulated attention, and the set
becomes one token, the weighted average with ``w_i = exp(-||k_i - k_p||^2 / (2 sigma^2))``
(values with the same weights). The paper picks the threshold to meet a budget; here the
threshold is given, and if ``budget`` is set and merging leaves more tokens than that, the
``budget`` most recent are kept (ours). With ``keep`` set, the threshold is the one that meets
that budget, as the paper picks it: the ``N - keep`` most similar adjacent pairs are merged
(ties: the older pair first), so exactly ``min(N, keep)`` tokens come out. The merged token takes the pivot's provenance (frame,
time, grid, pose) and the summed score of its set. Without scores the pivot is the newest
token of the set (ours). ``sigma`` default 1.0 is ours (the paper tunes it).

Shapes: ``(N, D)`` keys (and ``(N, Dv)`` values) -> ``(M, D)``, ``M <= N``.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> k = torch.tensor([[1., 0], [1, 0.01], [0, 1], [-1, 0]])
    >>> len(KVMergerPress(threshold=0.9)(Tokens.from_grid(k[None], 0, 0.0)))
    3
    >>> len(KVMergerPress(keep=2)(Tokens.from_grid(k[None], 0, 0.0)))
    2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streammem.memory.base import check_field
from streammem.memory.presses.base import Press
from streammem.types import Tokens

__all__ = ["KVMergerPress"]


@dataclass
class KVMergerPress(Press):
    """Gaussian-weighted merge of runs with adjacent cosine above ``threshold``."""

    threshold: float = 0.9
    sigma: float = 1.0
    budget: int | None = None
    keep: int | None = None

    def __post_init__(self) -> None:
        check_field(isinstance(self.threshold, (int, float)) and -1 <= self.threshold <= 1, "KVMergerPress",
                    "threshold", "a number in [-1, 1]", self.threshold)
        check_field(isinstance(self.sigma, (int, float)) and self.sigma > 0, "KVMergerPress", "sigma",
                    "a number > 0", self.sigma)
        check_field(self.budget is None or (isinstance(self.budget, int) and self.budget >= 1), "KVMergerPress",
                    "budget", "None or an int >= 1", self.budget)
        check_field(self.keep is None or (isinstance(self.keep, int) and self.keep >= 1), "KVMergerPress",
                    "keep", "None or an int >= 1", self.keep)

    def runs(self, tokens: Tokens) -> torch.Tensor:
        """``(N,)`` run id of each token (consecutive tokens with cosine > threshold share one)."""
        k = tokens.features.float()
        if len(tokens) < 2:
            return torch.zeros(len(tokens), dtype=torch.int64)
        sim = F.cosine_similarity(k[1:], k[:-1], dim=-1)
        if self.keep is None:
            same = sim > self.threshold
        else:  # the N - keep most similar adjacent pairs: the threshold that meets the budget
            same = torch.zeros(len(sim), dtype=torch.bool)
            same[torch.argsort(-sim, stable=True)[:max(0, len(tokens) - self.keep)]] = True
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum((~same).long(), 0)])

    def compress(self, tokens, values=None):
        n = len(tokens)
        if n < 2:
            return tokens, values
        run = self.runs(tokens)
        m = int(run[-1]) + 1
        pos = torch.arange(n)
        s = tokens.score if tokens.score is not None else pos.float()
        best = torch.full((m,), -torch.inf).scatter_reduce(0, run, s, "amax")
        cand = torch.where(s == best[run], pos, n)
        pivot = torch.full((m,), n).scatter_reduce(0, run, cand, "amin")
        k = tokens.features.float()
        d2 = ((k - k[pivot[run]]) ** 2).sum(1)
        w = torch.exp(-d2 / (2 * self.sigma ** 2))
        wsum = torch.zeros(m).index_add_(0, run, w)
        keys = torch.zeros(m, k.shape[1]).index_add_(0, run, w[:, None] * k) / wsum[:, None]
        out = tokens.index(pivot)
        out.features = keys.to(tokens.features.dtype)
        if tokens.score is not None:
            out.score = torch.zeros(m).index_add_(0, run, tokens.score)
        if values is not None:
            v = values.float()
            values = (torch.zeros(m, v.shape[1]).index_add_(0, run, w[:, None] * v) / wsum[:, None]).to(values.dtype)
        if self.budget is not None and m > self.budget:
            out = out.index(slice(m - self.budget, None))
            values = None if values is None else values[m - self.budget:]
        return out, values

    def max_kept(self):
        bounds = [b for b in (self.budget, self.keep) if b is not None]
        return min(bounds) if bounds else None
