"""The Generalized Enhancement Operation (GEO) of MAMBA: multi-head attention from the current
frame's features (queries) to a key set sampled from the memory bank.

The rule (MAMBA, AAAI 2021; reference code ``mem_bank/generalized_enhancement.py``):

    A_h  = softmax((Wq q)_h (Wk k)_h^T / sqrt(d_h))      for each of H heads, d_h = C / H
    O_h  = A_h @ k                                       values are the *raw* keys (C wide)
    att  = GroupConv1x1(cat_h O_h)                       H*C -> C, one group per head
    "attention" mode:  out = q + att
    "alignment" mode:  out = att while training, 0.7 q + 0.3 att at test, with the merge
                       initialised to identity (head h passes through channel slice h)

Defaults of the reference code: 16 heads, C = 1024. Ours is width-agnostic (``dim`` must be a
multiple of ``heads``). An empty key set falls back to the queries themselves, as the
reference test loop does when the bank is empty.

Shapes: ``q`` is ``(Nq, C)``, ``k`` is ``(Nk, C)``, the output ``(Nq, C)``.

Example:
    >>> import torch
    >>> geo = GEO(dim=64, heads=16)
    >>> geo(torch.randn(10, 64), torch.randn(200, 64)).shape
    torch.Size([10, 64])
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GEO", "GEO_MODES"]

GEO_MODES = ("attention", "alignment")


class GEO(nn.Module):
    """Multi-head attention with raw keys as values and a grouped 1x1 head merge.

    Args:
        dim: feature width C of queries and keys.
        heads: number of heads H (16 in MAMBA); ``dim % heads == 0``.
        mode: ``"attention"`` (residual, ``q + att``) or ``"alignment"``.
        test_mix: the query weight of alignment mode at test (0.7 in MAMBA).
    """

    def __init__(self, dim: int, heads: int = 16, mode: str = "attention", test_mix: float = 0.7) -> None:
        super().__init__()
        if dim <= 0 or heads <= 0 or dim % heads:
            raise ValueError(f"dim must be a positive multiple of heads, got dim={dim}, heads={heads}")
        if mode not in GEO_MODES:
            raise ValueError(f"mode must be one of {GEO_MODES}, got {mode!r}")
        if not 0.0 <= test_mix <= 1.0:
            raise ValueError(f"test_mix must be in [0, 1], got {test_mix}")
        self.dim, self.heads, self.mode, self.test_mix = dim, heads, mode, test_mix
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        # Grouped 1x1 "conv" over the concatenated heads: group h maps O_h (C) -> C / H channels.
        self.merge = nn.Conv1d(heads * dim, dim, kernel_size=1, groups=heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.wq, self.wk):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)
        if self.mode == "alignment":
            # Identity: head h passes through its own channel slice of A_h @ k.
            w = torch.zeros(self.dim, self.dim, 1)  # out channel, in channel within group, 1
            for h in range(self.heads):
                rows = slice(h * self.head_dim, (h + 1) * self.head_dim)
                w[rows, :, 0][:, rows] = torch.eye(self.head_dim)
            self.merge.weight.data.copy_(w)
            nn.init.zeros_(self.merge.bias)
        else:
            nn.init.normal_(self.merge.weight, std=0.01)
            nn.init.zeros_(self.merge.bias)

    def project_keys(self, k: torch.Tensor) -> torch.Tensor:
        """What :meth:`attend` computes from the keys alone: ``(Nk, 2C)`` = ``[Wk k, k W^T]``.

        A memory can store this instead of ``k`` (it depends on nothing else), so a read of Nk
        keys costs no key projection: :meth:`attend_projected` then gives :meth:`attend`'s result.
        """
        return torch.cat([self.wk(k), k @ self.merge.weight[:, :, 0].t()], 1)

    def attend_projected(self, q: torch.Tensor, pk: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`attend` with keys given as :meth:`project_keys` output ``(Nk, 2C)``."""
        nq, c = q.shape
        nk = pk.shape[0]
        qh = self.wq(q).view(nq, self.heads, self.head_dim).transpose(0, 1)  # H, Nq, d
        kh = pk[:, :c].reshape(nk, self.heads, self.head_dim).transpose(0, 1)
        # contiguous values: the batched a @ kv is ~25% faster than on the strided view (same result)
        kv = pk[:, c:].reshape(nk, self.heads, self.head_dim).transpose(0, 1).contiguous()
        a = torch.softmax(self._logits(qh, kh, bias), dim=-1)
        return (a @ kv).transpose(0, 1).reshape(nq, c) + self.merge.bias

    def _logits(self, qh: torch.Tensor, kh: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale = 1.0 / math.sqrt(self.head_dim)
        if bias is None:
            return qh @ kh.transpose(1, 2) * scale  # H, Nq, Nk
        want = (qh.shape[0], qh.shape[1], kh.shape[1])
        if tuple(bias.shape) != want:
            raise ValueError(f"GEO bias must be (heads, Nq, Nk) = {want}, got {tuple(bias.shape)}")
        return torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=scale)  # bias + scale * q k^T in one pass

    def mix(self, q: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """The mode's output from ``q`` and ``att`` (see the module docstring)."""
        if self.mode == "attention":
            return q + att
        if self.training:
            return att
        return self.test_mix * q + (1.0 - self.test_mix) * att

    def attend(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``att`` of the rule above: ``(Nq, C)``. ``bias`` ``(H, Nq, Nk)``, optional, is added to
        the attention logits before the softmax (a geometry prior; not in MAMBA).

        Computed as ``A_h @ (k W_h^T)`` rather than ``W_h (A_h @ k)``: the grouped merge is
        linear, so the two are equal, and the first costs ``Nk C^2 + Nq Nk C`` instead of
        ``H Nq Nk C`` (16 times less attention work at 16 heads). :meth:`attend_reference`
        keeps the literal order for tests.
        """
        nq, c = q.shape
        if k.shape[0] == 0:
            k = q
        qh = self.wq(q).view(nq, self.heads, self.head_dim).transpose(0, 1)  # H, Nq, d
        kh = self.wk(k).view(k.shape[0], self.heads, self.head_dim).transpose(0, 1)  # H, Nk, d
        a = torch.softmax(self._logits(qh, kh, bias), dim=-1)  # H, Nq, Nk
        # Group h of the merge maps O_h (C) to output slice h (d): W_h = merge.weight[h*d:(h+1)*d].
        kv = (k @ self.merge.weight[:, :, 0].t()).view(k.shape[0], self.heads, self.head_dim).transpose(0, 1)
        out = (a @ kv).transpose(0, 1).reshape(nq, c)  # Nq, H*d = C, heads in merge order
        return out + self.merge.bias

    def attend_reference(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The literal rule: ``GroupConv1x1(cat_h A_h @ k)``; equal to :meth:`attend`."""
        nq, c = q.shape
        if k.shape[0] == 0:
            k = q
        qh = self.wq(q).view(nq, self.heads, self.head_dim).transpose(0, 1)  # H, Nq, d
        kh = self.wk(k).view(k.shape[0], self.heads, self.head_dim).transpose(0, 1)  # H, Nk, d
        a = torch.softmax(self._logits(qh, kh, bias), dim=-1)  # H, Nq, Nk
        o = a @ k.unsqueeze(0)  # H, Nq, C: raw keys as values
        o = o.permute(1, 0, 2).reshape(nq, self.heads * c, 1)  # Nq, H*C, 1
        return self.merge(o).squeeze(-1)

    def weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention weights averaged over heads: ``(Nq, Nk)`` (for evidence and pruning)."""
        if k.shape[0] == 0:
            k = q
        qh = self.wq(q).view(q.shape[0], self.heads, self.head_dim).transpose(0, 1)
        kh = self.wk(k).view(k.shape[0], self.heads, self.head_dim).transpose(0, 1)
        return torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(self.head_dim), dim=-1).mean(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if q.ndim != 2 or k.ndim != 2 or q.shape[1] != self.dim or k.shape[1] != self.dim:
            raise ValueError(f"GEO expects q (Nq, {self.dim}) and k (Nk, {self.dim}), got {tuple(q.shape)} and {tuple(k.shape)}")
        return self.mix(q, self.attend(q, k, bias))
