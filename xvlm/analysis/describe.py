"""What is this region? X-VLM's object granularity read the other way: instead of the box for a phrase, the phrases
for a box. The box's visual concept (the mean of the patch tokens it covers, `Grounder.concepts`) is compared by ITC
with each candidate phrase; the candidates are ranked by that cosine.

Candidates: the user's, or short phrases built from words the model's tokenizer holds whole: colour + noun pairs,
nouns and colours (the shapes model's vocabulary, and common object nouns for models with a BERT vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .counterfactual import COLOUR_WORDS, NOUN_WORDS

COMMON_NOUNS = ("person", "man", "woman", "child", "dog", "cat", "horse", "bird", "car", "bus", "bicycle", "boat",
                "chair", "table", "bed", "tree", "sign", "building", "window", "door", "ball", "cup", "bottle")


@dataclass
class RegionCandidate:
    phrase: str
    itc: float


def default_candidates(tokenizer) -> list[str]:
    vocab = tokenizer.wordpiece.vocab
    colours = [w for w in COLOUR_WORDS if w in vocab]
    nouns = [w for w in NOUN_WORDS + COMMON_NOUNS if w in vocab]
    return [f"{c} {n}" for c in colours for n in nouns] + nouns + colours


def describe_region(g, image, box_xyxy, candidates=None, top_k: int | None = None) -> list[RegionCandidate]:
    """Candidates ranked by ITC with the box's concept, best first. `box_xyxy`: pixels of the original image."""
    from ..limits import MAX_PHRASES
    from ..preprocess import InputError, check_phrase

    box = np.asarray(box_xyxy, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise InputError("the region must be one box: x0, y0, x1, y1 in pixels")
    if candidates is None:
        candidates = default_candidates(g.tokenizer)
        if not candidates:
            raise InputError("the model's vocabulary has none of the default candidate words: give candidates")
    elif isinstance(candidates, str) or not list(candidates):
        raise InputError("candidates must be a non-empty list of phrases")
    phrases = list(dict.fromkeys(check_phrase(c) for c in candidates))
    g.concepts(image, [box])                                           # validates the box before any text is encoded
    scores = np.concatenate([g.concept_scores(image, phrases[i:i + MAX_PHRASES], [box])[:, 0]
                             for i in range(0, len(phrases), MAX_PHRASES)])
    order = np.argsort(-scores, kind="stable")
    ranked = [RegionCandidate(phrases[i], float(scores[i])) for i in order]
    return ranked[:top_k] if top_k else ranked
