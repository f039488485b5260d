"""The counterfactual phrase lab: edit one word of a phrase and see how the box and the scores move.

Edits of "the small red circle left of the square":
    colour     red -> every other colour word              ("the small blue circle left of the square")
    noun       circle / square -> every other shape word   ("the small red triangle left of the square")
    direction  left <-> right, above <-> below, top <-> bottom, leftmost <-> rightmost, topmost <-> bottommost
    size       small <-> large (big <-> small)
    drop       each content word left out                  ("the red circle left of the square")
All edits and the original are grounded as one batch on the image's cached encoding (`Grounder.ground`), so the
original row is the phrase's ordinary result. For each edit: the IoU of its box with the original box and how ITM
and ITC (image, region) moved. A model that reads a word moves when it changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..preprocess import pre_caption

# The shapes model's vocabulary (xvlm.data.synthetic) plus common colour words, so official models get edits too.
COLOUR_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "gray", "white", "black", "brown", "pink")
NOUN_WORDS = ("circle", "square", "triangle", "rectangle")
OPPOSITES = {"left": "right", "above": "below", "top": "bottom", "leftmost": "rightmost",
             "topmost": "bottommost", "small": "large", "big": "small", "upper": "lower"}
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items()) if v not in OPPOSITES})
SIZE_WORDS = {"small", "large", "big"}
FUNCTION_WORDS = {"the", "a", "an", "of", "to", "on", "at", "in", "and", "with", "is"}
EDIT_KINDS = ("original", "colour", "noun", "direction", "size", "drop")


@dataclass
class Edit:
    kind: str                # one of EDIT_KINDS
    phrase: str
    change: str              # "red -> blue", "drop 'small'", "" for the original


def edits(phrase: str, colours=COLOUR_WORDS, nouns=NOUN_WORDS, max_edits: int = 31) -> list[Edit]:
    """The original (first) and its one-word edits, without duplicates, at most `max_edits` edits (drops last)."""
    words = pre_caption(phrase, 10**6).split()
    out, seen = [Edit("original", phrase, "")], {" ".join(words)}

    def add(kind, i, new, change):
        text = " ".join(words[:i] + ([new] if new else []) + words[i + 1:])
        if text and text not in seen:
            seen.add(text)
            out.append(Edit(kind, text, change))

    for i, w in enumerate(words):
        if w in colours or w == "grey":
            for c in colours:
                if c != w and not (w == "grey" and c == "gray"):
                    add("colour", i, c, f"{w} -> {c}")
        if w in nouns or w.rstrip("s") in nouns:
            plural = w not in nouns
            for n in nouns:
                new = n + "s" if plural else n
                if new != w:
                    add("noun", i, new, f"{w} -> {new}")
        if w in OPPOSITES:
            add("size" if w in SIZE_WORDS else "direction", i, OPPOSITES[w], f"{w} -> {OPPOSITES[w]}")
    if len(words) > 1:
        for i, w in enumerate(words):
            if w not in FUNCTION_WORDS:
                add("drop", i, None, f"drop '{w}'")
    return out[: max_edits + 1]


@dataclass
class CounterfactualRow:
    edit: Edit
    result: object                         # GroundingResult
    iou: float | None                      # box IoU with the original's box
    d_itm: float | None                    # edit - original
    d_itc_image: float | None
    d_itc_region: float | None

    def to_dict(self, heatmaps: bool = False) -> dict:
        d = self.result.to_dict()
        if not heatmaps:
            d.pop("patch_heatmap", None)
            d.pop("region_mask", None)
        return {"kind": self.edit.kind, "phrase": self.edit.phrase, "change": self.edit.change, "iou": self.iou,
                "d_itm": self.d_itm, "d_itc_image": self.d_itc_image, "d_itc_region": self.d_itc_region,
                "result": d}


@dataclass
class Counterfactuals:
    phrase: str
    rows: list[CounterfactualRow] = field(default_factory=list)   # rows[0]: the original

    @property
    def original(self):
        return self.rows[0].result

    def to_dict(self) -> dict:
        return {"phrase": self.phrase, "rows": [r.to_dict() for r in self.rows]}


def _delta(a, b):
    return None if a is None or b is None else float(a - b)


def _iou(a, b) -> float | None:
    if a is None or b is None:
        return None
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def counterfactuals(g, image, phrase: str, kinds=None) -> Counterfactuals:
    """Ground the phrase and its edits (`edits`, optionally only `kinds`) as one batch."""
    from ..limits import MAX_PHRASES
    from ..preprocess import check_phrase

    phrase = check_phrase(phrase)
    vocab = g.tokenizer.wordpiece.vocab                  # swap only to words the model has whole
    colours = [w for w in COLOUR_WORDS if w in vocab]
    nouns = [w for w in NOUN_WORDS if w in vocab]
    todo = [e for e in edits(phrase, colours, nouns, max_edits=MAX_PHRASES - 1)
            if kinds is None or e.kind in ("original", *kinds)]
    results = g.ground(image, [e.phrase for e in todo])
    o = results[0]
    rows = [CounterfactualRow(e, r, _iou(np.asarray(r.box_xyxy, float), np.asarray(o.box_xyxy, float))
                              if r.box_xyxy is not None else None,
                              _delta(r.itm, o.itm), _delta(r.itc_image, o.itc_image),
                              _delta(r.itc_region, o.itc_region)) for e, r in zip(todo, results)]
    return Counterfactuals(phrase, rows)
