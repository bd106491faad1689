"""Aligned temporal fusion of backbone feature maps: a one-map recurrent pixel memory.

MAMBA's pixel bank is an unordered set: a pixel attends to stored pixels by content alone, with
no notion of *where* they were. That cannot denoise a frame or carry an object through a burst
of blur, because the matching content is at the same place a moment ago. ``LocalFusion`` keeps
one feature map, the fused map of the previous frame, and lets every position of the current
map attend over a ``(2r+1) x (2r+1)`` window of it around the same place (a local correlation,
so camera pans and object motion of up to ``r`` cells per frame are followed without a flow
network), then gates the result in per channel:

    q = Wq F_t,  k = Wk S_{t-1}                                 (1x1 convs, C -> d)
    a_o(p) = softmax_o(q(p) . k(p + o) / sqrt(d) + b_o)          o in the window, b: per offset
    A(p) = sum_o a_o(p) S_{t-1}(p + o)                           values: the raw state
    g = sigmoid(Wg [F_t, A])                                     per channel and position
    S_t = F_t + g * (A - F_t)

``S_t`` is both this frame's enhanced features and the next frame's state, so information older
than one frame survives through the gate (an exponential memory of bounded size: one ``C x h x
w`` map). Positions of the window outside the map are masked. With no state (a stream's first
frame, the single-frame detector) the map passes through unchanged. The gate starts nearly
closed (bias -2, zero weights) and the offset bias favours no motion, so a detector that gains
the module starts out close to its old self.

Related work: spatial-temporal memory for video detection (STMN, Xiao and Lee, ECCV 2018) and
local correlation aggregation; this module is ours, not from MAMBA.

Example:
    >>> import torch
    >>> fuse = LocalFusion(dim=16, radius=2)
    >>> f = torch.randn(1, 16, 8, 8)
    >>> torch.equal(fuse(f, None), f)
    True
    >>> fuse(f, torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 16, 8, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LocalFusion"]


class LocalFusion(nn.Module):
    """See the module docstring.

    Args:
        dim: feature channels C.
        radius: window radius r in cells (the window is ``(2r+1)^2`` positions).
        qk_dim: width d of the matching projections.
        gate_bias: initial gate bias (sigmoid(-2) = 0.12: mostly the current frame at first).
    """

    def __init__(self, dim: int, radius: int = 2, qk_dim: int = 16, gate_bias: float = -2.0) -> None:
        super().__init__()
        if dim < 1 or radius < 1 or qk_dim < 1:
            raise ValueError(f"LocalFusion needs dim, radius, qk_dim >= 1, got {dim}, {radius}, {qk_dim}")
        self.dim, self.radius, self.qk_dim = dim, radius, qk_dim
        self.q = nn.Conv2d(dim, qk_dim, 1)
        self.k = nn.Conv2d(dim, qk_dim, 1)
        side = 2 * radius + 1
        oy, ox = torch.meshgrid(torch.arange(side) - radius, torch.arange(side) - radius, indexing="ij")
        # offset bias: starts as a Gaussian preference for small motion
        self.offset_bias = nn.Parameter(-0.25 * (oy.float() ** 2 + ox.float() ** 2).flatten())
        self.gate = nn.Conv2d(2 * dim, dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)
        self._masks: dict = {}  # padding masks per map size (a plain dict: not saved; reads are thread-safe)

    def attend(self, feat: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``A``: the state gathered at each position of ``feat`` (both ``(B, C, h, w)``).

        One shifted slice of the padded maps per window offset: on CPU this is several times
        faster than ``F.unfold`` (which copies the window ``(2r+1)^2`` times) or a strided view.
        """
        b, c, h, w = feat.shape
        r, side = self.radius, 2 * self.radius + 1
        q = self.q(feat) / math.sqrt(self.qk_dim)
        kp = F.pad(self.k(state), (r, r, r, r))
        logits = torch.cat([(q * kp[:, :, dy:dy + h, dx:dx + w]).sum(1, keepdim=True)
                            for dy in range(side) for dx in range(side)], 1)
        att = torch.softmax(logits + self._bias(h, w, feat), 1)  # B, side^2, h, w
        vp = F.pad(state, (r, r, r, r))
        out = vp[:, :, 0:h, 0:w] * att[:, 0:1]
        for i in range(1, side * side):
            dy, dx = divmod(i, side)
            out = out.addcmul_(vp[:, :, dy:dy + h, dx:dx + w], att[:, i:i + 1])
        return out

    def _bias(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """Offset bias plus the padding mask (-inf where the offset leaves the map): ``(1, side^2, h, w)``."""
        key = (h, w, like.device, like.dtype)
        masks = self._masks
        mask = masks.get(key)  # read once: another thread may clear the dict meanwhile
        if mask is None:
            r, side = self.radius, 2 * self.radius + 1
            valid = F.pad(like.new_ones(1, 1, h, w), (r, r, r, r))
            win = torch.cat([valid[:, :, dy:dy + h, dx:dx + w] for dy in range(side) for dx in range(side)], 1)
            mask = torch.zeros_like(win).masked_fill_(win == 0, float("-inf"))
            if len(masks) >= 8:
                masks.clear()
            masks[key] = mask
        return mask + self.offset_bias.to(like.dtype)[None, :, None, None]

    def forward(self, feat: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """``feat (B, C, h, w)``, ``state`` (the previous fused map, same shape, or None) ->
        the fused map ``(B, C, h, w)`` (``feat`` itself when ``state`` is None)."""
        if state is None:
            return feat
        if state.shape != feat.shape:
            raise ValueError(f"LocalFusion state {tuple(state.shape)} does not match features {tuple(feat.shape)}")
        agg = self.attend(feat, state)
        g = torch.sigmoid(self.gate(torch.cat([feat, agg], 1)))
        return torch.addcmul(feat, g, agg - feat)
