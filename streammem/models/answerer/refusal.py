"""Refusals: what a QA answerer gives instead of an answer it cannot honestly give.

A :class:`Refusal` stands where an :class:`~streammem.types.Answer` would: it says why there is
no answer (``kind`` and ``reason``) and carries no evidence. ``kind`` is one of :data:`KINDS`:

- ``"vocabulary"``: the question or an option has words the answerer does not know
  (:meth:`SmallAnswerer.refusal <streammem.models.answerer.SmallAnswerer.refusal>`; the words
  are in ``unknown_words``);
- ``"options"``: a question that is not a yes/no question was asked without options
  (:func:`is_yes_no`);
- ``"time"``: the question's time is outside the stream (before 0 s, or after the last frame
  of a stream that ended);
- ``"no_memory"``: no frame was in memory at the question's time;
- ``"error"``: the answerer raised on the question (the reason names the exception): the
  stream's records keep the question with this refusal, and its future raises the exception.

Where each one comes out (:class:`~streammem.pipelines.qa.StreamingQAPipeline`): the refusals
that are known before any frame is read (vocabulary, options, a negative time) are bad input:
``schedule`` and ``ask`` raise :class:`QuestionRefused` (a ``ValueError`` holding the
``Refusal``). The ones that depend on the stream (no frame in memory, a time the stream never
reached) come back as a ``Refusal`` result: a scheduled question's future resolves with it and
``ask`` returns it.

Yes/no questions (:func:`is_yes_no`): a question whose first word is one of
:data:`YES_NO_STARTS` (is, are, was, were, has, have, had, do, does, did, can, could, will,
would) and that has no "or" in it: "Is there a cat in view now?", "Has a red star been in view
at any time so far?". Every other question needs its options: wh-questions ("Which object
vanished?", "What colour is the van?", "How many ...", "Where ...") and alternatives ("Is the
cat to the left or to the right of the cup?").

Example:
    >>> is_yes_no("Is there a cat in view now?"), is_yes_no("Which object vanished?")
    (True, False)
    >>> is_yes_no("Is the cup to the left or to the right of the cat?")
    False
    >>> r = Refusal("time", "asked at -1.00 s, before the stream starts (at 0 s)", query_time=-1.0)
    >>> r.refused, r.to_dict()["evidence"]
    (True, [])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from streammem.models.answerer.text import WORD_RE

__all__ = ["Refusal", "QuestionRefused", "KINDS", "YES_NO_STARTS", "is_yes_no"]

#: why a question was refused (see the module docstring)
KINDS = ("vocabulary", "options", "time", "no_memory", "error")
#: the first words of a yes/no question (which must also have no "or")
YES_NO_STARTS = ("is", "are", "was", "were", "has", "have", "had", "do", "does", "did", "can", "could", "will",
                 "would")


def is_yes_no(question: str) -> bool:
    """Whether ``question`` is answered by yes or no without options being given: its first word
    is in :data:`YES_NO_STARTS` and it has no "or" (an alternative question names its options)."""
    words = WORD_RE.findall(question.lower())
    return bool(words) and words[0] in YES_NO_STARTS and "or" not in words


@dataclass(frozen=True)
class Refusal:
    """No answer, and why (see the module docstring).

    Attributes:
        kind: one of :data:`KINDS`.
        reason: one sentence for the user, naming what was wrong and what can be asked instead.
        query_time: the stream time the question was asked at (seconds), when it has one.
        unknown_words: for ``kind="vocabulary"``, the words the answerer does not know, in order.
        refused: always True (an ``Answer`` has no such attribute; ``getattr(a, "refused",
            False)`` tells the two apart).
        evidence: always empty: a refusal used no frame.
    """

    kind: str
    reason: str
    query_time: float | None = None
    unknown_words: tuple[str, ...] = ()
    refused: ClassVar[bool] = True
    evidence: ClassVar[tuple] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Refusal.kind must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict:
        """The JSON record's fields: ``refused`` (True), ``kind``, ``reason``, ``query_time``,
        ``evidence`` (empty) and, for unknown words, ``unknown_words``."""
        return {"refused": True, "kind": self.kind, "reason": self.reason, "query_time": self.query_time,
                "evidence": [], **({"unknown_words": list(self.unknown_words)} if self.unknown_words else {})}

    def __str__(self) -> str:
        return f"refused: {self.reason}"


class QuestionRefused(ValueError):
    """A question refused before any frame is read (bad input); ``refusal`` says why."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal
