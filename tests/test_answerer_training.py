"""Answerer training data: snapshot shards on disk (safetensors + JSON, atomic, no pickle) and
the trainer that follows a folder of them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from streammem.models.grid_encoder import GridEncoder
from streammem.train.answerer import (AnswererTrainConfig, PoolMismatch, Snapshot, _ShardPool, iter_world_snapshots,
                                      load_shard, save_shard, shard_pool, train)
from streammem.types import Tokens


def _snap(i: int, n: int = 12, dim: int = 8, answer: str = "no") -> Snapshot:
    mem = Tokens.cat([Tokens.from_grid(torch.randn(2, 2, dim), f, f / 8) for f in range(n // 4)])
    mem = Tokens(features=mem.features, frame_index=mem.frame_index, timestamp=mem.timestamp, grid=mem.grid,
                 level=torch.arange(len(mem)) % 3)
    q = {"question": "is there a cat in view now ?", "candidates": ["yes", "no"], "answer": answer,
         "answer_type": "HD", "sub_answer_type": "HD-2"}
    return Snapshot(mem, 0.5 + i, [q], "ovbench", f"world{i}")


def test_a_shard_round_trips_tokens_and_questions(tmp_path):
    snaps = [_snap(0), _snap(1, n=20)]
    p = save_shard(tmp_path / "a.safetensors", snaps)
    assert p.exists() and not list(tmp_path.glob("*.tmp"))
    back = load_shard(p)
    assert len(back) == 2
    for a, b in zip(snaps, back):
        assert torch.equal(a.memory.features.half(), b.memory.features)
        assert torch.equal(a.memory.frame_index, b.memory.frame_index)
        assert torch.equal(a.memory.timestamp, b.memory.timestamp)
        assert torch.equal(a.memory.grid, b.memory.grid) and torch.equal(a.memory.level, b.memory.level)
        assert (a.query_time, a.questions, a.budget, a.video) == (b.query_time, b.questions, b.budget, b.video)


def test_a_safetensors_file_that_is_not_a_shard_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a streammem answerer snapshot shard"):
        load_shard(tmp_path / "other.safetensors")


def test_the_pool_picks_up_new_shards_and_keeps_under_its_cap(tmp_path):
    import random

    (tmp_path / "train").mkdir()
    pool = _ShardPool(tmp_path, cap_mb=1e9, rng=random.Random(0))
    assert pool.refresh() == 0
    save_shard(tmp_path / "train" / "w0.safetensors", [_snap(0), _snap(1)])
    assert pool.refresh() == 2
    save_shard(tmp_path / "train" / "w1.safetensors", [_snap(2)])
    assert pool.refresh() == 3 and pool.refresh() == 3  # a shard is read once
    (tmp_path / "train" / "w2.safetensors").write_bytes(b"truncated")  # a broken shard is skipped, named
    assert pool.refresh() == 3 and pool.broken == ["w2.safetensors"] and "w2.safetensors" in pool.summary()
    one = _snap(0).memory.features.half().nbytes
    small = _ShardPool(tmp_path, cap_mb=2.5 * one / 2 ** 20, rng=random.Random(0))
    assert small.refresh() == 2 and small.dropped == 1 and small.bytes <= 2.5 * one


def test_world_snapshots_are_causal_and_strided():
    enc = GridEncoder(dim=8, width=4).eval()
    (_, snaps), = list(iter_world_snapshots(enc, [5], ("clean",), 24.0, ("ovbench", "offline"), every_s=2.0,
                                            progress=False, strides={"offline": 3}))
    ov = [s for s in snaps if s.budget == "ovbench"]
    off = [s for s in snaps if s.budget == "offline"]
    assert len(ov) >= 5 and len(off) == -(-len(ov) // 3)
    for s in snaps:
        assert float(s.memory.timestamp.max()) <= s.query_time + 1e-9
        assert all(q["middle_frame_timestamp"] == s.query_time for q in s.questions)


def test_training_follows_a_shard_folder_and_saves_a_loadable_answerer(tmp_path, monkeypatch):
    from streammem.models.answerer import SmallAnswerer, Vocab
    from streammem.train import answerer as train_mod

    # The vocabulary of StreamWorld's templates takes nine generated streams to collect; these
    # snapshots ask one question, so the trainer gets that question's words instead.
    monkeypatch.setattr(train_mod, "fit_vocab", lambda extra_texts=None: Vocab.fit([_snap(0).questions[0]["question"],
                                                                                    "yes no"]))
    enc = GridEncoder(dim=8, width=4)
    enc.save_pretrained(tmp_path / "enc")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    save_shard(tmp_path / "data" / "train" / "w0.safetensors", [_snap(i) for i in range(4)])
    # validation: the same question with both answers, on four memories
    save_shard(tmp_path / "data" / "val" / "v0.safetensors", [_snap(9 + k, answer=("yes", "no")[k % 2]) for k in range(4)])
    cfg = AnswererTrainConfig(out=str(tmp_path / "ck"), encoder=str(tmp_path / "enc"), minutes=0.01,
                              data=str(tmp_path / "data"), threads=1, model={"d": 16, "heads": 2, "layers": 1})
    train(cfg)
    info = json.loads((tmp_path / "ck" / "training.json").read_text())
    assert info["steps"] >= 1 and "1 shards" in info["data"]
    m = SmallAnswerer.from_pretrained(str(tmp_path / "ck")).eval()
    assert m.token_dim == 8 and m.memory_pool == "mean"
    # the recorded validation accuracy is the saved answerer's, on the validation shard as stored (float16)
    right = []
    for s in load_shard(tmp_path / "data" / "val" / "v0.safetensors"):
        mem = Tokens(features=s.memory.features.float(), frame_index=s.memory.frame_index,
                     timestamp=s.memory.timestamp, grid=s.memory.grid, level=s.memory.level)
        with torch.no_grad():
            (a,) = m.answer_many(mem, [s.questions[0]["question"]], [s.questions[0]["candidates"]], s.query_time)
        right.append(a.text == s.questions[0]["answer"])
    expect = round(100.0 * sum(right) / 4, 1)
    assert info["validation_accuracy"] == {"ovbench": {"all": expect, "HD/HD-2": expect}}
    # shards of one pooling train an answerer of that pooling only
    for split, name, i in (("train", "w0", 0), ("val", "v0", 9)):
        save_shard(tmp_path / "data" / split / f"{name}.safetensors", [_snap(i + k) for k in range(4 if i == 0 else 1)],
                   pool="salient")
    with pytest.raises(PoolMismatch, match="pooled with 'salient', not 'mean'"):
        train(cfg)
    cfg.pool, cfg.out, cfg.init = "salient", str(tmp_path / "ck2"), str(tmp_path / "ck")
    train(cfg)
    m = SmallAnswerer.from_pretrained(str(tmp_path / "ck2"))
    assert m.memory_pool == "salient"
    from streammem.memory import PyramidMemory
    from streammem.pipelines.qa import StreamingQAPipeline

    pipe = StreamingQAPipeline(enc.eval(), m, memory="ovbench")
    assert isinstance(pipe.memory, PyramidMemory) and pipe.memory.config.pool == "salient"
    with pytest.warns(UserWarning, match="trained on PyramidMemory"):
        StreamingQAPipeline(enc, m, memory=PyramidMemory.from_preset("ovbench", dim=8))
    # the spread retention, by name; the pooling still follows the answerer
    from streammem.memory import PYRAMID_SPREAD

    cfg = StreamingQAPipeline(enc.eval(), m, memory="offline", retention="spread").memory.config
    assert cfg.pool == "salient" and cfg.capacities == (24, 24, 144)
    assert {k: getattr(cfg, k) for k in PYRAMID_SPREAD} == PYRAMID_SPREAD and PYRAMID_SPREAD["time_penalty"] > 0
    with pytest.raises(ValueError, match="retention must be one of"):
        StreamingQAPipeline(enc, m, memory="ovbench", retention="uniform")


def test_salient_snapshots_and_a_folder_of_one_pooling(tmp_path):
    from streammem.train.answerer import produce

    torch.manual_seed(0)
    enc = GridEncoder(dim=8, width=4).eval()
    g = torch.Generator().manual_seed(0)  # a random encoder's objectness is nearly flat: make salience vary
    enc.objectness = lambda tokens: torch.rand(tokens.shape[:-1], generator=g)
    snaps = {}
    for pool in ("mean", "salient"):
        (_, snaps[pool]), = list(iter_world_snapshots(enc, [5], ("clean",), 8.0, ("ovbench",), every_s=2.0,
                                                      progress=False, pool=pool))
    a, b = snaps["mean"][-1].memory, snaps["salient"][-1].memory

    def frame(m, level):  # {frame index: its tokens} at one level (retention may differ: descriptors do)
        return {int(f): m.features[(m.frame_index == f) & (m.level == level)] for f in m.frame_index[m.level == level]}

    for level, same in ((0, True), (2, False)):  # unpooled 16 x 16 frames equal; 4 x 4 pooled ones not
        fa, fb = frame(a, level), frame(b, level)
        common = sorted(set(fa) & set(fb))
        assert common
        assert all(torch.equal(fa[f], fb[f]) == same for f in common)
    enc.save_pretrained(tmp_path / "enc")
    produce(tmp_path / "d", str(tmp_path / "enc"), worlds=1, val_worlds=0, seconds=2.0, every_s=1.0,
            budgets=("ovbench",), progress=False, pool="salient")
    shard, = (tmp_path / "d" / "train").iterdir()
    assert shard_pool(shard) == "salient" and isinstance(load_shard(shard, "salient"), list)
    with pytest.raises(PoolMismatch, match="pooled with 'salient', not 'mean'"):
        produce(tmp_path / "d", str(tmp_path / "enc"), worlds=2, val_worlds=0, seconds=2.0, progress=False)
    with pytest.raises(PoolMismatch):
        load_shard(shard, "mean")


def test_the_cli_names_an_unknown_pool(tmp_path):
    from typer.testing import CliRunner

    from streammem.cli import app

    for cmd in (["train", "qa-snapshots", str(tmp_path / "d")], ["train", "answerer", "--data", str(tmp_path)]):
        res = CliRunner().invoke(app, cmd + ["--pool", "max"])
        assert res.exit_code == 2 and "choose mean" in res.output and not (tmp_path / "d").exists()
    res = CliRunner().invoke(app, ["train", "qa-snapshots", str(tmp_path / "d"), "--retention", "newest"])
    assert res.exit_code == 2 and "choose reference or spread" in res.output and not (tmp_path / "d").exists()
    res = CliRunner().invoke(app, ["ask", "world:seed=1,seconds=2", "--at", "1", "q", "-c", "a", "-c", "b",
                                   "--retention", "newest"])
    assert res.exit_code == 2 and "retention must be one of ['reference', 'spread'], got 'newest'" in res.output


def test_the_event_gate_cli_names_what_is_missing(tmp_path):
    from typer.testing import CliRunner

    from streammem.cli import app
    from streammem.models.answerer import SmallAnswerer

    def said(res) -> str:  # the error box's text on one line
        return " ".join(res.output.replace("│", " ").split())

    cmd = ["train", "event-gate", str(tmp_path / "d"), "--init", str(tmp_path / "ck"), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 2 and "has no train/ folder of snapshot shards" in said(res)
    (tmp_path / "d" / "train").mkdir(parents=True)
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 2 and "no checkpoint (config.json) in" in said(res)
    SmallAnswerer(vocab=["<pad>", "<unk>", "<cls>", "<sep>", "<time>"], token_dim=8, d=16, heads=2,
                  layers=1).save_pretrained(tmp_path / "ck")
    res = CliRunner().invoke(app, cmd)  # an empty train/ folder
    assert res.exit_code == 2 and "holds no snapshot shards" in res.output
    save_shard(tmp_path / "d" / "train" / "w.safetensors", [_snap(0)])
    res = CliRunner().invoke(app, cmd)  # an answerer without the event head
    assert res.exit_code == 2 and "needs the event head" in res.output and not (tmp_path / "o").exists()


def test_qa_snapshots_takes_a_seed_for_worlds_another_answerer_has_not_seen(tmp_path):
    from typer.testing import CliRunner

    from streammem.cli import app

    GridEncoder(dim=8, width=4).save_pretrained(tmp_path / "enc")
    res = CliRunner().invoke(app, ["train", "qa-snapshots", str(tmp_path / "d"), "--encoder", str(tmp_path / "enc"),
                                   "--worlds", "1", "--val-worlds", "0", "--seconds", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "d").rglob("*.safetensors")] == ["world_20003000.safetensors"]


def test_refitting_the_event_gate_learns_to_read_rising_and_falling_evidence(tmp_path):
    from streammem.models.answerer import SmallAnswerer, Vocab
    from streammem.train.answerer import event_gate_data, refit_event_gate

    torch.manual_seed(0)
    enc = GridEncoder(dim=8, width=4, num_classes=2, num_colours=2).eval()
    vocab = Vocab.fit(["which object appeared at about 3.5s ?", "which object vanished at about 3.5s ?",
                       "the red star", "the blue cat"])
    m = SmallAnswerer(vocab=vocab.words, token_dim=8, d=16, heads=2, layers=1, grid=4,
                      labels=["<background>", "cat", "star", "red", "blue"], num_classes=3, signed_time=True,
                      event_head=True).set_label_heads(enc).eval()
    m.save_pretrained(tmp_path / "init")
    w = torch.cat([enc.cls_head.weight, enc.colour_head.weight]).detach()
    u = w / w.norm(dim=1, keepdim=True)
    red_star, blue_cat, bg = 40 * (u[2] + u[3]), 40 * (u[1] + u[4]), 40 * u[0]

    def snap(i: int) -> Snapshot:  # one object before 3.5 s, the other after; asked which appeared or vanished
        first, then = (red_star, blue_cat) if i % 2 else (blue_cat, red_star)
        parts = [Tokens.from_grid(torch.stack([first, bg, bg, bg]).reshape(2, 2, 8), k, k * 0.5) for k in range(6)]
        parts += [Tokens.from_grid(torch.stack([then, bg, bg, bg]).reshape(2, 2, 8), k, k * 0.5) for k in range(8, 14)]
        mem = Tokens.cat(parts)
        mem = Tokens(features=mem.features, frame_index=mem.frame_index, timestamp=mem.timestamp, grid=mem.grid,
                     level=torch.zeros(len(mem), dtype=torch.int64))
        cands = ["the red star", "the blue cat"][:: 1 if i % 4 < 2 else -1]
        verb = "appeared" if i % 3 else "vanished"
        answer = ("the blue cat" if i % 2 else "the red star") if verb == "appeared" else \
            ("the red star" if i % 2 else "the blue cat")
        q = {"question": f"which object {verb} at about 3.5s ?", "candidates": cands, "answer": answer,
             "answer_type": "PM", "sub_answer_type": "PM-3"}
        return Snapshot(mem, 7.0, [q], "ovbench", f"w{i}")

    # val repeats train's 12 patterns (what is checked is the fitting, not generalisation)
    for split, seeds in (("train", range(24)), ("val", range(100, 112))):
        (tmp_path / "d" / split).mkdir(parents=True)
        save_shard(tmp_path / "d" / split / "w.safetensors", [snap(i) for i in seeds], pool="mean")
    before = event_gate_data(m, load_shard(tmp_path / "d" / "val" / "w.safetensors"), progress=False)
    assert len(before) == 12 and before.feats.shape == (12, m.max_cand, 8) and before.cls.shape == (12, 16)
    report = refit_event_gate(tmp_path / "init", tmp_path / "d", tmp_path / "out", weight_decay=0.0, threads=1)
    assert report["before"]["val"][1] < 0.9 and report["after"]["val"][1] == 1.0  # loss, accuracy
    assert report["after"]["train"][0] < report["before"]["train"][0]
    fitted = SmallAnswerer.from_pretrained(str(tmp_path / "out"))
    assert fitted.calibrated and set(fitted.state_dict()) - set(m.state_dict()) == {
        "base_scale.weight", "base_scale.bias", "support_gate.weight"}
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, fitted.state_dict()[k])}
    assert changed <= {"event_gate.weight", "event_gate.bias"} and changed  # nothing else moves
    with torch.no_grad():  # the calibration's own weights moved too
        assert float(fitted.support_gate.weight.abs().sum()) > 0 and float(fitted.base_scale.weight.abs().sum()) > 0
    val = load_shard(tmp_path / "d" / "val" / "w.safetensors")  # the saved model answers as the fit reported
    right = [fitted.answer(s.memory, q["question"], q["candidates"], s.query_time).text == q["answer"]
             for s in val for q in s.questions]
    assert sum(right) / len(right) == report["after"]["val"][1]
    info = json.loads((tmp_path / "out" / "training.json").read_text())["event_gate_refit"]
    assert info["train_questions"] == 24 and info["val_questions"] == 12 and info["calibrated"]
    # the gate alone (no scale) is refitted the same way
    plain = refit_event_gate(tmp_path / "init", tmp_path / "d", tmp_path / "out2", weight_decay=0.0, threads=1,
                             calibrate=False)
    assert plain["after"]["train"][0] < plain["before"]["train"][0]
    assert not SmallAnswerer.from_pretrained(str(tmp_path / "out2")).calibrated
    with pytest.raises(ValueError, match="already calibrated"):  # its scale cannot be left out of a refit
        refit_event_gate(tmp_path / "out", tmp_path / "d", tmp_path / "out3", threads=1, calibrate=False)
    with pytest.raises(ValueError, match="event head"):
        event_gate_data(SmallAnswerer(vocab=vocab.words, token_dim=8, d=16, heads=2, layers=1), [snap(0)])
