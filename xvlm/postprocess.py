"""The model's outputs -> what a `GroundingResult` holds, in pixels of the original image (DETR's `PostProcess`).

Pure functions of tensors, configs and results, shared by every backend (`Grounder`, `OnnxGrounder`), the CLI, the
eval and the app: where a box lands in pixels (the canvas, clipping), the patch grid over the image, the patch-ITC
heatmap, concept pooling, the phrase x box ITC matrix, Grad-CAM maps and the default Grad-CAM layer. Nothing here
runs a model or keeps state. `Canvas` itself lives in xvlm.preprocess, beside the letterbox layout it inverts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from . import box_ops
from .config import VisionConfig, XVLMConfig
from .models import box_patch_mask, concept_cls
from .preprocess import Canvas, InputError

if TYPE_CHECKING:
    from .grounder import GroundingResult

BOX_CLIPPED = ("the predicted box reached past the image's edges; box_xyxy is clipped to the image, "
               "box_xyxy_unclipped keeps it as predicted")


# --- geometry: the model's square input over the image ---------------------------------------------------------
def canvas(vision: VisionConfig, image_size: tuple[int, int]) -> Canvas:
    """Where an image of `image_size` (W, H) sits in the model's square input."""
    return Canvas.of(image_size, vision.image_res, vision.resize)


def boxes_to_pixels(coords_cxcywh: torch.Tensor, canvas: Canvas) -> np.ndarray:
    """The bbox head's normalised (cx, cy, w, h) [B, 4] -> pixel xyxy of the original image, as predicted (possibly
    past the image's edges: what the official evaluation scores), float64."""
    return canvas.to_pixels(box_ops.cxcywh_to_xyxy(coords_cxcywh.double().cpu()).numpy())


def set_boxes(results: Sequence["GroundingResult"], coords_cxcywh: torch.Tensor) -> None:
    """Each result's box from the bbox head's normalised (cx, cy, w, h): raw, in pixels, and clipped to the image
    (with a note when clipping moved it). The results share one image, hence one canvas."""
    pixels = boxes_to_pixels(coords_cxcywh, results[0].canvas)
    for r, c, xyxy in zip(results, coords_cxcywh.cpu(), pixels):
        r.box_cxcywh = [float(v) for v in c]
        r.box_xyxy_unclipped = [float(v) for v in xyxy]
        r.box_xyxy = box_ops.clip_xyxy(xyxy, r.image_size)
        if r.box_xyxy != r.box_xyxy_unclipped:
            r.notes["box_clipped"] = BOX_CLIPPED


def normalise_boxes(canvas: Canvas, image_size: tuple[int, int], boxes_xyxy) -> torch.Tensor:
    """Pixel xyxy boxes (clipped to the image) -> [B, 4] float32 canvas coordinates in [0, 1]; InputError for no
    boxes or empty / inverted ones."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if len(b) == 0:
        raise InputError("no boxes given")
    W, H = image_size
    norm = torch.as_tensor(canvas.normalise(np.clip(b, 0, [W, H, W, H])))
    if (norm[:, 2] <= norm[:, 0]).any() or (norm[:, 3] <= norm[:, 1]).any():
        raise InputError("boxes must be x0 < x1, y0 < y1 inside the image")
    return norm.float()


def cell_centre(canvas: Canvas, grid_shape: tuple[int, int], row: int, col: int) -> tuple[float, float, float, float]:
    """A patch-grid cell in pixels of the original image: (centre x, centre y, cell width, cell height)."""
    grid_h, grid_w = grid_shape
    x0, y0, x1, y1 = canvas.xyxy
    cell_w, cell_h = (x1 - x0) / grid_w, (y1 - y0) / grid_h
    return x0 + (col + 0.5) * cell_w, y0 + (row + 0.5) * cell_h, cell_w, cell_h


# --- ITC: heatmaps, concepts and the phrase x box matrix -------------------------------------------------------
def patch_heatmaps(text_feat: torch.Tensor, patch_feats: torch.Tensor, grid_size: int) -> torch.Tensor:
    """cosine(projected patch, projected text [CLS]) per phrase on the patch grid: [P, D] x [N, D] -> [P, G, G]."""
    return (patch_feats @ text_feat.T).T.reshape(len(text_feat), grid_size, grid_size)


def pool_concepts(tokens: torch.Tensor, boxes: torch.Tensor, grid_size: int,
                  fmt: str = "xyxy") -> tuple[torch.Tensor, torch.Tensor]:
    """Visual concepts of normalised boxes on one image's [1, 1+N, C] tokens, pooled the X-VLM way (the mean of the
    covered patches): ([B, C] concept [CLS], [B, 1+N] patch masks)."""
    masks = box_patch_mask(boxes, grid_size, fmt=fmt)
    return concept_cls(tokens, masks.to(tokens.dtype)), masks


def phrase_box_matrix(text_feat: torch.Tensor, concept_feats: torch.Tensor) -> torch.Tensor:
    """ITC of each phrase with each box's concept (object granularity): [P, D] x [B, D] -> [P, B]."""
    return text_feat @ concept_feats.T


def set_image_itc(results: Sequence["GroundingResult"], text_feat: torch.Tensor, image_feats: torch.Tensor,
                  grid_size: int) -> None:
    """Image-level ITC and the patch heatmap of each phrase; `image_feats` [1+N, D]: the projected image tokens."""
    itc_image = text_feat @ image_feats[0]
    heat = patch_heatmaps(text_feat, image_feats[1:], grid_size)
    for r, s, h in zip(results, itc_image.cpu(), heat.cpu()):
        r.itc_image, r.patch_heatmap = float(s), h.float().numpy()


def set_region_itc(results: Sequence["GroundingResult"], sims: torch.Tensor, masks: torch.Tensor,
                   grid_size: int) -> None:
    """Region and object ITC from the phrase x box matrix of each phrase's own box (`sims` [P, P]), and the patches
    of each phrase's box (`masks` [P, 1+N])."""
    sims = sims.cpu()
    for i, r in enumerate(results):
        r.itc_region = float(sims[i, i])
        r.itc_objects = [float(v) for v in sims[i]]
        r.region_mask = masks[i, 1:].reshape(grid_size, grid_size).bool().cpu().numpy()


# --- Grad-CAM --------------------------------------------------------------------------------------------------
def default_gradcam_layer(cfg: XVLMConfig) -> int:
    """The BERT layer whose cross-attention Grad-CAM reads by default: the middle fusion layer."""
    t = cfg.text
    return t.fusion_layer + (t.num_hidden_layers - t.fusion_layer) // 2


def gradcam_layer(cfg: XVLMConfig, layer: int | None = None) -> int:
    """`layer` checked to be a fusion layer (ValueError otherwise), or the default one."""
    t = cfg.text
    if layer is None:
        return default_gradcam_layer(cfg)
    if not t.fusion_layer <= layer < t.num_hidden_layers:
        raise ValueError(f"layer must be a fusion layer in [{t.fusion_layer}, {t.num_hidden_layers})")
    return layer


def gradcam_token_maps(attention: torch.Tensor, grads: torch.Tensor, text_mask: torch.Tensor,
                       grid_size: int) -> torch.Tensor:
    """The official Grad-CAM (Grounding.py) per text token: cross-attention probabilities [1, heads, T, 1+N] times
    their positive gradients, over the patches, averaged over heads, padding tokens zeroed -> [1, T, G, G]."""
    g, heads = grid_size, attention.shape[1]
    keep = text_mask.view(1, 1, -1, 1, 1).to(attention.dtype)
    cams = attention.detach()[:, :, :, 1:].reshape(1, heads, -1, g, g) * keep
    grads = grads[:, :, :, 1:].clamp(min=0).reshape(1, heads, -1, g, g) * keep
    return (cams * grads).mean(1)


__all__ = ["Canvas", "canvas", "boxes_to_pixels", "set_boxes", "normalise_boxes", "cell_centre", "patch_heatmaps",
           "pool_concepts", "phrase_box_matrix", "set_image_itc", "set_region_itc", "default_gradcam_layer",
           "gradcam_layer", "gradcam_token_maps", "BOX_CLIPPED"]
