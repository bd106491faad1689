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

Example (needs torchvision; a random model, nothing downloaded):
    >>> import numpy as np                                                      # doctest: +SKIP
    >>> from streammem.types import Frame                                       # doctest: +SKIP
    >>> det = TorchvisionDetector.from_torchvision("fasterrcnn_mobilenet_v3_large_fpn",
    ...     weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)  # doctest: +SKIP
    >>> pipe = TorchvisionDetectionPipeline(det)                                # doctest: +SKIP
    >>> d = pipe.step(Frame(0, 0.0, np.zeros((128, 128, 3), np.uint8)))         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import supervision as sv
import torch
from torch import nn

from streammem.models.geo import GEO
from streammem.pipelines.detection import DetectionStreamMixin
from streammem.types import Frame, Tokens

__all__ = ["TorchvisionConfig", "TorchvisionDetector", "TorchvisionDetectionPipeline", "require_torchvision",
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


@dataclass
class TorchvisionConfig:
    """Attributes:
    memory: ``"feature_bank"`` (MAMBA's bank + GEO) or ``"none"`` (the model alone).
    max_size / key_size: FeatureBank size and key-set size (MAMBA 20000 / 2000).
    bank_proposals: top proposals whose box-head features are written per frame (MAMBA 75).
    score_threshold: detections below this score are dropped (after the model's own threshold).
    device: where the model runs (``"cpu"``, ``"cuda"``).
    seed: seed of the bank (and of the protocol's shuffled order).
    mode: ``"causal"`` (default) or ``"protocol"`` (MAMBA's non-causal test protocol, through
        ``run_protocol``). warmup: the protocol's warm-up frames (MAMBA 25).
    """

    memory: str = "feature_bank"
    max_size: int = 20000
    key_size: int = 2000
    bank_proposals: int = 75
    score_threshold: float = 0.0
    device: str = "cpu"
    seed: int = 0
    mode: str = "causal"
    warmup: int = 25

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"TorchvisionConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        need(self.memory in ("feature_bank", "none"), "memory", "'feature_bank' or 'none'")
        need(isinstance(self.max_size, int) and self.max_size >= 1, "max_size", "an int >= 1")
        need(isinstance(self.key_size, int) and 1 <= self.key_size <= self.max_size, "key_size",
             "an int in [1, max_size]")
        need(isinstance(self.bank_proposals, int) and self.bank_proposals >= 1, "bank_proposals", "an int >= 1")
        need(0.0 <= self.score_threshold <= 1.0, "score_threshold", "in [0, 1]")
        need(self.mode in ("causal", "protocol"), "mode", "'causal' or 'protocol'")
        need(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "an int >= 0")


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


class TorchvisionDetectionPipeline(DetectionStreamMixin):
    """A torchvision detector + FeatureBank + GEO -> ``sv.Detections`` per frame.

    The API of the other detection pipelines (:class:`DetectionStreamMixin`): causal
    :meth:`step` / :meth:`run`, MAMBA's :meth:`run_protocol`, :meth:`reset`, :meth:`stats`. State (explicit): ``instance_memory`` (None for ``memory="none"``) and counters.
    """

    def __init__(self, detector: TorchvisionDetector, config: TorchvisionConfig | None = None, tracker=None) -> None:
        self.detector = detector
        self.config = c = config or TorchvisionConfig()
        self.tracker = tracker
        self.class_names = detector.class_names
        detector.model.to(c.device)
        detector.geo.to(c.device)
        detector.self_keys = c.bank_proposals
        self.instance_memory = None
        if c.memory == "feature_bank":
            from streammem.memory import FeatureBank

            self.instance_memory = FeatureBank(dim=detector.dim, max_size=c.max_size, key_size=c.key_size, seed=c.seed)
        self.reset()

    def reset(self) -> None:
        """Forget the bank and the counters."""
        if self.instance_memory is not None:
            self.instance_memory.reset()
        if self.tracker is not None:
            self.tracker.reset()
        self.counters = {"frames": 0, "instance_writes": 0}

    def stats(self) -> dict:
        out: dict = dict(self.counters)
        if self.instance_memory is not None:
            m = self.instance_memory
            out["instance_memory"] = {"num_tokens": m.num_tokens, "capacity": m.capacity, "nbytes": m.nbytes}
        out["memory"] = self.config.memory
        out["mode"] = self.config.mode
        out["detector"] = "torchvision"
        return out

    @torch.no_grad()
    def _process(self, frame: Frame) -> sv.Detections:
        """Detect in ``frame`` with the bank, then write this frame's top proposals."""
        c = self.config
        # 1. the image as torchvision wants it
        x = torch.from_numpy(np.ascontiguousarray(frame.image)).permute(2, 0, 1).float().div_(255.0).to(c.device)
        # 2. keys from the bank (None: no enhancement at all)
        keys = None
        if self.instance_memory is not None:
            keys = self.instance_memory.read().features.to(c.device) if self.instance_memory.num_tokens \
                else x.new_zeros(0, self.detector.dim)
        # 3. the model, with the hook
        out, feats = self.detector(x, keys)
        # 4. bank write: pre-enhancement features of the top proposals
        if self.instance_memory is not None and feats.shape[0]:
            f = feats[: c.bank_proposals].float().cpu().contiguous()
            n = f.shape[0]
            self.instance_memory.write(Tokens(
                features=f, frame_index=torch.full((n,), frame.index), timestamp=torch.full((n,), float(frame.timestamp)),
                grid=torch.zeros(n, 2), level=torch.ones(n, dtype=torch.int64)))
            self.counters["instance_writes"] += n
        self.counters["frames"] += 1
        # 5. sv.Detections
        keep = out["scores"] >= c.score_threshold
        boxes = out["boxes"][keep].float().cpu().numpy().reshape(-1, 4)
        labels = out["labels"][keep].cpu().numpy().astype(int)
        names = np.array([self.class_names[i] if i < len(self.class_names) else str(i) for i in labels], dtype=str)
        d = sv.Detections(xyxy=boxes, confidence=out["scores"][keep].float().cpu().numpy(), class_id=labels,
                          data={"class_name": names.reshape(-1)},
                          metadata={"frame_index": frame.index, "mode": self._mode_label()})
        return d
