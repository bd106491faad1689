"""torchvision's two-stage detectors (the Faster R-CNN family) with MAMBA's instance-level memory.

torchvision's ``FasterRCNN`` runs ``backbone -> rpn -> roi_heads``; inside ``roi_heads`` the
RoI-pooled features of every proposal go through ``box_head`` (``TwoMLPHead``: fc6, fc7 ->
``(K, representation_size)``, 1024 for the shipped models) and then ``box_predictor`` (class
logits and box deltas). This adapter puts the memory between the two, with a forward hook on
``roi_heads.box_head`` that is registered for one call and removed in ``finally``
(:meth:`TorchvisionDetector.enhancing`):

1. the hook keeps the box-head features of the frame (pre-enhancement, ``(K, D)``, the RPN's
   proposals in descending objectness, so the first ``bank_proposals`` rows are the top ones);
2. it returns ``GEO(features, keys)`` instead, ``keys (Nk, D)`` a fresh random key set of the
   :class:`~streammem.memory.FeatureBank` (while the bank is empty: the frame's own top
   proposals, as the small detector's pipeline does);
3. torchvision's own ``box_predictor`` and ``postprocess_detections`` then re-score and
   re-box the proposals from the enhanced features, so scores, NMS and thresholds are the
   model's own;
4. after the frame, the top ``bank_proposals`` pre-enhancement features are written to the
   bank (MAMBA: top 75), so reads at frame t see only frames < t (causal).

The GEO: a learned one can be passed (``geo=``, e.g. trained with the detector). Without one
the adapter builds a training-free GEO (:func:`training_free_geo`): alignment mode with
identity query/key projections and the identity head merge, so that at test time
``out = 0.7 q + 0.3 A k`` with ``A`` the per-head softmax of scaled dot products of the raw
box-head features; the output stays in the space ``box_predictor`` was trained on.

torchvision is imported lazily; without it :func:`require_torchvision` raises ImportError
with the ``pip install torchvision`` fix (a torchvision build must match the installed torch).

Example (needs torchvision; a random model, nothing downloaded)::

    det = TorchvisionDetector.from_torchvision("fasterrcnn_mobilenet_v3_large_fpn", weights=None,
                                               weights_backbone=None, num_classes=3, min_size=128, max_size=128)

A detection head over it, with the memory: ``TorchvisionDetectionPipeline(det)`` in
:mod:`streammem.pipelines.detection`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from streammem.models.geo import GEO

__all__ = ["TorchvisionDetector", "require_torchvision",
           "training_free_geo"]

INSTALL_HINT = "pip install torchvision  (a build matching the installed torch {torch})"


def require_torchvision() -> Any:
    """Import torchvision, or raise ImportError naming the fix."""
    try:
        import torchvision
        import torchvision.models.detection  # noqa: F401  (fails on a build that does not match torch)
    except Exception as exc:  # ImportError, or RuntimeError from a torchvision built for another torch
        raise ImportError(
            f"the torchvision detector adapter needs torchvision, which does not import here "
            f"({type(exc).__name__}: {exc}). Fix: {INSTALL_HINT.format(torch=torch.__version__)}"
        ) from exc
    return torchvision


def training_free_geo(dim: int, heads: int = 16, test_mix: float = 0.7) -> GEO:
    """A GEO that needs no training: alignment mode, identity ``Wq`` and ``Wk``, identity merge.

    ``out = test_mix * q + (1 - test_mix) * A k`` in eval mode, per head
    ``A_h = softmax(q_h k_h^T / sqrt(d_h))`` on the raw features.
    """
    geo = GEO(dim, heads=heads, mode="alignment", test_mix=test_mix)
    with torch.no_grad():
        for lin in (geo.wq, geo.wk):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
    return geo.eval()



class TorchvisionDetector:
    """A torchvision two-stage detector with a hook point for instance-level enhancement.

    Args:
        model: a torchvision ``GeneralizedRCNN`` (``FasterRCNN`` and its variants) with
            ``roi_heads.box_head``.
        class_names: names indexed by the model's labels (index 0 is background);
            default ``["__background__", "1", "2", ...]``.
        geo: the enhancement (default :func:`training_free_geo` of the box-head width).
    """

    def __init__(self, model: nn.Module, class_names: list[str] | None = None, geo: GEO | None = None) -> None:
        box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
        if box_head is None:
            raise TypeError(f"{type(model).__name__} has no roi_heads.box_head; the adapter needs a torchvision "
                            f"two-stage detector (fasterrcnn_*)")
        self.model = model.eval()
        self.dim = self._box_head_dim(model)
        num = model.roi_heads.box_predictor.cls_score.out_features
        self.class_names = list(class_names) if class_names is not None else ["__background__"] + [
            str(i) for i in range(1, num)]
        if len(self.class_names) < num:
            raise ValueError(f"class_names has {len(self.class_names)} names but the model predicts {num} labels")
        self.geo = (geo or training_free_geo(self.dim)).eval()
        self.self_keys = 75  # keys of a frame while the bank is empty: its own top proposals
        if self.geo.dim != self.dim:
            raise ValueError(f"geo.dim={self.geo.dim} but the box head gives {self.dim}-wide features")

    @staticmethod
    def _box_head_dim(model: nn.Module) -> int:
        pred = model.roi_heads.box_predictor
        return int(pred.cls_score.in_features)

    @classmethod
    def from_torchvision(cls, name: str = "fasterrcnn_mobilenet_v3_large_fpn", weights: Any = "DEFAULT",
                         geo: GEO | None = None, **kwargs: Any) -> "TorchvisionDetector":
        """Build ``torchvision.models.detection.<name>(weights=..., **kwargs)``.

        ``weights="DEFAULT"`` loads torchvision's COCO weights (downloaded by torchvision on
        first use, into its cache) and takes the class names from them; ``weights=None``
        builds a random model (pass ``num_classes``).
        """
        tv = require_torchvision()
        builder = getattr(tv.models.detection, name, None)
        if builder is None or not name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn")):
            raise ValueError(f"unknown two-stage torchvision detector {name!r}; try fasterrcnn_mobilenet_v3_large_fpn, "
                             f"fasterrcnn_resnet50_fpn or fasterrcnn_resnet50_fpn_v2")
        if isinstance(weights, str):
            weights = tv.models.get_model_weights(builder).verify(weights)
        model = builder(weights=weights, **kwargs)
        names = list(weights.meta["categories"]) if weights is not None else None
        return cls(model, class_names=names, geo=geo)

    @contextlib.contextmanager
    def enhancing(self, keys: torch.Tensor | None, captured: list):
        """For the calls inside the block: box-head features are appended to ``captured``
        (pre-enhancement) and, when ``keys`` is not None, replaced by ``geo(features, keys)``
        (empty ``keys``: the frame's own first ``len`` rows, see the module docstring).
        The hook is removed on exit, also after an error."""

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            captured.append(output.detach())
            if keys is None:
                return None
            k = keys if keys.shape[0] else output[: self.self_keys]
            return self.geo(output, k.to(output.dtype))

        handle = self.model.roi_heads.box_head.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
        """One frame ``(3, H, W)`` float in [0, 1] -> torchvision's output dict (``boxes``,
        ``labels``, ``scores``) and the pre-enhancement box-head features ``(K, D)``."""
        captured: list[torch.Tensor] = []
        with self.enhancing(keys, captured):
            out = self.model([image])[0]
        feats = captured[0] if captured else image.new_zeros(0, self.dim)
        return out, feats


