"""HFDetector: object detectors from ``transformers`` behind one call, with per-box features.

Two kinds of model, chosen by the checkpoint's ``config.model_type``:

- **closed-set** (``AutoModelForObjectDetection``: DETR, Conditional/Deformable DETR, RT-DETR,
  YOLOS, ...): the classes are the model's ``config.id2label``; the image processor's
  ``post_process_object_detection`` gives boxes, scores and labels;
- **open-vocabulary** (``owlv2``, ``owlvit``; ``AutoModelForZeroShotObjectDetection``): the
  classes are the names passed as ``classes`` (``--classes "person,car"``), each turned into the
  text query ``"a photo of a <name>"``; the processor's ``post_process_grounded_object_detection``
  gives the boxes. (Grounding DINO's post-processing keys labels by text spans rather than by
  class index; it is refused with a message rather than guessed at.)

Per frame (:meth:`HFDetector.__call__`), RGB ``(H, W, 3)`` uint8 in:

1. the processor prepares the image (and, open-vocabulary, the text queries);
2. the model runs once (``torch.no_grad``);
3. post-processing keeps the boxes with ``score > threshold`` and scales them to the frame's
   pixels (OWL models see the image padded to a square at the bottom and right, so their boxes
   are scaled to that square, ``max(H, W)`` on each side); boxes are clipped to the frame;
4. **per-box features**: the hidden state of the query behind each box, ``(K, D)``: the
   decoder's last hidden state for DETR and RT-DETR, the detection tokens (the last ``Q``
   tokens of ``last_hidden_state``) for YOLOS, ``class_embeds`` (one per image patch) for OWL.
   The query behind each kept box is found by post-processing a copy of the outputs whose
   boxes encode the query index (centre ``x = q``, zero size): every supported post-processor
   selects and orders boxes from the logits alone, so both calls keep the same entries in the
   same order. ``features`` is None for a model that exposes no per-query states.

Loading goes through :func:`streammem.models.hf.load_hf` (a local folder never touches the
network; a hub failure is :class:`~streammem.models.hf.HubUnavailable`, one line); the device
and dtype follow :func:`~streammem.models.hf.pick_device` / :func:`~streammem.models.hf.pick_dtype`.

Example (a hub model, downloaded on first use; any folder written by ``save_pretrained`` works
the same way)::

    det = HFDetector.from_pretrained("PekingU/rtdetr_r18vd")
    out = det(frame_rgb, threshold=0.3)        # HFBoxes: boxes (K, 4), scores, labels, features
    owl = HFDetector.from_pretrained("google/owlv2-base-patch16-ensemble", classes=["person", "car"])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from streammem.models.hf import load_hf, pick_device, pick_dtype, require_transformers

__all__ = ["HFBoxes", "HFDetector", "OPEN_VOCABULARY", "PROMPT"]

#: ``config.model_type`` of the open-vocabulary detectors the adapter supports
OPEN_VOCABULARY = ("owlv2", "owlvit")
#: text query of an open-vocabulary class name
PROMPT = "a photo of a {}"


@dataclass
class HFBoxes:
    """One frame's detections. ``boxes`` ``(K, 4)`` float32 xyxy in the frame's pixels (inside
    it), ``scores`` ``(K,)`` float32 (the post-processor's: a softmax or sigmoid probability),
    ``labels`` ``(K,)`` int64 indices into :attr:`HFDetector.class_names`, ``queries`` ``(K,)``
    int64 the model query (or OWL patch) behind each box, ``features`` ``(K, D)`` float32 that
    query's hidden state, or None."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    queries: np.ndarray
    features: np.ndarray | None

    def __len__(self) -> int:
        return len(self.scores)


def _parse_classes(classes: str | Sequence[str] | None) -> list[str]:
    if classes is None:
        return []
    items = classes.split(",") if isinstance(classes, str) else list(classes)
    return [c.strip() for c in items if c and c.strip()]


class HFDetector:
    """A ``transformers`` detection model and its processor (see the module docstring).

    Args:
        model: a ``*ForObjectDetection`` model (or OWLv2 / OWL-ViT).
        processor: its image processor (closed-set) or processor (open-vocabulary).
        classes: class names of an open-vocabulary model (required there, refused elsewhere).
        name: what the model was loaded from (for messages and summaries).
    """

    def __init__(self, model: Any, processor: Any, classes: str | Sequence[str] | None = None, name: str = "") -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name or getattr(model, "name_or_path", "") or type(model).__name__
        self.model_type = str(getattr(model.config, "model_type", ""))
        self.open_vocabulary = self.model_type in OPEN_VOCABULARY
        names = _parse_classes(classes)
        if self.open_vocabulary:
            if not names:
                raise ValueError(f"{self.name} is an open-vocabulary detector ({self.model_type}): name the classes "
                                 f"to find, e.g. --classes \"person,car\"")
            self.class_names = names
            self.prompts = [PROMPT.format(n) for n in names]
        else:
            if names:
                raise ValueError(f"{self.name} ({self.model_type}) detects a fixed set of classes; --classes applies "
                                 f"to open-vocabulary models ({', '.join(OPEN_VOCABULARY)})")
            id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
            n = max(id2label, default=-1) + 1
            self.class_names = [id2label.get(i, str(i)) for i in range(n)]
            self.prompts = []
        try:
            p = next(model.parameters())
            self.device, self.dtype = p.device, p.dtype
        except StopIteration:  # pragma: no cover - a detector has parameters
            self.device, self.dtype = torch.device("cpu"), torch.float32

    @classmethod
    def from_pretrained(cls, name: str, classes: str | Sequence[str] | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> HFDetector:
        """Load a hub id or a local folder (``name`` without the ``hf:`` prefix).

        ``device``: None for accelerate's choice, ``"auto"`` for ``device_map="auto"``;
        ``dtype``: None for :func:`~streammem.models.hf.pick_dtype`'s. Raises HubUnavailable
        (hub unreachable, unknown id) and ValueError (not a detector, classes missing or
        misplaced)."""
        tf = require_transformers()
        tf.utils.logging.disable_progress_bar()  # "Loading weights" bars are not our output
        config = load_hf(name, tf.AutoConfig.from_pretrained)
        kind = str(getattr(config, "model_type", ""))
        if kind == "grounding-dino":
            raise ValueError(f"{name}: Grounding DINO is not supported here; use an OWLv2 model for open-vocabulary "
                             f"detection, e.g. hf:google/owlv2-base-patch16-ensemble")
        dev = pick_device(device)
        kw: dict = {"dtype": pick_dtype(dev, dtype)}
        if str(dev) == "auto":
            kw["device_map"] = "auto"
        if kind in OPEN_VOCABULARY:
            model = load_hf(name, tf.AutoModelForZeroShotObjectDetection.from_pretrained, **kw)
            processor = load_hf(name, tf.AutoProcessor.from_pretrained)
        else:
            try:
                model = load_hf(name, tf.AutoModelForObjectDetection.from_pretrained, **kw)
            except ValueError as e:
                if "Unrecognized configuration class" not in str(e):
                    raise
                raise ValueError(f"{name} ({kind}) is not an object detector: hf: detectors are "
                                 f"AutoModelForObjectDetection models (DETR, RT-DETR, YOLOS) or OWLv2") from None
            processor = load_hf(name, tf.AutoImageProcessor.from_pretrained)
        if str(dev) != "auto":
            model.to(dev)
        return cls(model, processor, classes=classes, name=name)

    # ------------------------------------------------------------------ one frame
    def _inputs(self, image: np.ndarray) -> dict:
        if self.open_vocabulary:
            inputs = self.processor(text=[self.prompts], images=image, return_tensors="pt")
        else:
            inputs = self.processor(images=image, return_tensors="pt")
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def _post(self, outputs: Any, threshold: float, size: tuple[int, int] | None) -> dict:
        sizes = None if size is None else [size]
        if self.open_vocabulary:
            return self.processor.post_process_grounded_object_detection(
                outputs=outputs, threshold=threshold, target_sizes=sizes)[0]
        return self.processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)[0]

    @staticmethod
    def query_states(outputs: Any) -> torch.Tensor | None:
        """The per-query hidden states ``(Q, D)`` of one image's outputs (see the module
        docstring), or None."""
        q = outputs.pred_boxes.shape[1]
        states = getattr(outputs, "class_embeds", None)  # OWL: one class embedding per patch
        if states is None:
            states = getattr(outputs, "last_hidden_state", None)
        if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[1] < q:
            return None
        return states[0, -q:]  # DETR / RT-DETR: all of them; YOLOS: the detection tokens

    @torch.no_grad()
    def __call__(self, image: np.ndarray, threshold: float = 0.0) -> HFBoxes:
        """Detect in one RGB ``(H, W, 3)`` uint8 image; boxes with ``score > threshold``."""
        h, w = image.shape[:2]
        # 1.-2. processor and model
        outputs = self.model(**self._inputs(image))
        # 3. boxes in the frame's pixels
        size = (max(h, w), max(h, w)) if self.open_vocabulary else (h, w)
        res = self._post(outputs, threshold, size)
        # 4. the query behind each box, and its hidden state
        code = torch.zeros(outputs.pred_boxes.shape, dtype=torch.float32, device=outputs.pred_boxes.device)
        code[..., 0] = torch.arange(outputs.pred_boxes.shape[1], dtype=torch.float32, device=code.device)
        marked = type(outputs)(**{**outputs, "pred_boxes": code})
        queries = self._post(marked, threshold, None)["boxes"][:, 0].round().long().cpu()
        states = self.query_states(outputs)
        boxes = res["boxes"].float().cpu().numpy().reshape(-1, 4)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return HFBoxes(boxes=boxes.astype(np.float32), scores=res["scores"].float().cpu().numpy().reshape(-1),
                       labels=res["labels"].cpu().numpy().astype(np.int64).reshape(-1),
                       queries=queries.numpy().astype(np.int64),
                       features=None if states is None else states[queries.to(states.device)].float().cpu().numpy())
