"""``SmallAnswerer``: scores the candidates of multiple-choice questions over memory tokens.

It reads whatever a memory returns (``Tokens``: features ``(M, token_dim)``, timestamp, level,
grid position) and needs nothing else of the memory. The shipped checkpoint is trained on
StreamWorld questions over ``PyramidMemory`` reads (``streammem.train.answerer``).

Network (``d`` wide, pre-norm; B questions of L words, M memory tokens):

1. the sequence ``[CLS] question [SEP] candidate 1 [SEP] candidate 2 ...``
   (:func:`~streammem.models.answerer.text.encode_questions`) with word, position and segment
   (question / candidate k) embeddings; ``<time>`` words add an embedding of their age (query
   time - stated time);
2. ``layers`` blocks of self-attention over the sequence, then **time-biased cross-attention**
   to the memory, then an MLP. Memory tokens are ``LayerNorm(Linear(features) + level +
   grid-cell + age)`` embeddings. The attention logit of head h to a memory token is
   ``q.k / sqrt(d_h) - a_h * log(1 + |t_token - t_ref|)`` with ``a_h >= 0`` learned (initial
   slopes from ~0 to 8 over the heads) and ``t_ref`` the time the question names (or the query
   time if it names none): an ALiBi-style prior that lets heads look at "the moment asked
   about" or ignore time;
3. each candidate's positions are mean-pooled and scored by a linear layer; a softmax over
   the candidates gives the probabilities.

Grounding (``labels``): the frozen encoder's class and colour heads are copied into the
answerer (:meth:`SmallAnswerer.set_label_heads`), and their label names share one learned
embedding table with the words: a memory token adds ``sum_k p_k E[k]`` (its label
probabilities), a word that names label k adds ``E[k]``, so "star" in a question and a star in
memory start out pointing the same way. At each label word, :meth:`SmallAnswerer.grounded_readout`
adds what memory holds of that label. With ``signed_time``, ``event_head`` and ``calibrated``
(as the shipped checkpoint is built) it also tells evidence before the stated time from
evidence after it, and adds that evidence to the candidates' logits directly (see the
arguments of :class:`SmallAnswerer`). Answerers built without labels ignore all of this.

Refusals: the answerer scores whatever it is given (an unknown word reads as ``<unk>``), as
evaluations need; :meth:`SmallAnswerer.refusal` says which questions it cannot read, and
``StreamingQAPipeline`` asks it before answering.

Evidence: last-layer cross-attention weights of the chosen candidate's positions and of
``[CLS]``, averaged over heads and positions, summed per stored frame; the ``evidence_k``
heaviest frames are returned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streammem.models.answerer.cache import MemoryCache, _checksums, _run_keys, _run_starts
from streammem.models.answerer.features import (_EMPTY_LSE, _GROUND_V, _SIDE_GAP, _SIGNED_F, _SUPPORT_F,
                                                _MemoryView, _age_features, _log_dt, _support)
from streammem.models.answerer.refusal import Refusal
from streammem.models.answerer.text import LETTERS, PAD, SPECIALS, TIME, EncodedBatch, Vocab, encode_questions
from streammem.models.hub import SafeHubMixin
from streammem.types import Answer, Tokens

__all__ = ["SmallAnswerer"]

# StreamWorld questions given as examples in a refusal (those the answerer has every word of)
_EXAMPLES = (("Is there a cat in view now?", "yes / no"),
             ("Where in the frame is the red star now?", "top left / top right / bottom left / bottom right"))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        # time-prior slopes a_h = softplus(raw), from ~0 (time-blind) to 8 (sharply time-local)
        slopes = [1e-3] + [float(v) for v in torch.logspace(0, math.log10(8.0), heads - 1)] if heads > 1 else [2.0]
        self.time_slope = nn.Parameter(torch.tensor([math.log(math.expm1(v)) for v in slopes]))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        # cross-attention starts content-matching: query and key projections begin as the
        # identity, so a word and a memory token that share a component (the label embedding)
        # attend to each other from the first step instead of attending uniformly
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(d))
            self.q.bias.zero_()
            self.kv.weight[:d].copy_(torch.eye(d))
            self.kv.bias[:d].zero_()

    def forward(self, x: torch.Tensor, pad: torch.Tensor, mem: torch.Tensor | None, log_dt: torch.Tensor,
                keep: bool = False, kv: torch.Tensor | None = None):
        """``kv`` (``(M, 2d)``): ``self.kv(mem)`` already computed (see :class:`MemoryCache`).
        With ``keep``, also returns the cross-attention's ``(q, k, bias)`` (``(B, H, L, d_h)``,
        ``(H, M, d_h)``, ``(B, H, 1, M)``: the weights are ``softmax(q k^T / sqrt(d_h) + bias)``),
        else ``None``."""
        b, L, d = x.shape
        h = self.n1(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = self.n2(x)
        q = self.q(h).view(b, L, self.heads, self.dh).transpose(1, 2)  # B, H, L, dh
        kv = self.kv(mem) if kv is None else kv
        k, v = kv.view(kv.shape[0], 2, self.heads, self.dh).permute(1, 2, 0, 3)  # H, M, dh each
        bias = -F.softplus(self.time_slope).view(1, self.heads, 1, 1) * log_dt[:, None, None, :]  # B, H, 1, M
        # fused attention (PyTorch's CPU flash kernel): no (B, H, L, M) logits in memory
        att = F.scaled_dot_product_attention(q, k[None].expand(b, -1, -1, -1), v[None].expand(b, -1, -1, -1),
                                             attn_mask=bias)
        x = x + self.o(att.transpose(1, 2).reshape(b, L, d))
        x = x + self.mlp(self.n3(x))
        return x, ((q, k, bias) if keep else None)


def _attention_weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d_h) + bias)`` for the rows in ``q`` (see :meth:`_Block.forward`)."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias, -1)


class SmallAnswerer(nn.Module, SafeHubMixin):
    """Multiple-choice answerer over memory tokens (see the module docstring).

    Args:
        vocab: the words of :class:`Vocab` (specials first).
        token_dim: memory token width D (the encoder's).
        d: model width. heads: attention heads. layers: blocks.
        grid: side of the level-0 token grid (grid positions are in its units).
        levels: pyramid levels with their own embedding (others share the last).
        max_len: longest question + candidates sequence. max_cand: most candidates.
        encoder: optional name of the frame encoder checkpoint the answerer was trained with
            (informational; the pipeline loads it).
        labels / num_classes: the encoder's label space (see "Grounding").
        signed_time: add the signed-time grounded read-out (see :meth:`grounded_readout`).
        event_head: (with ``signed_time``) also add each candidate's signed-time evidence to its
            logit directly, weighted by a gate read from the question's ``[CLS]`` state (see
            :meth:`forward`), so "vanished" can learn to favour evidence that fell and
            "appeared" evidence that rose without routing it through the blocks.
        calibrated: (with ``event_head``) also scale the blocks' candidate logits by
            ``softplus(w . [CLS, support] + b)`` (1 at the start) before the event head adds its
            evidence (with an empty memory, which gives no evidence, nothing is scaled), and add
            ``U support`` to the gate, ``support`` being how far the memory's nearest frames
            before and after the stated time are
            (:func:`~streammem.models.answerer.features._support`), so a question can lean on the
            signed evidence rather than the blocks by how close to the stated time the memory
            keeps frames. Fitted with the gate, on worlds the answerer was not trained on, by
            :func:`streammem.train.event_gate.refit_event_gate`.
        memory_pool: the ``PyramidMemory`` pooling it was trained on (``"mean"`` or
            ``"salient"``); :class:`~streammem.pipelines.qa.StreamingQAPipeline` builds its
            pyramid with it.
    """

    def __init__(self, vocab: list[str], token_dim: int = 64, d: int = 128, heads: int = 4, layers: int = 2,
                 grid: int = 16, levels: int = 3, max_len: int = 96, max_cand: int = 5,
                 encoder: str | None = None, labels: list[str] | None = None, num_classes: int = 0,
                 signed_time: bool = False, memory_pool: str = "mean", event_head: bool = False,
                 calibrated: bool = False) -> None:
        super().__init__()
        if memory_pool not in ("mean", "salient"):
            raise ValueError(f"SmallAnswerer.memory_pool must be 'mean' or 'salient', got {memory_pool!r}")
        self.memory_pool = memory_pool
        if d % heads:
            raise ValueError(f"SmallAnswerer.d={d} must be divisible by heads={heads}")
        for name, val in (("token_dim", token_dim), ("d", d), ("heads", heads), ("layers", layers), ("grid", grid)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"SmallAnswerer.{name} must be an int >= 1, got {val!r}")
        self.vocab = Vocab(list(vocab))
        self.token_dim, self.d, self.grid, self.levels = token_dim, d, grid, levels
        self.max_len, self.max_cand, self.encoder = max_len, max_cand, encoder
        self.word = nn.Embedding(len(self.vocab), d, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, d)
        self.seg = nn.Embedding(max_cand + 1, d)
        self.time_word = nn.Linear(2 * 8 + 2, d)
        self.mem_in = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, d))
        self.mem_level = nn.Embedding(levels, d)
        self.mem_cell = nn.Linear(2 * 2 * 4, d)
        self.mem_age = nn.Linear(2 * 8 + 2, d)
        self.mem_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList([_Block(d, heads) for _ in range(layers)])
        self.out_norm = nn.LayerNorm(d)
        self.score = nn.Linear(d, 1)
        # shared label space (see "Grounding" in the module docstring)
        self.labels = list(labels) if labels else None
        self.num_classes = num_classes
        self.signed_time = bool(signed_time) and self.labels is not None
        if self.labels is not None:
            n = len(self.labels)
            if not 1 <= num_classes < n:
                raise ValueError(f"SmallAnswerer.num_classes must be in [1, {n - 1}] for {n} labels, got {num_classes}")
            self.label_emb = nn.Embedding(n + 1, d, padding_idx=n)  # row n: "not a label word"
            index = {w.lower(): i for i, w in enumerate(self.labels)}
            self.register_buffer("word_label", torch.tensor([index.get(w, n) for w in self.vocab.words]))
            # the frozen encoder's label heads (filled by set_label_heads, saved with the model)
            self.register_buffer("label_w", torch.zeros(n, token_dim))
            self.register_buffer("label_b", torch.zeros(n))
            # grounded read-out: two time scales (broad, local), learned slopes
            self.ground_slope = nn.Parameter(torch.tensor([math.log(math.expm1(0.3)), math.log(math.expm1(4.0))]))
            self.ground_out = nn.Linear(2 * (_GROUND_V + n + 1), d)
            nn.init.zeros_(self.ground_out.weight)
            nn.init.zeros_(self.ground_out.bias)
            if self.signed_time:
                # signed-time read-out: has-before/after, then per scale lse before, after, after - before
                self.ground_signed = nn.Linear(2 + 2 * 3, d)
                nn.init.zeros_(self.ground_signed.weight)
                nn.init.zeros_(self.ground_signed.bias)
        if event_head and not self.signed_time:
            raise ValueError("SmallAnswerer(event_head=True) needs signed_time=True and a label space")
        self.event_head = bool(event_head)
        if self.event_head:
            self.event_gate = nn.Linear(d, _SIGNED_F)  # [CLS] -> weights of the 8 signed features
            nn.init.zeros_(self.event_gate.weight)
            nn.init.zeros_(self.event_gate.bias)
        if calibrated and not self.event_head:
            raise ValueError("SmallAnswerer(calibrated=True) needs the event head (event_head=True)")
        self.calibrated = bool(calibrated)
        if self.calibrated:
            # [CLS] + the memory's support around the stated time (see _support) -> softplus
            # scale of the blocks' candidate logits (starts at exactly 1), and a support term of
            # the gate (starts at 0); how each weighs the support is learned
            self.base_scale = nn.Linear(d + _SUPPORT_F, 1)
            nn.init.zeros_(self.base_scale.weight)
            nn.init.constant_(self.base_scale.bias, math.log(math.expm1(1.0)))
            self.support_gate = nn.Linear(_SUPPORT_F, _SIGNED_F, bias=False)
            nn.init.zeros_(self.support_gate.weight)

    # ------------------------------------------------------------------ pieces
    def set_label_heads(self, encoder) -> "SmallAnswerer":
        """Copy a :class:`~streammem.models.grid_encoder.GridEncoder`'s class and colour heads
        (class 0 is background) into this answerer's label space."""
        if self.labels is None:
            raise ValueError("this SmallAnswerer was built without labels")
        w = torch.cat([encoder.cls_head.weight, encoder.colour_head.weight]).detach()
        b = torch.cat([encoder.cls_head.bias, encoder.colour_head.bias]).detach()
        if w.shape != self.label_w.shape:
            raise ValueError(f"encoder heads are {tuple(w.shape)}; this answerer's labels need {tuple(self.label_w.shape)}")
        self.label_w.copy_(w)
        self.label_b.copy_(b)
        return self

    def label_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """``(M, token_dim)`` -> ``(M, labels)``: class probabilities (background first), then
        colour probabilities scaled by the probability of an object."""
        z = feats @ self.label_w.t() + self.label_b
        c = self.num_classes
        pc = torch.softmax(z[:, :c], -1)
        pk = torch.softmax(z[:, c:], -1) * (1 - pc[:, :1])
        return torch.cat([pc, pk], -1)

    def _cell_features(self, grid: torch.Tensor) -> torch.Tensor:
        cell = grid.float() / self.grid * 2 * math.pi  # (M, 2) in one period over the grid
        return torch.cat([torch.sin(cell * k) for k in (1, 2, 4, 8)] + [torch.cos(cell * k) for k in (1, 2, 4, 8)], -1)

    def _features(self, memory: Tokens) -> torch.Tensor:
        """``memory``'s features as float, checked against the width this answerer reads."""
        feats = memory.features.float()
        if feats.shape[1] != self.token_dim:
            raise ValueError(f"memory tokens are {feats.shape[1]} wide; this answerer reads {self.token_dim}")
        return feats

    def _base_encoding(self, feats: torch.Tensor, level: torch.Tensor, cell_f: torch.Tensor) -> torch.Tensor:
        """``(M, d)``: the features, level and grid-cell parts of a memory token's encoding."""
        return self.mem_in(feats) + self.mem_level(level.clamp(0, self.levels - 1)) + self.mem_cell(cell_f)

    def _view(self, memory: Tokens, query_time: float) -> _MemoryView:
        """What every part of a read needs of ``memory``, computed once per read."""
        feats = self._features(memory)
        level = memory.level.long() if memory.level is not None else torch.zeros(len(memory), dtype=torch.long)
        age = (query_time - memory.timestamp.double()).float()
        probs = self.label_probs(feats) if self.labels is not None else None
        return _MemoryView(feats, level, self._cell_features(memory.grid), _age_features(age), probs)

    def new_cache(self, min_tokens: int = 2048, min_run: int = 16) -> MemoryCache:
        """An empty :class:`MemoryCache` for one stream (pass it to :meth:`answer_many`)."""
        return MemoryCache(min_tokens, min_run)

    def _static_rows(self, feats: torch.Tensor, level: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        """Per token, what :class:`MemoryCache` keeps: ``[features | grid | cell features |
        label probs | static encoding - its mean]``, then ``W' (static - mean)`` per block."""
        cell_f = self._cell_features(grid)
        xs = self._base_encoding(feats, level, cell_f)
        if self.labels is not None:
            probs = self.label_probs(feats)
            xs = xs + probs @ self.label_emb.weight[:-1]
        else:
            probs = feats.new_zeros(len(feats), 0)
        xs = xs - xs.mean(-1, keepdim=True)
        proj = [xs @ (blk.kv.weight * self.mem_norm.weight).t() for blk in self.blocks]
        return [torch.cat([feats, grid.float(), cell_f, probs, xs], 1), *proj]

    @torch.no_grad()
    def _cached_read(self, memory: Tokens, query_time: float,
                     cache: MemoryCache) -> tuple[Tokens, torch.Tensor, _MemoryView, list[torch.Tensor]] | None:
        """``memory`` in the cache's slot order, the slot row of each of ``memory``'s tokens,
        the view and each block's ``kv(encode_memory(...))``, from ``cache`` plus the frames it
        lacks (see :class:`MemoryCache`); ``None`` for a read the cache skips (under
        ``cache.min_tokens`` tokens, or runs shorter than ``cache.min_run`` on average). The
        returned tensors are views of the cache, valid until its next read."""
        if len(memory) < cache.min_tokens:
            return None  # small reads: re-encoding them costs what the bookkeeping would
        feats = self._features(memory)
        level, ts, grid = memory.level.long(), memory.timestamp.double(), memory.grid.float()
        starts, counts = _run_starts(memory)  # one slot range per run
        if len(starts) * cache.min_run > len(memory):
            return None  # many short runs (DualMemory's merged slots): the bookkeeping costs more than it saves
        keys, lengths = _run_keys(memory, starts, counts), counts.tolist()
        sums = _checksums(feats, grid, starts, counts)
        if cache._model != id(self):
            cache.clear()
            cache._model = id(self)
        firsts, missing = cache._place(keys, lengths, sums)
        if missing:
            try:
                n = counts[missing]
                within = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
                sel = torch.repeat_interleave(starts[missing], n) + within  # the read's rows of the new runs
                dest = torch.repeat_interleave(torch.tensor([firsts[i] for i in missing]), n) + within  # their slots
                parts = self._static_rows(feats[sel], level[sel], grid[sel])
                cache._ensure([p.shape[1] for p in parts])
                for table, p in zip(cache._tables, parts):
                    table.index_copy_(0, dest, p)
                for table, v in ((cache._level, level), (cache._fi, memory.frame_index), (cache._ts, ts)):
                    table.index_copy_(0, dest, v[sel])
            except BaseException:  # the slots are booked but not written: forget everything
                cache.clear()
                raise
        top = cache._top
        tables = [t[:top] for t in cache._tables]
        meta, d0 = tables[0], self.token_dim
        slot_mem = Tokens(features=meta[:, :d0], frame_index=cache._fi[:top], timestamp=cache._ts[:top],
                          grid=meta[:, d0:d0 + 2], level=cache._level[:top])
        # per question: one age vector per run, the LayerNorm statistics, the expansion
        order = sorted(range(len(keys)), key=firsts.__getitem__)
        inv = torch.repeat_interleave(torch.tensor(order), counts[order])  # slot row -> run
        age_f = _age_features((query_time - ts[starts]).float())
        age = self.mem_age(age_f)
        age = age - age.mean(-1, keepdim=True)  # static and age are centred apart: their sum is centred
        o = d0 + 2
        n = len(self.labels) if self.labels is not None else 0
        cell_f, probs = meta[:, o:o + 16], (meta[:, o + 16:o + 16 + n] if self.labels is not None else None)
        y = torch.index_select(age, 0, inv, out=cache._work("y", (top, self.d)))
        y.add_(meta[:, o + 16 + n:])
        rs = torch.rsqrt(y.square_().mean(-1, keepdim=True) + self.mem_norm.eps)
        kvs = []
        for blk, proj in zip(self.blocks, tables[1:]):
            w = blk.kv.weight * self.mem_norm.weight
            kv = torch.index_select(age @ w.t(), 0, inv, out=cache._work(f"kv{len(kvs)}", (top, 2 * self.d)))
            kvs.append(kv.add_(proj).mul_(rs).add_(blk.kv.weight @ self.mem_norm.bias + blk.kv.bias))
        view = _MemoryView(meta[:, :d0], cache._level[:top], cell_f, age_f.index_select(0, inv), probs)
        to_slot = torch.repeat_interleave(torch.tensor(firsts) - starts, counts) + torch.arange(len(memory))
        return slot_mem, to_slot, view, kvs

    def grounded_readout(self, memory: Tokens, batch: "EncodedBatch", view: _MemoryView | None = None,
                         log_dt: torch.Tensor | None = None, signed_out: list | None = None) -> torch.Tensor:
        """``(B, L, d)``: at each word naming a label, what memory holds of that label (zero at
        other words).

        The word's target is its label (a class word preceded by a colour word targets the
        conjunction: "the red star"); memory token i scores ``log p_i(target)`` (from the
        encoder's heads) minus a time prior ``a * log(1 + |t_i - t_ref|)`` at two learned
        scales. The read-out is the softmax-weighted mean of the tokens' grid cell, age, level
        and label probabilities, plus the log-sum-exp of the scores (how much evidence there
        is), through a linear layer that starts at zero. Only label words are computed.

        Signed time (``signed_time=True``, as the shipped answerer is built): the
        same log-sum-exp is also taken over the tokens before ``t_ref`` and over those after
        it, with their difference. "What colour did it become", "which object
        vanished / appeared at about 62.4s" ask whether a target is more present after the
        stated moment than before it, which the symmetric time prior cannot tell. A candidate
        that is a bare colour word ("green") targets the conjunction with the class the
        question names ("the purple triangle changed colour").

        ``view`` / ``log_dt`` (``(B, M)``) are what :meth:`forward` already computed. With
        ``signed_out`` (a list) and ``signed_time``, the raw signed features ``(B, L, 8)``
        (zero at other words) are appended to it.
        """
        n, c = len(self.labels), self.num_classes
        b, L = batch.ids.shape
        out = torch.zeros(b, L, self.d)
        lab = self.word_label[batch.ids]  # B, L
        bi, li = torch.nonzero(lab < n, as_tuple=True)
        if len(bi) == 0:
            if signed_out is not None and self.signed_time:
                signed_out.append(torch.zeros(b, L, _SIGNED_F))
            return out
        view = view or self._view(memory, float(batch.query_time[0]))
        if log_dt is None:
            log_dt = _log_dt(memory, batch)
        logp = torch.log(view.probs.clamp(min=1e-4))  # M, n
        logp = torch.cat([logp, torch.zeros(len(memory), 1)], 1).t()  # n + 1, M (row n: not a label)
        prev = torch.cat([torch.full_like(lab[:, :1], n), lab[:, :-1]], 1)
        is_cls = (lab >= 1) & (lab < c)
        conj = torch.where(is_cls & (prev >= c) & (prev < n), prev, torch.full_like(prev, n))
        if self.signed_time:  # a bare colour candidate ("green") targets the class its question names
            nxt = torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], n)], 1)
            pos = torch.arange(L)[None].expand(b, L)
            last = torch.where((batch.segment == 0) & is_cls, pos, torch.full_like(pos, -1)).max(1).values  # B
            q_cls = torch.where(last >= 0, lab.gather(1, last.clamp(min=0)[:, None])[:, 0], torch.full_like(last, n))
            bare = (batch.segment > 0) & (lab >= c) & (lab < n) & ~((nxt >= 1) & (nxt < c))
            conj = torch.where(bare, q_cls[:, None].expand(b, L), conj)
        score = logp[lab[bi, li]] + logp[conj[bi, li]]  # P, M
        v = torch.cat([view.cell_f, view.age_f, F.one_hot(view.level.clamp(0, 2), 3).float(),
                       torch.exp(logp[:n].t())], -1)  # M, V
        dt = log_dt[bi]  # P, M
        if self.signed_time:
            side = memory.timestamp.double()[None, :] - batch.ref_time[bi][:, None]  # P, M
            before, after = side < -_SIDE_GAP, side > _SIDE_GAP
            signed = [torch.stack([before.any(-1), after.any(-1)], -1).float()]  # has tokens before / after
        outs = []
        for a in F.softplus(self.ground_slope):
            z = score - a * dt
            lse = torch.logsumexp(z, -1, keepdim=True)
            outs += [torch.softmax(z, -1) @ v, (lse - math.log(len(memory))) / 5.0]
            if self.signed_time:
                lb = torch.logsumexp(z.masked_fill(~before, -1e4), -1).clamp(min=_EMPTY_LSE)
                la = torch.logsumexp(z.masked_fill(~after, -1e4), -1).clamp(min=_EMPTY_LSE)
                signed.append(torch.stack([lb, la, la - lb], -1) / 5.0)
        res = self.ground_out(torch.cat(outs, -1))
        if self.signed_time:
            sig = torch.cat(signed, -1)
            res = res + self.ground_signed(sig)
            if signed_out is not None:
                full = torch.zeros(b, L, _SIGNED_F)
                full[bi, li] = sig
                signed_out.append(full)
        out[bi, li] = res
        return out

    def encode_memory(self, memory: Tokens, query_time: float, view: _MemoryView | None = None) -> torch.Tensor:
        """Memory tokens -> ``(M, d)`` (features + level + grid cell + age [+ labels])."""
        view = view or self._view(memory, query_time)
        x = self._base_encoding(view.feats, view.level, view.cell_f) + self.mem_age(view.age_f)
        if view.probs is not None:
            x = x + view.probs @ self.label_emb.weight[:-1]
        return self.mem_norm(x)

    def _forward(self, memory: Tokens, batch: EncodedBatch, cache: MemoryCache | None = None, keep: bool = False,
                 event_parts: list | None = None):
        """:meth:`forward`'s logits, and with ``keep`` the last block's ``(q, k, bias)`` plus the
        memory in the order ``k`` has it and, if that is the cache's slot order, the slot row of
        each of the read's tokens (else ``None``). With ``event_parts`` (a list) and the event
        head and a memory that is not empty, what the head's gate reads is appended to it: the
        blocks' logits ``(B, C)`` (before the ``calibrated`` scale and the head), the ``[CLS]``
        states ``(B, d)``, each candidate's signed features ``(B, C, 8)`` and the memory's
        support ``(B, 2)`` (:func:`~streammem.models.answerer.features._support`; see
        :func:`streammem.train.event_gate.fit_event_gate`)."""
        b, L = batch.ids.shape
        if L > self.max_len:
            raise ValueError(f"sequence of {L} words is over max_len={self.max_len}")
        qt = float(batch.query_time[0])
        x = self.word(batch.ids) + self.pos(torch.arange(L))[None] + self.seg(batch.segment)
        if self.labels is not None:
            x = x + self.label_emb(self.word_label[batch.ids])
        is_time = batch.ids == TIME
        if is_time.any():
            age = (batch.query_time[:, None] - torch.nan_to_num(batch.times.double(), nan=0.0)).float()
            x = x + self.time_word(_age_features(age)) * is_time[..., None]
        signed: list = []
        kvs: list | None = None
        mem = to_slot = None
        if len(memory) == 0:
            mem = torch.zeros(1, self.d)
            log_dt = torch.zeros(b, 1)
        else:
            got = self._cached_read(memory, qt, cache) if cache is not None else None
            if got is not None:
                memory, to_slot, view, kvs = got
            else:
                view = self._view(memory, qt)
            log_dt = _log_dt(memory, batch)
            if view.probs is not None:
                x = x + self.grounded_readout(memory, batch, view, log_dt, signed if self.event_head else None)
            if kvs is None:
                mem = self.encode_memory(memory, qt, view)
        kept = None
        for i, blk in enumerate(self.blocks):
            x, k = blk(x, batch.pad_mask, mem, log_dt, keep and i == len(self.blocks) - 1,
                       kv=None if kvs is None else kvs[i])
            kept = (*k, memory, to_slot) if k is not None else kept
        x = self.out_norm(x)
        cm = batch.cand_mask.float()  # B, C, L
        pooled = torch.einsum("bcl,bld->bcd", cm, x) / cm.sum(-1, keepdim=True).clamp(min=1)
        logits = self.score(pooled)[..., 0]
        if self.event_head and signed:  # (signed is filled whenever the memory is not empty)
            cls = x[:, 0]
            feats = self._event_features(signed[0], batch)
            need = self.calibrated or event_parts is not None
            sup = _support(memory.timestamp, batch.ref_time) if need else None
            if event_parts is not None:
                event_parts.append((logits, cls, feats, sup))
            logits = self._event_logits(logits, cls, feats, sup)
        valid = torch.arange(self.max_cand)[None] < batch.n_cand[:, None]
        logits = logits.masked_fill(~valid, float("-inf"))
        return logits, kept

    def forward(self, memory: Tokens, batch: EncodedBatch, want_weights: bool = False,
                cache: MemoryCache | None = None):
        """Candidate logits ``(B, max_cand)`` (``-inf`` past each question's candidates) for B
        questions asked at one query time over ``memory``; with ``want_weights`` also the last
        block's cross-attention ``(B, H, L, M)``. With ``cache`` (inference only: it holds
        no gradients), what does not depend on the query time is reused from earlier reads of
        the same stream (:class:`MemoryCache`)."""
        logits, kept = self._forward(memory, batch, cache, keep=want_weights)
        if not want_weights:
            return logits
        q, k, bias, _, to_slot = kept
        w = _attention_weights(q, k, bias)
        return logits, (w if to_slot is None else w[..., to_slot])  # in the read's token order

    def _event_logits(self, base: torch.Tensor, cls: torch.Tensor, feats: torch.Tensor,
                      sup: torch.Tensor | None) -> torch.Tensor:
        """The event head on top of the blocks' logits ``base (B, C)`` (finite): for a
        ``calibrated`` answerer ``base`` times ``softplus(w . [CLS, sup] + b)``, plus each
        candidate's signed features ``feats (B, C, 8)`` dotted with the gate ``event_gate(cls)``
        (+ ``support_gate(sup)`` when calibrated). The one place this sum is written:
        :func:`streammem.train.event_gate.fit_event_gate` fits through it."""
        gate = self.event_gate(cls)
        if self.calibrated:
            base = base * F.softplus(self.base_scale(torch.cat([cls, sup], 1)))
            gate = gate + self.support_gate(sup)
        return base + (feats * gate[:, None, :]).sum(-1)

    def _event_features(self, signed: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
        """``(B, C, 8)``: each candidate's signed-time evidence, at its last label word (its class
        word, or a bare colour; zero for a candidate without one). The event head adds it to the
        candidate's logit dotted with the gate the question's ``[CLS]`` state sets (plus, for a
        ``calibrated`` answerer, the gate's support term)."""
        is_label = self.word_label[batch.ids] < len(self.labels)  # B, L
        pos = torch.arange(batch.ids.shape[1])
        at = torch.where(batch.cand_mask & is_label[:, None, :], pos, -1).max(-1).values  # B, C
        feats = signed.gather(1, at.clamp(min=0)[..., None].expand(-1, -1, signed.shape[-1]))  # B, C, F
        return feats * (at >= 0)[..., None]

    # ------------------------------------------------------------------ inference
    def refusal(self, question: str, candidates=()) -> Refusal | None:
        """A ``"vocabulary"`` :class:`~streammem.models.answerer.refusal.Refusal` when
        ``question`` or one of ``candidates`` has words outside this answerer's vocabulary (times
        such as "37.2" are always read), else None. Its reason names the words, what the
        answerer knows (StreamWorld's classes and colours, from its labels), an example question
        of StreamWorld's kind, and the models for real footage."""
        words = self.vocab.unknown(" ".join([question, *candidates]))
        if not words:
            return None
        named = ", ".join(f'"{w}"' for w in words)
        knows = f"the {len(self.vocab) - len(SPECIALS)} words of StreamWorld's questions"
        if self.labels is not None:
            classes, colours = ([w for w in ws if w in self.vocab.index]
                                for ws in (self.labels[1:self.num_classes], self.labels[self.num_classes:]))
            knows += f" (its {len(classes)} object classes {', '.join(classes)}; its colours {', '.join(colours)})"
        examples = [f'"{q}" ({opts})' for q, opts in _EXAMPLES if not self.vocab.unknown(f"{q} {opts}")]
        ask = f" It can answer, for example, {' or '.join(examples)}." if examples else ""
        reason = (f"the answerer does not know the word{'s' if len(words) > 1 else ''} {named}: it was trained "
                  f"only on StreamWorld and knows {knows}.{ask} For real footage use a vision-language model: "
                  "streammem ask --answerer hf:<model id or folder> (e.g. hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct).")
        return Refusal("vocabulary", reason, unknown_words=tuple(words))

    @torch.no_grad()
    def answer_many(self, memory: Tokens, questions: list[str], candidates: list[list[str]], query_time: float,
                    evidence_k: int = 5, cache: MemoryCache | None = None) -> list[Answer]:
        """Answer several questions asked at the same ``query_time`` over ``memory``.

        Every question is answered: unknown words read as ``<unk>`` (see :meth:`refusal`).
        ``cache``: this stream's :class:`MemoryCache` (:meth:`new_cache`), so a question only
        encodes the frames stored since the last one (``StreamingQAPipeline`` keeps one)."""
        # chunk the questions so a batch's attention work stays bounded (~32M query-token pairs)
        per_q = self.max_len * len(self.blocks[0].time_slope) * max(len(memory), 1)
        chunk = max(1, 32_000_000 // per_q)
        if len(questions) > chunk:
            out: list[Answer] = []
            for i in range(0, len(questions), chunk):
                out += self.answer_many(memory, questions[i:i + chunk], candidates[i:i + chunk], query_time,
                                        evidence_k, cache)
            return out
        batch = encode_questions(self.vocab, questions, candidates, [query_time] * len(questions),
                                 self.max_len, self.max_cand)
        logits, kept = self._forward(memory, batch, cache, keep=evidence_k > 0)
        probs = torch.softmax(logits, -1)
        out = []
        for i, cands in enumerate(candidates):
            p = probs[i, : len(cands)]
            j = int(p.argmax())
            ev = []
            if len(memory) and kept is not None:
                pos = batch.cand_mask[i, j].clone()
                pos[0] = True  # [CLS]
                q, k, bias, memory, _ = kept  # the memory in k's order
                tok_w = _attention_weights(q[i][:, pos], k, bias[i]).mean((0, 1))  # (M,)
                fids, inv = torch.unique(memory.frame_index, return_inverse=True)
                per = torch.zeros(len(fids)).index_add_(0, inv, tok_w)
                top = torch.argsort(per, descending=True)[:evidence_k]
                for t in top.tolist():
                    sel = inv == t
                    first = int(torch.nonzero(sel)[0])
                    ev.append({"frame_index": int(fids[t]), "timestamp": float(memory.timestamp[first]),
                               "weight": round(float(per[t]), 4),
                               "level": int(memory.level[sel].min())})  # the finest level holding it
            out.append(Answer(index=j, letter=LETTERS[j], text=cands[j], confidence=float(p[j]),
                              probs=[float(v) for v in p], evidence=ev, query_time=float(query_time)))
        return out

    def answer(self, memory: Tokens, question: str, candidates: list[str], query_time: float,
               cache: MemoryCache | None = None) -> Answer:
        """One question (see :meth:`answer_many`)."""
        return self.answer_many(memory, [question], [list(candidates)], query_time, cache=cache)[0]
