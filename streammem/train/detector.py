"""Train the shipped small detector on StreamWorld clips, MAMBA-style (no bank in training).

Each sample is a triple of frames of one clip (a key frame and 2 reference frames drawn
uniformly from the clip). Every frame of a triple is trained as a key frame whose keys come
from the other two: instance keys are the pre-enhancement fc6 features of their top-75
proposals, pixel keys are backbone features inside their ground-truth boxes (<= 100 per box,
``pixel_keys`` in all). With probability ``self_ref`` a triple is one frame three times (the
single-frame case, and what a stream sees while its bank is empty; MAMBA uses copies of DET
images the same way). With probability ``key_corrupt`` the first frame of a triple gets one
extra corruption (blur, defocus, noise, low light, occluder or JPEG) that its references do not
have, so the enhancement learns to borrow from cleaner frames, as a stream's bank lets it.
A ``fusion_radius`` model (temporal fusion, :class:`~streammem.models.fusion.LocalFusion`)
trains it on the key frame of each non-self triple: with ``history`` > 0 the 1..``history``
frames just before the key frame in the clip are run first (without gradients), each fused
with the one before, and the key frame is fused with the last of them, as a stream's frame is
with the previous frame's fused map. (The key frame's extra corruption, below, is then a burst
that its history does not have.) A ``geo_pos`` model's geometry prior sees each key's proposal centre and its age (the time
between its reference frame and the key frame), as the streaming pipeline gives it bank keys'.

Losses: CenterNet focal loss on the objectness heatmap, L1 on centre offset and log size at
object centres, cross-entropy over (background + classes) for RoIs (the model's own top
proposals plus jittered ground-truth boxes; IoU >= 0.5 is foreground), smooth L1 on box deltas
of foreground RoIs.

The loop runs under ``accelerate`` for a wall-clock budget (``minutes``), with a cosine
learning-rate schedule over that budget, a tqdm bar, and ``save_pretrained`` checkpoints every
``save_every_min`` minutes and at the end.

Example (a few steps; ``streammem train detector`` is the same from the shell)::

    from streammem.train.detector import TrainConfig, train
    train(TrainConfig(minutes=0.2, out="/tmp/det"))
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from streammem.models.detector import STRIDE, SmallDetector, box_iou, encode_deltas

__all__ = ["TrainConfig", "TripleStream", "train", "detector_losses"]


@dataclass
class TrainConfig:
    """Attributes:
    out: checkpoint folder (``config.json`` + ``model.safetensors``).
    minutes: wall-clock training budget.
    batch: triples per step.
    lr: peak AdamW learning rate (cosine to 5% over the budget, 3% warm-up).
    presets: preset mix, sampled uniformly per clip.
    size: frame side in pixels.
    clip_len: frames rendered per clip; triples are drawn from them.
    triples_per_clip: samples drawn after each newly rendered clip, from a pool of the last
        ``pool_clips`` clips (so a batch mixes clips and rendering is not the bottleneck).
    self_ref: probability that a triple is one frame three times.
    key_corrupt: probability that the first frame of a triple gets one extra pixel corruption
        (a type of ``PIXEL_CORRUPTIONS`` at intensity 0.4-1.0) that its references do not have.
        A stream's degraded frame (a blur burst, a dark stretch, an occluder) usually has cleaner
        frames in the bank: this teaches the enhancement to borrow from them. A self triple
        (the single-frame case) is corrupted the same way, so the single-frame model sees as
        many degraded frames as the aggregated one.
    seed: data and init seed.
    workers: DataLoader worker processes rendering clips.
    threads: torch threads of the training process.
    save_every_min: checkpoint period.
    max_steps: optional step cap (for smoke tests).
    log: optional JSONL file of per-step losses.
    resume: a checkpoint folder to start from (its weights and model config; the schedule
        starts afresh over ``minutes``).
    model: SmallDetector keyword arguments.
    history: most frames of consecutive history before a non-self triple's key frame (1 to
        ``history``, uniformly; fewer when the key frame is near the clip's start), whose fused
        state the key frame is fused with. Needed by a ``fusion_radius`` model (else its fusion
        never trains) and refused without one. The history pass runs without gradients and
        with the backbone's BatchNorm in eval mode (running statistics, not updated), as at
        inference.
    """

    out: str = "outputs/checkpoints/detector"
    minutes: float = 30.0
    batch: int = 3
    lr: float = 2e-3
    presets: tuple[str, ...] = ("clean", "medium", "hard", "hard")
    size: int = 256
    clip_len: int = 12
    triples_per_clip: int = 8
    pool_clips: int = 6
    self_ref: float = 0.2
    key_corrupt: float = 0.0
    seed: int = 0
    workers: int = 1
    threads: int = 2
    save_every_min: float = 5.0
    max_steps: int | None = None
    log: str | None = None
    resume: str | None = None
    model: dict = field(default_factory=dict)
    history: int = 0

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"TrainConfig.minutes must be > 0, got {self.minutes}")
        if self.batch < 1 or self.clip_len < 3:
            raise ValueError(f"TrainConfig.batch must be >= 1 and clip_len >= 3, got {self.batch}, {self.clip_len}")
        if not 0 <= self.self_ref <= 1:
            raise ValueError(f"TrainConfig.self_ref must be in [0, 1], got {self.self_ref}")
        if self.history < 0 or self.history >= self.clip_len:
            raise ValueError(f"TrainConfig.history must be in [0, clip_len), got {self.history}")
        if not 0 <= self.key_corrupt <= 1:
            raise ValueError(f"TrainConfig.key_corrupt must be in [0, 1], got {self.key_corrupt}")


def _frame_target(frame) -> dict:
    gt = frame.info["gt"]
    return {
        "image": torch.from_numpy(frame.image).permute(2, 0, 1).float().div_(255.0),
        "boxes": torch.from_numpy(np.asarray(gt["boxes"], np.float32)).reshape(-1, 4),
        "class_id": torch.from_numpy(np.asarray(gt["class_id"], np.int64)).reshape(-1),
        "t": float(frame.timestamp),
    }


class TripleStream(IterableDataset):
    """Endless triples ``[key, ref, ref]`` of frame dicts (``image (3, H, W)``, ``boxes``,
    ``class_id``), each from a fresh seeded world clip. World seeds start at 10_000_000 so
    training never sees the evaluation worlds (seeds < 10_000)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __iter__(self):
        from streammem.world import World

        info = get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([self.cfg.seed, wid, 77])
        c = self.cfg
        pool: list[list[dict]] = []
        while True:
            preset = c.presets[int(rng.integers(len(c.presets)))]
            seed = 10_000_000 + int(rng.integers(0, 2**30))
            start = int(rng.integers(0, 200))
            w = World(seed=seed, preset=preset, size=c.size, fps=8, drop_frames=False, start=start,
                      frames=start + c.clip_len)
            frames = [_frame_target(f) for f in w]
            if len(frames) < 3:
                continue
            pool.append(frames)
            if len(pool) > c.pool_clips:
                pool.pop(0)
            for _ in range(c.triples_per_clip):
                clip = pool[int(rng.integers(len(pool)))]
                hist: list[dict] = []
                if rng.random() < c.self_ref:
                    i = int(rng.integers(len(clip)))
                    triple = [clip[i]] * 3
                else:
                    if c.history:  # the key frame has at least one frame before it
                        i = int(rng.integers(1, len(clip)))
                        refs = rng.choice([j for j in range(len(clip)) if j != i], 2, replace=False)
                        idx = [i, *refs]
                        m = int(rng.integers(1, c.history + 1))
                        hist = clip[max(0, i - m):i]
                    else:
                        idx = rng.choice(len(clip), 3, replace=False)
                    triple = [clip[int(i)] for i in idx]
                if rng.random() < c.key_corrupt:
                    key = _corrupted(triple[0], rng)
                    triple = [key] * 3 if triple[0] is triple[1] else [key] + triple[1:]
                if hist:
                    triple = [dict(triple[0], history=hist)] + triple[1:]
                yield triple


def _corrupted(frame: dict, rng: np.random.Generator) -> dict:
    """A copy of a frame dict with one extra pixel corruption (see ``TrainConfig.key_corrupt``)."""
    from streammem.world.corruptions import PIXEL_CORRUPTIONS, corrupt_once

    img = (frame["image"].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    name = PIXEL_CORRUPTIONS[int(rng.integers(len(PIXEL_CORRUPTIONS)))]
    out = corrupt_once(img, name, float(rng.uniform(0.4, 1.0)), seed=int(rng.integers(2**31)),
                       motion=tuple(rng.normal(0.0, 3.0, 2)))
    return dict(frame, image=torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float().div_(255.0))


def _collate(items):
    return items


# ---------------------------------------------------------------------- losses
def _gaussian_targets(boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Heatmap ``(h, w)`` with a Gaussian per object centre, and per object its centre cell and
    box target (dx, dy, log w/8, log h/8)."""
    heat = torch.zeros(h, w)
    cells, regs = [], []
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for b in boxes:
        bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
        if bw < 1 or bh < 1:
            continue
        cx, cy = float(b[0] + b[2]) / 2 / STRIDE, float(b[1] + b[3]) / 2 / STRIDE
        ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
        sigma = max(0.5, 0.15 * max(bw, bh) / STRIDE)
        g = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma * sigma))
        heat = torch.maximum(heat, g)
        cells.append((iy, ix))
        regs.append([cx - ix - 0.5, cy - iy - 0.5, math.log(bw / STRIDE), math.log(bh / STRIDE)])
    return heat, cells, torch.tensor(regs, dtype=torch.float32).reshape(-1, 4)


def _focal(logit: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    neg = 1 - pos
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - heat) ** 4 * neg).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def _pixel_keys(feat: torch.Tensor, boxes: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Backbone features ``(C, h, w)`` inside ``boxes`` (<= 100 random pixels per box), at most ``n``."""
    c, h, w = feat.shape
    out = []
    for b in boxes:
        x0, y0 = int(b[0] // STRIDE), int(b[1] // STRIDE)
        x1, y1 = max(x0 + 1, int(math.ceil(float(b[2]) / STRIDE))), max(y0 + 1, int(math.ceil(float(b[3]) / STRIDE)))
        f = feat[:, y0:min(y1, h), x0:min(x1, w)].reshape(c, -1).t()
        if f.shape[0] > 100:
            f = f[torch.randperm(f.shape[0], generator=gen)[:100]]
        out.append(f)
    if not out:
        return feat.new_zeros(0, c)
    k = torch.cat(out)
    if k.shape[0] > n:
        k = k[torch.randperm(k.shape[0], generator=gen)[:n]]
    return k


def detector_losses(model: SmallDetector, triples: list, gen: torch.Generator) -> dict:
    """Losses of a batch of triples (see the module docstring); returns named scalars."""
    dev = next(model.parameters()).device
    imgs = torch.stack([f["image"] for t in triples for f in t]).to(dev)
    feat = model.features(imgs)  # 3B, C, h, w
    fused_key = _fused_keys(model, triples, feat, dev)
    b3, c, h, w = feat.shape
    size_hw = (imgs.shape[2], imgs.shape[3])
    losses = {"heat": 0.0, "reg": 0.0, "cls": 0.0, "box": 0.0}
    n_frames = 0
    for ti, t in enumerate(triples):
        base = 3 * ti
        # pixel keys of each frame: features inside the gt boxes of the other two frames
        enh = []
        for j in range(3):
            others = [base + o for o in range(3) if o != j]
            pk = torch.cat([_pixel_keys(feat[o], t[o - base]["boxes"], model.pixel_keys, gen) for o in others])
            if pk.shape[0] > model.pixel_keys:
                pk = pk[torch.randperm(pk.shape[0], generator=gen)[: model.pixel_keys]]
            if t[0] is t[1]:  # self triple: the single-frame case, keys from the frame itself
                pk = pk[:0]
            f = fused_key[ti] if j == 0 and ti in fused_key else feat[base + j: base + j + 1]
            enh.append(model.enhance_pixels(f, pk))
        enh_t = torch.cat(enh)
        obj, boxmap = model.proposal_maps(enh_t)
        # proposals and fc6 of every frame
        props, fc6s = [], []
        for j in range(3):
            p, _ = model.decode_proposals(obj[j:j + 1].detach(), boxmap[j:j + 1].detach(), model.num_proposals)
            props.append(p)
            fc6s.append(model.roi_fc6(enh_t[j:j + 1], p[: model.bank_proposals]))
        for j in range(3):
            fr = t[j]
            gtb, gtc = fr["boxes"].to(dev), fr["class_id"].to(dev)
            heat, cells, regs = _gaussian_targets(gtb.cpu(), h, w)
            losses["heat"] = losses["heat"] + _focal(obj[j, 0], heat.to(dev))
            if cells:
                iy = torch.tensor([cc[0] for cc in cells], device=dev)
                ix = torch.tensor([cc[1] for cc in cells], device=dev)
                losses["reg"] = losses["reg"] + F.l1_loss(boxmap[j][:, iy, ix].t(), regs.to(dev))
            # RoIs: own proposals + jittered gt
            rois = [props[j]]
            if len(gtb):
                wh = (gtb[:, 2:] - gtb[:, :2]).repeat(3, 1)
                jit = gtb.repeat(3, 1) + torch.randn(wh.shape[0], 4, generator=gen).to(dev) * 0.1 * wh.repeat(1, 2)
                rois.append(gtb)
                rois.append(jit)
            rois = torch.cat(rois)
            rois = torch.stack([rois[:, 0].clamp(0, size_hw[1]), rois[:, 1].clamp(0, size_hw[0]),
                                rois[:, 2].clamp(0, size_hw[1]), rois[:, 3].clamp(0, size_hw[0])], 1)
            rois = torch.cat([rois[:, :2], torch.maximum(rois[:, 2:], rois[:, :2] + 1)], 1)
            fc6 = model.roi_fc6(enh_t[j:j + 1], rois)
            refs = [j] if t[0] is t[1] else [o for o in range(3) if o != j]
            keys = torch.cat([fc6s[o] for o in refs])
            bias = None
            if model.geo_pos:  # key centres and ages (the reference frame's time minus the key's)
                kb = torch.cat([props[o][: model.bank_proposals] for o in refs])
                age = torch.cat([kb.new_full((min(len(props[o]), model.bank_proposals),),
                                             t[o].get("t", 0.0) - fr.get("t", 0.0)) for o in refs])
                bias = model.position_bias(rois, model.box_centres(kb), age)
            logits, deltas = model.head(fc6, keys, bias)
            labels = torch.zeros(rois.shape[0], dtype=torch.long, device=dev)
            if len(gtb):
                iou = box_iou(rois, gtb)
                best, arg = iou.max(1)
                fg = best >= 0.5
                labels[fg] = gtc[arg[fg]] + 1
                if fg.any():
                    tgt = encode_deltas(rois[fg], gtb[arg[fg]])
                    losses["box"] = losses["box"] + F.smooth_l1_loss(deltas[fg], tgt, beta=1 / 9)
            losses["cls"] = losses["cls"] + F.cross_entropy(logits, labels)
            n_frames += 1
    out = {k: v / n_frames for k, v in losses.items()}
    out["total"] = out["heat"] + out["reg"] + out["cls"] + out["box"]
    return out


def _fused_keys(model: SmallDetector, triples: list, feat: torch.Tensor, dev) -> dict:
    """Key frames with a ``history``: ``{triple index: fused features (1, C, h, w)}``. The
    history frames' features and states are computed without gradients (one backbone pass for
    the batch); the key frame's fusion step has them."""
    if not model.fusion_radius:
        return {}
    hist = [(ti, t[0]["history"]) for ti, t in enumerate(triples) if t[0].get("history")]
    if not hist:
        return {}
    was = model.backbone.training
    model.backbone.eval()  # BatchNorm: running statistics, not updated by the history frames
    states, at = {}, 0
    with torch.no_grad():
        hf = model.features(torch.stack([f["image"] for _, h in hist for f in h]).to(dev))
        for ti, h in hist:
            state = None
            for j in range(len(h)):
                state = model.fuse(hf[at + j: at + j + 1], state)
            states[ti], at = state, at + len(h)
    model.backbone.train(was)
    return {ti: model.fuse(feat[3 * ti: 3 * ti + 1], state) for ti, state in states.items()}


# ---------------------------------------------------------------------- loop
def train(cfg: TrainConfig) -> SmallDetector:
    """Train for ``cfg.minutes`` of wall clock; saves to ``cfg.out`` as it goes. Returns the model."""
    from accelerate import Accelerator

    from streammem.world import CLASSES

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if cfg.resume:  # cfg.model entries override the checkpoint's config (new parameters start at their init)
        model = SmallDetector.from_pretrained(cfg.resume, **cfg.model)
    else:
        model = SmallDetector(num_classes=len(CLASSES), class_names=list(CLASSES), **cfg.model)
    if bool(model.fusion_radius) != bool(cfg.history):
        raise ValueError(
            f"TrainConfig.history={cfg.history} with a detector of fusion_radius={model.fusion_radius}: "
            "a temporal-fusion model needs history frames to train its fusion (e.g. history=4), and "
            "history needs a fusion model (e.g. model={'fusion_radius': 2})")
    # the geometry prior (geo_pos) is a few logit-scale weights: it learns at 10x the rate;
    # the temporal fusion (fusion_radius) at 5x
    scale = {"pos_bias.": 10.0, "fusion.": 5.0}
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not any(n.startswith(k) for k in scale)], "lr_scale": 1.0}]
    for k, v in scale.items():
        ps = [p for n, p in named if n.startswith(k)]
        if ps:
            groups.append({"params": ps, "lr_scale": v})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=1e-4)
    loader = DataLoader(TripleStream(cfg), batch_size=cfg.batch, collate_fn=_collate, num_workers=cfg.workers,
                        prefetch_factor=4 if cfg.workers else None, persistent_workers=bool(cfg.workers))
    model, opt = acc.prepare(model, opt)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    log = open(cfg.log, "a") if cfg.log else None
    budget = cfg.minutes * 60.0
    t0 = last_save = time.time()
    step, ema = 0, None
    bar = tqdm(total=int(budget), unit="s", desc="train detector", disable=not acc.is_main_process)
    model.train()
    for batch in loader:
        elapsed = time.time() - t0
        if elapsed >= budget or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        frac = elapsed / budget
        lr = cfg.lr * (frac / 0.03 if frac < 0.03 else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        losses = detector_losses(acc.unwrap_model(model), batch, gen)
        opt.zero_grad(set_to_none=True)
        acc.backward(losses["total"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        vals = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
        ema = vals if ema is None else {k: 0.95 * ema[k] + 0.05 * vals[k] for k in vals}
        bar.update(int(time.time() - t0) - bar.n)
        bar.set_postfix(step=step, loss=f"{ema['total']:.3f}", cls=f"{ema['cls']:.3f}", heat=f"{ema['heat']:.3f}")
        if log:
            log.write(json.dumps({"step": step, "time_s": round(time.time() - t0, 1), "lr": lr, **vals}) + "\n")
            log.flush()
        if time.time() - last_save >= cfg.save_every_min * 60:
            _save(acc, model, out, cfg, step, time.time() - t0, ema)
            last_save = time.time()
    bar.close()
    _save(acc, model, out, cfg, step, time.time() - t0, ema)
    if log:
        log.close()
    return acc.unwrap_model(model)


def _save(acc, model, out: Path, cfg: TrainConfig, step: int, seconds: float, ema: dict | None) -> None:
    if not acc.is_main_process:
        return
    m = acc.unwrap_model(model)
    out.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(out)
    summary = {"steps": step, "wall_s": round(seconds, 1), "loss_ema": ema, "train_config": asdict(cfg)}
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
