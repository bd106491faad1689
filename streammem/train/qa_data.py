"""QA training data: StreamWorld questions over Pyramid Memory Bank snapshots, in memory or as
safetensors shards on disk.

Snapshots (:func:`build_snapshots`, :func:`iter_world_snapshots`): seeded worlds stream through
the frozen :class:`~streammem.models.grid_encoder.GridEncoder` into one ``PyramidMemory`` per
budget (``ovbench`` 832 tokens, ``offline`` 9,984); at each question time the banks' contents
are snapshotted (as the streaming pipeline would read them: only frames up to that time) with
the questions asked then. A question at time t is answered before the first frame after t is
written. Snapshot features are kept in half precision. Training worlds take seeds from
``TRAIN_SEED0`` (20,000,000) up, validation worlds from ``VAL_SEED0`` (30,000,000), 1,000 apart
per ``seed``.

Shards (:func:`save_shard`, :func:`load_shard`, :func:`produce`): one safetensors file per
world, tensors only, the questions and the pyramids' pooling and retention rule in its JSON
metadata; written atomically, so a trainer can follow a folder a producer is still writing
(``streammem train qa-snapshots``; :class:`_ShardPool` is the trainer's side).

The answerer's vocabulary and label space: :func:`fit_vocab`, :func:`label_space`.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from streammem.checkpoints import ROOT as CHECKPOINTS
from streammem.memory import PyramidMemory
from streammem.models.answerer import Vocab
from streammem.models.grid_encoder import grid_tokens
from streammem.types import Tokens


#: the shipped frozen encoder (its folder inside the installed package)
SHIPPED_ENCODER = str(CHECKPOINTS / "grid_encoder")

__all__ = ["TRAIN_SEED0", "VAL_SEED0", "Snapshot", "build_snapshots", "iter_world_snapshots", "PoolMismatch",
           "shard_pool", "save_shard", "load_shard", "produce", "fit_vocab", "label_space"]

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


def produce(out_dir: str | Path, encoder: str = SHIPPED_ENCODER, worlds: int = 60,
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
    """The vocabulary of StreamWorld's question templates (from a few generated streams), plus
    the words of ``extra_texts``."""
    return Vocab.fit(list(extra_texts or []) + list(_template_texts()))


@functools.lru_cache(maxsize=1)
def _template_texts() -> tuple[str, ...]:
    """Every question and candidate of 9 generated streams (deterministic; computed once)."""
    from streammem.world import World
    from streammem.world.questions import AGE_BUCKETS, QUADRANTS

    texts = []
    for s in range(3):
        for preset in ("clean", "medium", "hard"):
            for q in World(seed=990_000 + s, preset=preset, size=256, seconds=400).questions(every_s=5):
                texts.append(q["question"])
                texts.extend(q["candidates"])
    texts += QUADRANTS + [b[2] for b in AGE_BUCKETS] + [str(i) for i in range(10)]
    return tuple(texts)


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
