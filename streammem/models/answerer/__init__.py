"""The shipped small QA answerer: multiple-choice questions over memory tokens with timestamps.

- :mod:`~streammem.models.answerer.text`: :class:`Vocab`, :func:`encode_questions` and
  :class:`EncodedBatch` (questions and candidates as padded id sequences; decimals are times);
- :mod:`~streammem.models.answerer.features`: what is computed per read of a memory's tokens
  (age and grid-cell encodings, the time prior's distance, the support around a stated time);
- :mod:`~streammem.models.answerer.cache`: :class:`MemoryCache`, what the answerer keeps of
  one stream's memory between questions;
- :mod:`~streammem.models.answerer.model`: :class:`SmallAnswerer`, the network (its module
  docstring states the architecture);
- :mod:`~streammem.models.answerer.refusal`: :class:`Refusal` (no answer, and why),
  :class:`QuestionRefused` and :func:`is_yes_no` (which questions need no options).

Example:
    >>> import torch
    >>> from streammem.types import Tokens
    >>> vocab = Vocab.fit(["What colour is the cat?", "red", "blue"])
    >>> m = SmallAnswerer(vocab=vocab.words, token_dim=8, d=16, heads=2, layers=1).eval()
    >>> mem = Tokens.cat([Tokens.from_grid(torch.randn(2, 2, 8), i, i / 8) for i in range(3)])
    >>> a = m.answer(mem, "What colour is the cat?", ["red", "blue"], query_time=0.25)
    >>> a.letter in ("A", "B"), round(sum(a.probs), 5)
    (True, 1.0)
"""

from streammem.models.answerer.cache import MemoryCache
from streammem.models.answerer.features import _NO_FRAME_S, _support  # noqa: F401  (tests read them here)
from streammem.models.answerer.model import SmallAnswerer
from streammem.models.answerer.refusal import KINDS, YES_NO_STARTS, QuestionRefused, Refusal, is_yes_no
from streammem.models.answerer.text import (CLS, LETTERS, PAD, SEP, SPECIALS, TIME, UNK, WORD_RE, EncodedBatch,
                                            Vocab, encode_questions)

__all__ = ["Vocab", "SmallAnswerer", "EncodedBatch", "encode_questions", "LETTERS", "MemoryCache", "WORD_RE",
           "SPECIALS", "PAD", "UNK", "CLS", "SEP", "TIME", "Refusal", "QuestionRefused", "KINDS", "YES_NO_STARTS",
           "is_yes_no"]
