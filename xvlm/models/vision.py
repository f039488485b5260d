"""Vision encoders returning X-VLM's token layout: [CLS = mean of patches, patch_1 .. patch_N] of width `width`.

The backbones are timm's; X-VLM only changes what is read out of them: the final-stage normed tokens, with an
average-pooled token in front that plays the role of the image [CLS]. Visual concepts (boxes) reuse the same
tokens: a concept's [CLS] is the mean of the patches the box covers (`concept_tokens`).
"""
from __future__ import annotations

import math

import timm.models.swin_transformer as timm_swin
import timm.models.vision_transformer as timm_vit
import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from ..config import VisionConfig, ViTVisionConfig
from . import beit2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "swin":
            if cfg.patch_size != 4 * 2 ** (len(cfg.depths) - 1):
                raise ValueError(f"Swin with {len(cfg.depths)} stages has patch_size {4 * 2 ** (len(cfg.depths) - 1)}")
            self.backbone = timm_swin.SwinTransformer(
                img_size=cfg.image_res, patch_size=4, embed_dim=cfg.embed_dim, depths=tuple(cfg.depths),
                num_heads=tuple(cfg.num_heads), window_size=cfg.window_size, mlp_ratio=4.0, qkv_bias=True,
                drop_path_rate=0.1, num_classes=0, global_pool="")
            width = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        elif cfg.kind == "vit":
            self.backbone = timm_vit.VisionTransformer(
                img_size=cfg.image_res, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=4.0, qkv_bias=True, class_token=False, global_pool="avg",
                num_classes=0, drop_path_rate=0.05, embed_layer=_patch_embedding(cfg))
            # 2-D sin-cos positions (as MAE) to start from: X-VLM's fusion attends to image tokens without positions
            # of their own, so the box can only be read off position carried by the tokens. A from-scratch learned
            # embedding (timm's init, std 0.02) stayed too weak for that in our measurements. The table then trains
            # with the rest of the encoder (weights/README.md: it moves little).
            with torch.no_grad():
                self.backbone.pos_embed.copy_(sincos_2d(cfg.grid_size, cfg.width)[None])
            width = cfg.width
        elif cfg.kind == "beit2":
            self.backbone = beit2.build_backbone(cfg)
            width = cfg.width
        else:
            raise ValueError(f"unknown vision encoder kind {cfg.kind!r}")
        if width != cfg.width:
            raise ValueError(f"vision width {width} != configured width {cfg.width}")
        for module in self.backbone.modules():  # PyTorch SDPA attention (timm keeps it opt-in for Swin)
            if hasattr(module, "fused_attn"):
                module.fused_attn = True

    @property
    def grid_size(self) -> int:
        return self.cfg.grid_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] normalised images -> [B, 1 + G*G, width] (token 0: mean of the patches)."""
        if self.cfg.kind == "beit2":
            patches = beit2.patch_tokens(self.backbone, images)           # fc_norm per patch, cls output dropped
        else:
            patches = self.backbone.forward_features(images)
            patches = patches.flatten(1, 2) if patches.dim() == 4 else patches  # Swin: B H W C, ViT: B N C
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


def _patch_embedding(cfg: ViTVisionConfig):
    """timm's ViT embedding layer for `cfg.stem`: its linear patchify, or a convolutional stem whose last stride-2
    convolution lands on the patch grid with `width` channels (16, 32, ... channels before it; BatchNorm + ReLU)."""
    if cfg.stem == "patch":
        return timm_vit.PatchEmbed
    if cfg.stem != "conv":
        raise ValueError(f"unknown vision stem {cfg.stem!r}")
    depth = int(math.log2(cfg.patch_size))
    if 2 ** depth != cfg.patch_size or depth < 2:
        raise ValueError(f"a conv stem needs a power-of-two patch_size >= 4, got {cfg.patch_size}")
    channels = tuple(16 * 2 ** i for i in range(depth - 1)) + (cfg.width,)

    def embedding(img_size, patch_size, in_chans, embed_dim, **_):
        stem = ConvStem(in_chans, depth, channels, kernel_size=3, stride=(2,) * depth, norm_layer="batchnorm2d",
                        act_layer="relu")
        return HybridEmbed(stem, img_size=img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim, proj=False)
    return embedding


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """[grid*grid, width] fixed position code: half the channels encode the row, half the column."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = [f(pos.reshape(-1, 1) * freqs) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def box_patch_mask(box_cxcywh_or_xyxy: torch.Tensor, grid_size: int, fmt: str = "xyxy") -> torch.Tensor:
    """Which patches a box touches, the X-VLM way (official `get_image_attns`): floor of the left/top edge, ceil of the
    right/bottom edge on the patch grid, at least one patch. Boxes are normalised to [0, 1].

    Returns a [B, 1 + G*G] 0/1 float mask whose first entry (the concept [CLS]) is always 1.
    """
    boxes = box_cxcywh_or_xyxy.detach().double().cpu()
    if fmt == "cxcywh":
        boxes = torch.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                             boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], dim=1)
    masks = torch.zeros(len(boxes), 1 + grid_size * grid_size)
    masks[:, 0] = 1
    for b, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        c0, r0 = (min(max(math.floor(v * grid_size), 0), grid_size - 1) for v in (x0, y0))
        c1 = max(c0 + 1, min(math.ceil(x1 * grid_size), grid_size))
        r1 = max(r0 + 1, min(math.ceil(y1 * grid_size), grid_size))
        grid = masks[b, 1:].view(grid_size, grid_size)
        grid[r0:r1, c0:c1] = 1
    return masks.to(box_cxcywh_or_xyxy.device)


def concept_cls(image_tokens: torch.Tensor, patch_mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """A visual concept's [CLS]: the mean of the patch tokens in `patch_mask`.

    image_tokens [B, 1+N, C]; patch_mask [P, 1+N] (0/1, entry 0 ignored); index [P] picks each concept's image
    (default: concept p is on image p). Returns [P, C].
    """
    weights = patch_mask[:, 1:].to(image_tokens.dtype)
    if image_tokens.shape[0] == 1:      # every concept on the one image: a matmul, no per-concept copy of the patches
        pooled = weights @ image_tokens[0, 1:]
    else:
        patches = image_tokens[:, 1:] if index is None else image_tokens[index, 1:]
        pooled = torch.einsum("pn,pnc->pc", weights, patches)
    return pooled / weights.sum(dim=1, keepdim=True)


def concept_tokens(image_tokens: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """Token 0 replaced by the concept [CLS]; the patch tokens unchanged (fusion sees only the covered ones through
    the same mask). image_tokens [B, 1+N, C], patch_mask [B, 1+N]."""
    return torch.cat([concept_cls(image_tokens, patch_mask)[:, None], image_tokens[:, 1:]], dim=1)
