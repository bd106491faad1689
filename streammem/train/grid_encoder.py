"""Pretrain :class:`~streammem.models.grid_encoder.GridEncoder` on StreamWorld dense cell targets.

Per 16 x 16 token cell, from ``info["id_mask"]`` (``World(debug=True)``) and the ground truth:
the object covering most of the cell (if it covers at least ``min_cover`` of it) gives the
class target (else background) and the colour target; the share of the cell covered by any
object is the objectness target. Loss: class cross-entropy + colour cross-entropy (object cells
only) + objectness binary cross-entropy.

Frames come from clips of ``clip_len`` frames at seeded offsets in many worlds (earlier frames
are simulated without rendering, so late offsets cost little), all presets mixed.

Example (tiny; ``streammem train encoder`` is the same from the shell)::

    from streammem.train.grid_encoder import EncoderTrainConfig, train_encoder
    m = train_encoder(EncoderTrainConfig(worlds=1, clip_len=4, steps=2, batch=4, width=8, dim=16,
                                         out=None, val_worlds=1))
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streammem.models.grid_encoder import GridEncoder, images_to_tensor
from streammem.world import World
from streammem.world.objects import CLASSES, COLOUR_NAMES

__all__ = ["EncoderTrainConfig", "cell_targets", "make_frames", "train_encoder"]

COLOURS_ALL = COLOUR_NAMES + ["natural"]


@dataclass
class EncoderTrainConfig:
    worlds: int = 40
    clip_len: int = 48
    frame_stride: int = 2
    val_worlds: int = 3
    steps: int = 1500
    minutes: float = 10.0
    batch: int = 24
    lr: float = 2e-3
    dim: int = 64
    width: int = 16
    min_cover: float = 0.2
    bg_weight: float = 0.2
    seed: int = 0
    out: str | None = "outputs/checkpoints/grid_encoder"
    log: str | None = None


def cell_targets(frame, grid: int = 16, min_cover: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(grid, grid)`` class target (0 = background, 1 + class id), colour target (-1 where
    background) and objectness (covered share) of one ``World(debug=True)`` frame."""
    ids = frame.info["id_mask"]
    gt = frame.info["gt"]
    h, w = ids.shape
    ch, cw = h // grid, w // grid
    ids = ids[: ch * grid, : cw * grid].reshape(grid, ch, grid, cw)
    cover = np.zeros((len(gt["track_id"]) + 1, grid, grid), np.float32)
    for k, tid in enumerate(gt["track_id"]):
        cover[k + 1] = (ids == tid).mean((1, 3))
    obj = cover[1:].sum(0) if len(gt["track_id"]) else np.zeros((grid, grid), np.float32)
    best = cover.argmax(0)
    big = cover.max(0) >= min_cover
    cls = np.zeros((grid, grid), np.int64)
    col = np.full((grid, grid), -1, np.int64)
    if len(gt["track_id"]):
        cls_ids = np.concatenate([[0], 1 + np.asarray(gt["class_id"])])
        col_ids = np.array([-1] + [COLOURS_ALL.index(c) for c in gt["colour"]])
        cls = np.where(big, cls_ids[best], 0)
        col = np.where(big & (best > 0), col_ids[best], -1)
    return cls, col, np.clip(obj, 0, 1)


def make_frames(seeds: list[int], clip_len: int, stride: int, size: int = 256, min_cover: float = 0.2):
    """Images and cell targets from one clip per seed (preset and offset drawn from the seed)."""
    presets = ["clean", "medium", "hard"]
    imgs, cls, col, obj = [], [], [], []
    for s in seeds:
        rng = np.random.default_rng([s, 77])
        preset = presets[s % 3]
        start = int(rng.integers(0, 8 * 240))
        w = World(seed=s, preset=preset, size=size, frames=start + clip_len, start=start, debug=True)
        for i, f in enumerate(w):
            if i % stride:
                continue
            a, b, c = cell_targets(f, min_cover=min_cover)
            imgs.append(f.image)
            cls.append(a)
            col.append(b)
            obj.append(c)
    return (images_to_tensor(imgs, size), torch.from_numpy(np.stack(cls)), torch.from_numpy(np.stack(col)),
            torch.from_numpy(np.stack(obj)))


def _losses(model: GridEncoder, x, cls, col, obj, bg_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    tok = model(x)
    lc, lcol, lo = model.heads(tok)
    wts = torch.ones(lc.shape[-1])
    wts[0] = bg_weight
    l1 = F.cross_entropy(lc.reshape(-1, lc.shape[-1]), cls.reshape(-1), weight=wts)
    m = col.reshape(-1) >= 0
    l2 = F.cross_entropy(lcol.reshape(-1, lcol.shape[-1])[m], col.reshape(-1)[m]) if m.any() else lc.sum() * 0
    l3 = F.binary_cross_entropy_with_logits(lo, obj)
    with torch.no_grad():
        pred = lc.argmax(-1)
        fg = cls > 0
        stats = {
            "cell_acc": float((pred == cls).float().mean()),
            "fg_recall": float(((pred == cls) & fg).sum() / fg.sum().clamp(min=1)),
            "colour_acc": float((lcol.argmax(-1).reshape(-1)[m] == col.reshape(-1)[m]).float().mean()) if m.any() else float("nan"),
        }
    return l1 + l2 + l3, stats


def train_encoder(cfg: EncoderTrainConfig) -> GridEncoder:
    """Train, print progress, save to ``cfg.out`` (when set) and return the model in eval mode."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    x, cls, col, obj = make_frames([cfg.seed * 1000 + i for i in range(cfg.worlds)], cfg.clip_len, cfg.frame_stride, min_cover=cfg.min_cover)
    vx, vcls, vcol, vobj = make_frames([cfg.seed * 1000 + 500 + i for i in range(cfg.val_worlds)], cfg.clip_len, cfg.frame_stride, min_cover=cfg.min_cover)
    print(f"[grid_encoder] {len(x)} train / {len(vx)} val frames in {time.time() - t0:.0f}s", flush=True)
    model = GridEncoder(dim=cfg.dim, width=cfg.width, num_classes=len(CLASSES), num_colours=len(COLOURS_ALL))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    logf = open(cfg.log, "a") if cfg.log else None
    deadline = t0 + cfg.minutes * 60
    step = 0
    for step in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch,), generator=g)
        xb = x[idx]
        if torch.rand(1, generator=g).item() < 0.5:  # brightness / contrast jitter
            xb = (xb - 0.5) * (0.8 + 0.4 * torch.rand(1, generator=g)) + 0.5 + 0.1 * (torch.rand(1, generator=g) - 0.5)
        model.train()
        loss, st = _losses(model, xb.clamp(0, 1), cls[idx], col[idx], obj[idx], cfg.bg_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": round(float(loss), 4), **{k: round(v, 4) for k, v in st.items()},
                   "elapsed_s": round(time.time() - t0, 1)}
            print("[grid_encoder]", json.dumps(rec), flush=True)
            if logf:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
        if time.time() > deadline:
            break
    model.eval()
    with torch.no_grad():
        vals = [_losses(model, vx[i:i + 64], vcls[i:i + 64], vcol[i:i + 64], vobj[i:i + 64]) for i in range(0, len(vx), 64)]
    val = {k: round(float(np.mean([v[1][k] for v in vals])), 4) for k in vals[0][1]}
    val["loss"] = round(float(np.mean([float(v[0]) for v in vals])), 4)
    val["bg_share"] = round(float((vcls == 0).float().mean()), 4)
    summary = {"steps": step + 1, "wall_s": round(time.time() - t0, 1), "val": val, "config": asdict(cfg)}
    print("[grid_encoder] done", json.dumps(summary), flush=True)
    if logf:
        logf.write(json.dumps(summary) + "\n")
        logf.close()
    if cfg.out:
        model.save_pretrained(cfg.out)
    return model


if __name__ == "__main__":  # python -m streammem.train.grid_encoder [minutes]
    import sys

    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    train_encoder(EncoderTrainConfig(minutes=float(sys.argv[1]) if len(sys.argv) > 1 else 8.0,
                                     log="/tmp/grid_encoder_train.jsonl"))
