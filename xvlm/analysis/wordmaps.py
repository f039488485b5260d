"""Per-word ITM Grad-CAM maps (the LAVIS text-localization way).

`Grounder.gradcam` averages, over the phrase's text tokens, each token's cross-attention row times its positive
gradient. A word's map averages only the rows of that word's WordPiece tokens (one row for most words here; "##"
pieces share their word's map), so the maps of all tokens, [CLS] included, average back to the phrase's map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..preprocess import pre_caption


@dataclass
class WordMaps:
    phrase: str
    caption: str                       # the text the model saw
    words: list[str]                   # the caption's words that the model read (truncation drops the rest)
    token_rows: list[list[int]]        # each word's rows in the cross-attention (0 is [CLS])
    maps: np.ndarray                   # (words, G, G) Grad-CAM per word
    phrase_map: np.ndarray             # (G, G) the phrase's Grad-CAM, as `Grounder.gradcam`
    layer: int

    def to_dict(self) -> dict:
        return {"phrase": self.phrase, "caption": self.caption, "layer": self.layer, "words": self.words,
                "token_rows": self.token_rows, "maps": self.maps.tolist(), "phrase_map": self.phrase_map.tolist()}


def word_token_rows(tokenizer, phrase: str) -> tuple[str, list[str], list[list[int]]]:
    """(caption, words, rows): each caption word's token rows after [CLS], within the model's token limit."""
    caption = pre_caption(phrase, tokenizer.max_words)
    words, rows, nxt = [], [], 1
    for w in caption.split():
        n = len(tokenizer.wordpiece.tokenize(w))
        span = [i for i in range(nxt, nxt + n) if i < tokenizer.max_tokens]
        nxt += n
        if span:
            words.append(w)
            rows.append(span)
    return caption, words, rows


def word_gradcams(g, image, phrase: str, layer: int | None = None) -> WordMaps:
    from ..postprocess import gradcam_layer
    from ..preprocess import check_phrase

    phrase = check_phrase(phrase)
    per_token = g.gradcam_tokens(image, phrase, layer)              # [1, T, G, G]; validates the layer
    caption, words, rows = word_token_rows(g.tokenizer, phrase)
    if rows and rows[-1][-1] >= per_token.shape[1]:                  # the word split disagrees with the batch's
        raise RuntimeError(f"word pieces of {caption!r} do not match the model's {per_token.shape[1]} tokens")
    maps = np.stack([per_token[0, r].mean(0).float().cpu().numpy() for r in rows]) if rows else np.zeros(
        (0,) + tuple(per_token.shape[2:]), dtype=np.float32)
    used = gradcam_layer(g.itm_model.cfg, layer)
    return WordMaps(phrase, caption, words, rows, maps, per_token.mean(1)[0].float().cpu().numpy(), used)
