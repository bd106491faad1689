"""A small two-stage video detector with MAMBA's memory hooks, trained on StreamWorld.

Stages (each a method, so the streaming pipeline can put memory reads and writes between them):

1. :meth:`SmallDetector.features`: a compact CNN, stride 8: ``(B, 3, H, W)`` in [0, 1] ->
   ``(B, C, H/8, W/8)``.
2. :meth:`SmallDetector.fuse` (a ``fusion_radius > 0`` model only): aligned temporal fusion
   with the previous frame's fused map (:class:`~streammem.models.fusion.LocalFusion`, a
   one-map recurrent memory); then :meth:`SmallDetector.enhance_pixels`: pixel-level GEO over all ``H/8 * W/8`` positions of
   one frame, keys from the pixel bank (``(Nk, C)``; empty -> the frame's own pixels).
3. :meth:`SmallDetector.propose`: a dense, class-agnostic proposal stage (CenterNet-style
   objectness heatmap with a 3x3 peak filter, per-cell centre offset and log size): top-K
   peaks -> ``boxes (K, 4)`` xyxy pixels, ``objectness (K,)``.
4. :meth:`SmallDetector.roi_fc6`: RoI features by bilinear sampling
   (``torch.nn.functional.grid_sample``, a ``roi`` x ``roi`` grid of bin centres) ->
   ``relu(fc6)`` ``(K, D)``. These pre-enhancement features are what the instance bank stores.
5. :meth:`SmallDetector.head`: ``GEO0(fc6, keys) -> relu(fc7) -> GEO1(., relu(fc7(keys)))``
   -> class logits ``(K, 1 + num_classes)`` (0 is background) and box deltas ``(K, 4)``.

Training (``streammem.train.detector``) follows MAMBA: no bank; the keys of a frame are the
fc6 features of the top-75 proposals of reference frames of the same clip (and the pixel keys
are features inside the reference frames' ground-truth boxes).

Saved as ``config.json`` + ``model.safetensors`` through
:class:`~streammem.models.hub.SafeHubMixin` (huggingface_hub's ``PyTorchModelHubMixin``,
refusing pickles and naming missing weights).

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> det = SmallDetector(width=16, fc_dim=32, heads=4).eval()
    >>> out = det.detect(torch.rand(1, 3, 64, 64))
    >>> sorted(out) == ["boxes", "class_id", "fc6", "fused", "objectness", "pixels", "proposals", "scores"]
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from streammem.models.hub import SafeHubMixin
from torch import nn

from streammem.models.fusion import LocalFusion
from streammem.models.geo import GEO

__all__ = ["SmallDetector", "nms", "box_iou", "encode_deltas", "decode_deltas"]

STRIDE = 8
DELTA_STD = (0.1, 0.1, 0.2, 0.2)


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Res(nn.Module):
    def __init__(self, c: int, dilation: int = 1) -> None:
        super().__init__()
        self.a = _cbr(c, c, dilation=dilation)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(self.a(x)))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-6)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float = 0.5) -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices in descending score order."""
    order = torch.argsort(scores, descending=True)
    if order.numel() == 0:
        return order
    # the greedy pass runs on a numpy boolean matrix: per-step tensor ops cost ~10x more on CPU
    suppress = (box_iou(boxes[order], boxes[order]) > iou).cpu().numpy()
    keep = np.ones(order.numel(), dtype=bool)
    for i in range(order.numel()):
        if keep[i]:
            keep[i + 1:] &= ~suppress[i, i + 1:]
    return order[torch.from_numpy(keep).to(order.device)]


def encode_deltas(props: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Standard (dx, dy, dw, dh) deltas of ``gt`` w.r.t. ``props``, divided by DELTA_STD."""
    pw, ph = (props[:, 2] - props[:, 0]).clamp(min=1), (props[:, 3] - props[:, 1]).clamp(min=1)
    gw, gh = (gt[:, 2] - gt[:, 0]).clamp(min=1), (gt[:, 3] - gt[:, 1]).clamp(min=1)
    d = torch.stack([
        ((gt[:, 0] + gt[:, 2]) - (props[:, 0] + props[:, 2])) / 2 / pw,
        ((gt[:, 1] + gt[:, 3]) - (props[:, 1] + props[:, 3])) / 2 / ph,
        torch.log(gw / pw),
        torch.log(gh / ph),
    ], 1)
    return d / d.new_tensor(DELTA_STD)


def decode_deltas(props: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    d = deltas * deltas.new_tensor(DELTA_STD)
    pw, ph = (props[:, 2] - props[:, 0]).clamp(min=1), (props[:, 3] - props[:, 1]).clamp(min=1)
    cx, cy = (props[:, 0] + props[:, 2]) / 2 + d[:, 0] * pw, (props[:, 1] + props[:, 3]) / 2 + d[:, 1] * ph
    w, h = pw * d[:, 2].clamp(max=4).exp(), ph * d[:, 3].clamp(max=4).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


class SmallDetector(nn.Module, SafeHubMixin):
    """The shipped small detector (see the module docstring for the stages and shapes).

    Args:
        num_classes: object classes (background excluded).
        class_names: their names, index = class id.
        width: backbone output channels C (pixel-level token width).
        fc_dim: fc6 / fc7 width D (instance-level token width).
        heads: GEO heads at both levels (16 in MAMBA).
        roi: RoI sampling grid side.
        num_proposals: top-K peaks kept by the proposal stage (300 in MAMBA).
        bank_proposals: proposals whose fc6 features go to the instance bank (75 in MAMBA).
        geo_mode: ``"attention"`` or ``"alignment"`` for the instance-level GEOs.
        pixel_geo: whether the pixel-level GEO is used.
        pixel_heads: heads of the pixel-level GEO (4, not MAMBA's 16: attention over all
            H/8 * W/8 pixels costs ``heads * HW * Nk`` softmax entries, the dominant cost on CPU).
        pixel_keys: pixel key-set size the model was trained with (the pipeline reads this many
            from the pixel bank; MAMBA reads 2000). A frame without keys uses ``pixel_keys``
            of its own pixels, evenly strided.
        geo_pos: add a learned geometry prior to the instance-level GEOs' attention logits (not
            in MAMBA): per head, a linear function of ``log(1 + r^2)``, ``log(1 + |dt|)`` and
            ``log(1 + r^2) / (1 + |dt|)``, where ``r`` is the distance from the proposal's centre
            to the key's, in units of the proposal's size, and ``dt`` the key's age in seconds.
            It lets a proposal attend to the same object in recent frames; zero-initialised,
            so a model trained without it is unchanged when it is switched on.
        fusion_radius: > 0 adds :class:`~streammem.models.fusion.LocalFusion` with this window
            radius (cells) after the backbone (not in MAMBA): each position attends to the
            previous frame's fused map around the same place, and a learned gate mixes it in.
            0 (default): no fusion. Without a state (first frame, single-frame use) it is the
            identity.
    """

    def __init__(
        self,
        num_classes: int = 11,
        class_names: list[str] | None = None,
        width: int = 48,
        fc_dim: int = 128,
        heads: int = 16,
        roi: int = 7,
        num_proposals: int = 100,
        bank_proposals: int = 75,
        geo_mode: str = "attention",
        pixel_geo: bool = True,
        pixel_heads: int = 4,
        pixel_keys: int = 256,
        geo_pos: bool = False,
        fusion_radius: int = 0,
    ) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("width", width), ("fc_dim", fc_dim), ("roi", roi),
                        ("num_proposals", num_proposals), ("bank_proposals", bank_proposals)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SmallDetector.{name} must be an int >= 1, got {v!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"SmallDetector.class_names must have num_classes={num_classes} names, got {len(class_names)}")
        self.num_classes, self.class_names = num_classes, list(class_names or [str(i) for i in range(num_classes)])
        self.width, self.fc_dim, self.roi = width, fc_dim, roi
        self.num_proposals, self.bank_proposals, self.use_pixel_geo = num_proposals, bank_proposals, pixel_geo
        self.pixel_keys, self.geo_pos, self.heads = pixel_keys, bool(geo_pos), heads
        if not isinstance(fusion_radius, int) or fusion_radius < 0:
            raise ValueError(f"SmallDetector.fusion_radius must be an int >= 0, got {fusion_radius!r}")
        self.fusion_radius = fusion_radius
        c1, c2 = max(width // 3, 8), max(2 * width // 3, 8)
        self.backbone = nn.Sequential(
            _cbr(3, c1, 2), _cbr(c1, c2, 2), _cbr(c2, width, 2), _Res(width), _cbr(width, width, dilation=2)
        )
        self.pixel_geo = GEO(width, heads=pixel_heads, mode="attention")
        self.prop_trunk = _cbr(width, width)
        self.prop_obj = nn.Conv2d(width, 1, 1)
        self.prop_box = nn.Conv2d(width, 4, 1)  # dx, dy (cells), log(w / 8), log(h / 8)
        nn.init.constant_(self.prop_obj.bias, -math.log((1 - 0.1) / 0.1))
        nn.init.zeros_(self.prop_box.weight)
        nn.init.constant_(self.prop_box.bias[2:], math.log(3.0))
        nn.init.zeros_(self.prop_box.bias[:2])
        self.fc6 = nn.Linear(width * roi * roi, fc_dim)
        self.geo0 = GEO(fc_dim, heads=heads, mode=geo_mode)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.geo1 = GEO(fc_dim, heads=heads, mode=geo_mode)
        self.cls = nn.Linear(fc_dim, num_classes + 1)
        self.box = nn.Linear(fc_dim, 4)
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.box.bias)
        if self.geo_pos:
            self.pos_bias = nn.Linear(3, 2 * heads)  # -> GEO0 and GEO1 logit biases per head
            nn.init.zeros_(self.pos_bias.weight)
            nn.init.zeros_(self.pos_bias.bias)
        if fusion_radius:
            self.fusion = LocalFusion(width, radius=fusion_radius)

    # ------------------------------------------------------------------ stages
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1], H and W multiples of 8 -> ``(B, C, H/8, W/8)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % STRIDE or images.shape[3] % STRIDE:
            raise ValueError(f"image height and width must be multiples of {STRIDE}, got {tuple(images.shape[2:])}")
        x = (images - 0.45) / 0.25
        return self.backbone(x)

    def fuse(self, feat: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """Temporal fusion of backbone features ``(B, C, h, w)`` with ``state`` (the previous
        frame's fused map, or None); returns this frame's fused map, the next frame's state. The
        identity for a model without fusion or without a state."""
        if not self.fusion_radius or state is None:
            return feat
        return self.fusion(feat, state)

    def enhance_pixels(self, feat: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Pixel-level GEO of one frame: ``feat (1, C, h, w)``, ``keys (Nk, C)`` -> ``(1, C, h, w)``."""
        if not self.use_pixel_geo:
            return feat
        _, c, h, w = feat.shape
        q = feat[0].flatten(1).t()
        if keys.shape[0] == 0:
            keys = q[:: max(1, q.shape[0] // self.pixel_keys)][: self.pixel_keys]
        return self.pixel_geo(q, keys).t().reshape(1, c, h, w)

    def proposal_maps(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness logits ``(B, 1, h, w)`` and box maps ``(B, 4, h, w)``."""
        t = self.prop_trunk(feat)
        return self.prop_obj(t), self.prop_box(t)

    @staticmethod
    def decode_proposals(obj_logit: torch.Tensor, box_map: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` 3x3 peaks of one frame's maps -> ``boxes (k', 4)`` xyxy pixels, ``objectness (k',)``."""
        heat = torch.sigmoid(obj_logit[0, 0])
        peak = heat == F.max_pool2d(heat[None, None], 3, 1, 1)[0, 0]
        h, w = heat.shape
        score = torch.where(peak, heat, heat.new_zeros(()))
        k = min(k, h * w)
        top, idx = torch.topk(score.flatten(), k)
        ys, xs = idx // w, idx % w
        b = box_map[0][:, ys, xs]  # 4, k
        cx = (xs.float() + 0.5 + b[0]) * STRIDE
        cy = (ys.float() + 0.5 + b[1]) * STRIDE
        bw, bh = b[2].clamp(-3, 5).exp() * STRIDE, b[3].clamp(-3, 5).exp() * STRIDE
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        boxes = torch.stack([boxes[:, 0].clamp(0, w * STRIDE), boxes[:, 1].clamp(0, h * STRIDE),
                             boxes[:, 2].clamp(0, w * STRIDE), boxes[:, 3].clamp(0, h * STRIDE)], 1)
        return boxes, top

    def propose(self, feat: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame ``(1, C, h, w)`` -> ``boxes (K, 4)``, ``objectness (K,)``, best first."""
        o, b = self.proposal_maps(feat)
        return self.decode_proposals(o, b, k or self.num_proposals)

    def roi_sample(self, feat: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Bilinear RoI sampling: ``feat (1, C, h, w)``, ``boxes (K, 4)`` xyxy image pixels ->
        ``(K, C, roi, roi)``, values at the centres of a ``roi x roi`` grid of bins."""
        _, c, h, w = feat.shape
        k = boxes.shape[0]
        t = (torch.arange(self.roi, dtype=feat.dtype, device=feat.device) + 0.5) / self.roi  # bin centres
        x = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * t  # K, r
        y = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * t
        # align_corners=False: -1 and 1 are the outer edges of the map = image pixels 0 and W.
        gx = x / (w * STRIDE) * 2 - 1
        gy = y / (h * STRIDE) * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(k, self.roi, self.roi), gy[:, :, None].expand(k, self.roi, self.roi)], -1)
        s = F.grid_sample(feat, grid.reshape(1, k, self.roi * self.roi, 2), mode="bilinear", align_corners=False)
        return s[0].permute(1, 0, 2).reshape(k, c, self.roi, self.roi)

    def roi_fc6(self, feat: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``feat (1, C, h, w)``, ``boxes (K, 4)`` xyxy image pixels -> ``relu(fc6)`` ``(K, D)``."""
        if boxes.shape[0] == 0:
            return feat.new_zeros(0, self.fc_dim)
        return F.relu(self.fc6(self.roi_sample(feat, boxes).flatten(1)))

    @staticmethod
    def box_centres(boxes: torch.Tensor) -> torch.Tensor:
        """``(N, 4)`` xyxy -> ``(N, 2)`` xy centres."""
        return (boxes[:, :2] + boxes[:, 2:]) / 2

    def own_key_places(self, props: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres and ages (0) of a frame's own instance keys, its top ``bank_proposals``
        proposals: the ``key_xy``, ``key_age`` of :meth:`position_bias` for the single-frame case."""
        own = props[: self.bank_proposals]
        return self.box_centres(own), own.new_zeros(own.shape[0])

    def position_bias(self, boxes: torch.Tensor, key_xy: torch.Tensor, key_age: torch.Tensor) -> torch.Tensor | None:
        """The geometry prior of ``geo_pos`` (None when the model has none): proposals ``boxes
        (K, 4)`` xyxy pixels, key centres ``key_xy (Nk, 2)`` xy pixels, key ages ``key_age (Nk,)``
        seconds -> logit biases ``(2, heads, K, Nk)`` for GEO0 and GEO1."""
        if not self.geo_pos:
            return None
        c = self.box_centres(boxes)
        k = key_xy.to(c)
        size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=STRIDE * STRIDE)
        # squared centre distances by one matmul, in units of the proposal's area -> log(1 + r^2)
        d2 = torch.addmm((c * c).sum(1)[:, None] + (k * k).sum(1)[None], c, k.t(), alpha=-2.0)
        r2 = torch.log1p(d2.clamp_(min=0.0) / size[:, None])  # K, Nk
        age = key_age.abs().to(c)
        # w0 r2 + w1 log(1 + age) + w2 r2 / (1 + age) + b  =  r2 * A[:, key] + B[:, key]
        w, bias = self.pos_bias.weight, self.pos_bias.bias  # (2H, 3), (2H,)
        a = w[:, 0:1] + w[:, 2:3] * (1.0 / (1.0 + age))[None]  # 2H, Nk
        b = w[:, 1:2] * torch.log1p(age)[None] + bias[:, None]
        out = torch.addcmul(b[:, None, :], r2[None], a[:, None, :])  # 2H, K, Nk
        return out.view(2, self.heads, *r2.shape)

    def head(self, fc6: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance-level enhancement: ``fc6 (K, D)``, ``keys (Nk, D)`` (fc6 features) ->
        class logits ``(K, 1 + num_classes)`` and box deltas ``(K, 4)``. ``bias``: optional
        :meth:`position_bias` output."""
        x = self.geo0(fc6, keys, None if bias is None else bias[0])
        x = F.relu(self.fc7(x))
        k7 = F.relu(self.fc7(keys)) if keys.shape[0] else keys.new_zeros(0, self.fc_dim)
        x = self.geo1(x, k7, None if bias is None else bias[1])
        return self.cls(x), self.box(x)

    def key_cache(self, fc6: torch.Tensor) -> torch.Tensor:
        """Everything :meth:`head` computes from its keys alone, ``(K, 4D)``: GEO0's projected
        keys, ``relu(fc7(keys))`` through GEO1's projections. The instance memory stores these
        (they depend only on the key), so a read of N keys costs no per-read key work;
        :meth:`head_cached` gives :meth:`head`'s result from them."""
        if fc6.shape[0] == 0:
            return fc6.new_zeros(0, 4 * self.fc_dim)
        return torch.cat([self.geo0.project_keys(fc6), self.geo1.project_keys(F.relu(self.fc7(fc6)))], 1)

    def head_cached(self, fc6: torch.Tensor, cache: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`head` with keys given as :meth:`key_cache` rows (at least one)."""
        d2 = 2 * self.fc_dim
        x = self.geo0.mix(fc6, self.geo0.attend_projected(fc6, cache[:, :d2], None if bias is None else bias[0]))
        x = F.relu(self.fc7(x))
        x = self.geo1.mix(x, self.geo1.attend_projected(x, cache[:, d2:], None if bias is None else bias[1]))
        return self.cls(x), self.box(x)

    # ------------------------------------------------------------------ one-frame inference
    def postprocess(self, props: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, size_hw: tuple[int, int],
                    score_threshold: float = 0.01, nms_iou: float = 0.5) -> dict:
        """Per proposal: best foreground class and its probability, refined box; class-wise NMS."""
        prob = torch.softmax(logits, -1)[:, 1:]
        score, cls = prob.max(-1)
        boxes = decode_deltas(props, deltas)
        h, w = size_hw
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                             boxes[:, 3].clamp(0, h)], 1)
        ok = (score >= score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        idx = torch.nonzero(ok).flatten()
        # class-wise NMS by offsetting boxes per class
        off = cls[idx].to(boxes.dtype)[:, None] * (max(h, w) + 1)
        keep = idx[nms(boxes[idx] + off, score[idx], nms_iou)]
        return {"boxes": boxes[keep], "scores": score[keep], "class_id": cls[keep]}

    @torch.no_grad()
    def detect(self, image: torch.Tensor, pixel_keys: torch.Tensor | None = None,
               instance_keys: torch.Tensor | None = None, score_threshold: float = 0.01,
               instance_key_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
               state: torch.Tensor | None = None) -> dict:
        """One frame ``(1, 3, H, W)``; keys default to the frame itself (the single-frame model).
        ``instance_key_pos``: ``(centres (Nk, 2) xy pixels, ages (Nk,) seconds)`` of given
        instance keys, for a ``geo_pos`` model (without it the prior is left out). ``state``: the
        previous frame's ``fused`` map, for a ``fusion_radius`` model.

        Returns ``boxes (N, 4)``, ``scores (N,)``, ``class_id (N,)`` and, for bank writes,
        ``pixels`` (pre-enhancement ``(1, C, h, w)``), ``proposals (K, 4)``, ``objectness (K,)``,
        ``fc6 (K, D)`` (pre-enhancement, best proposal first), ``fused`` (the next frame's state).
        """
        feat = self.features(image)
        fused = self.fuse(feat, state)
        pk = pixel_keys if pixel_keys is not None else feat.new_zeros(0, self.width)
        enh = self.enhance_pixels(fused, pk)
        props, obj = self.propose(enh)
        fc6 = self.roi_fc6(enh, props)
        if instance_keys is None:
            keys, instance_key_pos = fc6[: self.bank_proposals], self.own_key_places(props)
        else:
            keys = instance_keys
        bias = None if instance_key_pos is None else self.position_bias(props, *instance_key_pos)
        logits, deltas = self.head(fc6, keys, bias)
        out = self.postprocess(props, logits, deltas, tuple(image.shape[2:]), score_threshold)
        out.update(pixels=feat, proposals=props, objectness=obj, fc6=fc6, fused=fused)
        return out
