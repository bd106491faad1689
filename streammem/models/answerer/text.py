"""The answerer's text side: a word vocabulary, and questions with their candidates as padded
id sequences.

Words are cut by ``WORD_RE`` (decimals, integers, lower-case words, ``? , '``) from the
lower-cased text. A decimal number is a *time* ("at about 37.2s"): it becomes the ``<time>``
word and its value is kept beside the ids. The vocabulary starts with ``SPECIALS``
(``<pad> <unk> <cls> <sep> <time>``, ids 0-4); unknown words map to ``<unk>``.

A question with C candidates is the sequence ``[CLS] question [SEP] candidate 1 [SEP] ...
candidate C [SEP]``; segment 0 is the question, segment c the c-th candidate.

Example:
    >>> v = Vocab.fit(["What colour is the cat?", "red", "blue"])
    >>> ids, times = v.encode("the cat at 2.5s")
    >>> [v.words[i] for i in ids], times[3]
    (['the', 'cat', '<unk>', '<time>', '<unk>'], 2.5)
    >>> b = encode_questions(v, ["What colour is the cat?"], [["red", "blue"]], [4.0])
    >>> b.ids.shape, b.cand_mask.shape, b.n_cand.tolist()
    (torch.Size([1, 12]), torch.Size([1, 5, 12]), [2])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

__all__ = ["LETTERS", "WORD_RE", "SPECIALS", "PAD", "UNK", "CLS", "SEP", "TIME", "Vocab", "EncodedBatch",
           "encode_questions"]

LETTERS = "ABCDEFGH"
WORD_RE = re.compile(r"\d+\.\d+|\d+|[a-z]+|[?,']")
SPECIALS = ["<pad>", "<unk>", "<cls>", "<sep>", "<time>"]
PAD, UNK, CLS, SEP, TIME = range(5)


class Vocab:
    """Word-level vocabulary over the question templates; decimals are ``<time>`` words."""

    def __init__(self, words: list[str]) -> None:
        if list(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"Vocab.words must start with {SPECIALS}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def fit(cls, texts: list[str], min_count: int = 1) -> "Vocab":
        counts: dict[str, int] = {}
        for t in texts:
            for w in WORD_RE.findall(t.lower()):
                if not _is_time(w):
                    counts[w] = counts.get(w, 0) + 1
        return cls(SPECIALS + sorted(w for w, c in counts.items() if c >= min_count))

    def encode(self, text: str) -> tuple[list[int], list[float]]:
        """Word ids and, per word, the stated time in seconds (NaN for other words)."""
        ids, times = [], []
        for w in WORD_RE.findall(text.lower()):
            if _is_time(w):
                ids.append(TIME)
                times.append(float(w))
            else:
                ids.append(self.index.get(w, UNK))
                times.append(float("nan"))
        return ids, times

    def unknown(self, text: str) -> list[str]:
        """The words of ``text`` (split at spaces, surrounding punctuation stripped) that hold a
        piece this vocabulary does not know, each once, in order; times are known.

        >>> Vocab.fit(["is there a cat at?"]).unknown("Is there an elephant, or a cat at 2.5?")
        ['an', 'elephant', 'or']
        """
        out: list[str] = []
        for raw in text.split():
            word = raw.strip(_PUNCT)
            if word not in out and any(w not in self.index and not _is_time(w) for w in WORD_RE.findall(word.lower())):
                out.append(word)
        return out

    def __len__(self) -> int:
        return len(self.words)


_PUNCT = ".,;:!?\"'()[]{}"


def _is_time(w: str) -> bool:
    return "." in w and w[0].isdigit()


@dataclass
class EncodedBatch:
    """Padded token sequences for B questions over one memory.

    ids, segment, (B, L) long; times (B, L) float (NaN where not a time); ref_time (B,);
    query_time (B,); cand_mask (B, C, L) bool: positions of candidate c; n_cand (B,).
    """

    ids: torch.Tensor
    segment: torch.Tensor
    times: torch.Tensor
    ref_time: torch.Tensor
    query_time: torch.Tensor
    cand_mask: torch.Tensor
    n_cand: torch.Tensor

    @property
    def pad_mask(self) -> torch.Tensor:
        return self.ids == PAD


def encode_questions(vocab: Vocab, questions: list[str], candidates: list[list[str]], query_times: list[float],
                     max_len: int = 96, max_cand: int = 5) -> EncodedBatch:
    """Build an :class:`EncodedBatch` (see :class:`SmallAnswerer` for the layout)."""
    if not questions:
        raise ValueError("encode_questions needs at least one question")
    seqs = []
    for q, cands, qt in zip(questions, candidates, query_times):
        if not 2 <= len(cands) <= max_cand:
            raise ValueError(f"a question needs 2..{max_cand} candidates, got {len(cands)}: {cands!r}")
        qi, qtimes = vocab.encode(q)
        ids, seg, tms = [CLS] + qi + [SEP], [0] * (len(qi) + 2), [math.nan] + qtimes + [math.nan]
        spans = []
        for c, cand in enumerate(cands):
            ci, ctimes = vocab.encode(cand)
            ci = ci or [UNK]
            ctimes = ctimes or [math.nan]
            spans.append((len(ids), len(ids) + len(ci)))
            ids += ci + [SEP]
            seg += [c + 1] * (len(ci) + 1)
            tms += ctimes + [math.nan]
        if len(ids) > max_len:
            raise ValueError(f"question and candidates are {len(ids)} words, over max_len={max_len}: {q!r}")
        stated = [t for t in qtimes if t == t]
        ref = stated[0] if stated else qt
        seqs.append((ids, seg, tms, spans, ref, qt))
    b, L = len(seqs), max(len(s[0]) for s in seqs)
    ids = torch.full((b, L), PAD, dtype=torch.long)
    seg = torch.zeros(b, L, dtype=torch.long)
    tms = torch.full((b, L), math.nan)
    cmask = torch.zeros(b, max_cand, L, dtype=torch.bool)
    n_cand = torch.zeros(b, dtype=torch.long)
    for i, (si, ss, st, spans, _, _) in enumerate(seqs):
        ids[i, : len(si)] = torch.tensor(si)
        seg[i, : len(ss)] = torch.tensor(ss)
        tms[i, : len(st)] = torch.tensor(st)
        for c, (a, e) in enumerate(spans):
            cmask[i, c, a:e] = True
        n_cand[i] = len(spans)
    return EncodedBatch(ids, seg, tms, torch.tensor([s[4] for s in seqs], dtype=torch.float64),
                        torch.tensor([s[5] for s in seqs], dtype=torch.float64), cmask, n_cand)
