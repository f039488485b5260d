"""X-VLM (Zeng et al., ICML 2022): image encoder, text encoder, fusion encoder and the multi-grained heads.

    image --vision_encoder--> [CLS, patches]  --vision_proj--> ITC features (image, region, object granularity)
    text  --text layers-----> [CLS, tokens]   --text_proj----> ITC features
    (text, image tokens) --fusion layers--> fused [CLS] --itm_head--> match logits
                                                        --bbox_head--> sigmoid (cx, cy, w, h)
A visual concept (a box) is the same image tokens with token 0 replaced by the mean of the covered patches and a
fusion mask restricted to them (`vision.concept_tokens`, `vision.box_patch_mask`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import XVLMConfig
from .bert import BertModel, FusionKeysValues, FusionOutput, MLMHead
from .vision import VisionEncoder

HEADS = ("itc", "itm", "bbox", "mlm")


def build_mlp(width: int, out: int) -> nn.Sequential:
    """X-VLM's head shape: Linear(w, 2w) -> LayerNorm -> GELU -> Linear(2w, out)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out))


class XVLM(nn.Module):
    def __init__(self, cfg: XVLMConfig):
        super().__init__()
        unknown = set(cfg.heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; known: {HEADS}")
        self.cfg = cfg
        self.vision_encoder = VisionEncoder(cfg.vision)
        self.text_encoder = BertModel(cfg.text, image_width=cfg.vision.width)
        width = cfg.text.hidden_size
        if "itc" in cfg.heads:
            self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
            self.text_proj = nn.Linear(width, cfg.embed_dim)
            self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        if "itm" in cfg.heads:
            self.itm_head = build_mlp(width, 2)
        if "bbox" in cfg.heads:
            self.bbox_head = build_mlp(width, 4)
        if "mlm" in cfg.heads:
            self.mlm_head = MLMHead(cfg.text, self.text_encoder.embeddings.word_embeddings)
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT's initialisation (N(0, 0.02) weights, zero biases, unit LayerNorm) for everything but the timm
        backbone, which initialises itself. Only matters for training from scratch: checkpoints overwrite it."""
        for name, module in self.named_modules():
            if name.startswith("vision_encoder"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def heads(self) -> tuple[str, ...]:
        return self.cfg.heads

    # --- encoders -----------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_encoder.encode_text(input_ids, attention_mask, position_ids)

    def image_keys_values(self, image_tokens: torch.Tensor) -> FusionKeysValues:
        """An image's cross-attention keys/values in every fusion layer, for reuse across queries (`fuse`)."""
        return self.text_encoder.image_keys_values(image_tokens)

    def fuse(self, text_embeds, attention_mask, image_embeds, image_mask=None, last_rows=None, keys_values=None,
             return_attention: int | None = None) -> torch.Tensor | FusionOutput:
        """`BertModel.fuse`: fused hidden states, or a FusionOutput with one layer's cross-attention."""
        return self.text_encoder.fuse(text_embeds, attention_mask, image_embeds, image_mask, last_rows, keys_values,
                                      return_attention)

    # --- heads --------------------------------------------------------------------------------------------------
    def image_features(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of every image token ([..., C] -> [..., D]); token 0 is the ITC image feature."""
        return F.normalize(self.vision_proj(image_tokens), dim=-1)

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused[:, 0])

    def predict_bbox(self, fused: torch.Tensor) -> torch.Tensor:
        """Normalised (cx, cy, w, h) from the fused [CLS] of text attending to the WHOLE image."""
        return self.bbox_head(fused[:, 0]).sigmoid()

    def mlm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(fused)
