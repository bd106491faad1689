"""Detection heads: a detector plus memory aggregation, one ``sv.Detections`` per frame.

======================================  =====================================================
:class:`StreamingDetectionPipeline`     the shipped small detector with MAMBA's pixel- and
                                        instance-level memory banks and GEO (``small.py``)
:class:`HOGDetectionPipeline`           OpenCV's HOG people detector with a training-free
                                        memory re-scoring (``hog.py``)
:class:`TorchvisionDetectionPipeline`   a torchvision Faster R-CNN with MAMBA's instance-level
                                        memory (``torchvision.py``)
:class:`HFDetectionPipeline`            a ``transformers`` detector (DETR, RT-DETR, YOLOS,
                                        OWLv2) with feature-level re-scoring (``hf.py``)
:class:`TrackRescorer`,                 memory re-scoring for any head: per-track score
:class:`FeatureRescorer`                banks; FeatureBanks of per-box features
                                        (``rescoring.py``)
:class:`DetectionHead`                  what they share: causal ``step``, MAMBA's
                                        ``run_protocol``, records, overlays, snapshots
:class:`IoUTracker`,                    box-level baselines (no feature memory)
:class:`TrackScoreSmoother`
======================================  =====================================================
"""

from streammem.pipelines.detection.base import DetectionHead, detection_records
from streammem.pipelines.detection.config import MEMORIES, MODES, PROTOCOL_LABEL, DetectionConfig
from streammem.pipelines.detection.hf import HF_MEMORIES, HFConfig, HFDetectionPipeline
from streammem.pipelines.detection.hog import HOG_MEMORIES, HOGConfig, HOGDetectionPipeline
from streammem.pipelines.detection.rescoring import RESCORERS, FeatureRescorer, TrackRescoreConfig, TrackRescorer
from streammem.pipelines.detection.small import StreamingDetectionPipeline, load_default_detection
from streammem.pipelines.detection.torchvision import TorchvisionConfig, TorchvisionDetectionPipeline
from streammem.pipelines.detection.tracking import IoUTracker, TrackScoreSmoother

__all__ = [
    "DetectionHead", "detection_records", "DetectionConfig", "MODES", "MEMORIES", "PROTOCOL_LABEL",
    "StreamingDetectionPipeline", "load_default_detection", "HOGConfig", "HOGDetectionPipeline", "HOG_MEMORIES",
    "TorchvisionConfig", "TorchvisionDetectionPipeline", "IoUTracker", "TrackScoreSmoother",
    "HFConfig", "HFDetectionPipeline", "HF_MEMORIES", "RESCORERS", "TrackRescoreConfig", "TrackRescorer", "FeatureRescorer",
]
