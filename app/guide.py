"""The page's "How to read this" text, written from the selected model's config and capabilities: its input size,
patch size and grid, how an image becomes its input, which heads (so which panels and granularities) it has, and how
much of a phrase it reads. The page rewrites it when the user switches models."""
from __future__ import annotations

from collections.abc import Mapping

from xvlm.config import XVLMConfig, model_family
from xvlm.limits import MAX_FILE_SIZE, MAX_IMAGE_PIXELS, MAX_PHRASE_CHARS, MAX_PHRASES, phrase_tokens

ENCODERS = {"swin": "Swin Transformer", "vit": "ViT", "beit2": "BEiT-2"}


def how_to_read(cfg: XVLMConfig, capabilities: Mapping[str, bool], name: str | None = None) -> str:
    """Markdown for a model of config `cfg` with `capabilities` (`Grounder.capabilities`: box, itc, itm, gradcam)."""
    caps = {k: bool(capabilities.get(k)) for k in ("box", "itc", "itm", "gradcam")}
    parts = [_model_input(cfg, name), _itc(caps), _itm(caps), _bbox(caps), _text_limits(cfg)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _model_input(cfg: XVLMConfig, name: str | None) -> str:
    v = cfg.vision
    g, p = v.grid_size, v.patch_size
    resize = ("squashed: resized without keeping its aspect ratio, as the official code does" if v.resize == "squash"
              else "letterboxed: fitted with its aspect ratio kept and padded with the mean colour; the padding cells "
                   "are not drawn and do not count in the maps' color scales")
    merges = len(v.depths) - 1 if v.kind == "swin" else 0       # only Swin's config has stages
    token = (f" (Swin: 4×4-pixel patches merged 2×2 at each of its {merges} stage transitions)"
             if v.kind == "swin" and 4 * 2 ** merges == p else "")
    which = f"**{name}** ({model_family(cfg)})" if name else model_family(cfg)
    cell = f"1/{g} of the image's width and 1/{g} of its height" if v.resize == "squash" else \
        f"1/{g} of the padded square's side"
    return (f"**This model's input.** These notes describe {which}. Its {ENCODERS.get(v.kind, v.kind)} vision encoder "
            f"reads the image as a {v.image_res}×{v.image_res}-pixel square ({resize}), cut into a {g}×{g} grid of "
            f"{p}×{p}-pixel patches{token}: {g * g} image tokens. Every map on this page has one cell per patch, "
            f"covering {cell}.")


def _itc(caps: dict[str, bool]) -> str:
    if not caps["itc"]:
        return ("**ITC (image-text contrastive).** This model has no ITC head (`vision_proj`, `text_proj`): no ITC "
                "scores, no patch heatmaps and no phrase × box matrix.")
    granularities = ["- *image*: the image's [CLS] feature (the mean of all patch tokens) vs. the phrase, shown as "
                     "**ITC(image)**;"]
    if caps["box"]:
        granularities += ["- *region*: a box's **visual concept** vs. the phrase, shown as **ITC(region)** for the "
                          "predicted box;",
                          "- *objects*: every phrase's box is a concept; the phrase × box matrix tells whether each "
                          "phrase prefers its own box."]
    else:
        granularities += ["- *region* and *objects* compare the phrase with the predicted box's concept: this model "
                          "has no bbox head, so they show the image granularity."]
    return ("**ITC (image-text contrastive).** The image and the phrase are encoded separately and projected into one "
            "small space (`vision_proj`, `text_proj`, L2-normalised). Their cosine similarity is the ITC score: high "
            "when the phrase describes what is seen. X-VLM computes it at three granularities:\n"
            + "\n".join(granularities) + "\n\n"
            "**The patch heatmap.** Each patch token of the model input is projected on its own and compared with "
            "the phrase: red patches look most like the phrase, blue least (one color scale shared by all phrases of a "
            "request)."
            + (" A region's concept is the **mean of its patch tokens, projected** (`vision_proj` is linear, so it is "
               "the mean of the projected patches before normalisation). ITC(region) is therefore close to, but not "
               "equal to, the average of the heatmap over the box's patches (the region view greys out the other "
               "patches): patches with larger features weigh more, and the result is normalised again."
               if caps["box"] else ""))


def _itm(caps: dict[str, bool]) -> str:
    if not caps["itm"]:
        return ("**ITM (image-text matching).** This model has no ITM head: no match probability and no Grad-CAM "
                "maps.")
    text = ("**ITM (image-text matching).** The phrase attends to the whole image through the fusion layers "
            "(cross-attention); the ITM head reads the fused [CLS] and gives the probability that image and phrase "
            "match.")
    if caps["gradcam"]:
        return text + (" The **Grad-CAM** map shows which patches that decision used: cross-attention weights × "
                       "their positive gradients, at the chosen fusion layer.")
    return text + " Grad-CAM maps are not available for this model as it is loaded (see the model line above)."


def _bbox(caps: dict[str, bool]) -> str:
    if not caps["box"]:
        return ("**Boxes.** This model has no bbox head, so it draws no boxes"
                + (": its Grad-CAM maps are where it grounds a phrase." if caps["gradcam"] else "."))
    text = ("**The bbox head.** From the same fused [CLS], it regresses the box (center, width, height) directly — "
            "there are no proposals.")
    if caps["itc"] or caps["itm"]:
        text += " The box, ITM and ITC come from different heads: a box can be right while ITC is low, and vice versa."
    return text


def _text_limits(cfg: XVLMConfig) -> str:
    tokens = phrase_tokens(cfg)
    if cfg.grounding_truncation == "positions":
        budget = (f"its first {tokens} word pieces (its text encoder's position table: like the official grounding "
                  f"evaluation, grounding does not cut at the training length of {cfg.max_tokens} tokens)")
    else:
        budget = f"its first {tokens} tokens ([CLS] and word pieces: its token budget)"
    punctuation = "deleted" if cfg.punctuation == "delete" else "replaced by spaces"
    return (f"**Limits of this demo.** At most {MAX_PHRASES} phrases of {MAX_PHRASE_CHARS} characters per request; "
            f"images up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels and {MAX_FILE_SIZE.upper()} per upload. This model "
            f"reads at most {cfg.max_words} words of a phrase, lower-cased with punctuation {punctuation}, and of "
            f"those {budget}. Changing only the phrases re-uses the image's encoding.")


__all__ = ["how_to_read"]
