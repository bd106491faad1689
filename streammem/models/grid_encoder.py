"""GridEncoder: a small CNN, RGB frame -> ``(16, 16, D)`` token grid with object semantics.

Four stride-2 stages take a ``256 x 256`` frame to a ``16 x 16`` grid; a 1x1 projection and a
LayerNorm give ``D``-wide tokens (default 64). It is pretrained on StreamWorld with dense
per-cell targets from the ground truth (``streammem.train.grid_encoder``): the class of the
object covering most of the cell (or background), that object's colour, and the share of the
cell that objects cover. Heads are linear on the tokens, so what questions ask about (class,
colour, where) is linearly readable from each token, and stays readable after the Pyramid
Memory Bank's average pooling. It is frozen afterwards; the QA answerer reads its tokens.

Saved as ``config.json`` + ``model.safetensors`` (``streammem.models.hub.SafeHubMixin``).

Example:
    >>> import numpy as np, torch
    >>> from streammem.types import Frame
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> enc = GridEncoder(dim=16, width=8).eval()
    >>> tok = enc(Frame(index=2, timestamp=0.25, image=np.zeros((90, 160, 3), np.uint8)))
    >>> tok.features.shape, int(tok.frame_index[0]), tok.salience.shape
    (torch.Size([256, 16]), 2, torch.Size([256]))
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from streammem.models.hub import SafeHubMixin
from torch import nn

from streammem.types import Frame, Tokens

__all__ = ["GridEncoder", "images_to_tensor", "grid_tokens"]


def images_to_tensor(images: list[np.ndarray], side: int) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` images -> float ``(B, 3, side, side)`` in [0, 1]."""
    arr = np.stack([
        im if im.shape[:2] == (side, side) else cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA)
        for im in images
    ])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class GridEncoder(nn.Module, SafeHubMixin):
    """Frame -> ``(grid, grid, dim)`` tokens.

    Args:
        dim: token width D.
        width: channels of the first stage (stages use width x 1, 2, 3, 4).
        grid: token-grid side (input side = ``grid * 16``).
        num_classes: object classes (background excluded) of the pretraining head.
        num_colours: colour names of the pretraining head (StreamWorld: 8 tints + natural).
    """

    def __init__(self, dim: int = 64, width: int = 16, grid: int = 16, num_classes: int = 11,
                 num_colours: int = 9) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("width", width), ("grid", grid), ("num_classes", num_classes),
                        ("num_colours", num_colours)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GridEncoder.{name} must be an int >= 1, got {v!r}")
        self.dim, self.grid, self.side = dim, grid, grid * 16
        w = width
        self.body = nn.Sequential(
            _cbr(3, w, 2), _cbr(w, w),
            _cbr(w, 2 * w, 2), _cbr(2 * w, 2 * w),
            _cbr(2 * w, 3 * w, 2), _cbr(3 * w, 3 * w),
            _cbr(3 * w, 4 * w, 2), _cbr(4 * w, 4 * w),
        )
        self.proj = nn.Conv2d(4 * w, dim, 1)
        self.norm = nn.LayerNorm(dim)
        # pretraining heads (linear, so the tokens carry the targets linearly)
        self.cls_head = nn.Linear(dim, num_classes + 1)
        self.colour_head = nn.Linear(dim, num_colours)
        self.obj_head = nn.Linear(dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, side, side)`` in [0, 1] -> ``(B, grid, grid, dim)`` tokens."""
        x = self.body(images - 0.5)
        if x.shape[-1] != self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    def heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits ``(..., C+1)`` (0 = background), colour logits, objectness logit."""
        return self.cls_head(tokens), self.colour_head(tokens), self.obj_head(tokens)[..., 0]

    @torch.no_grad()
    def objectness(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` tokens -> ``(...)``: 1 - P(background) from the class head, the
        salience ``PyramidMemory(pool="salient")`` pools by. (Not ``obj_head``, which regresses
        the share of a cell that objects cover: a small object is a small share of its cell
        but still the cell's class.)"""
        return 1.0 - torch.softmax(self.cls_head(tokens), -1)[..., 0]

    def tokens(self, grid: torch.Tensor, frame_index: int, timestamp: float, pose=None) -> Tokens:
        """One frame's ``(grid, grid, dim)`` tokens -> :class:`Tokens` with ``salience``."""
        return Tokens.from_grid(grid, frame_index=frame_index, timestamp=timestamp, pose=pose,
                                salience=self.objectness(grid))

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> ``(B, grid, grid, dim)`` float tokens (eval mode)."""
        return self(images_to_tensor(images, self.side))

    def __call__(self, x):  # Frame -> Tokens, tensor -> tensor
        if isinstance(x, Frame):
            g = self.encode_images([x.image])[0]
            return self.tokens(g, x.index, x.timestamp, x.pose)
        return super().__call__(x)


def grid_tokens(encoder, grid: torch.Tensor, frame_index: int, timestamp: float) -> Tokens:
    """One frame's ``(g, g, D)`` token grid from ``encoder`` as :class:`Tokens`, with
    ``salience`` when the encoder gives one (:meth:`GridEncoder.tokens`); other encoders' grids
    go in as they are."""
    if hasattr(encoder, "tokens"):
        return encoder.tokens(grid, frame_index, timestamp)
    return Tokens.from_grid(grid, frame_index=frame_index, timestamp=timestamp)
