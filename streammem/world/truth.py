"""Ground truth of a StreamWorld frame as JSON, and drawn on the frame."""

from __future__ import annotations

import numpy as np

__all__ = ["gt_to_json", "annotate_truth"]


def gt_to_json(frame) -> dict:
    """JSON-ready ground truth of one frame (the dynamic mask is summarised by its pixel count)."""
    g = frame.info["gt"]
    cam = g["camera"]
    return {
        "index": frame.index,
        "timestamp": frame.timestamp,
        "pose": np.round(frame.pose, 6).tolist(),
        "action": np.round(frame.action, 6).tolist(),
        "action_name": cam["action_name"],
        "camera_segment": cam["segment"],
        "camera_state": list(cam["state"]),
        "boxes": np.round(g["boxes"], 2).tolist(),
        "class_id": g["class_id"].tolist(),
        "class_name": g["class_name"],
        "track_id": g["track_id"].tolist(),
        "visible": np.round(g["visible"], 4).tolist(),
        "speed": g["speed"],
        "colour": g["colour"],
        "motion": g["motion"],
        "dynamic_pixels": int(g["dynamic_mask"].sum()),
        "events": g["events"],
        "corruptions": g["corruptions"],
    }


def annotate_truth(frame) -> np.ndarray:
    """The frame's image with its ground-truth boxes and labels drawn (supervision annotators)."""
    import supervision as sv

    g = frame.info["gt"]
    keep = g["visible"] > 0
    det = sv.Detections(xyxy=g["boxes"][keep].astype(np.float32), class_id=g["class_id"][keep],
                        tracker_id=g["track_id"][keep])
    labels = [f"{c}#{t}" for c, t, k in zip(g["class_name"], g["track_id"], keep) if k]
    img = frame.image.copy()
    if len(det):
        img = sv.BoxAnnotator(thickness=1).annotate(img, det)
        img = sv.LabelAnnotator(text_scale=0.3, text_thickness=1, text_padding=1).annotate(img, det, labels=labels)
    return img
