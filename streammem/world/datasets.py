"""Torch datasets of StreamWorld clips, for training and evaluating the heads.

Example:
    >>> ds = ClipDataset(seed=0, preset="clean", clip_len=4, size=64, n_clips=2)
    >>> item = ds[1]
    >>> item["frames"].shape, item["pose"].shape, len(item["boxes"])
    (torch.Size([4, 3, 64, 64]), torch.Size([4, 4, 4]), 4)
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .world import World

__all__ = ["ClipDataset", "QuestionDataset", "collate_clips", "frames_to_item"]


def frames_to_item(frames) -> dict:
    """Stack a list of Frames into tensors; per-frame variable-size ground truth stays in lists.

    Returns ``frames`` float32 (T, 3, H, W) in [0, 1], ``pose`` float32 (T, 4, 4), ``action``
    float32 (T, 13), ``timestamp`` float64 (T,), ``index`` int64 (T,), ``dynamic_mask`` bool
    (T, H, W), and lists of T tensors: ``boxes`` (N_t, 4), ``class_id``, ``track_id``,
    ``visible``; plus ``events`` and ``corruptions`` (lists of T lists).
    """
    imgs = np.stack([f.image for f in frames])
    gts = [f.info["gt"] for f in frames]
    return {
        "frames": torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0),
        "pose": torch.as_tensor(np.stack([f.pose for f in frames]), dtype=torch.float32),
        "action": torch.as_tensor(np.stack([f.action for f in frames]), dtype=torch.float32),
        "timestamp": torch.tensor([f.timestamp for f in frames], dtype=torch.float64),
        "index": torch.tensor([f.index for f in frames], dtype=torch.int64),
        "dynamic_mask": torch.from_numpy(np.stack([g["dynamic_mask"] for g in gts])),
        "boxes": [torch.from_numpy(g["boxes"]) for g in gts],
        "class_id": [torch.from_numpy(g["class_id"]) for g in gts],
        "track_id": [torch.from_numpy(g["track_id"]) for g in gts],
        "visible": [torch.from_numpy(g["visible"]) for g in gts],
        "events": [g["events"] for g in gts],
        "corruptions": [g["corruptions"] for g in gts],
    }


def collate_clips(items: list[dict]) -> dict:
    """Batch clips: tensors of fixed shape are stacked, per-frame lists become lists of lists."""
    out = {}
    for k, v in items[0].items():
        out[k] = torch.stack([it[k] for it in items]) if isinstance(v, torch.Tensor) else [it[k] for it in items]
    return out


class ClipDataset(Dataset):
    """``n_clips`` clips of ``clip_len`` frames; clip ``i`` comes from its own world.

    Clip ``i`` uses world seed ``seed * 1_000_003 + i`` and starts at a seeded offset within
    the first ``max_start_s`` seconds (earlier frames are only simulated). Dropped frames are
    turned off so every clip has exactly ``clip_len`` frames; other corruptions follow the
    preset (or ``corruption``).
    """

    def __init__(self, seed: int = 0, preset: str = "medium", clip_len: int = 8, size: int | tuple[int, int] = 128,
                 n_clips: int = 1000, fps: float = 8.0, stride: int = 1, corruption: str | None = None,
                 max_start_s: float = 60.0):
        if clip_len < 1 or n_clips < 1 or stride < 1:
            raise ValueError(f"clip_len, n_clips and stride must be >= 1, got {clip_len}, {n_clips}, {stride}")
        self.seed, self.preset, self.clip_len, self.size = seed, preset, clip_len, size
        self.n_clips, self.fps, self.stride, self.corruption = n_clips, fps, stride, corruption
        self.max_start = int(max_start_s * fps)

    def __len__(self) -> int:
        return self.n_clips

    def world(self, i: int) -> World:
        s = self.seed * 1_000_003 + i
        start = int(np.random.default_rng([s, 404]).integers(0, self.max_start + 1))
        return World(seed=s, preset=self.preset, size=self.size, fps=self.fps, corruption=self.corruption,
                     drop_frames=False, start=start, frames=start + self.clip_len * self.stride)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n_clips:
            raise IndexError(f"clip index {i} out of range 0..{self.n_clips - 1}")
        w = self.world(i)
        frames = [f for f in w if (f.index - w.start) % self.stride == 0]
        return frames_to_item(frames)


class QuestionDataset(Dataset):
    """OVBench-shaped questions of one world, each with the ``clip_len`` frames up to its query.

    Frames are taken every ``stride`` frames, ending at the query frame; the item holds the
    question dict under ``"question"`` and the clip tensors as :func:`frames_to_item`.
    """

    def __init__(self, seed: int = 0, preset: str = "medium", seconds: float = 120.0, size: int | tuple[int, int] = 128,
                 fps: float = 8.0, clip_len: int = 16, stride: int = 4, **question_kw):
        self.world = World(seed=seed, preset=preset, size=size, fps=fps, seconds=seconds, drop_frames=False)
        self.questions = self.world.questions(**question_kw)
        self.clip_len, self.stride = clip_len, stride

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict:
        q = self.questions[i]
        last = q["query_frame"]
        first = max(0, last - (self.clip_len - 1) * self.stride)
        w = World(seed=self.world.seed, preset=self.world.preset, size=self.world.size, fps=self.world.fps,
                  frames=last + 1, drop_frames=False, start=first)
        frames = [f for f in w if (last - f.index) % self.stride == 0]
        item = frames_to_item(frames)
        item["question"] = q
        return item
