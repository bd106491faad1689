"""Train the QA answerer (:class:`~streammem.models.answerer.SmallAnswerer`) on StreamWorld
questions over Pyramid Memory Bank snapshots (:mod:`streammem.train.qa_data`).

Training (:func:`train`): each step takes ``snapshots_per_step`` snapshots and all their
questions (a random ``big_memory_questions`` of them for a snapshot over ``big_memory``
tokens), cross-entropy over the candidates; AdamW, the learning rate warmed up linearly over
the first 5% of a wall-clock budget, then cosine-decayed towards 3% of ``lr``; gradient norm
clipped at 1; ``accelerate`` for the device. Checkpoints (``config.json`` +
``model.safetensors`` + ``training.json``) are saved every 5 minutes and at the end, with the
validation accuracy per budget and per question type (:func:`evaluate_snapshots`).

Snapshots are built in process (``worlds`` training and ``val_worlds`` validation worlds), or,
with ``data``, read from a folder of shards that a producer may still be writing, one core
rendering and encoding while the other trains, so every world the trainer sees is new::

    streammem train qa-snapshots data/qa --worlds 60 --seconds 480 --every 1 &
    streammem train answerer --data data/qa --minutes 20 --threads 1 --out ck/a

The event head's refit lives in :mod:`streammem.train.event_gate`. This module re-exports the
names of :mod:`~streammem.train.qa_data` and :mod:`~streammem.train.event_gate` that it used to
define.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from streammem.models.answerer import SmallAnswerer, encode_questions
from streammem.train.event_gate import EventGateData, event_gate_data, fit_event_gate, refit_event_gate
from streammem.train.qa_data import (SHIPPED_ENCODER, TRAIN_SEED0, VAL_SEED0, PoolMismatch, Snapshot, _ShardPool, _snapshot_tokens,
                                     build_snapshots, fit_vocab, iter_world_snapshots, label_space, load_shard,
                                     produce, save_shard, shard_pool)

__all__ = ["AnswererTrainConfig", "train", "evaluate_snapshots",
           # re-exported from streammem.train.qa_data and streammem.train.event_gate
           "Snapshot", "build_snapshots", "iter_world_snapshots", "save_shard", "load_shard", "produce", "fit_vocab",
           "label_space", "shard_pool", "PoolMismatch", "EventGateData", "event_gate_data", "fit_event_gate",
           "refit_event_gate"]


@dataclass
class AnswererTrainConfig:
    """Attributes:
    out: checkpoint folder. encoder: the frozen GridEncoder checkpoint.
    minutes: wall-clock training budget (data building excluded).
    worlds / val_worlds: training / validation worlds; seconds: length of each.
    presets: world presets, cycled over worlds. budgets: PyramidMemory presets snapshotted.
    every_s: seconds between question times.
    snapshots_per_step: snapshots (each with all its questions) per optimiser step.
    big_memory / big_memory_questions: snapshots with more tokens than ``big_memory`` train on a
        random subset of this many of their questions per visit (cost is questions x tokens).
    lr, weight_decay: AdamW. threads: torch threads. seed: init and sampling seed.
    data: a folder of snapshot shards written by :func:`produce` (``train/`` and ``val/``)
        instead of building snapshots in process. New shards are picked up while training runs
        (the producer may still be writing them); at most ``buffer_mb`` MB of snapshot features
        are held, random ones dropped beyond that.
    grounding: share the encoder's class / colour label space with the words (see
        :class:`~streammem.models.answerer.SmallAnswerer`).
    only_budgets: train on snapshots of these budgets only (an ``offline`` snapshot costs about
        12 ``ovbench`` ones to train on).
    init: start from this answerer checkpoint instead of a fresh model (its architecture;
        ``model``'s ``signed_time`` / ``event_head`` add those parts to it).
    pool: the pyramids' pooling the answerer is trained on and expects (``PyramidConfig.pool``;
        saved as ``SmallAnswerer.memory_pool``). With ``data`` it must match the shards'.
    model: SmallAnswerer keyword arguments (besides vocab and token_dim).
    """

    out: str = "outputs/checkpoints/answerer"
    encoder: str = SHIPPED_ENCODER
    minutes: float = 25.0
    worlds: int = 10
    val_worlds: int = 2
    seconds: float = 360.0
    presets: tuple[str, ...] = ("clean", "medium", "hard")
    budgets: tuple[str, ...] = ("ovbench", "offline")
    every_s: float = 10.0
    snapshots_per_step: int = 2
    big_memory: int = 2000
    big_memory_questions: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    threads: int = 2
    seed: int = 0
    log: str | None = None
    data: str | None = None
    buffer_mb: float = 6000.0
    grounding: bool = True
    only_budgets: tuple[str, ...] | None = None
    init: str | None = None
    pool: str = "mean"
    model: dict = field(default_factory=lambda: {"d": 128, "heads": 4, "layers": 2})

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"AnswererTrainConfig.minutes must be > 0, got {self.minutes}")
        if self.worlds < 1 or self.seconds <= 0:
            raise ValueError("AnswererTrainConfig.worlds must be >= 1 and seconds > 0")
        if self.pool not in ("mean", "salient"):
            raise ValueError(f"AnswererTrainConfig.pool must be 'mean' or 'salient', got {self.pool!r}")
        for b in self.budgets:
            if b not in ("ovbench", "offline"):
                raise ValueError(f"AnswererTrainConfig.budgets: unknown PyramidMemory preset {b!r}")


def train(cfg: AnswererTrainConfig, snapshots: list[Snapshot] | None = None,
          val_snapshots: list[Snapshot] | None = None) -> SmallAnswerer:
    """Build data (unless given), train for ``cfg.minutes``, save to ``cfg.out``; returns the model."""
    from accelerate import Accelerator

    from streammem.models.grid_encoder import GridEncoder

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    encoder = GridEncoder.from_pretrained(cfg.encoder).eval()
    t_data = time.time()
    pool = _ShardPool(Path(cfg.data), cfg.buffer_mb, rng, cfg.only_budgets, cfg.pool) if cfg.data else None
    if pool is not None:
        snapshots = pool.snapshots
        while not pool.refresh():
            time.sleep(10)  # wait for the producer's first shard
    elif snapshots is None:
        seeds = [TRAIN_SEED0 + cfg.seed * 1000 + i for i in range(cfg.worlds)]
        snapshots = build_snapshots(encoder, seeds, cfg.presets, cfg.seconds, cfg.budgets, cfg.every_s,
                                    pool=cfg.pool)
    if val_snapshots is None and pool is None:
        vseeds = [VAL_SEED0 + cfg.seed * 1000 + i for i in range(cfg.val_worlds)]
        val_snapshots = build_snapshots(encoder, vseeds, cfg.presets, cfg.seconds, cfg.budgets, cfg.every_s,
                                        pool=cfg.pool)
    n_q = sum(len(s.questions) for s in snapshots)
    print(f"[answerer] {len(snapshots)} snapshots, {n_q} questions, ready in {time.time() - t_data:.0f}s", flush=True)
    vocab = fit_vocab()
    if cfg.init:
        extra = {k: True for k in ("signed_time", "event_head") if cfg.model.get(k)}
        model = SmallAnswerer.from_pretrained(cfg.init, memory_pool=cfg.pool, **extra)
    else:
        model = SmallAnswerer(vocab=vocab.words, token_dim=encoder.dim, grid=encoder.grid, encoder=cfg.encoder,
                              memory_pool=cfg.pool, **label_space(encoder, cfg.grounding), **cfg.model)
        if cfg.grounding:
            model.set_label_heads(encoder)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    out = Path(cfg.out)
    log = open(cfg.log, "a") if cfg.log else None
    budget = cfg.minutes * 60.0
    t0 = last_save = time.time()
    step, ema_loss, ema_acc = 0, None, None
    order: list[int] = []
    bar = tqdm(total=int(budget), unit="s", desc="train answerer")
    last_poll = time.time()
    while time.time() - t0 < budget:
        if pool is not None and time.time() - last_poll > 20:
            pool.refresh()
            last_poll = time.time()
        frac = (time.time() - t0) / budget
        lr = cfg.lr * (frac / 0.05 if frac < 0.05 else 0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        loss_sum, correct, total = 0.0, 0, 0
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.snapshots_per_step):
            if pool is not None:  # the pool changes as shards arrive: sample uniformly
                snap = snapshots[rng.randrange(len(snapshots))]
            else:
                if not order:
                    order = list(range(len(snapshots)))
                    rng.shuffle(order)
                snap = snapshots[order.pop()]
            if len(snap.memory) > cfg.big_memory and len(snap.questions) > cfg.big_memory_questions:
                # large memories cost ~linear in questions x tokens: a random subset of the questions
                snap = Snapshot(snap.memory, snap.query_time, rng.sample(snap.questions, cfg.big_memory_questions),
                                snap.budget, snap.video)
            loss, c, n = _step_loss(acc.unwrap_model(model), snap)
            acc.backward(loss / cfg.snapshots_per_step)
            loss_sum += float(loss.detach()) / cfg.snapshots_per_step
            correct += c
            total += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        a = correct / max(total, 1)
        ema_loss = loss_sum if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_sum
        ema_acc = a if ema_acc is None else 0.98 * ema_acc + 0.02 * a
        bar.update(int(time.time() - t0) - bar.n)
        bar.set_postfix(step=step, loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
        if log:
            log.write(json.dumps({"step": step, "time_s": round(time.time() - t0, 1), "lr": lr, "loss": loss_sum,
                                  "acc": a}) + "\n")
            log.flush()
        if time.time() - last_save > 300:
            _save(acc.unwrap_model(model), out, cfg, step, time.time() - t0, None)
            last_save = time.time()
    bar.close()
    m = acc.unwrap_model(model)
    if pool is not None:
        val_snapshots = [x for p in sorted((Path(cfg.data) / "val").glob("*.safetensors"))
                         for x in load_shard(p, cfg.pool)]
        print(f"[answerer] trained on {pool.summary()}", flush=True)
    val = evaluate_snapshots(m, val_snapshots) if val_snapshots else None
    print("[answerer] validation accuracy:", json.dumps(val), flush=True)
    _save(m, out, cfg, step, time.time() - t0, val, pool.summary() if pool is not None else None)
    if log:
        log.close()
    return m.eval()


def _step_loss(model: SmallAnswerer, snap: Snapshot) -> tuple[torch.Tensor, int, int]:
    qs = snap.questions
    batch = encode_questions(model.vocab, [q["question"] for q in qs], [q["candidates"] for q in qs],
                             [snap.query_time] * len(qs), model.max_len, model.max_cand)
    logits = model(_snapshot_tokens(snap), batch)
    target = torch.tensor([q["candidates"].index(q["answer"]) for q in qs])
    loss = F.cross_entropy(logits, target)
    correct = int((logits.argmax(-1) == target).sum())
    return loss, correct, len(qs)


@torch.no_grad()
def evaluate_snapshots(model: SmallAnswerer, snaps: list[Snapshot]) -> dict:
    """Accuracy per budget, overall and per (answer_type, sub_answer_type)."""
    model.eval()
    res: dict[str, dict] = {}
    for s in snaps:
        qs = s.questions
        answers = model.answer_many(_snapshot_tokens(s), [q["question"] for q in qs], [q["candidates"] for q in qs],
                                    s.query_time, evidence_k=0)
        r = res.setdefault(s.budget, {})
        for q, a in zip(qs, answers):
            ok = a.text == q["answer"]
            for key in ("all", f"{q['answer_type']}/{q['sub_answer_type']}"):
                c = r.setdefault(key, [0, 0])
                c[0] += ok
                c[1] += 1
    return {b: {k: round(100.0 * c[0] / c[1], 1) for k, c in sorted(r.items())} for b, r in res.items()}


def _save(model: SmallAnswerer, out: Path, cfg: AnswererTrainConfig, step: int, seconds: float,
          val: dict | None, data: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    summary = {"steps": step, "wall_s": round(seconds, 1), "validation_accuracy": val, "data": data,
               "train_config": asdict(cfg)}
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
