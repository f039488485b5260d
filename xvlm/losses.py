"""X-VLM's four objectives on a batch of (visual concept, text) pairs.

A pair's visual side is one image's tokens with a patch mask (all ones for the whole image, the covered patches for a
box), so image-, region- and object-level pairs share one code path — the paper's point: a concept is pooled from the
same patch tokens as the image.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import box_ops
from .models import XVLM, ImageContext, concept_cls


CLS_ROW = torch.tensor([0])   # heads that read the fused [CLS] need only that row from the last fusion layer


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather across processes keeping gradients for the local shard (as the official AllGather)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


def without_padding(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row: masked tokens change no unmasked output, so the
    result is the same and a layer costs the rows' longest text, not the batch's."""
    n = max(int(mask.sum(dim=1).max()), 1)
    return tokens[:, :n], mask[:, :n]


def in_length_groups(groups: list[torch.Tensor], run, tokens: torch.Tensor, mask: torch.Tensor,
                     out_len: int | None = None) -> torch.Tensor:
    """`run(rows, tokens[rows], mask[rows])` for each group of rows (boolean masks covering the batch), each group
    padded only to its own longest text, and the results put back in row order, zero-padded to `out_len` (default:
    the batch's length). Captions run to 23 tokens, phrases to about 11 (mean under 5): one padded batch spent most
    of its text and fusion compute on padding. Per row the numbers are those of the padded batch."""
    out = None
    for group in groups:
        rows = group.nonzero().squeeze(1)
        if not len(rows):
            continue
        result = run(rows, *without_padding(tokens[rows], mask[rows]))
        if out is None:
            out = result.new_zeros(len(tokens), out_len or tokens.shape[1], *result.shape[2:])
        out[rows, : result.shape[1]] = result
    return out


def encode_text(model: XVLM, input_ids, mask, groups: list[torch.Tensor]) -> torch.Tensor:
    """The text layers, by length group. Returns [B, L, H]; padding positions hold zeros."""
    return in_length_groups(groups, lambda rows, ids, m: model.encode_text(ids, m), input_ids, mask)


def contrastive_loss(image_feat, text_feat, temp, idx) -> torch.Tensor:
    """Symmetric InfoNCE over all processes' pairs; pairs with the same `idx` (same text) are all positives."""
    image_all, text_all, idx_all = gather_with_grad(image_feat), gather_with_grad(text_feat), gather_with_grad(idx)
    logits = image_all @ text_all.T / temp
    positives = (idx_all[:, None] == idx_all[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(logits.T, dim=1) * targets).sum(dim=1).mean()
    return (i2t + t2i) / 2


def sample_hard_negatives(image_feat, text_feat, temp, idx, describes=None,
                          generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair, a negative visual for its text and a negative text for its visual, drawn in proportion to ITC
    similarity among pairs whose text differs (the official hard-negative mining).

    `describes` [P, P] (optional): text i truly describes visual j although the texts differ ("the red circle" and
    another image's red circle). Such pairs are never drawn: they are the most similar, so hard-negative mining
    would pick them first and teach ITM contradictory labels."""
    with torch.no_grad():
        sim = image_feat @ text_feat.T / temp
        same = idx[:, None] == idx[None, :]
        if describes is not None:
            same_t2i = same | describes          # rows: texts, columns: visuals
            same_i2t = same | describes.T        # rows: visuals, columns: texts
        else:
            same_t2i = same_i2t = same
        w_i2t = (F.softmax(sim, dim=1) + 1e-5).masked_fill(same_i2t, 0)
        w_t2i = (F.softmax(sim.T, dim=1) + 1e-5).masked_fill(same_t2i, 0)
        w_i2t[same_i2t.all(dim=1)] = 1.0   # nothing left to draw from: fall back to uniform
        w_t2i[same_t2i.all(dim=1)] = 1.0
        neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def matching_loss(model: XVLM, visual: ImageContext, visual_mask, text_embeds, text_mask, neg_image,
                  neg_text, groups: list[torch.Tensor]) -> torch.Tensor:
    """ITM: positives, (negative visual, text) and (visual, negative text), fused by length group of the texts."""
    vis = ImageContext.cat([visual, visual.select(neg_image), visual])
    vis_mask = torch.cat([visual_mask, visual_mask[neg_image], visual_mask], dim=0)
    txt = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)
    txt_mask = torch.cat([text_mask, text_mask, text_mask[neg_text]], dim=0)
    txt_groups = [torch.cat([g, g, g[neg_text]]) for g in groups]
    last_rows = CLS_ROW.to(txt.device)
    fused = in_length_groups(txt_groups, lambda rows, t, m: model.fuse(t, m, vis.select(rows), vis_mask[rows],
                                                                       last_rows=last_rows), txt, txt_mask, out_len=1)
    logits = model.itm_logits(fused)
    n = len(visual)
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def image_matching_loss(model: XVLM, fused_own, image_tokens, text_embeds, text_mask, text_feat, image_feat, temp,
                        describes_image, absent=None) -> torch.Tensor:
    """ITM of phrases against whole images: does the image hold what the phrase describes? The question the demo's
    ITM score answers for a typed phrase (the official ITM pairs a region's text with the region only, so a phrase
    against its whole image is a pair it never saw). Positives: each phrase fused with its own image (`fused_own`,
    the [CLS] rows the bbox head reads); negatives: the phrase with another image of the batch that holds nothing it
    describes, drawn in proportion to ITC similarity. Phrases with no such image are left out of the negatives.
    `absent` (optional): (embeds [A, L, H], mask [A, L], image [A]) texts that name what their image lacks ("the green
    triangle" beside a red one), fused with that image as negatives: the pairs the not-found verdict must reject, which
    another image of the batch rarely is (it differs in everything, not in one word).

    fused_own [T, 1, C]; image_tokens [B, 1+N, C]; text_* [T, ...]; image_feat [B, D]; describes_image [T, B]."""
    with torch.no_grad():
        weights = (F.softmax(text_feat @ image_feat.T / temp, dim=1) + 1e-5).masked_fill(describes_image, 0)
        has_negative = ~describes_image.all(dim=1)
        weights[~has_negative] = 1.0
        neg_image = torch.multinomial(weights, 1).squeeze(1)[has_negative]
    logits = [model.itm_logits(fused_own)]
    negatives = [(text_embeds[has_negative], text_mask[has_negative], neg_image)] if len(neg_image) else []
    if absent is not None and len(absent[2]):
        negatives.append(absent)
    for embeds, mask, image in negatives:
        others = ImageContext(image_tokens[image, 0], image_tokens[:, 1:], image)
        logits.append(model.itm_logits(model.fuse(embeds, mask, others, last_rows=CLS_ROW.to(mask.device))))
    n_negative = sum(len(image) for _, _, image in negatives)
    labels = torch.cat([torch.ones(len(fused_own)), torch.zeros(n_negative)]).long().to(fused_own.device)
    return F.cross_entropy(torch.cat(logits), labels)


def mask_tokens(input_ids, attention_mask, mask_id: int, vocab_size: int, prob: float, special_ids, generator=None):
    """BERT masking (80% [MASK], 10% random, 10% kept) of `prob` of the words; at least one per text."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
    rand = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = maskable & (rand < prob)
    # guarantee one masked token per text that has any word
    first_pick = torch.where(maskable, rand, torch.full_like(rand, 2.0)).argmin(dim=1)
    has_word = maskable.any(dim=1)
    chosen[has_word, first_pick[has_word]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    mode = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = input_ids.clone()
    masked[chosen & (mode < 0.8)] = mask_id
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    swap = chosen & (mode >= 0.8) & (mode < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


def mlm_loss(model: XVLM, masked_ids, text_mask, labels, visual, visual_mask,
             groups: list[torch.Tensor]) -> torch.Tensor:
    """Masked language modelling conditioned on the visual concept (fusion restricted to its patches)."""
    fused = in_length_groups(groups, lambda rows, ids, m: model.fuse(model.encode_text(ids, m), m, visual.select(rows),
                                                                     visual_mask[rows]), masked_ids, text_mask)
    rows = labels != -100
    return F.cross_entropy(model.mlm_logits(fused[rows]), labels[rows])


def bbox_loss(pred_cxcywh, target_cxcywh) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 and GIoU between predicted and target normalised boxes, averaged over boxes."""
    l1 = F.l1_loss(pred_cxcywh, target_cxcywh, reduction="none").sum(dim=1).mean()
    giou = box_ops.paired_giou(box_ops.cxcywh_to_xyxy(pred_cxcywh), box_ops.cxcywh_to_xyxy(target_cxcywh))
    return l1, (1 - giou).mean()


def attention_guidance_loss(attention_map: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """-log of the cross-attention mass the fused [CLS] puts on the target box's patches, for the best head.

    Not an X-VLM objective: a training aid for our from-scratch, CPU-sized default model (see weights/README.md),
    whose bbox head otherwise waits for the attention to find the box by itself. Only one head has to look at the
    target, so the others stay free for what relations need (the reference object).
    attention_map [P, heads, T, 1+N] (softmax over image tokens); patch_mask [P, 1+N], entry 0 ignored.
    """
    target = patch_mask[:, 1:].to(attention_map.dtype)
    mass = (attention_map[:, :, 0, 1:] * target[:, None]).sum(dim=-1)        # [P, heads]
    return -torch.log(mass.max(dim=1).values.clamp_min(1e-6)).mean()


def concept_visuals(image_tokens: torch.Tensor, group: torch.Tensor, patch_mask: torch.Tensor) -> ImageContext:
    """Each pair's visual side: its image's patches, with the mean of the masked patches as token 0."""
    return ImageContext(concept_cls(image_tokens, patch_mask, group), image_tokens[:, 1:], group)
