"""The shipped answerer refuses what it cannot answer, with the reason, never a forced answer:
words outside its vocabulary, a question that needs options asked without them, a time outside
the stream, no frame in memory; through the Python API (``StreamingQAPipeline``) and through
``streammem ask``. Answered questions keep their evidence; StreamWorld's own questions are
never refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from streammem.cli import app
from streammem.models.answerer import QuestionRefused, Refusal, is_yes_no
from streammem.pipelines.qa import Question, answer_record, load_default_qa
from streammem.types import Answer
from streammem.world import World

WORLD = "world:seed=1,seconds=2,size=64"  # 16 frames at 8 fps: 0 .. 1.875 s


@pytest.fixture(scope="module")
def shipped():
    return load_default_qa("ovbench")


@pytest.fixture()
def pipe(shipped):
    shipped.reset()
    return shipped


def two_seconds():
    return list(World(seed=1, seconds=2, size=64))


# ---------------------------------------------------------------------- which questions are yes/no
def test_yes_no_questions_are_those_streamworld_asks_with_yes_and_no():
    """The yes/no rule matches StreamWorld's own question generator: its questions offered with
    exactly yes / no are the yes/no ones, and every other one needs its options (including
    "Is the ... to the left or to the right of ...?")."""
    qs = World(seed=3, preset="medium", size=64, seconds=40).questions(every_s=2)
    kinds = {is_yes_no(q["question"]) for q in qs}
    assert kinds == {True, False}, "the sample should hold both kinds"
    for q in qs:
        assert is_yes_no(q["question"]) == (sorted(q["candidates"]) == ["no", "yes"]), q["question"]
    assert not is_yes_no("Is the red star to the left or to the right of the cat?")
    assert not is_yes_no("What colour is the van?") and not is_yes_no("How many people are walking?")
    assert is_yes_no("Did the cat vanish?") and is_yes_no("has a red star been in view?")


def test_streamworld_questions_are_never_refused(shipped):
    """Every question StreamWorld generates is in the shipped answerer's vocabulary, with its options."""
    qs = [q for seed in (3, 8) for q in World(seed=seed, preset="medium", size=64, seconds=40).questions(every_s=2)]
    assert len(qs) > 50
    refused = [(q["question"], q["candidates"]) for q in qs
               if shipped.refusal(q["question"], q["candidates"], q["middle_frame_timestamp"]) is not None]
    assert refused == []


# ---------------------------------------------------------------------- Python API
def test_unknown_words_are_refused_naming_them(pipe):
    with pytest.raises(QuestionRefused) as exc:
        pipe.ask("Is there an elephant?")
    r = exc.value.refusal
    assert r.kind == "vocabulary" and r.unknown_words == ("an", "elephant") and r.refused and not r.evidence
    assert '"elephant"' in r.reason and '"Is there a cat in view now?"' in r.reason
    assert "StreamWorld" in r.reason and "--answerer hf:" in r.reason
    # the options are read too, and schedule refuses the same way (nothing is scheduled)
    with pytest.raises(QuestionRefused, match='"van"') as exc:
        pipe.schedule("What colour is the van?", ["white", "red", "green"], at=1.0)
    assert exc.value.refusal.unknown_words == ("van",) and exc.value.refusal.query_time == 1.0
    with pytest.raises(QuestionRefused) as exc:
        pipe.schedule("Which object vanished at about 1.0s?", ["the elephant", "the cat"], at=1.0)
    assert exc.value.refusal.unknown_words == ("elephant",)
    assert pipe.stats()["pending"] == 0
    assert isinstance(exc.value, ValueError)  # bad input, as other bad questions


def test_a_question_that_needs_options_is_refused_without_them(pipe):
    for q in ("Which object vanished?", "What colour is the star?",
              "Is the red star to the left or to the right of the cat?"):
        with pytest.raises(QuestionRefused, match="needs options") as exc:
            pipe.ask(q)
        assert exc.value.refusal.kind == "options"
    with pytest.raises(QuestionRefused, match="needs options"):
        pipe.schedule("Which object vanished?", [], at=1.0)
    # with options it is answered; a yes/no question without options is answered yes or no
    for f in two_seconds():
        pipe.step(f)
    a = pipe.ask("Which object vanished at about 1.0s?", ["the cat", "the red star"])
    assert isinstance(a, Answer) and a.text in ("the cat", "the red star") and a.evidence
    a = pipe.ask("Is there a cat in view now?")
    assert isinstance(a, Answer) and a.text in ("yes", "no") and len(a.probs) == 2 and a.evidence
    # a malformed question is still a plain ValueError
    with pytest.raises(ValueError, match="at least 2"):
        pipe.ask("Is there a cat in view now?", ["yes"])


def test_times_outside_the_stream_are_refused(pipe):
    with pytest.raises(QuestionRefused, match=r"asked at -1.00 s, before the stream starts") as exc:
        pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=-1.0)
    assert exc.value.refusal.kind == "time"
    late = pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=999.0)
    edge = pipe.schedule("Is there a cat in view now?", None, at=2.0)  # within one frame of the last (1.875 s)
    got = list(pipe.run(two_seconds()))
    r = late.result(timeout=0)
    assert isinstance(r, Refusal) and r.kind == "time" and r.query_time == 999.0 and list(r.evidence) == []
    assert r.reason == "asked at 999.00 s, after the end of the stream: its last frame is at 1.88 s"
    a = edge.result(timeout=0)
    assert isinstance(a, Answer) and a.query_time == 2.0 and a.evidence
    assert all(e["timestamp"] <= 2.0 for e in a.evidence)
    # both come out of the stream, and the refusal's record says why, without an answer
    assert sorted(q.at for q, _ in got) == [2.0, 999.0]
    rec = answer_record(*next((q, x) for q, x in got if q.at == 999.0))
    assert rec["refused"] is True and rec["kind"] == "time" and rec["evidence"] == [] and "answer" not in rec


def test_no_frame_in_memory_is_refused(pipe):
    r = pipe.ask("Is there a cat in view now?", ["yes", "no"])  # nothing streamed yet
    assert isinstance(r, Refusal) and r.kind == "no_memory" and "nothing has been streamed" in r.reason
    # a stream whose first frame comes after the question's time
    early = pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=0.25)
    later = pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=1.0)
    for f in two_seconds()[4:]:  # 0.5 .. 1.875 s
        pipe.step(f)
    pipe.finish()
    r = early.result(timeout=0)
    assert isinstance(r, Refusal) and r.kind == "no_memory"
    assert r.reason == "no frame in memory at 0.25 s: the stream's first frame is at 0.50 s"
    assert isinstance(later.result(timeout=0), Answer)
    # a stream that delivered no frame at all
    pipe.reset()
    fut = pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=1.0)
    pipe.finish()
    assert fut.result(timeout=0).reason == "no frame in memory at 1.00 s: no frame was read from the stream"


def test_refusals_leave_answers_bitwise_unchanged(pipe):
    """A refused question beside an answered one changes nothing of the answer."""
    frames = two_seconds()
    alone = pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=1.0)
    list(pipe.run(frames))
    pipe.reset()
    with_refusals = pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=1.0)
    pipe.schedule("Is there a cat in view now?", ["yes", "no"], at=50.0)
    list(pipe.run(frames))
    assert dataclasses.asdict(alone.result()) == dataclasses.asdict(with_refusals.result())


def test_refusal_records_round_trip_through_json():
    q = Question("Is there a cat in view now?", ["yes", "no"], 9.0, id={"answer": "yes", "sub_answer_type": "HD-2"})
    rec = answer_record(q, Refusal("time", "asked at 9.00 s, after the end of the stream", query_time=9.0))
    assert json.loads(json.dumps(rec)) == {"at": 9.0, "question": q.question, "candidates": ["yes", "no"],
                                           "refused": True, "kind": "time",
                                           "reason": "asked at 9.00 s, after the end of the stream",
                                           "evidence": [], "truth": "yes", "correct": False, "type": "HD-2"}
    with pytest.raises(ValueError, match="kind"):
        Refusal("unsure", "no reason")


# ---------------------------------------------------------------------- CLI
def ask(*args: str):
    return CliRunner().invoke(app, ["ask", *args])


def test_cli_says_it_was_trained_on_streamworld_and_points_to_vlms():
    res = CliRunner().invoke(app, ["ask", "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert "trained only on StreamWorld" in res.output and "--answerer" in res.output
    res = ask(WORLD, "--at", "1", "Is there a cat in view now?")
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert "trained only on StreamWorld" in first and "--answerer hf:" in first
    assert "-> (A) yes" in res.output or "-> (B) no" in res.output  # a yes/no question needs no options


def test_cli_time_after_the_end_is_refused_and_recorded(tmp_path):
    res = ask(WORLD, "--at", "1", "--at", "999", "Is there a cat in view now?", "-c", "yes", "-c", "no",
              "-o", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "-> refused: asked at 999.00 s, after the end of the stream: its last frame is at 1.88 s" in res.output
    assert "2 answers (1 refused) ->" in res.output
    answered, refused = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answered["at"] == 1.0 and answered["evidence"] and "refused" not in answered
    assert refused["at"] == 999.0 and refused["refused"] is True and refused["kind"] == "time"
    assert refused["evidence"] == [] and "text" not in refused


@pytest.mark.parametrize("args, says", [
    (["--at", "-1", "Is there a cat in view now?"], "refused: asked at -1.00 s, before the stream starts"),
    (["--at", "1", "Is there an elephant?"], 'refused: the answerer does not know the words "an", "elephant"'),
    (["--at", "1", "What colour is the van?", "-c", "white", "-c", "red", "-c", "green"], '"van"'),
    (["--at", "1", "Which object vanished?"], 'refused: "Which object vanished?" needs options'),
], ids=["negative-time", "unknown-words", "unknown-word-with-options", "needs-options"])
def test_cli_bad_questions_exit_2_before_anything_is_written(tmp_path, args, says):
    res = ask(WORLD, *args, "-o", str(tmp_path / "o"))
    assert res.exit_code == 2, res.output
    assert says in res.output
    assert not (tmp_path / "o" / "answers.jsonl").exists()


def test_cli_no_frame_in_memory_is_refused():
    res = ask(WORLD, "--at", "1", "--max-frames", "0", "Is there a cat in view now?")
    assert res.exit_code == 0, res.output
    assert "-> refused: no frame in memory at 1.00 s: no frame was read from the stream" in res.output
    assert "confidence" not in res.output


def test_cli_which_object_vanished_with_options_is_answered():
    res = ask(WORLD, "--at", "1", "Which object vanished at about 0.5s? (A) the cat (B) the red star")
    assert res.exit_code == 0, res.output
    assert "-> (A) the cat" in res.output or "-> (B) the red star" in res.output
    assert "evidence: frame" in res.output


def test_cli_interactive_prints_refusals_and_goes_on():
    res = CliRunner().invoke(app, ["ask", WORLD, "--interactive"],
                             input="Is there an elephant?\nWhich object vanished?\n")
    assert res.exit_code == 0, res.output
    assert 'refused: the answerer does not know the words "an", "elephant"' in res.output
    assert 'refused: "Which object vanished?" needs options' in res.output
