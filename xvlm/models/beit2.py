"""X²-VLM's vision encoder: BEiT-2 (Peng et al. 2022) as timm's `Beit`, read out the X²-VLM way.

timm's Beit expresses the official computation (`models/beit2.py` of X²-VLM): Conv2d patch embedding, a cls token,
no absolute position embedding, pre-norm blocks with layer scale (`gamma_1`, `gamma_2`), q and v biases (no k bias),
a relative position bias per block whose table has 3 extra rows (cls->token, token->cls, cls->cls), LayerNorm eps
1e-6, exact GELU, and `fc_norm` with `norm` = Identity (`use_mean_pooling=True`). Only the read-out differs from
timm's head: X²-VLM drops the cls token's output, applies `fc_norm` to every patch token and uses their mean as the
image [CLS] (timm pools first and norms the mean), so we call `forward_features` and read the tokens ourselves.
The official parameter names are timm's, so the checkpoint filter only adds the `backbone.` prefix.
"""
from __future__ import annotations

import re

import torch
from timm.models.beit import Beit

from ..config import Beit2VisionConfig

EXTRA_TOKENS = 3          # non-spatial rows at the end of each relative position bias table
TABLE_SUFFIX = "attn.relative_position_bias_table"


def build_backbone(cfg: Beit2VisionConfig) -> Beit:
    """The official `build_vision_encoder(use_beit_v2=True)` arguments (drop rates only matter for training)."""
    return Beit(img_size=cfg.image_res, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=4.0, qkv_bias=True, use_abs_pos_emb=False, use_rel_pos_bias=True,
                init_values=0.1, drop_path_rate=0.1, num_classes=0, global_pool="avg", use_fc_norm=True)


def patch_tokens(backbone: Beit, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, R, R] -> [B, G*G, width]: the `fc_norm`-ed patch tokens (the cls token's output is discarded)."""
    x = backbone.forward_features(images)          # `norm` is Identity with fc_norm
    return backbone.fc_norm(x[:, 1:])


def table_rows(grid: int) -> int:
    """Rows of a relative position bias table on a grid x grid patch grid."""
    return (2 * grid - 1) ** 2 + EXTRA_TOKENS


def shape_from_state(state: dict[str, torch.Tensor], prefix: str = "vision_encoder.") -> dict[str, int]:
    """Depth, attention heads, width and patch size of an official BEiT-2 state dict, read from its shapes (the official code
    hard-codes them by the words base/large in the vision config's file name). Heads: the columns of a relative
    position bias table."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    table = state.get(f"{prefix}blocks.0.{TABLE_SUFFIX}")
    patch = state.get(f"{prefix}patch_embed.proj.weight")
    if not blocks or table is None or patch is None:
        raise KeyError(f"no BEiT-2 vision encoder under {prefix!r} (blocks.N.{TABLE_SUFFIX}, patch_embed.proj)")
    return {"depth": max(blocks) + 1, "num_heads": int(table.shape[1]), "width": int(patch.shape[0]),
            "patch_size": int(patch.shape[-1])}
