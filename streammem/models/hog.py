"""OpenCV's pretrained HOG people detector, split into proposals and features.

OpenCV ships a linear SVM over HOG descriptors for standing people
(``cv2.HOGDescriptor_getDefaultPeopleDetector()``, Dalal & Triggs, a 64x128 window), so this
model detects people in real videos with nothing to download and nothing to train.
:class:`~streammem.pipelines.detection.HOGDetectionPipeline` adds a training-free memory
aggregation on top (the attention :func:`support` of a window to past windows).

- :meth:`HOGPeopleDetector.propose`: ``detectMultiScale`` with a permissive ``hitThreshold``,
  no grouping, greedy NMS of the windows and the top ``max_proposals`` -> windows ``(K, 4)``
  xyxy and SVM margins ``(K,)``.
- :meth:`HOGPeopleDetector.features`: each window cropped (reflect-padded at the borders),
  resized to 64x128, described by the same HOG (3780 values), centred (its own mean
  subtracted) and L2-normalised -> ``(K, 3780)``. Centring matters: raw HOG values are all
  positive, so raw cosines of unrelated windows sit around 0.7-0.9 and say little.

Example:
    >>> import numpy as np
    >>> det = HOGPeopleDetector()
    >>> boxes, scores = det.propose(np.full((160, 120, 3), 128, np.uint8))
    >>> boxes.shape[1], det.dim
    (4, 3780)
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from streammem.models.detector import nms

__all__ = ["HOGPeopleDetector", "WINDOW", "support"]

WINDOW = (64, 128)  # width, height of the default people detector's window


class HOGPeopleDetector:
    """OpenCV's default HOG + linear SVM people detector, split into proposals and features.

    Args:
        proposal_threshold / win_stride / padding / scale / max_proposals / proposal_nms_iou:
            as in :class:`~streammem.pipelines.detection.HOGConfig`.

    Attributes:
        dim: feature width (3780, the HOG descriptor of a 64x128 window).
        class_names: ``["person"]``.
    """

    class_names = ["person"]

    def __init__(self, proposal_threshold: float = -1.5, win_stride: int = 8, padding: int = 16, scale: float = 1.05,
                 max_proposals: int = 60, proposal_nms_iou: float = 0.7) -> None:
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.dim = int(self.hog.getDescriptorSize())
        self.proposal_threshold, self.win_stride, self.padding = proposal_threshold, win_stride, padding
        self.scale, self.max_proposals, self.proposal_nms_iou = scale, max_proposals, proposal_nms_iou

    @classmethod
    def from_config(cls, config) -> "HOGPeopleDetector":
        """From a config with the proposal fields (a ``HOGConfig``)."""
        c = config
        return cls(c.proposal_threshold, c.win_stride, c.padding, c.scale, c.max_proposals, c.proposal_nms_iou)

    def propose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``image (H, W, 3)`` uint8 -> windows ``(K, 4)`` float32 xyxy, SVM margins ``(K,)``, best first.

        The image must be at least 64 wide and 128 high (the window); smaller ones give K = 0.
        """
        h, w = image.shape[:2]
        if w < WINDOW[0] or h < WINDOW[1]:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        rects, weights = self.hog.detectMultiScale(
            image, hitThreshold=self.proposal_threshold, winStride=(self.win_stride, self.win_stride),
            padding=(self.padding, self.padding), scale=self.scale, groupThreshold=0)
        rects = np.asarray(rects, np.float32).reshape(-1, 4)
        scores = np.asarray(weights, np.float32).reshape(-1)
        if len(rects) == 0:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1)
        keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), self.proposal_nms_iou)[: self.max_proposals]
        keep = keep.numpy()
        return boxes[keep], scores[keep]

    def features(self, image: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """HOG descriptors of the windows' crops: ``(K, 4)`` xyxy -> ``(K, dim)`` float32,
        centred and L2-normalised. Windows may reach past the image (reflect padding)."""
        if len(windows) == 0:
            return np.zeros((0, self.dim), np.float32)
        h, w = image.shape[:2]
        x0 = np.floor(windows[:, 0]).astype(int)
        y0 = np.floor(windows[:, 1]).astype(int)
        x1 = np.maximum(np.ceil(windows[:, 2]).astype(int), x0 + 1)
        y1 = np.maximum(np.ceil(windows[:, 3]).astype(int), y0 + 1)
        pad = int(max(0, -x0.min(), -y0.min(), x1.max() - w, y1.max() - h))
        src = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT_101) if pad else image
        out = np.empty((len(windows), self.dim), np.float32)
        for i in range(len(windows)):
            crop = src[y0[i] + pad: y1[i] + pad, x0[i] + pad: x1[i] + pad]
            crop = cv2.resize(crop, WINDOW, interpolation=cv2.INTER_AREA)
            out[i] = self.hog.compute(crop).reshape(-1)
        out -= out.mean(1, keepdims=True)
        out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-6
        return out


def support(queries: torch.Tensor, keys: torch.Tensor, tau: float) -> torch.Tensor:
    """Attention-weighted cosine of unit ``queries (K, D)`` to unit ``keys (N, D)`` -> ``(K,)``.

    GEO with identity projections and one head: ``A = softmax(q k^T / tau)``, ``<q, A k>``.
    Zero when there are no keys.
    """
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        return queries.new_zeros(queries.shape[0])
    sim = queries @ keys.t()
    return (torch.softmax(sim / tau, dim=1) * sim).sum(1)

