"""Train :class:`~streammem.models.video_dit.CausalVideoDiT` on StreamWorld clips, on the CPU, resumable.

Data. ``n_seeds`` worlds (seeds ``seed_base + i``, presets alternating over ``presets``, no
corruptions, no dropped frames) rendered once at ``size`` px and ``fps`` for ``stream_frames``
frames each, cached as one ``.npz`` under ``cache_dir``. The presets are changed for training:
``loop_prob`` (default 0.6, StreamWorld's presets use 0.25) so that most camera segments are
loops that leave a place and come back to the exact same pose, and ``pan_speed`` (default 80
world px/s) so that the camera moves a few pixels per frame at 64 px and 4 fps. Held-out
evaluation worlds should use seeds below ``seed_base``.

One training example: a clip of ``clip_frames`` consecutive frames from a random stream and
offset, time-reversed with probability ``reverse_prob`` (RELIC's palindrome augmentation; the
actions are inverted accordingly), a chunk start ``k`` (shared by the batch, ``1 <= k <=
clip_frames - chunk_frames``), the clean frames ``0 .. k-1`` written one by one to a
``PoseKVMemory`` (the memory the model will read at generation time: a ``window`` of full-
resolution frames plus the RELIC-pooled history, all history retrieved), and the chunk
``k .. k+F-1`` noised by flow matching: ``s ~ logit-normal(0, 1)``, ``x_s = (1 - s) x0 + s eps``,
target ``v = eps - x0``, MSE; the anchor is clean frame ``k-1``. The prompt is the world's preset name, dropped to the empty
prompt with probability ``prompt_drop``.

Optimiser AdamW (betas 0.9, 0.99, weight decay 0.01), gradient clipping 1.0, linear warmup for
``warmup`` steps, then cosine decay to ``0.1 lr`` over the ``minutes`` budget (by elapsed time).

Outputs in ``out``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers
``save_pretrained``), ``training_state.safetensors`` (optimiser moments, torch RNG state) and
``training.json`` (step, elapsed time, train config, numpy RNG state, last losses), written every
``save_every_s`` seconds and at the end; ``train_log.jsonl`` gets one line per ``log_every``
steps and a validation line (fixed held-out batch, with the memory context and with the first
frame only) every ``val_every`` steps. Running again with the same ``out`` resumes from there
until the elapsed time reaches ``minutes``.

Usage (shell)::

    streammem train generator --minutes 60 --threads 1 --out outputs/checkpoints/generator
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from streammem.memory import RELIC_SCHEDULE, PoseKVMemory
from streammem.memory.posekv import _cells
from streammem.models.video_dit import ChunkContext, CausalVideoDiT
from streammem.train.generation_config import TrainConfig

__all__ = ["TrainConfig", "train", "render_streams", "reverse_actions", "ClipSampler", "batch_context"]

# action layout pairs (right/left, down/up, forward/backward, pitch, yaw, roll) swap when time runs backwards
_ACTION_SWAP = [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12]


def render_streams(cfg: TrainConfig, seeds: list[int]) -> dict[str, np.ndarray]:
    """Render one stream per seed: ``frames (S, T, H, W, 3) uint8``, ``poses (S, T, 4, 4)``,
    ``actions (S, T, 13)``, ``preset (S,)`` index into ``cfg.presets``."""
    from streammem.world import World
    from streammem.world.world import PRESETS

    frames, poses, actions, presets = [], [], [], []
    for i, seed in enumerate(seeds):
        name = cfg.presets[seed % len(cfg.presets)]
        w = World(seed=seed, preset=name, size=cfg.size, fps=cfg.fps, frames=cfg.stream_frames,
                  corruption="clean", drop_frames=False)
        w.params = dataclasses.replace(PRESETS[name], loop_prob=cfg.loop_prob, pan_speed=cfg.pan_speed)
        fr = list(w)
        frames.append(np.stack([f.image for f in fr]))
        poses.append(np.stack([f.pose for f in fr]).astype(np.float32))
        actions.append(np.stack([f.action for f in fr]).astype(np.float32))
        presets.append(cfg.presets.index(name))
    return {"frames": np.stack(frames), "poses": np.stack(poses), "actions": np.stack(actions),
            "preset": np.array(presets, np.int64)}


def _cached_streams(cfg: TrainConfig, seeds: list[int], tag: str) -> dict[str, np.ndarray]:
    key = json.dumps([seeds, cfg.size, cfg.fps, cfg.stream_frames, list(cfg.presets), cfg.loop_prob, cfg.pan_speed])
    path = Path(os.path.expanduser(cfg.cache_dir)) / f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    data = render_streams(cfg, seeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    return data


def reverse_actions(actions: np.ndarray) -> np.ndarray:
    """Actions ``(T, 13)`` of the time-reversed clip: reversed frame j's action is the inverse
    of original frame ``T-j``'s (swapped direction pairs); the first frame gets "static"."""
    out = np.zeros_like(actions)
    out[1:] = actions[::-1][:-1][:, _ACTION_SWAP]
    out[0, 12] = 1.0
    return out


def batch_context(model: CausalVideoDiT, frames: torch.Tensor, poses: torch.Tensor, window: int) -> ChunkContext:
    """What a ``PoseKVMemory(window=window, retrieval="all")`` returns from ``read()`` after
    writing frames ``0 .. k-1`` of each clip, for the whole batch at once: history frames (older
    than the window), oldest first, each pooled per axis by ``RELIC_SCHEDULE[i % 18]``, then the
    window at full resolution; the frames of each pooling factor are pooled in one call.
    ``frames (B, k, 3, H, W)``, ``poses (B, k, 4, 4)``."""
    b, k = frames.shape[:2]
    s = model.grid_side
    patches = model.patchify(frames).reshape(b, k, s, s, -1)
    factor = [1 if i >= k - window else RELIC_SCHEDULE[i % len(RELIC_SCHEDULE)] for i in range(k)]
    per_frame: list = [None] * k
    for f in sorted(set(factor)):
        idx = [i for i in range(k) if factor[i] == f]
        o = math.ceil(s / f)
        t = patches[:, idx]
        if o != s:
            t = t.reshape(b * len(idx), s, s, -1).permute(0, 3, 1, 2)
            t = torch.nn.functional.adaptive_avg_pool2d(t, (o, o)).permute(0, 2, 3, 1).reshape(b, len(idx), o, o, -1)
            gy, gx = torch.meshgrid(_cells(s, o), _cells(s, o), indexing="ij")
        else:
            gy, gx = (g.float() for g in torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij"))
        grid = torch.stack([gy.reshape(-1), gx.reshape(-1)], 1)
        for j, i in enumerate(idx):
            per_frame[i] = (t[:, j].reshape(b, o * o, -1), grid, f)
    tokens = torch.cat([p[0] for p in per_frame], 1)
    pose = torch.cat([poses[:, i, None].expand(b, len(p[1]), 4, 4) for i, p in enumerate(per_frame)], 1)
    grid = torch.cat([p[1] for p in per_frame], 0).expand(b, -1, 2)
    level = torch.cat([torch.full((len(p[1]),), p[2], dtype=torch.int64) for p in per_frame]).expand(b, -1)
    return ChunkContext(tokens, pose, grid, level, torch.ones(tokens.shape[:2], dtype=torch.bool))


class ClipSampler:
    """Draws training batches (clip, chunk start, memory context) from rendered streams."""

    def __init__(self, cfg: TrainConfig, data: dict[str, np.ndarray], model: CausalVideoDiT, rng: np.random.Generator):
        self.cfg, self.data, self.model, self.rng = cfg, data, model, rng
        self.words = [model.prompt_ids(p, 1) for p in cfg.presets]

    def memory(self) -> PoseKVMemory:
        g = self.model.grid_side
        return PoseKVMemory(dim=self.model.patch_dim, height=g, width=g, window=self.cfg.window,
                            history_frames=18 * math.ceil(self.cfg.clip_frames / 18), retrieval="all")

    def batch(self, k: int | None = None, reverse: bool | None = None, drop_prompt: bool = True,
              revisit: bool | None = None, build_context: bool = True) -> dict:
        cfg, rng = self.cfg, self.rng
        f = cfg.chunk_frames
        if k is None:
            k = int(rng.integers(1, cfg.clip_frames - f + 1))
        xs, acts, poses, prompts, ctx, anchors, anchor_poses = [], [], [], [], [], [], []
        n_streams, t_stream = self.data["frames"].shape[:2]
        for _ in range(cfg.batch_size):
            rev = bool(rng.random() < cfg.reverse_prob) if reverse is None else reverse
            want_revisit = bool(rng.random() < cfg.revisit_prob) if revisit is None else revisit
            for _try in range(40 if want_revisit else 1):
                s = int(rng.integers(n_streams))
                o = int(rng.integers(t_stream - cfg.clip_frames + 1))
                po = self.data["poses"][s, o:o + cfg.clip_frames]
                if rev:
                    po = po[::-1]
                if not want_revisit or self.revisits(po, k):
                    break
            fr = self.data["frames"][s, o:o + cfg.clip_frames]
            ac = self.data["actions"][s, o:o + cfg.clip_frames]
            if rev:
                fr, ac = fr[::-1], reverse_actions(ac)
            img = torch.from_numpy(np.ascontiguousarray(fr)).permute(0, 3, 1, 2).float() / 127.5 - 1
            po_t = torch.from_numpy(np.ascontiguousarray(po))
            ctx.append((img[:k], po_t[:k]))
            xs.append(img[k:k + f])
            anchors.append(img[k - 1])
            anchor_poses.append(po_t[k - 1])
            acts.append(torch.from_numpy(np.ascontiguousarray(ac[k:k + f])))
            poses.append(po_t[k:k + f])
            pid = self.words[int(self.data["preset"][s])]
            if drop_prompt and rng.random() < cfg.prompt_drop:
                pid = torch.zeros_like(pid)
            prompts.append(pid)
        ctx_frames, ctx_poses = torch.stack([c[0] for c in ctx]), torch.stack([c[1] for c in ctx])
        context = self.context(ctx_frames, ctx_poses) if build_context else None
        return {"x0": torch.stack(xs), "actions": torch.stack(acts), "poses": torch.stack(poses),
                "prompt_ids": torch.stack(prompts), "context": context, "anchor": torch.stack(anchors),
                "anchor_pose": torch.stack(anchor_poses), "k": k, "context_frames": ctx_frames,
                "context_poses": ctx_poses}

    def revisits(self, poses: np.ndarray, k: int) -> bool:
        """Whether a chunk starting at ``k`` returns to a pose last seen before the window
        (frames ``0 .. k - window - 1``) and not seen in the window since."""
        f, w = self.cfg.chunk_frames, self.cfg.window
        old, recent = poses[:max(0, k - w)], poses[max(0, k - w):k]
        for p in poses[k:k + f]:
            if len(old) and np.abs(old - p).max(axis=(1, 2)).min() < 1e-4 and (
                    not len(recent) or np.abs(recent - p).max(axis=(1, 2)).min() >= 1e-4):
                return True
        return False

    def context(self, frames: torch.Tensor, poses: torch.Tensor) -> ChunkContext:
        """The memory context of frames ``0 .. k-1`` of each clip (:func:`batch_context`)."""
        return batch_context(self.model, frames, poses, self.cfg.window)


def flow_loss(model: CausalVideoDiT, batch: dict, sigma: torch.Tensor, noise: torch.Tensor,
              context: ChunkContext | None = None) -> torch.Tensor:
    """Flow-matching MSE of ``v = eps - x0`` at noise levels ``sigma (B,)`` in [0, 1]."""
    x0 = batch["x0"]
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    v = model(xt, sigma * 1000, batch["actions"], batch["poses"], batch["prompt_ids"],
              batch["context"] if context is None else context, batch.get("anchor"), anchor_pose=batch.get("anchor_pose"))
    return (v - (noise - x0)).square().mean()


# ---------------------------------------------------------------------------------- state
def _save(out: Path, model, opt, step: int, elapsed: float, cfg: TrainConfig, rng: np.random.Generator,
          last: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tensors = {"rng.torch": torch.get_rng_state()}
    groups = []
    index = {id(p): i for i, p in enumerate(model.parameters())}
    for g in opt.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params"} | {"params": [index[id(p)] for p in g["params"]]})
        for p in g["params"]:
            for name, val in opt.state.get(p, {}).items():
                tensors[f"opt.{index[id(p)]}.{name}"] = val.detach().clone().contiguous()
    tmp = out / "training_state.tmp.safetensors"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / "training_state.safetensors")
    meta = {"step": step, "elapsed_s": elapsed, "config": dataclasses.asdict(cfg), "param_groups": groups,
            "numpy_rng": rng.bit_generator.state, "last": last}
    (out / "training.tmp.json").write_text(json.dumps(meta, indent=1))
    os.replace(out / "training.tmp.json", out / "training.json")


def _load_state(out: Path, model, opt, rng: np.random.Generator) -> tuple[int, float]:
    meta = json.loads((out / "training.json").read_text())
    tensors = load_file(str(out / "training_state.safetensors"))
    params = list(model.parameters())
    for g, saved in zip(opt.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(v, list) else v
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt.state[params[int(i)]][name] = val
    torch.set_rng_state(tensors["rng.torch"])
    rng.bit_generator.state = meta["numpy_rng"]
    return int(meta["step"]), float(meta["elapsed_s"])


def _lr(cfg: TrainConfig, step: int, elapsed: float) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(elapsed / (cfg.minutes * 60), 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) into ``cfg.out`` until ``cfg.minutes`` of training time have passed."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resume = (out / "training.json").exists() and (out / "training_state.safetensors").exists()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if resume:
        model = CausalVideoDiT.from_pretrained(out)
    else:
        model = CausalVideoDiT(**cfg.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, elapsed = 0, 0.0
    if resume:
        step, elapsed = _load_state(out, model, opt, rng)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.jsonl", "a")

    def write(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()

    t0 = time.time()
    data = _cached_streams(cfg, list(range(cfg.seed_base, cfg.seed_base + cfg.n_seeds)), "train")
    val_data = _cached_streams(dataclasses.replace(cfg, stream_frames=2 * cfg.clip_frames),
                               list(range(cfg.seed_base - 4, cfg.seed_base)), "val")
    write({"event": "resume" if resume else "start", "step": step, "elapsed_s": elapsed,
           "render_s": round(time.time() - t0, 1), "params": sum(p.numel() for p in model.parameters())})
    sampler = ClipSampler(cfg, data, model, rng)
    val_rng = np.random.default_rng(12345)
    val_sampler = ClipSampler(dataclasses.replace(cfg, batch_size=8), val_data, model, val_rng)
    val_k = cfg.clip_frames - cfg.chunk_frames
    val_batch = val_sampler.batch(k=val_k, reverse=False, drop_prompt=False, revisit=False)
    # chunks that return to a place last seen before the window: where the memory must pay
    val_rev = val_sampler.batch(k=val_k, reverse=False, drop_prompt=False, revisit=True)
    vg = torch.Generator().manual_seed(7)
    val_sigma = torch.linspace(0.1, 0.9, 8)
    val_noise = torch.randn(val_batch["x0"].shape, generator=vg)
    g = model.grid_side ** 2
    # the same clips with only their first frame as context (schedule[0] = 1 keeps it at full resolution)
    first_only = ChunkContext.from_tokens([_first_frame_tokens(val_batch["context"], i, g)
                                           for i in range(val_batch["x0"].shape[0])])
    first_rev = ChunkContext.from_tokens([_first_frame_tokens(val_rev["context"], i, g)
                                          for i in range(val_rev["x0"].shape[0])])

    last_save = time.time()
    window: list[float] = []
    start_wall = time.time() - elapsed
    while True:
        elapsed = time.time() - start_wall
        if elapsed >= cfg.minutes * 60 or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        if step % cfg.val_every == 0:
            model.eval()
            with torch.no_grad():
                vl = flow_loss(model, val_batch, val_sigma, val_noise).item()
                vf = flow_loss(model, val_batch, val_sigma, val_noise, context=first_only).item()
                rl = flow_loss(model, val_rev, val_sigma, val_noise).item()
                rf = flow_loss(model, val_rev, val_sigma, val_noise, context=first_rev).item()
            model.train()
            write({"step": step, "elapsed_s": round(elapsed, 1), "val_loss_memory": vl, "val_loss_first_frame": vf,
                   "val_revisit_loss_memory": rl, "val_revisit_loss_first_frame": rf})
        ts = time.time()
        batch = sampler.batch()
        tb = time.time() - ts
        sigma = torch.sigmoid(torch.randn(cfg.batch_size))
        noise = torch.randn(batch["x0"].shape)
        for gr in opt.param_groups:
            gr["lr"] = _lr(cfg, step, elapsed)
        loss = flow_loss(model, batch, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        step += 1
        window.append(loss.item())
        if step % cfg.log_every == 0:
            write({"step": step, "elapsed_s": round(time.time() - start_wall, 1), "loss": float(np.mean(window)),
                   "grad_norm": round(gn, 3), "lr": opt.param_groups[0]["lr"], "data_s": round(tb, 3),
                   "step_s": round(time.time() - ts, 3), "context_tokens": len(batch["context"])})
            window = []
        if time.time() - last_save >= cfg.save_every_s:
            _save(out, model, opt, step, time.time() - start_wall, cfg, rng, {"loss": loss.item()})
            write({"event": "save", "step": step, "elapsed_s": round(time.time() - start_wall, 1)})
            last_save = time.time()
    _save(out, model, opt, step, time.time() - start_wall, cfg, rng, {"loss": window[-1] if window else None})
    write({"event": "done", "step": step, "elapsed_s": round(time.time() - start_wall, 1)})
    log.close()
    return out


def _first_frame_tokens(ctx: ChunkContext, i: int, hw: int):
    """Tokens of sample ``i``'s first context frame (the oldest full-resolution or pooled one)."""
    from streammem.types import Tokens

    n = min(hw, int(ctx.mask[i].sum()))
    return Tokens(ctx.tokens[i, :n], torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.float64),
                  ctx.grid[i, :n], ctx.level[i, :n], ctx.pose[i, :n])
