"""torchvision Faster R-CNN adapter: the box-head hook, the bank writes, GEO enhancement and
re-scoring by torchvision's own predictor, on a tiny randomly initialised model.

The model tests need a torchvision build that imports beside the installed torch. Where it
does not, they are skipped with the import error as the reason (the adapter's error test
still runs); that case is reported as blocked, not as a pass.
"""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import supervision as sv
import torch

from streammem.models.torchvision_adapter import (
    TorchvisionDetector,
    require_torchvision,
    training_free_geo,
)
from streammem.pipelines.detection import TorchvisionConfig, TorchvisionDetectionPipeline
from streammem.types import Frame

try:
    require_torchvision()
    TV_ERROR = None
except ImportError as exc:
    TV_ERROR = str(exc)

needs_tv = pytest.mark.skipif(TV_ERROR is not None, reason=f"BLOCKED, torchvision unavailable: {TV_ERROR}")


def tiny_model(seed: int = 0) -> TorchvisionDetector:
    torch.manual_seed(seed)
    det = TorchvisionDetector.from_torchvision(
        "fasterrcnn_mobilenet_v3_large_fpn", weights=None, weights_backbone=None, num_classes=3,
        min_size=128, max_size=128, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=60,
        box_score_thresh=0.0, box_detections_per_img=20)
    # A random MobileNet's activations vanish (~1e-8 at the FPN) with default BatchNorm
    # statistics, which makes every RoI feature the same. Calibrate the BatchNorm statistics
    # on a few random images so features differ between proposals.
    bns = [m for m in det.model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    det.model.backbone.train()
    with torch.no_grad():
        for x in torch.rand(4, 2, 3, 128, 128):
            det.model.backbone(det.model.transform(list(x))[0].tensors)
    det.model.eval()
    # then bring the FPN outputs to unit scale (random FPN convs blow them up instead)
    with torch.no_grad():
        feats = det.model.backbone(det.model.transform([torch.rand(3, 128, 128)])[0].tensors)
        scale = float(torch.stack([f.std() for f in feats.values()]).mean())
        for m in det.model.backbone.fpn.layer_blocks.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.div_(scale)
                if m.bias is not None:
                    m.bias.div_(scale)
    return det


def frames(n: int, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        img = np.roll(base, 4 * i, axis=1).copy()
        img[40:90, 30 + 3 * i: 70 + 3 * i] = (200, 40, 40)
        out.append(Frame(index=i, timestamp=i / 8, image=img))
    return out


def test_missing_torchvision_gives_the_install_fix(monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install torchvision"):
        require_torchvision()
    with pytest.raises(ImportError, match="pip install torchvision"):
        TorchvisionDetector.from_torchvision("fasterrcnn_mobilenet_v3_large_fpn", weights=None)


def test_training_free_geo_is_a_convex_mix_in_eval():
    geo = training_free_geo(32, heads=4)
    q, k = torch.rand(5, 32), torch.rand(9, 32)
    out = geo(q, k)
    # per channel, 0.7 q + 0.3 (a convex combination of the keys): bounded by the keys' range
    att = (out - 0.7 * q) / 0.3
    assert (att >= k.min(0).values - 1e-4).all() and (att <= k.max(0).values + 1e-4).all()
    assert torch.allclose(geo(q, q[:1]), q[:1].expand(5, 32) * 0.3 + 0.7 * q, atol=1e-5)


def test_config_is_checked():
    with pytest.raises(ValueError, match="TorchvisionConfig.memory"):
        TorchvisionConfig(memory="dual")
    with pytest.raises(ValueError, match="TorchvisionConfig.key_size"):
        TorchvisionConfig(max_size=5, key_size=10)


@needs_tv
def test_no_memory_equals_the_plain_model_and_hooks_are_removed():
    det = tiny_model()
    fr = frames(1)[0]
    x = torch.from_numpy(fr.image).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        plain = det.model([x])[0]
    d = TorchvisionDetectionPipeline(det, TorchvisionConfig(memory="none")).step(fr)
    assert isinstance(d, sv.Detections) and len(d) == len(plain["boxes"]) > 0
    assert np.allclose(d.xyxy, plain["boxes"].numpy()) and np.allclose(d.confidence, plain["scores"].numpy())
    assert len(det.model.roi_heads.box_head._forward_hooks) == 0


@needs_tv
def test_bank_writes_enhancement_and_boundedness():
    det = tiny_model()
    vid = frames(6)
    cfg = TorchvisionConfig(max_size=100, key_size=40, bank_proposals=25)
    pipe = TorchvisionDetectionPipeline(det, cfg)
    # frame 0: features captured by the hook are the box head's, (K, 1024)
    x = torch.from_numpy(vid[0].image).permute(2, 0, 1).float() / 255
    out, feats = det(x, None)
    assert feats.ndim == 2 and feats.shape[1] == det.dim == 1024 and feats.shape[0] >= 25
    pipe.step(vid[0])
    assert pipe.instance_memory.num_tokens == 25
    stored = pipe.instance_memory.read().features
    assert torch.allclose(stored, feats[:25], atol=1e-5)  # pre-enhancement, top proposals
    # frame 1 with the bank: enhancement changes torchvision's own scores
    with torch.no_grad():
        plain = det.model([torch.from_numpy(vid[1].image).permute(2, 0, 1).float() / 255])[0]
    d = pipe.step(vid[1])
    assert len(d) and not (len(d) == len(plain["scores"]) and np.allclose(d.confidence, plain["scores"].numpy()))
    assert len(det.model.roi_heads.box_head._forward_hooks) == 0
    for f in vid[2:]:
        d = pipe.step(f)
    assert pipe.instance_memory.num_tokens == 100 and pipe.stats()["instance_writes"] == 25 * 6
    assert d.metadata["frame_index"] == 5 and set(d.data["class_name"]) <= {"1", "2"}
    pipe.reset()
    assert pipe.instance_memory.num_tokens == 0


@needs_tv
def test_hook_is_removed_after_an_error():
    det = tiny_model()
    with pytest.raises(ValueError, match="GEO expects"):
        det(torch.rand(3, 64, 64), torch.rand(4, 7))  # keys of the wrong width fail inside the hook
    assert len(det.model.roi_heads.box_head._forward_hooks) == 0


class _StubRoIHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.box_head = torch.nn.Linear(12, 16)
        self.box_predictor = torch.nn.Module()
        self.box_predictor.cls_score = torch.nn.Linear(16, 3)


class _StubTwoStage(torch.nn.Module):
    """The shape of a torchvision two-stage detector, without torchvision: 10 fixed proposals
    whose box-head features (the hooked module) decide the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.roi_heads = _StubRoIHeads()

    def forward(self, images):
        x = images[0]
        f = self.roi_heads.box_head(x.reshape(3, -1)[:, :40].reshape(10, 12))
        score, label = self.roi_heads.box_predictor.cls_score(f).softmax(-1).max(-1)
        k = torch.arange(10.0)
        return [{"boxes": torch.stack([2 * k, k, 2 * k + 5, k + 5], 1), "labels": label, "scores": score}]


def test_pipeline_modes_on_a_stub_two_stage_model():
    """Runs without torchvision: the pipeline's streaming API (shared with the other detection
    pipelines) in causal and protocol mode, bank writes and the mode checks."""
    torch.manual_seed(0)
    det = TorchvisionDetector(_StubTwoStage())
    rng = np.random.default_rng(0)
    video = [Frame(i, i / 8, rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for i in range(6)]
    pipe = TorchvisionDetectionPipeline(det, TorchvisionConfig(max_size=30, key_size=10))
    out = list(pipe.run(video))
    assert len(out) == 6 and all(len(d) == 10 and d.metadata["mode"] == "causal" for d in out)
    assert pipe.stats()["instance_writes"] == 60 and pipe.instance_memory.num_tokens == 30  # bounded
    alone = TorchvisionDetectionPipeline(det, TorchvisionConfig(memory="none"))
    assert not np.allclose(alone.step(video[-1]).confidence, out[-1].confidence)  # the bank changes scores
    proto = TorchvisionDetectionPipeline(det, TorchvisionConfig(max_size=30, key_size=10, mode="protocol", warmup=3))
    res = proto.run_protocol(video)
    assert [d.metadata["frame_index"] for d in res] == list(range(6)) and proto.stats()["frames"] == 9
    assert res[0].metadata["mode"].startswith("protocol") and proto.stats()["mode"] == "protocol"
    with pytest.raises(RuntimeError, match="step\\(\\) is causal"):
        proto.step(video[0])
    with pytest.raises(ValueError, match="TorchvisionConfig.mode"):
        TorchvisionConfig(mode="shuffled")
