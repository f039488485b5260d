"""The per-stage objective: ITC, ITM, MLM, bbox (L1 + GIoU), attention guidance and whole-image ITM, weighted by the
stage; and the cross-attention alignment a stage may start with."""
from __future__ import annotations

import torch
from torch import nn

from .. import losses
from ..models import XVLM, ImageContext
from ..models.bert import additive_mask
from ..preprocess import Tokenizer
from .recipes import Stage


class Pretrainer(nn.Module):
    """forward(batch) -> dict of losses; a module so DistributedDataParallel can wrap it."""

    def __init__(self, model: XVLM, tokenizer: Tokenizer, mask_prob: float):
        super().__init__()
        self.model, self.tokenizer, self.mask_prob = model, tokenizer, mask_prob
        self.weights: dict[str, float] = {}       # the losses to compute (weight != 0) and their weights
        self.frozen_vision = False                # no gradient through the vision encoder
        self.unique_box_targets = False           # bbox/attn losses only on concepts that are box targets

    def set_stage(self, stage: Stage) -> None:
        """Compute the stage's losses."""
        self.weights = {k: v for k, v in stage.loss_weights.items() if v}
        self.frozen_vision = stage.trainable != "all"
        self.unique_box_targets = stage.unique_box_targets

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, w = self.model, self.weights
        ids, tmask = batch["input_ids"], batch["attention_mask"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_vision):
            tokens = m.encode_image(batch["images"])                                # one vision pass per image
        visual = losses.concept_visuals(tokens, batch["group"], batch["patch_mask"])  # image / region / object
        phrases = ~batch["is_image"]
        by_length = [batch["is_image"], phrases]      # captions and phrases, each padded to its own longest text
        text_embeds = losses.encode_text(m, ids, tmask, by_length)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        image_feat, text_feat = m.image_features(visual.cls), m.text_features(text_embeds)
        if w.get("itc"):
            out["itc"] = losses.contrastive_loss(image_feat, text_feat, m.temp, batch["idx"])
        if w.get("itm"):
            neg_image, neg_text = losses.sample_hard_negatives(image_feat, text_feat, m.temp, batch["idx"],
                                                                batch.get("describes"))
            out["itm"] = losses.matching_loss(m, visual, batch["patch_mask"], text_embeds, tmask, neg_image,
                                              neg_text, by_length)
        if w.get("itm_caption"):     # image-caption ITM, negatives among captions: what retrieval's re-rank asks
            caps = batch["is_image"].nonzero().squeeze(1)
            if len(caps) > 1:
                neg_image, neg_text = losses.sample_hard_negatives(image_feat[caps], text_feat[caps], m.temp,
                                                                    batch["idx"][caps])
                out["itm_caption"] = losses.matching_loss(
                    m, visual.select(caps), batch["patch_mask"][caps], text_embeds[caps], tmask[caps], neg_image,
                    neg_text, [torch.ones(len(caps), dtype=torch.bool, device=caps.device)])
        if w.get("mlm"):
            t = self.tokenizer
            masked, labels = losses.mask_tokens(ids, tmask, t.mask_id, t.vocab_size, self.mask_prob,
                                                (t.pad_id, t.cls_id))
            out["mlm"] = losses.mlm_loss(m, masked, tmask, labels, visual, batch["patch_mask"], by_length)
        if w.get("bbox") or w.get("itm_image"):     # phrases fused with their whole image: the Grounder's query
            phrase_embeds, phrase_mask = losses.without_padding(text_embeds[phrases], tmask[phrases])
            whole_image = ImageContext(tokens[batch["group"], 0], tokens[:, 1:], batch["group"]).select(phrases)
            attn_layer = -1 if w.get("attn") and w.get("bbox") else None    # the last fusion layer's [CLS] attention
            fused = m.fuse(phrase_embeds, phrase_mask, whole_image, last_rows=losses.CLS_ROW.to(tmask.device),
                           return_attention=attn_layer)
            if attn_layer is not None:
                fused, attention = fused.hidden, fused.attention
        if w.get("bbox"):
            names_one = batch["names_one_object"][phrases]
            targets = names_one if self.unique_box_targets and names_one.any() else slice(None)
            out["l1"], out["giou"] = losses.bbox_loss(m.predict_bbox(fused)[targets], batch["boxes"][phrases][targets])
            if w.get("attn"):
                out["attn"] = losses.attention_guidance_loss(attention[targets], batch["patch_mask"][phrases][targets])
        if w.get("itm_image"):
            absent = None
            if "absent_ids" in batch:                   # texts naming what their image lacks: same-image negatives
                a_embeds, a_mask = losses.without_padding(m.encode_text(batch["absent_ids"], batch["absent_mask"]),
                                                          batch["absent_mask"])
                absent = (a_embeds, a_mask, batch["absent_group"])
            out["itm_image"] = losses.image_matching_loss(
                m, fused, tokens, phrase_embeds, phrase_mask, text_feat[phrases],
                m.image_features(tokens[:, 0]), m.temp, batch["describes_image"][phrases], absent)
        return out

    def total(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = {**self.weights, "l1": self.weights.get("bbox", 0), "giou": self.weights.get("bbox", 0)}
        return sum(weight[k] * v for k, v in out.items())


@torch.no_grad()
def align_cross_attention(model: XVLM, batch: dict, target_std: float = 4.0) -> float:
    """Point the fusion layers' cross-attention at the patches whose ITC feature matches the text.

    Query/key rows of the first `embed_dim` channels are set to the (scaled) text_proj / vision_proj weights, and the
    fusion layers' text self-attention output is zeroed (the residual passes the text [CLS] through), so the attention
    logits start as the patch-ITC similarity the pre-training stage learned. Without it the bbox head sits at the mean
    box: with uniform attention the fused [CLS] carries no position, so the head learns the mean, and with a constant
    head no gradient teaches attention where to look. Returns the scale used.
    """
    m = model
    E = m.cfg.embed_dim
    layer = m.text_encoder.fusion_layers[0]
    tokens = m.encode_image(batch["images"])
    text = m.encode_text(batch["input_ids"], batch["attention_mask"])
    for fusion in m.text_encoder.fusion_layers:   # text self-attention in fusion layers passes the text through
        fusion.attention.output.dense.weight.zero_()
        fusion.attention.output.dense.bias.zero_()
    query_in = layer.attention(text, additive_mask(batch["attention_mask"], text.dtype))[:, 0]   # [P, H]
    q = m.text_proj(query_in)                                     # [P, E]
    k = m.vision_proj(tokens[batch["group"], 1:])                 # [P, N, E]
    head_dim = m.cfg.text.hidden_size // m.cfg.text.num_attention_heads
    logits = torch.einsum("pe,pne->pn", q, k) / head_dim ** 0.5
    scale = float((target_std / logits.std(dim=1).mean()).sqrt())
    for fusion in m.text_encoder.fusion_layers:
        attn = fusion.crossattention.self
        attn.query.weight[:E] = m.text_proj.weight * scale
        attn.query.bias[:E] = m.text_proj.bias * scale
        attn.key.weight[:E] = m.vision_proj.weight * scale
        attn.key.bias[:E] = m.vision_proj.bias * scale
    return scale
