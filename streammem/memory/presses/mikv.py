"""MiKVPress: keep evicted tokens in low precision instead of dropping them.

Rule (MiKV, "No Token Left Behind", Yang et al. 2024; paper only): an eviction policy splits
the cache into an important set, kept at high precision, and an evicted set, kept at low
precision (INT2-4, per-token round-to-nearest) instead of being dropped. Reference setting:
important set at FP16 / INT8, evicted set at INT2-4, plus a channel outlier balancer.

Here the split comes from any eviction press with ``keep()`` (``inner``, default H2O); the
evicted set is quantized per token, asymmetric min-max round-to-nearest at ``bits`` (4 or 8;
any of 2..8 accepted), and dequantized back, so ``compress`` returns every token in its
original order, the evicted ones carrying their low-precision values. Departures: no outlier
balancer; the important set stays in the memory's own dtype. ``quantize`` / ``dequantize``
give the packed form (``uint8`` codes + per-token scale and offset) for storage, and
``nbytes`` the bytes of that form.

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> from streammem.memory.presses import SinkWindowPress
    >>> t = Tokens.from_grid(torch.randn(1, 8, 16), 0, 0.0)
    >>> out = MiKVPress(inner=SinkWindowPress(n_sink=1, window=2), bits=8)(t)
    >>> len(out), bool(torch.equal(out.features[-2:], t.features[-2:]))
    (8, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streammem.memory.base import check_field
from streammem.memory.presses.base import Press
from streammem.memory.presses.h2o import H2OPress
from streammem.types import Tokens

__all__ = ["MiKVPress", "quantize", "dequantize"]


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric RTN: ``(N, D) -> (codes uint8 (N, D), scale (N, 1), offset (N, 1))``."""
    x = x.float()
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
    codes = torch.round((x - lo) / scale).clamp(0, 2 ** bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale + offset


@dataclass
class MiKVPress(Press):
    """Important tokens (``inner.keep``) exact; the rest round-tripped through ``bits``-bit RTN."""

    inner: Press = field(default_factory=lambda: H2OPress())
    bits: int = 4

    def __post_init__(self) -> None:
        check_field(isinstance(self.bits, int) and 2 <= self.bits <= 8, "MiKVPress", "bits", "an int in [2, 8]",
                    self.bits)

    def split(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(important, evicted)`` positions."""
        keep = self.inner.keep(tokens)
        mask = torch.ones(len(tokens), dtype=torch.bool)
        mask[keep] = False
        return keep, mask.nonzero().flatten()

    def compress(self, tokens, values=None):
        _, low = self.split(tokens)
        if len(low) == 0:
            return tokens, values
        out = tokens.index(slice(None))
        out.features = out.features.clone()
        out.features[low] = dequantize(*quantize(tokens.features[low], self.bits)).to(out.features.dtype)
        if values is not None:
            values = values.clone()
            values[low] = dequantize(*quantize(values[low], self.bits)).to(values.dtype)
        return out, values

    def nbytes(self, n_important: int, n_evicted: int, dim: int, elsize: int = 2) -> int:
        """Bytes of keys held: important at ``elsize`` bytes, evicted packed at ``bits`` plus two
        float16 numbers (scale, offset) per token."""
        return n_important * dim * elsize + n_evicted * ((dim * self.bits + 7) // 8 + 4)
