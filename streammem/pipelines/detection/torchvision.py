"""TorchvisionDetectionPipeline: a torchvision two-stage detector with MAMBA's instance-level
memory (the model and its hook: :mod:`streammem.models.torchvision_adapter`).

Per frame: keys from the :class:`~streammem.memory.FeatureBank` (while it is empty: the
frame's own top proposals), the model with the GEO hook on its box head, then the top
``bank_proposals`` pre-enhancement box-head features are written to the bank (causal).

Example (needs torchvision; a random model, nothing downloaded)::

    import numpy as np
    from streammem.models.torchvision_adapter import TorchvisionDetector
    from streammem.types import Frame

    det = TorchvisionDetector.from_torchvision("fasterrcnn_mobilenet_v3_large_fpn", weights=None,
                                               weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    pipe = TorchvisionDetectionPipeline(det)
    d = pipe.step(Frame(0, 0.0, np.zeros((128, 128, 3), np.uint8)))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import supervision as sv
import torch

from streammem.models.torchvision_adapter import TorchvisionDetector
from streammem.pipelines.detection.base import DetectionHead
from streammem.types import Frame, Tokens, field_checker

__all__ = ["TorchvisionConfig", "TorchvisionDetectionPipeline"]


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
        need = field_checker(self)

        need(self.memory in ("feature_bank", "none"), "memory", "'feature_bank' or 'none'")
        need(isinstance(self.max_size, int) and self.max_size >= 1, "max_size", "an int >= 1")
        need(isinstance(self.key_size, int) and 1 <= self.key_size <= self.max_size, "key_size",
             "an int in [1, max_size]")
        need(isinstance(self.bank_proposals, int) and self.bank_proposals >= 1, "bank_proposals", "an int >= 1")
        need(0.0 <= self.score_threshold <= 1.0, "score_threshold", "in [0, 1]")
        need(self.mode in ("causal", "protocol"), "mode", "'causal' or 'protocol'")
        need(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "an int >= 0")



class TorchvisionDetectionPipeline(DetectionHead):
    """A torchvision detector + FeatureBank + GEO -> ``sv.Detections`` per frame.

    The API of the other detection pipelines (:class:`~streammem.pipelines.detection.DetectionHead`): causal
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

    def memories(self) -> dict:
        return {} if self.instance_memory is None else {"instance_memory": self.instance_memory}

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
