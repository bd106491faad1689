"""H2OPress: heavy-hitter eviction by accumulated attention (H2O), with Scissorhands' option.

Rule (H2O, Zhang et al. 2023; ``FMInference/H2O``): each cached token accumulates the attention
it receives from every query; keep the ``recent`` most recent tokens plus the ``budget - recent``
other tokens with the highest accumulated attention (reference split: 10% heavy hitters + 10%
recent of the sequence; kvpress ``ObservedAttentionPress``).

Scissorhands (Liu et al. 2023; no official code): "persistence of importance": count, for each
token, how many attention steps gave it less than the average weight (1/n); outside the recent
window drop the tokens with the highest count. With ``persistence=True`` a cache supplies
``score = -count`` instead of accumulated attention (the press itself keeps the top scores
either way). The exact counter of the paper is unverified; ours counts below-average steps over
the token's whole life, without a history window.

The statistic is read from ``tokens.score`` (``(N,)``, higher = more important); the press is
stateless. Ties keep the older token.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> t = Tokens.from_grid(torch.randn(1, 6, 2), 0, 0.0, score=torch.tensor([5., 0, 9, 1, 0, 0]))
    >>> H2OPress(budget=3, recent=1)(t).grid[:, 1].tolist()
    [0.0, 2.0, 5.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammem.memory.base import check_field
from streammem.memory.presses.base import Press
from streammem.types import Tokens

__all__ = ["H2OPress"]


@dataclass
class H2OPress(Press):
    """Keep ``recent`` newest + top-``(budget - recent)`` by ``tokens.score``."""

    budget: int = 512
    recent: int = 256
    persistence: bool = False

    def __post_init__(self) -> None:
        check_field(isinstance(self.budget, int) and self.budget >= 1, "H2OPress", "budget", "an int >= 1", self.budget)
        check_field(isinstance(self.recent, int) and 0 <= self.recent <= self.budget, "H2OPress", "recent",
                    f"an int in [0, budget={self.budget}]", self.recent)

    def keep(self, tokens: Tokens) -> torch.Tensor:
        n = len(tokens)
        if n <= self.budget:
            return torch.arange(n)
        if tokens.score is None:
            raise ValueError("H2OPress needs Tokens.score (accumulated attention, or -count with persistence)")
        old = n - self.recent
        heavy = self.budget - self.recent
        # stable ranking: higher score first, older first among equals
        order = torch.argsort(-tokens.score[:old], stable=True)[:heavy]
        return torch.cat([torch.sort(order).values, torch.arange(old, n)])

    def max_kept(self) -> int:
        return self.budget
