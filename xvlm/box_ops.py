"""Box conversions and (generalised) IoU, in the DETR conventions X-VLM's bbox loss uses."""
from __future__ import annotations

import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def clip_xyxy(box, size) -> list[float]:
    """A pixel xyxy box clipped to an image of `size` (W, H): the one place where boxes are put inside the image
    (the bbox head's box may reach past its edges; `GroundingResult.box_xyxy_unclipped` keeps it as predicted)."""
    w, h = size
    x0, y0, x1, y1 = (float(v) for v in box)
    return [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of row-aligned xyxy boxes a[i], b[i]."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return inter / union.clamp(min=1e-9), union


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of row-aligned xyxy boxes (the diagonal of DETR's pairwise matrix, without the N x N work)."""
    iou, union = paired_iou(a, b)
    hull = box_area(torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], -1))
    return iou - (hull - union) / hull.clamp(min=1e-9)
