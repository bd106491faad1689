"""CachePress: the memory presses of :mod:`streammem.memory.presses` applied to a VLM's key-value cache.

As kvpress does for language models, a VLM answerer with a press (``LlavaAnswerer.press``,
``--press NAME`` on the command line) answers in two passes:

1. **prefill** the prompt up to the question (prefix text, every stored frame's marker and
   memory tokens) with ``use_cache=True``;
2. **compress** each layer's cache: the entries of the memory-token positions become
   :class:`~streammem.types.Tokens` (keys of all KV heads concatenated: ``(M, kv_heads * head_dim)``;
   values likewise) and go through the press; the text entries (prefix, frame markers) are kept;
3. **decode** the question (and, for a free-form answer, the generated tokens) over the
   compressed cache. The question keeps the positions it had in the uncompressed prompt
   (``position_ids`` continue from the prefix length), as kvpress keeps them.

Budgets: ``ratio`` is the fraction of memory tokens kept, ``n_keep(M) = max(1, round(ratio * M))``,
the same number in every layer:

- ``sink_window``: the first ``min(n_sink, n_keep)`` and the last ``n_keep - n_sink`` memory
  tokens (StreamingLLM);
- ``h2o``: ``n_keep // 2`` most recent plus the heaviest others by *observed* attention: the
  attention each memory entry received from the prefill's queries, summed over heads and
  queries (kvpress ``ObservedAttentionPress``); the prefill runs with eager attention for it;
- ``kvmerger``: the ``M - n_keep`` most similar adjacent key pairs are merged
  (``KVMergerPress(keep=n_keep)``: the threshold that meets the budget); the pivot of a run is
  its entry with the most observed attention; a merged entry sits at its pivot's position;
- ``mikv``: H2O's choice of ``n_keep`` entries stays exact, the others are kept, round-tripped
  through ``bits``-bit per-token quantization (all ``M`` entries stay; ``kept`` counts the
  exact ones).

Departures: scores and merges are per layer over the concatenated heads (kvpress scores each
head); keys are not re-rotated (as kvpress's default).

Example:
    >>> p = CachePress("sink_window", ratio=0.25)
    >>> p.n_keep(832), p.build(832)
    (208, SinkWindowPress(n_sink=4, window=204))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammem.memory.presses import PRESSES, H2OPress, KVMergerPress, MiKVPress, Press, SinkWindowPress
from streammem.types import Tokens

__all__ = ["CachePress", "PRESS_NAMES"]

#: the presses a VLM cache can take (``--press``)
PRESS_NAMES = tuple(sorted(PRESSES))


@dataclass
class CachePress:
    """A named press over the memory-prefix cache, keeping ``ratio`` of the memory entries.

    Attributes:
        name: ``sink_window``, ``h2o``, ``kvmerger`` or ``mikv``.
        ratio: fraction of memory entries kept (at full precision for ``mikv``), in (0, 1].
        n_sink: attention-sink entries kept by ``sink_window`` (StreamingLLM's 4).
        bits: ``mikv``'s precision for the entries it does not keep exact.
    """

    name: str
    ratio: float = 0.5
    n_sink: int = 4
    bits: int = 4

    def __post_init__(self) -> None:
        if self.name not in PRESSES:
            raise ValueError(f"unknown press {self.name!r}; choose one of {', '.join(PRESS_NAMES)}")
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"press ratio must be in (0, 1], got {self.ratio!r}")
        if not (isinstance(self.n_sink, int) and self.n_sink >= 0):
            raise ValueError(f"CachePress.n_sink must be an int >= 0, got {self.n_sink!r}")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ValueError(f"CachePress.bits must be an int in [2, 8], got {self.bits!r}")

    @property
    def needs_scores(self) -> bool:
        """Whether the press reads observed attention (the prefill then runs eagerly)."""
        return self.name != "sink_window"

    def n_keep(self, m: int) -> int:
        """Memory entries kept (exact) out of ``m``."""
        return min(m, max(1, round(self.ratio * m)))

    def build(self, m: int) -> Press:
        """The :mod:`streammem.memory.presses` press for ``m`` memory entries."""
        k = self.n_keep(m)
        if self.name == "sink_window":
            sink = min(self.n_sink, k)
            return SinkWindowPress(n_sink=sink, window=k - sink)
        if self.name == "kvmerger":
            return KVMergerPress(keep=k)
        h2o = H2OPress(budget=k, recent=k // 2)
        return h2o if self.name == "h2o" else MiKVPress(inner=h2o, bits=self.bits)

    @torch.no_grad()
    def compress_layer(self, keys: torch.Tensor, values: torch.Tensor, memory_positions: torch.Tensor,
                       score: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compress one layer's cache.

        Args:
            keys, values: ``(1, kv_heads, P, head_dim)`` cache of the ``P`` prefill positions.
            memory_positions: ``(M,)`` positions of the memory tokens (ascending).
            score: ``(P,)`` observed attention per position, or None (needed unless ``sink_window``).

        Returns:
            ``(keys, values, positions)``: the compressed ``(1, kv_heads, P', head_dim)`` cache and
            the ``(P',)`` prompt position each entry stands for (ascending).
        """
        _, h, p, d = keys.shape
        mem = memory_positions.to(keys.device)
        m = len(mem)
        if self.needs_scores and score is None:
            raise ValueError(f"the {self.name} press needs the observed attention of the prefill")
        flat_k = keys[0, :, mem].permute(1, 0, 2).reshape(m, h * d)
        flat_v = values[0, :, mem].permute(1, 0, 2).reshape(m, h * d)
        zeros = torch.zeros(m, dtype=torch.int64)
        toks = Tokens(features=flat_k.cpu(), frame_index=zeros, timestamp=zeros.float(),
                      grid=torch.zeros(m, 2), level=zeros,
                      score=None if score is None else score[memory_positions].float().cpu(),
                      extras={"pos": memory_positions.cpu()})
        out, v = self.build(m).compress(toks, flat_v.cpu())
        text = torch.ones(p, dtype=torch.bool)
        text[memory_positions] = False
        text_pos = text.nonzero().flatten()
        positions = torch.cat([text_pos, out.extras["pos"]])
        order = torch.argsort(positions)
        dev = keys.device
        new_k = torch.cat([keys[0, :, text_pos.to(dev)],
                           out.features.to(dev, keys.dtype).reshape(-1, h, d).permute(1, 0, 2)], 1)[:, order.to(dev)]
        new_v = torch.cat([values[0, :, text_pos.to(dev)],
                           v.to(dev, values.dtype).reshape(-1, h, d).permute(1, 0, 2)], 1)[:, order.to(dev)]
        return new_k[None].contiguous(), new_v[None].contiguous(), positions[order]

    def kept(self, m: int) -> int:
        """Memory entries held at full precision after compression (``n_keep``)."""
        return self.n_keep(m)
