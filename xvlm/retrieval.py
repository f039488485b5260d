"""Image-text retrieval the way X-VLM is evaluated (official `Retrieval.py` `evaluation()` / `itm_eval()`), and search
over a persisted gallery index with the grounded box of every hit.

Official protocol (`retrieval_scores`):
    texts  -> pre_caption -> `[CLS] tokens` padded to max_tokens (padding='max_length', truncation) -> text layers
           -> text_proj([CLS]), L2-normalised
    images -> vision encoder -> vision_proj(image [CLS]), L2-normalised
    ITC    = image_feat @ text_feat.T (cosine, no temperature), [images x texts]
    i2t: per image, its top-k_test texts by ITC re-scored by the ITM match LOGIT itm_head(fused [CLS])[:, 1]; the other
         entries are -100. t2i: the same per text over images.
`retrieval_metrics` turns the two score matrices into TR / IR R@1/5/10 as `itm_eval`.

Search (`search`, `search_texts`): the same two stages for one query, ITC over the index's vectors (FAISS,
`xvlm.index`), then the top `rerank` images re-encoded from their files through the Grounder's image-encoding cache
and ranked by the ITM logit; each returned hit is then grounded (box, heatmap, ITM probability) as in the grounding
view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from .grounder import NO_ITC, NO_ITM, check_phrases
from .preprocess import InputError, Pixels, TextBatch, check_phrase

if TYPE_CHECKING:
    from .grounder import Grounder, GroundingResult
    from .index import GalleryIndex

# What the official score matrices hold outside the ITC top-k.
NOT_RERANKED = -100.0
FUSION_BATCH = 64          # (text, image) pairs per fusion forward: bounds memory, not results


# --- text and image features, as the official evaluation computes them ----------------------------------------------
def pad_max_length(batch: TextBatch, max_tokens: int, pad_id: int) -> TextBatch:
    """The official retrieval's `padding='max_length'`: every row padded with [PAD] (mask 0) to max_tokens. The batch
    comes from our tokenizer called with the same max_tokens (it truncates to [CLS] + max_tokens-1 pieces, no [SEP],
    and pads to the longest row)."""
    n, length = batch.input_ids.shape
    ids = torch.full((n, max_tokens), pad_id, dtype=batch.input_ids.dtype)
    mask = torch.zeros((n, max_tokens), dtype=batch.attention_mask.dtype)
    ids[:, :length], mask[:, :length] = batch.input_ids, batch.attention_mask
    return TextBatch(ids, mask, batch.captions, batch.truncated)


@dataclass
class TextFeatures:
    hidden: torch.Tensor      # [T, L, H] text-layer output (the fusion layers' input)
    mask: torch.Tensor        # [T, L]
    embeds: torch.Tensor      # [T, D] normalised text_proj([CLS]); empty when the model has no ITC head
    captions: list[str]


def check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InputError("texts must be a list of strings")
    if not texts:
        raise InputError("no texts given")
    return [check_phrase(t) for t in texts]


def encode_texts(g: "Grounder", texts: list[str], model, batch_size: int = 256) -> TextFeatures:
    texts = check_texts(texts)
    tok = g.tokenizer
    # The official retrieval truncates at the config's max_tokens, unlike its grounding evaluation (for which an
    # official Grounder's tokenizer cuts only at the position table).
    max_tokens = model.cfg.max_tokens
    hidden, masks, embeds, captions = [], [], [], []
    with g.inference():
        for i in range(0, len(texts), batch_size):
            b = pad_max_length(tok(texts[i:i + batch_size], max_tokens=max_tokens), max_tokens, tok.pad_id)
            ids, mask = b.input_ids.to(g.device), b.attention_mask.to(g.device)
            h = model.encode_text(ids, mask)
            hidden.append(h)
            masks.append(mask)
            if "itc" in model.heads:
                embeds.append(model.text_features(h).float())
            captions += b.captions
    return TextFeatures(torch.cat(hidden), torch.cat(masks),
                        torch.cat(embeds) if embeds else torch.empty(0), captions)


def image_embed(g: "Grounder", tokens: torch.Tensor, model) -> torch.Tensor:
    """[1, 1+N, C] vision tokens -> the normalised ITC image feature [D] (vision_proj of token 0)."""
    with g.inference():
        return model.image_features(tokens[0, 0]).float()


def itm_logits(g: "Grounder", model, text: TextFeatures, text_rows, image_tokens: list[torch.Tensor],
               image_masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """ITM logits itm_head(fused [CLS]) [n, 2] of pairs (text_rows[j], image_tokens[j]), fused in chunks; column 1 is
    the match logit the official protocol ranks by. `image_masks[j]` [1, 1+N] restricts pair j's cross-attention to a
    visual concept's patches (None: the whole image, as the official image retrieval)."""
    out = []
    with g.inference():
        for s in range(0, len(text_rows), FUSION_BATCH):
            rows = torch.as_tensor(text_rows[s:s + FUSION_BATCH], dtype=torch.long, device=text.hidden.device)
            images = torch.cat(image_tokens[s:s + FUSION_BATCH]).to(text.hidden.dtype)
            masks = None if image_masks is None else torch.cat(image_masks[s:s + FUSION_BATCH]).to(images.device)
            fused = model.fuse(text.hidden[rows], text.mask[rows], images, masks)
            out.append(model.itm_logits(fused).float())
    return torch.cat(out) if out else torch.empty(0, 2)


# --- the official evaluation --------------------------------------------------------------------------------------
@dataclass
class RetrievalScores:
    itc: np.ndarray           # [I, T] cosine similarities (the official sims_matrix)
    i2t: np.ndarray           # [I, T] ITM logits at each image's ITC top-k texts, -100 elsewhere
    t2i: np.ndarray           # [T, I] ITM logits at each text's ITC top-k images, -100 elsewhere
    i2t_topk: np.ndarray      # [I, k] text ids in ITC order
    t2i_topk: np.ndarray      # [T, k] image ids in ITC order
    k_test: int
    captions: list[str] = field(default_factory=list)


def retrieval_scores(g: "Grounder", images, texts: list[str], k_test: int = 256,
                     text_batch_size: int = 256, progress: bool = False) -> RetrievalScores:
    """X-VLM's `Retrieval.py` `evaluation()` on `images` (paths, PIL images or arrays) and `texts`: the ITC matrix and
    the i2t / t2i score matrices (ITM match logits at each query's ITC top-k_test, -100 elsewhere). A k_test larger
    than the gallery or the text list is refused, as the official code's topk would fail."""
    itc_m, itm_m = _retrieval_models(g)
    images = list(images)
    if not images:
        raise InputError("empty gallery: give at least one image")
    if not isinstance(k_test, int) or k_test < 1:
        raise InputError(f"k_test must be a positive integer, got {k_test!r}")
    if k_test > len(images) or k_test > len(texts):
        # the official evaluation's torch.topk raises here; say so instead
        raise InputError(f"k_test={k_test} is larger than the gallery ({len(images)} images, {len(texts)} texts); "
                         "the official protocol re-ranks k_test candidates in both directions")
    text_itc = encode_texts(g, texts, itc_m, text_batch_size)
    text_itm = text_itc if itm_m is itc_m else encode_texts(g, texts, itm_m, text_batch_size)
    img_embeds, img_tokens = [], []
    for image in tqdm(images, desc="encoding images", unit="img", disable=not progress):
        px = g.read_image(image)                        # decoded one at a time: a 5K gallery does not fit decoded
        img_embeds.append(image_embed(g, g.encode(px, itc_m).tokens, itc_m))
        img_tokens.append(g.encode(px, itm_m).tokens)
    return official_scores(g, itm_m, torch.stack(img_embeds), img_tokens, None, text_itc, text_itm, k_test)


def official_scores(g: "Grounder", itm_m, visual_embeds: torch.Tensor, visual_tokens: list[torch.Tensor],
                    visual_masks: list[torch.Tensor] | None, text_itc: TextFeatures, text_itm: TextFeatures,
                    k_test: int) -> RetrievalScores:
    """The two stages of `evaluation()` for any visual candidates (images, or box concepts with their fusion masks):
    ITC matrix, then each row's / column's top-k_test re-scored by the ITM match logit, -100 elsewhere."""
    sims = visual_embeds @ text_itc.embeds.T          # [I, T]
    n_img, n_txt = sims.shape
    i2t = torch.full((n_img, n_txt), NOT_RERANKED)
    t2i = torch.full((n_txt, n_img), NOT_RERANKED)
    i2t_topk = sims.topk(k_test, dim=1).indices.cpu()           # [I, k]
    t2i_topk = sims.T.topk(k_test, dim=1).indices.cpu()         # [T, k]

    def masks(ids):
        return None if visual_masks is None else [visual_masks[i] for i in ids]

    # i2t: candidate i with each of its top-k texts; t2i: text t with each of its top-k candidates
    vis = [i for i in range(n_img) for _ in range(k_test)]
    rows = [int(t) for i in range(n_img) for t in i2t_topk[i]]
    logits = itm_logits(g, itm_m, text_itm, rows, [visual_tokens[i] for i in vis], masks(vis))
    i2t[torch.arange(n_img).repeat_interleave(k_test), i2t_topk.reshape(-1)] = logits[:, 1].cpu()
    rows = [t for t in range(n_txt) for _ in range(k_test)]
    vis = [int(i) for t in range(n_txt) for i in t2i_topk[t]]
    logits = itm_logits(g, itm_m, text_itm, rows, [visual_tokens[i] for i in vis], masks(vis))
    t2i[torch.arange(n_txt).repeat_interleave(k_test), t2i_topk.reshape(-1)] = logits[:, 1].cpu()
    return RetrievalScores(sims.cpu().numpy(), i2t.numpy(), t2i.numpy(), i2t_topk.numpy(), t2i_topk.numpy(), k_test,
                           text_itc.captions)


def _ranks(scores: np.ndarray, truth, stable: bool) -> np.ndarray:
    """Per query row: the best position of any of its ground-truth columns in `argsort(row)[::-1]` (as itm_eval)."""
    ranks = np.zeros(len(scores))
    for q, row in enumerate(np.asarray(scores)):
        order = (np.argsort(row, kind="stable") if stable else np.argsort(row))[::-1]
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        gt = truth[q] if isinstance(truth[q], (list, tuple, np.ndarray)) else [truth[q]]
        ranks[q] = min(position[int(i)] for i in gt)
    return ranks


def retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt, stable: bool = True) -> dict[str, float]:
    """The official `itm_eval` dict (percent): txt_r1/5/10 (image -> text), img_r1/5/10 (text -> image), their means
    and r_mean. `img2txt[i]`: the text ids of image i; `txt2img[t]`: the image of text t.

    `stable=True` ranks with a stable argsort: the official `np.argsort` is not stable, so with ties (the -100 entries
    outside the top-k, when k_test < 10) its figures depend on the numpy build and CPU; the stable order is one of its
    possible outcomes and the same everywhere. `stable=False` calls np.argsort exactly as the official code."""
    if len(scores_i2t) != len(img2txt) or len(scores_t2i) != len(txt2img):
        raise ValueError(f"score matrices ({len(scores_i2t)} image rows, {len(scores_t2i)} text rows) do not match "
                         f"img2txt ({len(img2txt)}) / txt2img ({len(txt2img)})")
    tr = _ranks(scores_i2t, img2txt, stable)
    ir = _ranks(scores_t2i, txt2img, stable)
    out = {}
    for prefix, ranks in (("txt", tr), ("img", ir)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return {k: out[k] for k in ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                                "img_r_mean", "r_mean")}


# --- search -------------------------------------------------------------------------------------------------------
@dataclass
class Hit:
    rank: int                      # 1-based
    id: str                        # the image's id in the index (its path relative to the index root, or a name)
    path: str | None               # the file the hit was re-encoded from
    itc: float                     # cosine(image feature, text feature): the first stage
    itm_logit: float | None        # ITM match logit that ranks the re-ranked hits (official); None past `rerank`
    itm: float | None              # ITM match probability (the grounding view's figure)
    box_xyxy: list[float] | None = None
    grounding: "GroundingResult | None" = None    # box, heatmap, notes (why a field is None)
    notes: dict[str, str | list[str]] = field(default_factory=dict)

    def to_dict(self, heatmap: bool = False) -> dict:
        d = {"rank": self.rank, "id": self.id, "path": self.path, "itc": self.itc, "itm_logit": self.itm_logit,
             "itm": self.itm, "box_xyxy": self.box_xyxy, "notes": self.notes}
        if self.grounding is not None:
            d["image_size"] = list(self.grounding.image_size)
            if heatmap and self.grounding.patch_heatmap is not None:
                d["patch_heatmap"] = self.grounding.patch_heatmap.tolist()
        return d


@dataclass
class TextHit:
    rank: int
    index: int                     # position in the given texts
    text: str
    itc: float
    itm_logit: float | None
    itm: float | None


def _order(itc: np.ndarray, reranked: dict[int, float]) -> list[int]:
    """Re-ranked candidates by ITM logit first (ties by ITC), then the rest by ITC: the official score row (-100 outside
    the top-k), with ITC breaking the -100 ties instead of argsort's machine-dependent order."""
    first = sorted(reranked, key=lambda j: (-reranked[j], -itc[j], j))
    rest = sorted((j for j in range(len(itc)) if j not in reranked), key=lambda j: (-itc[j], j))
    return first + rest


def search(g: "Grounder", index: "GalleryIndex", phrase: str, k: int = 10, rerank: int | None = None,
           ground: bool = True) -> list[Hit]:
    """The top-k gallery images for `phrase`: ITC over the index (FAISS), the top `rerank` (clamped to the gallery;
    None: the model's `search_rerank`) re-encoded from their files and ranked by the ITM logit, then each returned
    hit grounded."""
    (phrase,) = check_phrases([phrase])
    rerank = default_rerank(g) if rerank is None else rerank
    itc_m, itm_m = _retrieval_models(g)
    index.check_model(g)
    if len(index) == 0:
        raise InputError("the index is empty: add images first (python -m xvlm index FOLDER --out INDEX)")
    if k < 1 or rerank < 0:
        raise InputError(f"k must be >= 1 and rerank >= 0, got k={k}, rerank={rerank}")
    n_cand = min(len(index), max(k, rerank))
    rerank = min(rerank, len(index))
    text = encode_texts(g, [phrase], itc_m)
    rows, sims = index.search(text.embeds.cpu().numpy(), n_cand)
    rows, sims = rows[0], sims[0]
    opened: dict[int, Pixels] = {}           # each candidate's file decoded and hashed once per search

    def pixels(row: int) -> Pixels:
        if row not in opened:
            opened[row] = index.open(row, g)
        return opened[row]

    reranked: dict[int, float] = {}
    if rerank:
        text_itm = text if itm_m is itc_m else encode_texts(g, [phrase], itm_m)
        tokens = [g.encode(pixels(int(r)), itm_m).tokens for r in rows[:rerank]]
        logits = itm_logits(g, itm_m, text_itm, [0] * len(tokens), tokens)[:, 1].cpu().numpy()
        reranked = {j: float(v) for j, v in enumerate(logits)}
    hits = []
    for rank, j in enumerate(_order(sims, reranked)[:k], 1):
        r = int(rows[j])
        hit = Hit(rank, index.items[r]["id"], index.file(r), float(sims[j]), reranked.get(j), None)
        if ground:
            res = g.ground(pixels(r), phrase)
            hit.grounding, hit.box_xyxy, hit.itm = res, res.box_xyxy, res.itm
            hit.notes.update(res.notes)
        hits.append(hit)
    return hits


def default_rerank(g: "Grounder") -> int:
    """The ITC candidates a search re-ranks by ITM when not told: the model's `search_rerank` (16: the protocol)."""
    return g.model.cfg.search_rerank


def search_texts(g: "Grounder", image, texts: list[str], k: int | None = None,
                 rerank: int | None = None) -> list[TextHit]:
    """Image -> text: rank `texts` for one image, ITC first, the top `rerank` (None: the model's `search_rerank`)
    re-scored by the ITM logit."""
    rerank = default_rerank(g) if rerank is None else rerank
    itc_m, itm_m = _retrieval_models(g)
    px = g.read_image(image)
    text = encode_texts(g, texts, itc_m)
    sims = (text.embeds @ image_embed(g, g.encode(px, itc_m).tokens, itc_m)).cpu().numpy()
    rerank = min(max(rerank, 0), len(texts))
    top = np.argsort(-sims, kind="stable")[:rerank]
    reranked: dict[int, float] = {}
    probs: dict[int, float] = {}
    if rerank:
        text_itm = text if itm_m is itc_m else encode_texts(g, texts, itm_m)
        tokens = g.encode(px, itm_m).tokens
        logits = itm_logits(g, itm_m, text_itm, [int(t) for t in top], [tokens] * len(top)).cpu()
        reranked = {int(t): float(v) for t, v in zip(top, logits[:, 1])}
        probs = {int(t): float(p) for t, p in zip(top, logits.softmax(dim=-1)[:, 1])}
    order = _order(sims, reranked)[: (k or len(texts))]
    return [TextHit(rank, j, texts[j], float(sims[j]), reranked.get(j), probs.get(j))
            for rank, j in enumerate(order, 1)]


def _retrieval_models(g: "Grounder"):
    itc_m, itm_m = g.itc_model, g.itm_model
    if itc_m is None:
        raise RuntimeError(f"retrieval needs ITC features: {NO_ITC}")
    if itm_m is None:
        raise RuntimeError(f"retrieval re-ranks with ITM: {NO_ITM}")
    return itc_m, itm_m



__all__ = ["RetrievalScores", "Hit", "TextHit", "retrieval_scores", "retrieval_metrics", "search", "search_texts",
           "pad_max_length", "NOT_RERANKED"]
