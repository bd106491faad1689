"""Features of memory tokens that the answerer computes per read: age and grid-cell encodings,
the time prior's distance, and the calibration's support around a stated time.

Shapes: M memory tokens, B questions. Ages are seconds before the query time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streammem.models.answerer.text import EncodedBatch
from streammem.types import Tokens


def _fourier(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(...)`` -> ``(..., 2n)``: sin/cos at geometric frequencies (periods ~2 to ~2000)."""
    freqs = torch.exp(torch.linspace(math.log(2 * math.pi / 2.0), math.log(2 * math.pi / 2000.0), n,
                                     device=x.device, dtype=torch.float32))
    a = x.float()[..., None] * freqs
    return torch.cat([a.sin(), a.cos()], -1)


def _age_features(age: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Seconds before the query -> ``(..., 2n + 2)``: Fourier features plus log(1 + age)."""
    age = age.float().clamp(min=0)
    return torch.cat([_fourier(age, n), torch.log1p(age)[..., None] / 6.0, (age < 1.0).float()[..., None]], -1)


@dataclass
class _MemoryView:
    """Per-read inputs shared by the memory encoding and the grounded read-out."""

    feats: torch.Tensor  # (M, token_dim) float
    level: torch.Tensor  # (M,) long
    cell_f: torch.Tensor  # (M, 16) grid-cell Fourier features
    age_f: torch.Tensor  # (M, 18) age features (query time - timestamp)
    probs: torch.Tensor | None  # (M, labels) or None without a label space


def _log_dt(memory: Tokens, batch: "EncodedBatch") -> torch.Tensor:
    """``(B, M)``: log(1 + |t_token - t_ref|), the time prior's distance."""
    return torch.log1p((memory.timestamp.double()[None, :] - batch.ref_time[:, None]).abs().float())


_GROUND_V = 16 + 18 + 3  # read-out value: grid-cell Fourier, age features, level one-hot (+ label probs)
_SIDE_GAP = 0.25  # seconds: tokens this close to the stated time are neither before nor after it
_EMPTY_LSE = -20.0  # the signed read-out's value for a side with no tokens (below any real score)
_SIGNED_F = 2 + 2 * 3  # signed read-out features per label word: has before / after, per scale lse before, after, diff
_SUPPORT_F = 2  # the calibration's support features: distance to the nearest frame before / after the stated time
_NO_FRAME_S = 1e4  # seconds: the support's distance for a side without frames


def _support(ts: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """``(B, 2)``: ``log(1 + s) / 5``, ``s`` the seconds from each question's stated time
    (``ref (B,)``; the query time for a question that states none, whose "after" side is then
    empty) to the nearest stored frame before it and after it (at least ``_SIDE_GAP`` away, as
    the signed read-out's sides); a side without frames, or whose nearest frame is more than
    ``_NO_FRAME_S`` away, reads as ``_NO_FRAME_S``."""
    if ts is None or len(ts) == 0:
        gap = torch.full((len(ref), 2), _NO_FRAME_S, dtype=torch.float64)
    else:
        side = ts.double()[None, :] - ref.double()[:, None]  # B, M
        far = torch.full_like(side, _NO_FRAME_S)
        gap = torch.stack([torch.where(side < -_SIDE_GAP, -side, far).amin(1),
                           torch.where(side > _SIDE_GAP, side, far).amin(1)], 1).clamp(max=_NO_FRAME_S)
    return (torch.log1p(gap) / 5.0).float()
