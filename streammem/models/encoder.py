"""Frame encoders: RGB frame -> ``(grid, grid, D)`` token grid -> :class:`~streammem.Tokens`.

:class:`PatchEncoder` has no learned weights: the frame is resized to ``grid * patch`` pixels
and each ``patch x patch`` cell's pixels, centred and scaled to [-1, 1], are one token
(``D = 3 * patch**2``), as a ViT's patch embedding before its projection. It is the default
encoder of the main job and a baseline for learned encoders.

Example:
    >>> import numpy as np
    >>> from streammem.types import Frame
    >>> enc = PatchEncoder(grid=16, patch=4)
    >>> tok = enc(Frame(index=3, timestamp=0.375, image=np.zeros((90, 160, 3), np.uint8)))
    >>> tok.features.shape, enc.dim, int(tok.frame_index[0])
    (torch.Size([256, 48]), 48, 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from streammem.types import Frame, Tokens

__all__ = ["PatchEncoder"]


@dataclass
class PatchEncoder:
    """Pixels of ``patch x patch`` cells on a ``grid x grid`` layout as tokens (no weights)."""

    grid: int = 16
    patch: int = 4

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.patch < 1:
            raise ValueError(f"patch must be >= 1, got {self.patch}")

    @property
    def dim(self) -> int:
        return 3 * self.patch * self.patch

    def grid_features(self, image: np.ndarray) -> torch.Tensor:
        """``(grid, grid, D)`` float32 features of an RGB uint8 ``(H, W, 3)`` image."""
        side = self.grid * self.patch
        small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(small).float().div_(127.5).sub_(1.0)  # side, side, 3
        x = x.view(self.grid, self.patch, self.grid, self.patch, 3).permute(0, 2, 1, 3, 4)
        return x.reshape(self.grid, self.grid, self.dim).contiguous()

    def __call__(self, frame: Frame) -> Tokens:
        return Tokens.from_grid(
            self.grid_features(frame.image), frame_index=frame.index, timestamp=frame.timestamp, pose=frame.pose
        )
