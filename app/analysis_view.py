"""The analysis panel's callbacks (counterfactual lab, what-is-this-region, per-word maps) and the score table's
verdict / evidence cells: pure functions of (grounder, inputs) -> outputs, testable without a server. The layout is
in `app/analysis_panel.py`.

Like `callbacks.ground_and_render`, the `*_view` functions never raise: bad input comes back as a message; the
`*_json` functions (the named API endpoints) raise `InputError` with the message.
"""
from __future__ import annotations

import re
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np

from xvlm.grounder import Grounder
from xvlm.limits import MAX_CANDIDATES
from xvlm.preprocess import InputError
from xvlm.render import draw_boxes, overlay_heatmap

from . import callbacks as cb
from .analysis_cells import verdict_cell

CF_HEADERS = ["edit", "phrase", "change", "box IoU with original", "ITM", "Δ ITM", "Δ ITC image", "Δ ITC region",
              "found"]
REGION_HEADERS = ["rank", "candidate phrase", "ITC with the region"]
CF_OVERLAY_EDITS = 5           # edits drawn on the overlay besides the original: those whose box moved most


# --- inputs ------------------------------------------------------------------------------------------------------
def parse_box(text) -> list[float]:
    """'x0, y0, x1, y1' (pixels; commas, spaces or brackets) -> 4 floats, or InputError."""
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        values = re.findall(r"-?\d+(?:\.\d+)?", str(text or ""))
    if len(values) != 4:
        raise InputError("give the region as four numbers x0, y0, x1, y1 (pixels), or click two corners on the image")
    box = [float(v) for v in values]
    if not (box[0] < box[2] and box[1] < box[3]):
        raise InputError("the region needs x0 < x1 and y0 < y1")
    return box


def parse_candidates(text) -> list[str] | None:
    """One candidate per line; empty -> None (the model's vocabulary)."""
    if text is None or not str(text).strip():
        return None
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) > MAX_CANDIDATES:
        raise InputError(f"too many candidates ({len(lines)}); at most {MAX_CANDIDATES}")
    return lines


def _one_phrase(text) -> str:
    phrases = cb.parse_phrases(text)
    return phrases[0]


# --- counterfactual lab ------------------------------------------------------------------------------------------
@dataclass
class AnalysisView:
    ok: bool
    message: str = ""
    image: np.ndarray | None = None
    table: dict | None = None
    words: list[str] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    payload: dict | None = None

    @classmethod
    def error(cls, message: str) -> "AnalysisView":
        return cls(ok=False, message=f"⚠️ **{message}**")


def _guard(fn, *args) -> AnalysisView:
    try:
        return fn(*args)
    except InputError as e:
        return AnalysisView.error(str(e))
    except Exception as e:  # the page must stay up
        return AnalysisView.error(f"something went wrong ({type(e).__name__}: {cb._short(str(e), 300)})")


def _n(v, signed=False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def counterfactuals_json(g: Grounder, image, phrase_text, lock: threading.Lock | None = None) -> dict:
    phrase = _one_phrase(phrase_text)
    pil = cb.read_image(image)
    with lock or nullcontext():
        cf = g.counterfactuals(pil, phrase)
    return cb._json_clean({"model": g.name, "image": {"width": pil.width, "height": pil.height}, **cf.to_dict()})


def counterfactual_view(g: Grounder, image, phrase_text, lock=None) -> AnalysisView:
    return _guard(_counterfactual_view, g, image, phrase_text, lock)


def _counterfactual_view(g, image, phrase_text, lock) -> AnalysisView:
    phrase = _one_phrase(phrase_text)
    pil = cb.read_image(image)
    with lock or nullcontext():
        cf = g.counterfactuals(pil, phrase)
    rows = cf.rows
    table = {"headers": CF_HEADERS, "data": [
        [r.edit.kind, r.edit.phrase, r.edit.change or "—", _n(r.iou), _n(r.result.itm), _n(r.d_itm, True),
         _n(r.d_itc_image, True), _n(r.d_itc_region, True), verdict_cell(r.result)] for r in rows]}
    view = AnalysisView(ok=True, table=table, payload=cf.to_dict())
    if g.capabilities["box"]:
        moved = sorted(rows[1:], key=lambda r: (r.iou if r.iou is not None else 1.0))[:CF_OVERLAY_EDITS]
        labelled = [replace(r.result, phrase=f"original: {r.edit.phrase}" if r.edit.kind == "original"
                            else r.edit.change) for r in [rows[0]] + moved]   # labels name the change
        view.image = draw_boxes(cb._display_copy(pil), labelled)
    n_moved = sum(1 for r in rows[1:] if r.iou is not None and r.iou < 0.5)
    view.message = (f"{len(rows) - 1} edits of “{cb._short(phrase, 60)}” grounded in one batch on the cached image; "
                    f"{n_moved} moved the box (IoU < 0.5 with the original). The overlay shows the original and the "
                    f"{min(CF_OVERLAY_EDITS, len(rows) - 1)} edits whose box moved most, each labelled by its change.")
    return view


# --- what is this region -----------------------------------------------------------------------------------------
def describe_region_json(g: Grounder, image, box_text, candidates_text=None, lock=None) -> dict:
    box = parse_box(box_text)
    candidates = parse_candidates(candidates_text)
    pil = cb.read_image(image)
    with lock or nullcontext():
        ranked = g.describe_region(pil, box, candidates)
    return cb._json_clean({"model": g.name, "box_xyxy": box, "candidates": "user" if candidates else "vocabulary",
                           "ranking": [{"phrase": c.phrase, "itc": c.itc} for c in ranked]})


def region_view(g: Grounder, image, box_text, candidates_text, lock=None, top_k: int = 15) -> AnalysisView:
    return _guard(_region_view, g, image, box_text, candidates_text, lock, top_k)


def _region_view(g, image, box_text, candidates_text, lock, top_k) -> AnalysisView:
    if not g.capabilities["itc"]:
        raise InputError("this model has no ITC head, so it cannot compare a region with phrases")
    box = parse_box(box_text)
    candidates = parse_candidates(candidates_text)
    pil = cb.read_image(image)
    with lock or nullcontext():
        ranked = g.describe_region(pil, box, candidates)
    from xvlm.grounder import GroundingResult

    best = ranked[0]
    marker = GroundingResult(best.phrase, best.phrase, pil.size, box_xyxy=box)
    view = AnalysisView(ok=True, image=draw_boxes(cb._display_copy(pil), [marker], show_scores=False),
                        table={"headers": REGION_HEADERS, "data": [[i + 1, c.phrase, f"{c.itc:.3f}"]
                                                                  for i, c in enumerate(ranked[:top_k])]},
                        payload={"box_xyxy": box, "ranking": [{"phrase": c.phrase, "itc": c.itc} for c in ranked]})
    source = "your candidates" if candidates else "short phrases from the model's vocabulary"
    view.message = (f"The region's visual concept (mean of its patch tokens) compared by ITC with {len(ranked)} "
                    f"{source}; best: “{best.phrase}” ({best.itc:.3f}).")
    return view


def click_corner(box_text, x: float, y: float) -> str:
    """Two clicks draw a region: the first sets one corner ('x0, y0'), the second completes 'x0, y0, x1, y1'."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", str(box_text or ""))
    if len(nums) == 2:
        (ax, ay), (bx, by) = (float(nums[0]), float(nums[1])), (float(x), float(y))
        if ax != bx and ay != by:
            return f"{min(ax, bx):.0f}, {min(ay, by):.0f}, {max(ax, bx):.0f}, {max(ay, by):.0f}"
    return f"{float(x):.0f}, {float(y):.0f}"


# --- per-word maps -----------------------------------------------------------------------------------------------
def word_maps_json(g: Grounder, image, phrase_text, layer=None, lock=None) -> dict:
    phrase = _one_phrase(phrase_text)
    pil = cb.read_image(image)
    if not g.capabilities["gradcam"]:
        raise InputError("this model has no ITM head, so there is no Grad-CAM")
    layer = None if layer is None or cb._finite(layer, None) is None else int(layer)
    with lock or nullcontext():
        wm = g.word_gradcams(pil, phrase, layer)
    return cb._json_clean({"model": g.name, **wm.to_dict()})


def word_maps_view(g: Grounder, image, phrase_text, layer=None, lock=None, alpha: float = cb.DEFAULT_ALPHA
                   ) -> AnalysisView:
    return _guard(_word_maps_view, g, image, phrase_text, layer, lock, alpha)


def _word_maps_view(g, image, phrase_text, layer, lock, alpha) -> AnalysisView:
    if not g.capabilities["gradcam"]:
        raise InputError("this model has no ITM head, so there is no Grad-CAM")
    phrase = _one_phrase(phrase_text)
    pil = cb.read_image(image)
    layer = None if layer is None or cb._finite(layer, None) is None else int(layer)
    with lock or nullcontext():
        wm = g.word_gradcams(pil, phrase, layer)
        r = g.ground(pil, phrase)
    disp = cb._display_copy(pil)
    maps = []
    for cam in [wm.phrase_map, *wm.maps]:
        peak = float(cam[r.cells_on_image(cam.shape[0])].max())
        maps.append(overlay_heatmap(disp, cam, alpha, vmin=0.0, vmax=peak if peak > 0 else 1.0, box_xyxy=r.box_xyxy,
                                    box_image_size=r.image_size, grid_xyxy=r.canvas_xyxy))
    view = AnalysisView(ok=True, words=["(whole phrase)"] + wm.words, maps=maps, image=maps[0],
                        payload=wm.to_dict())
    view.message = (f"ITM Grad-CAM of each word of “{cb._short(phrase, 60)}” at text layer {wm.layer}: the "
                    "cross-attention rows of that word's tokens (the LAVIS way); each map scaled to its own maximum.")
    return view
