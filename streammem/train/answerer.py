"""Train the shipped QA answerer on StreamWorld questions over Pyramid Memory Bank snapshots.

Data (:func:`build_snapshots`): seeded worlds (seeds from 20_000_000 up, never the
evaluation's) stream through the frozen :class:`~streammem.models.grid_encoder.GridEncoder`
into ``PyramidMemory`` banks of each preset in ``budgets`` (``ovbench`` 832 tokens,
``offline`` 9,984); at each question time the banks' contents are snapshotted (as the
streaming pipeline would read them: only frames up to that time) with the questions asked
then. Snapshots keep features in half precision.

Training (:func:`train`): each step takes ``snapshots_per_step`` snapshots and all their
questions, cross-entropy over the candidates; AdamW with warm-up and cosine decay over a
wall-clock budget, ``accelerate`` for the device, checkpoints (``config.json`` +
``model.safetensors``) as it goes, validation accuracy per question type on held-out worlds.

    python -m streammem.train.answerer --minutes 25          # or: streammem train answerer

With many worlds, render and encode in one process while another trains (two cores, one
each; every world the trainer sees is new, so it cannot memorise a handful of streams). The
shipped checkpoint was made this way, in two phases (first the cheap ``ovbench`` snapshots
only, then both budgets; an offline snapshot costs about 12 ovbench ones to train on):

    streammem train qa-snapshots data/qa --worlds 60 --seconds 480 --every 1 &   # shards
    streammem train answerer --data data/qa --only-budget ovbench --minutes 20 --threads 1 --out ck/a
    streammem train answerer --data data/qa --init ck/a --minutes 20 --threads 1 --out ck/b

(For the shipped run the producer was stopped after 31 training worlds, ~190,000 questions.)

What made it learn to read memory (it had learned only answer priors before): many fresh
worlds with a question every second instead of a few worlds, and the grounded label space of
:class:`~streammem.models.answerer.SmallAnswerer`. Even so, accuracy on a question type
stays at its prior for a while and then rises within a few hundred steps.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from streammem.memory import PyramidMemory
from streammem.models.answerer import SmallAnswerer, Vocab, encode_questions
from streammem.models.grid_encoder import grid_tokens
from streammem.types import Tokens

__all__ = ["AnswererTrainConfig", "Snapshot", "build_snapshots", "iter_world_snapshots", "save_shard", "load_shard",
           "produce", "train", "evaluate_snapshots", "fit_vocab", "shard_pool", "PoolMismatch", "EventGateData",
           "event_gate_data", "fit_event_gate", "refit_event_gate"]

TRAIN_SEED0 = 20_000_000
VAL_SEED0 = 30_000_000


@dataclass
class Snapshot:
    """One memory read at ``query_time`` and the questions asked then."""

    memory: Tokens
    query_time: float
    questions: list[dict]
    budget: str
    video: str


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
    only_budgets: train on snapshots of these budgets only (a first, cheap phase on the small
        ``ovbench`` memories: an offline snapshot costs about 12 ovbench ones).
    init: start from this answerer checkpoint instead of a fresh model (a second phase).
    pool: the pyramids' pooling the answerer is trained on and expects (``PyramidConfig.pool``;
        saved as ``SmallAnswerer.memory_pool``). With ``data`` it must match the shards'.
    model: SmallAnswerer keyword arguments (besides vocab and token_dim).
    """

    out: str = "streammem/checkpoints/answerer"
    encoder: str = "streammem/checkpoints/grid_encoder"
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


def build_snapshots(encoder, seeds: list[int], presets: tuple[str, ...], seconds: float, budgets: tuple[str, ...],
                    every_s: float = 10.0, size: int = 256, fps: float = 8.0, batch: int = 32,
                    progress: bool = True, memories: dict | None = None,
                    strides: dict[str, int] | None = None, pool: str = "mean") -> list[Snapshot]:
    """Stream each world through ``encoder`` into one memory per budget; snapshot at question times.

    ``memories`` maps a name to a zero-argument factory of a memory, replacing the
    ``PyramidMemory`` budgets (the evaluation uses this for its baselines). ``strides`` maps a
    budget to k: snapshot it only at every k-th question time (big memories cost more to keep
    and to train on). ``pool`` is the pyramids' pooling (``PyramidConfig.pool``).
    """
    out: list[Snapshot] = []
    for _, snaps in iter_world_snapshots(encoder, seeds, presets, seconds, budgets, every_s, size, fps, batch,
                                         progress, memories, strides, pool):
        out += snaps
    return out


def iter_world_snapshots(encoder, seeds: list[int], presets: tuple[str, ...], seconds: float,
                         budgets: tuple[str, ...], every_s: float = 10.0, size: int = 256, fps: float = 8.0,
                         batch: int = 32, progress: bool = True, memories: dict | None = None,
                         strides: dict[str, int] | None = None, pool: str = "mean", retention: str = "reference"):
    """Like :func:`build_snapshots`, one world at a time: yields ``(seed, snapshots)``.
    ``retention``: the pyramids' retention rule (a name of :data:`~streammem.pipelines.qa.RETENTIONS`)."""
    from streammem.pipelines.qa import retention_overrides
    from streammem.world import World

    overrides = retention_overrides(retention)
    factories = memories or {b: (lambda b=b: PyramidMemory.from_preset(b, dim=encoder.dim, pool=pool,
                                                                       **overrides))
                             for b in budgets}
    strides = strides or {}
    for wi, seed in enumerate(seeds):
        out: list[Snapshot] = []
        preset = presets[wi % len(presets)]
        world = World(seed=seed, preset=preset, size=size, fps=fps, seconds=seconds, drop_frames=False)
        qs = world.questions(every_s=every_s)
        by_time: dict[float, list[dict]] = {}
        for q in qs:
            by_time.setdefault(float(q["middle_frame_timestamp"]), []).append(q)
        times = sorted(by_time)
        mems = {name: f() for name, f in factories.items()}
        ti = 0
        buf = []

        def flush() -> None:
            if not buf:
                return
            with torch.no_grad():
                grids = encoder.encode_images([f.image for f in buf])
            for f, g in zip(buf, grids):
                tok = grid_tokens(encoder, g, f.index, f.timestamp)
                for m in mems.values():
                    m.write(tok)
            buf.clear()

        bar = tqdm(total=world.num_frames, desc=f"snapshots {world.seed} {preset}", disable=not progress, leave=False)
        for frame in world:
            # a question at time t is answered before the first frame after t is written
            while ti < len(times) and times[ti] < frame.timestamp:
                flush()
                for name, m in mems.items():
                    if ti % strides.get(name, 1):
                        continue
                    r = m.read()
                    r = Tokens(features=r.features.half(), frame_index=r.frame_index, timestamp=r.timestamp,
                               grid=r.grid, level=r.level)
                    out.append(Snapshot(r, times[ti], by_time[times[ti]], name, world.__repr__()))
                ti += 1
            buf.append(frame)
            if len(buf) >= batch:
                flush()
            bar.update(1)
        bar.close()
        yield seed, out


# ------------------------------------------------------------------ snapshot shards on disk
class PoolMismatch(ValueError):
    """A snapshot shard was pooled differently from what the reader expects."""


def shard_pool(path: str | Path) -> str:
    """The pyramid pooling a shard's snapshots were made with (``"mean"`` for older shards)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("pool", "mean")


def save_shard(path: str | Path, snaps: list[Snapshot], pool: str = "mean", retention: str = "reference") -> Path:
    """Write snapshots as one safetensors file (tensors) with the questions in its JSON metadata
    (and ``pool`` / ``retention``, the pyramids' pooling and retention rule they were made with).

    The file appears atomically (written under a temporary name, then renamed), so a trainer
    following a folder never reads half a shard.
    """
    import os

    from safetensors.torch import save_file

    path = Path(path)
    tensors, meta = {}, []
    for i, s in enumerate(snaps):
        m = s.memory
        tensors[f"{i}.features"] = m.features.half().contiguous()
        tensors[f"{i}.frame_index"] = m.frame_index.to(torch.int32).contiguous()
        tensors[f"{i}.timestamp"] = m.timestamp.to(torch.float64).contiguous()
        tensors[f"{i}.grid"] = m.grid.to(torch.int16).contiguous()
        tensors[f"{i}.level"] = (m.level if m.level is not None else torch.zeros(len(m), dtype=torch.long)) \
            .to(torch.int8).contiguous()
        meta.append({"query_time": s.query_time, "budget": s.budget, "video": s.video, "questions": s.questions})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "streammem.answerer_snapshots/1",
                                           "snapshots": json.dumps(meta), "pool": pool, "retention": retention})
    os.replace(tmp, path)
    return path


def load_shard(path: str | Path, pool: str | None = None) -> list[Snapshot]:
    """Read a :func:`save_shard` file (tensors and JSON only; nothing is unpickled). With
    ``pool``, a shard made with another pooling raises :class:`PoolMismatch`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        if md.get("format") != "streammem.answerer_snapshots/1":
            raise ValueError(f"{path} is not a streammem answerer snapshot shard (format {md.get('format')!r})")
        if pool is not None and md.get("pool", "mean") != pool:
            raise PoolMismatch(f"{path} holds snapshots pooled with {md.get('pool', 'mean')!r}, not {pool!r}; "
                               f"train with --pool {md.get('pool', 'mean')} or make {pool!r} shards")
        meta = json.loads(md["snapshots"])
        out = []
        for i, m in enumerate(meta):
            mem = Tokens(features=f.get_tensor(f"{i}.features"), frame_index=f.get_tensor(f"{i}.frame_index").long(),
                         timestamp=f.get_tensor(f"{i}.timestamp"), grid=f.get_tensor(f"{i}.grid").long(),
                         level=f.get_tensor(f"{i}.level").long())
            out.append(Snapshot(mem, float(m["query_time"]), m["questions"], m["budget"], m["video"]))
    return out


def produce(out_dir: str | Path, encoder: str = "streammem/checkpoints/grid_encoder", worlds: int = 60,
            val_worlds: int = 2, seconds: float = 360.0, every_s: float = 1.0, val_every_s: float = 10.0,
            presets: tuple[str, ...] = ("clean", "medium", "hard"), budgets: tuple[str, ...] = ("ovbench", "offline"),
            strides: dict[str, int] | None = None, seed: int = 0, threads: int = 1,
            progress: bool = True, pool: str = "mean", retention: str = "reference") -> None:
    """Write snapshot shards, one per world, to ``out_dir/val`` (first) and ``out_dir/train``.

    Worlds already written are skipped, so a stopped run resumes. A trainer can follow the
    folder while this runs (``AnswererTrainConfig.data``): rendering and encoding on one core,
    training on the other, and every world the trainer sees is a new one. ``pool``: the
    pyramids' pooling (``"mean"``, the reference, or ``"salient"``), recorded in each shard; a
    folder holds one kind (adding another to it is refused). ``retention``: the pyramids'
    retention rule (``"reference"`` or ``"spread"``), also recorded in each shard; a trainer may
    mix shards of both rules (they differ in which frames are kept, not in what a token means).
    """
    from streammem.models.grid_encoder import GridEncoder

    torch.set_num_threads(threads)
    enc = GridEncoder.from_pretrained(encoder).eval()
    strides = {"offline": 5} if strides is None else strides
    root = Path(out_dir)
    if pool not in ("mean", "salient"):
        raise ValueError(f"pool must be 'mean' or 'salient', got {pool!r}")
    from streammem.pipelines.qa import retention_overrides

    retention_overrides(retention)  # an unknown name fails before any world is rendered
    for old in sorted(root.glob("*/*.safetensors"))[:1]:
        if (kind := shard_pool(old)) != pool:
            raise PoolMismatch(f"{root} holds snapshots pooled with {kind!r}, not {pool!r}")
    jobs = [("val", VAL_SEED0 + seed * 1000 + i, val_every_s, {}) for i in range(val_worlds)] + \
           [("train", TRAIN_SEED0 + seed * 1000 + i, every_s, strides) for i in range(worlds)]
    for wi, (split, s, ev, st) in enumerate(jobs):
        path = root / split / f"world_{s}.safetensors"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        preset = presets[wi % len(presets)]
        t0 = time.time()
        for _, snaps in iter_world_snapshots(enc, [s], (preset,), seconds, budgets, ev, progress=progress,
                                             strides=st, pool=pool, retention=retention):
            save_shard(path, snaps, pool, retention)
        print(f"[produce] {split} world {s} ({preset}): {len(snaps)} snapshots, "
              f"{sum(len(x.questions) for x in snaps)} questions, {time.time() - t0:.0f}s", flush=True)


def fit_vocab(extra_texts: list[str] | None = None) -> Vocab:
    """The vocabulary of StreamWorld's question templates (from a few generated streams)."""
    from streammem.world import World
    from streammem.world.questions import AGE_BUCKETS, QUADRANTS

    texts = list(extra_texts or [])
    for s in range(3):
        for preset in ("clean", "medium", "hard"):
            for q in World(seed=990_000 + s, preset=preset, size=256, seconds=400).questions(every_s=5):
                texts.append(q["question"])
                texts.extend(q["candidates"])
    texts += QUADRANTS + [b[2] for b in AGE_BUCKETS] + [str(i) for i in range(10)]
    return Vocab.fit(texts)


def label_space(encoder, grounding: bool = True) -> dict:
    """``labels`` / ``num_classes`` for a :class:`SmallAnswerer` sharing ``encoder``'s label heads
    (StreamWorld's class names after background, then its colour names)."""
    if not grounding:
        return {}
    from streammem.world.objects import CLASSES, COLOUR_NAMES

    labels = ["<background>"] + list(CLASSES) + list(COLOUR_NAMES) + ["natural"]
    n_cls, n_col = encoder.cls_head.out_features, encoder.colour_head.out_features
    if (n_cls, n_col) != (1 + len(CLASSES), len(COLOUR_NAMES) + 1):
        raise ValueError(f"the encoder's heads ({n_cls} classes, {n_col} colours) are not StreamWorld's labels")
    return {"labels": labels, "num_classes": n_cls}


def _snapshot_tokens(s: Snapshot) -> Tokens:
    """A snapshot's memory as the answerer reads it (features back to float)."""
    return Tokens(features=s.memory.features.float(), frame_index=s.memory.frame_index, timestamp=s.memory.timestamp,
                  grid=s.memory.grid, level=s.memory.level)


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


class _ShardPool:
    """Snapshots from the shards in ``root/train``, loaded as they appear, at most ``cap_mb``."""

    def __init__(self, root: Path, cap_mb: float, rng: random.Random, budgets: tuple[str, ...] | None = None,
                 pool: str | None = None) -> None:
        self.root, self.cap, self.rng, self.budgets, self.pool = root, cap_mb * 2 ** 20, rng, budgets, pool
        self.snapshots: list[Snapshot] = []
        self.seen: set[str] = set()
        self.bytes = 0
        self.dropped = 0
        self.questions = 0
        self.broken: list[str] = []

    def refresh(self) -> int:
        """Load new shards; returns how many snapshots the pool holds."""
        for p in sorted((self.root / "train").glob("*.safetensors")):
            if p.name in self.seen:
                continue
            self.seen.add(p.name)
            try:
                loaded = load_shard(p, self.pool)
            except PoolMismatch:
                raise
            except Exception as e:  # a broken shard must not end a training run: skip it, say so
                self.broken.append(p.name)
                print(f"[answerer] skipping unreadable shard {p}: {e}", flush=True)
                continue
            new = [x for x in loaded if self.budgets is None or x.budget in self.budgets]
            self.snapshots += new
            self.bytes += sum(x.memory.features.nbytes for x in new)
            self.questions += sum(len(x.questions) for x in new)
            while self.bytes > self.cap and len(self.snapshots) > 1:
                i = self.rng.randrange(len(self.snapshots))
                self.snapshots[i], self.snapshots[-1] = self.snapshots[-1], self.snapshots[i]
                self.bytes -= self.snapshots.pop().memory.features.nbytes
                self.dropped += 1
        return len(self.snapshots)

    def summary(self) -> str:
        return (f"{len(self.seen) - len(self.broken)} shards ({self.questions} questions); {len(self.snapshots)} "
                f"snapshots held, {self.dropped} dropped by the {self.cap / 2 ** 20:.0f} MB cap"
                + (f"; {len(self.broken)} unreadable shards skipped: {', '.join(self.broken)}" if self.broken else ""))


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


@dataclass
class EventGateData:
    """What :func:`fit_event_gate` fits on, one row per question (see
    :meth:`SmallAnswerer._forward`'s ``event_parts``): the frozen model's logits before the
    event head ``base (N, C)`` (``-inf`` past a question's candidates), ``[CLS]`` states
    ``cls (N, d)``, signed features ``feats (N, C, 8)``, the right candidate ``target (N,)``, the
    memory's support around the stated time ``support (N, 2)``."""

    base: torch.Tensor
    cls: torch.Tensor
    feats: torch.Tensor
    target: torch.Tensor
    support: torch.Tensor

    def __len__(self) -> int:
        return len(self.target)


@torch.no_grad()
def event_gate_data(model: SmallAnswerer, snaps, progress: bool = True) -> EventGateData:
    """Run the frozen ``model`` over ``snaps`` (an iterable of :class:`Snapshot`) and keep what
    its event head's gate reads, per question."""
    if not model.event_head:
        raise ValueError("event_gate_data needs an answerer with the event head (event_head=True)")
    model.eval()
    parts: list = []
    targets = []
    for s in tqdm(snaps, desc="event-gate data", unit="snapshot", disable=not progress):
        qs = s.questions
        batch = encode_questions(model.vocab, [q["question"] for q in qs], [q["candidates"] for q in qs],
                                 [s.query_time] * len(qs), model.max_len, model.max_cand)
        got: list = []
        model._forward(_snapshot_tokens(s), batch, event_parts=got)
        if not got:  # an empty memory: the head adds nothing, the question teaches the gate nothing
            continue
        base, cls, feats, support = got[0]
        valid = torch.arange(model.max_cand)[None] < batch.n_cand[:, None]
        parts.append((base.masked_fill(~valid, float("-inf")), cls, feats, support))
        targets += [q["candidates"].index(q["answer"]) for q in qs]
    if not parts:
        raise ValueError("event_gate_data: no question had a memory to read")
    base, cls, feats, support = (torch.cat(x) for x in zip(*parts))
    return EventGateData(base, cls, feats, torch.tensor(targets), support)


def fit_event_gate(model: SmallAnswerer, data: EventGateData, weight_decay: float = 0.1, iters: int = 300,
                   val: EventGateData | None = None) -> dict:
    """Re-fit only the event head's gate (``model.event_gate``: 1,032 weights at d = 128) and,
    for a ``calibrated`` answerer, the scale of the blocks' logits and the gate's support term
    (``model.base_scale``, ``model.support_gate``: 131 + 16), by full-batch L-BFGS on the
    cross-entropy of ``scale(cls, support) * base + feats . (gate(cls) + U support)``;
    everything else stays frozen. ``weight_decay``: L2 pull of every fitted weight towards
    where it started (for a first calibration: the scale at 1, the support term at 0); 0.1 was
    chosen by leaving 2 of 12 unseen worlds out in turn (1e-3 fitted its worlds but gained
    nothing on held-out ones at the ovbench budget; 10 gained less everywhere).
    Returns ``{"before" | "after": {"train" | "val": (loss, accuracy)}}``.

    Why: the head joins the answerer late in training (phase D), and on worlds it never saw the
    blocks' logits are overconfident (validation loss 2.2 against 0.7 on its training worlds),
    most of all on past-memory questions about old events, where the head's evidence alone
    answers far better than the whole model (README)."""
    modules = [model.event_gate, *([model.base_scale, model.support_gate] if model.calibrated else [])]
    params = [p for m in modules for p in m.parameters()]
    start = [p.detach().clone() for p in params]

    def logits_of(d: EventGateData) -> torch.Tensor:
        # the model's own event-head sum; -inf marks absent candidates: kept out of the product's gradient
        absent = torch.isinf(d.base)
        out = model._event_logits(d.base.masked_fill(absent, 0.0), d.cls, d.feats, d.support)
        return out.masked_fill(absent, float("-inf"))

    def loss_acc(d: EventGateData) -> tuple[float, float]:
        with torch.no_grad():
            logits = logits_of(d)
            return float(F.cross_entropy(logits, d.target)), float((logits.argmax(-1) == d.target).float().mean())

    report = {"before": {"train": loss_acc(data)}}
    if val is not None:
        report["before"]["val"] = loss_acc(val)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits_of(data), data.target)
        loss = loss + weight_decay * sum((p - p0).square().sum() for p, p0 in zip(params, start))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    report["after"] = {"train": loss_acc(data)}
    if val is not None:
        report["after"]["val"] = loss_acc(val)
    return report


def refit_event_gate(init: str | Path, data: str | Path, out: str | Path, weight_decay: float = 0.1,
                     iters: int = 300, threads: int = 2, calibrate: bool = True, progress: bool = True) -> dict:
    """Load the answerer at ``init`` (made ``calibrated`` when ``calibrate``: the scale starts at
    1), re-fit its event gate and scale (:func:`fit_event_gate`) on the snapshot shards in
    ``data/train`` (validated on ``data/val`` when it has shards) and save the result to
    ``out``, with ``init``'s ``training.json`` plus an ``event_gate_refit`` record. The shards
    must be worlds ``init`` was not trained on: on its own training worlds the blocks' logits
    are right far more often than on new ones and would teach the gate to trust them."""
    root = Path(data)
    if not any((root / "train").glob("*.safetensors")):
        raise ValueError(f"{root / 'train'} holds no snapshot shards (streammem train qa-snapshots)")
    cfg_path = Path(init) / "config.json"
    if not calibrate and cfg_path.is_file() and json.loads(cfg_path.read_text()).get("calibrated"):
        raise ValueError(f"{init} is already calibrated: its scale and support term are refitted with the gate "
                         "(calibrate=True)")
    torch.set_num_threads(threads)
    with warnings.catch_warnings():  # a first calibration: the scale is new, starting at 1, as it should
        warnings.filterwarnings("ignore", message=r".*left at their initial values: base_scale\.bias, "
                                                  r"base_scale\.weight, support_gate\.weight$")
        model = SmallAnswerer.from_pretrained(str(init), **({"calibrated": True} if calibrate else {}))

    def collect(split: str) -> tuple[EventGateData | None, int]:
        paths = sorted((root / split).glob("*.safetensors"))
        if not paths:
            return None, 0
        snaps = (s for p in paths for s in load_shard(p, model.memory_pool))  # one shard in memory at a time
        return event_gate_data(model, snaps, progress=progress), len(paths)

    train_data, n_train = collect("train")
    val_data, n_val = collect("val")
    report = fit_event_gate(model, train_data, weight_decay=weight_decay, iters=iters, val=val_data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    prev = Path(init) / "training.json"
    summary = json.loads(prev.read_text()) if prev.is_file() else {}
    summary["event_gate_refit"] = {
        "init": str(init), "data": str(root), "train_shards": n_train, "train_questions": len(train_data),
        "val_shards": n_val, "val_questions": len(val_data) if val_data is not None else 0,
        "weight_decay": weight_decay, "iters": iters, "calibrated": model.calibrated,
        "loss_accuracy": {k: {split: [round(v, 4) for v in la] for split, la in r.items()} for k, r in report.items()},
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    return report


def _save(model: SmallAnswerer, out: Path, cfg: AnswererTrainConfig, step: int, seconds: float,
          val: dict | None, data: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    summary = {"steps": step, "wall_s": round(seconds, 1), "validation_accuracy": val, "data": data,
               "train_config": asdict(cfg)}
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")


def main() -> None:  # python -m streammem.train.answerer [OPTIONS]: the same as `streammem train answerer`
    import sys

    from streammem.cli import app

    app(["train", "answerer", *sys.argv[1:]])


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
