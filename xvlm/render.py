"""Drawing grounding results: boxes with score labels, patch heatmaps, and a per-phrase figure (CLI and web app).

Everything returns plain HxWx3 uint8 RGB arrays or an Agg-backed matplotlib Figure (no display needed):
    draw_boxes(image, results)            boxes + "phrase  ITM 0.93 · ITC 0.41" labels, one color per phrase
    overlay_heatmap(image, grid, ...)     a (G, G) patch grid laid over the image (its canvas), colormapped, blended;
                                          cells outside `mask` are greyed out (region granularity)
    heatmap_figure(image, results, ...)   one row per phrase: box | ITC image | ITC region (| ITM Grad-CAM)
"""
from __future__ import annotations

import textwrap
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .grounder import GroundingResult

# Tableau-like colors, ordered so that neighbours contrast; RGB.
PALETTE: list[tuple[int, int, int]] = [
    (230, 25, 75),    # red
    (60, 180, 75),    # green
    (0, 130, 200),    # blue
    (255, 165, 0),    # orange
    (145, 30, 180),   # purple
    (70, 240, 240),   # cyan
    (240, 50, 230),   # magenta
    (210, 245, 60),   # lime
    (0, 128, 128),    # teal
    (170, 110, 40),   # brown
    (250, 190, 212),  # pink
    (128, 128, 0),    # olive
]

HEATMAP_CMAP = "jet"
FIGURE_MAX_SIDE = 640        # panels of heatmap_figure are drawn on a copy of the image no larger than this
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_SEP = " \u00b7 "           # the separator between scores; Hershey fonts have no middle dot, so we draw it


def color_for(i: int) -> tuple[int, int, int]:
    """The i-th phrase's color (RGB), cycling through PALETTE."""
    return PALETTE[int(i) % len(PALETTE)]


# --- helpers -----------------------------------------------------------------------------------------------------
def _as_rgb(image) -> np.ndarray:
    """PIL image / HxW[xC] array / path -> a fresh, contiguous HxWx3 uint8 RGB array (the input is never modified)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image).copy()
    from .preprocess import load_image  # every other mode/dtype: the same conversion the model's input gets

    return np.array(load_image(image, convert="composite"), dtype=np.uint8)   # as a viewer shows it


def _thickness(h: int, w: int) -> int:
    return max(2, int(round(min(h, w) / 200)))


def _font_scale(h: int, w: int) -> float:
    return float(np.clip(min(h, w) / 900, 0.35, 2.0))


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only: strip accents, replace what remains by '?'."""
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch if ord(ch) < 128 else ("" if unicodedata.combining(ch) else "?") for ch in text)


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = bg
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _fmt(v: float | None) -> str:
    return f"{v:.2f}"


def score_text(r: "GroundingResult") -> list[str]:
    """['ITM 0.93', 'ITC 0.41'] for the scores the result has (ITC = image-level cosine, as the official ITC)."""
    parts = []
    if r.itm is not None:
        parts.append(f"ITM {_fmt(r.itm)}")
    if r.itc_image is not None:
        parts.append(f"ITC {_fmt(r.itc_image)}")
    return parts


NOT_FOUND_COLOR = (150, 150, 150)


def verdict_text(r: "GroundingResult") -> str | None:
    """'not found' (with '?' when the model's threshold is not calibrated) for results judged absent, else None."""
    if getattr(r, "found", None) is not False:
        return None
    return "not found" + ("?" if getattr(r, "found_calibrated", None) is False else "")


def _label_segments(phrase: str, scores: list[str]) -> list[str]:
    return [_ascii(phrase)] + scores


def _measure(segments: list[str], scale: float, thick: int) -> tuple[int, int, int, list[int]]:
    """Width, text height, baseline of the label, and the width of each segment; separators are `_SEP` wide."""
    widths = [cv2.getTextSize(s, _FONT, scale, thick)[0][0] for s in segments]
    sep_w = cv2.getTextSize(_SEP.replace("\u00b7", "."), _FONT, scale, thick)[0][0]
    (_, th), base = cv2.getTextSize("Ag", _FONT, scale, thick)
    return sum(widths) + sep_w * (len(segments) - 1), th, base, widths


def _fit_label(segments: list[str], scale: float, thick: int, max_w: int) -> tuple[list[str], float]:
    """Shrink the font (down to 60%), then shorten the phrase with '...' until the label fits `max_w` pixels."""
    for s in (scale, scale * 0.8, scale * 0.6):
        if _measure(segments, s, thick)[0] <= max_w:
            return segments, s
    scale = scale * 0.6
    phrase = segments[0]
    while len(phrase) > 1 and _measure([phrase + "..."] + segments[1:], scale, thick)[0] > max_w:
        phrase = phrase[:-1]
    return [phrase.rstrip() + "..."] + segments[1:], scale


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(size: tuple[int, int], box: tuple[int, int, int, int], thick: int,
                 taken: list[tuple[int, int, int, int]], H: int, W: int) -> tuple[int, int]:
    """Top-left corner for a label of `size` (w, h): inside the image and over no label in `taken`. Tried in order:
    above the box, below it, inside its top and bottom edges (left- then right-aligned); else the free spot nearest
    the box's top-left corner; with no free spot at all, the candidate that overlaps least."""
    lw, lh = size
    x0, y0, x1, y1 = box
    max_x, max_y = max(W - lw, 0), max(H - lh, 0)
    xs = (x0, x1 - lw + 1)
    ys = (y0 - lh, y1 + 1, y0 + thick, y1 - lh - thick + 1)
    preferred = [(int(np.clip(x, 0, max_x)), int(np.clip(y, 0, max_y))) for y in ys for x in xs]
    if y0 - lh >= 0:
        candidates = preferred
    else:                                  # no room above: the label goes inside the top edge before below the box
        candidates = [preferred[i] for i in (4, 5, 2, 3, 0, 1, 6, 7)]

    def free(xy):
        rect = (xy[0], xy[1], xy[0] + lw, xy[1] + lh)
        return not any(_overlaps(rect, t) for t in taken)

    for xy in candidates:
        if free(xy):
            return xy
    # a free spot, if any, can slide left / up until it meets the image's edge or another label: these suffice
    xs = {0, max_x, *(t[2] for t in taken), *(t[0] - lw for t in taken)}
    ys = {0, max_y, *(t[3] for t in taken), *(t[1] - lh for t in taken)}
    grid = [(x, y) for y in sorted(ys) for x in sorted(xs) if 0 <= x <= max_x and 0 <= y <= max_y]
    spots = [xy for xy in grid if free(xy)]
    if spots:
        return min(spots, key=lambda xy: (xy[0] - x0) ** 2 + (xy[1] - (y0 - lh)) ** 2)

    def overlap(xy):
        rect = (xy[0], xy[1], xy[0] + lw, xy[1] + lh)
        return sum(max(0, min(rect[2], t[2]) - max(rect[0], t[0])) * max(0, min(rect[3], t[3]) - max(rect[1], t[1]))
                   for t in taken)
    return min(candidates + grid, key=overlap)


def _draw_label(out: np.ndarray, segments: list[str], color, box: tuple[int, int, int, int],
                scale: float, thick: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A filled label with the phrase and its scores next to its box (`_place_label`): always inside the image and,
    where the image has room, over no other label."""
    H, W = out.shape[:2]
    text_thick = max(1, thick // 2)
    segments, scale = _fit_label(segments, scale, text_thick, max(W - 4, 1))
    tw, th, base, widths = _measure(segments, scale, text_thick)
    pad = max(2, int(round(th * 0.3)))
    lw, lh = tw + 2 * pad, th + base + 2 * pad
    lx, ly = _place_label((lw, lh), box, thick, taken, H, W)
    cv2.rectangle(out, (lx, ly), (lx + lw - 1, ly + lh - 1), color, thickness=-1)
    fg = _text_color(color)
    x, y = lx + pad, ly + pad + th
    sep_w = cv2.getTextSize(_SEP.replace("\u00b7", "."), _FONT, scale, text_thick)[0][0]
    for k, (seg, w) in enumerate(zip(segments, widths)):
        if k:
            dot_r = max(1, int(round(th * 0.12)))
            cv2.circle(out, (x + sep_w // 2, y - th // 2), dot_r, fg, -1, cv2.LINE_AA)
            x += sep_w
        cv2.putText(out, seg, (x, y), _FONT, scale, fg, text_thick, cv2.LINE_AA)
        x += w
    return lx, ly, lx + lw, ly + lh


def _dashed_rectangle(out: np.ndarray, p0, p1, color, thick: int) -> None:
    """A rectangle outline in dashes (the box of a phrase judged not found)."""
    dash = max(4, 3 * thick)
    (x0, y0), (x1, y1) = p0, p1
    for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True), (y0, y1, x0, False), (y0, y1, x1, False)):
        for s in range(a, b + 1, 2 * dash):
            e = min(s + dash, b)
            q0, q1 = ((s, fixed), (e, fixed)) if horizontal else ((fixed, s), (fixed, e))
            cv2.line(out, q0, q1, color, thick, cv2.LINE_8)


def _pixel_box(box_xyxy, src_size, dst_hw) -> tuple[int, int, int, int]:
    """A box in pixels of an image of `src_size` (W, H) -> integer corners on the drawn image, clipped to it."""
    H, W = dst_hw
    sw, sh = (src_size if src_size else (W, H))
    sx, sy = W / max(sw, 1), H / max(sh, 1)
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    x0, x1 = sorted((x0 * sx, x1 * sx))
    y0, y1 = sorted((y0 * sy, y1 * sy))
    cx0 = int(np.clip(round(x0), 0, W - 1))
    cy0 = int(np.clip(round(y0), 0, H - 1))
    cx1 = int(np.clip(round(x1) - 1, 0, W - 1))   # xyxy pixel boxes are end-exclusive
    cy1 = int(np.clip(round(y1) - 1, 0, H - 1))
    return cx0, cy0, max(cx1, cx0), max(cy1, cy0)


# --- public API --------------------------------------------------------------------------------------------------
def draw_boxes(image, results: Sequence["GroundingResult"], show_scores: bool = True,
               colors: Sequence[tuple[int, int, int]] | None = None, show_labels: bool = True) -> np.ndarray:
    """Draw each result's box in its own color (`color_for(i)`, or `colors[i]`) with a label "phrase  ITM · ITC";
    a result judged not found (`found` False) dashed and grey, its label saying "not found" ("not found?" when the
    model's threshold is uncalibrated). Labels never overlap each other while the image has room, nor leave it.

    Boxes are in pixels of the image the result was computed on (`r.image_size`); if `image` has another size
    (e.g. a thumbnail) they are scaled to it. Boxes reaching outside the image are clipped to it; results whose box
    is None are skipped. `show_labels=False` draws the boxes only. Returns a new HxWx3 uint8 RGB array of the
    image's size.
    """
    out = _as_rgb(image)
    H, W = out.shape[:2]
    thick, scale = _thickness(H, W), _font_scale(H, W)
    boxes = []
    for i, r in enumerate(results):
        if r.box_xyxy is None:
            continue
        color = tuple(int(c) for c in (colors[i] if colors is not None else color_for(i)))
        box = _pixel_box(r.box_xyxy, getattr(r, "image_size", None), (H, W))
        if verdict_text(r):                              # judged absent: a dashed grey box
            color = NOT_FOUND_COLOR
            _dashed_rectangle(out, box[:2], box[2:], color, thick)
        else:
            cv2.rectangle(out, box[:2], box[2:], color, thick, cv2.LINE_8)
        boxes.append((r, color, box))
    taken: list[tuple[int, int, int, int]] = []
    for r, color, box in boxes if show_labels else []:  # labels after all boxes so that no box line crosses a label
        segments = _label_segments(r.phrase, score_text(r) if show_scores else [])
        if verdict_text(r):
            segments.insert(1, verdict_text(r))
        taken.append(_draw_label(out, segments, color, box, scale, thick, taken))
    return out


def overlay_heatmap(image, heatmap: np.ndarray, alpha: float = 0.5, mask: np.ndarray | None = None,
                    vmin: float | None = None, vmax: float | None = None, box_xyxy=None, color=None,
                    cmap: str = HEATMAP_CMAP, interpolation: str = "nearest",
                    box_image_size: tuple[int, int] | None = None, grid_xyxy=None) -> np.ndarray:
    """Blend a (G, G) patch grid over the image.

    The grid covers the model's square input: `grid_xyxy` (a result's `canvas_xyxy`), in pixels of an image of
    `box_image_size` like `box_xyxy`; default the whole image (the official squashing resize, each cell W/G x H/G
    pixels). A letterboxed input reaches past the image, and only the cells over the image are drawn.
    `interpolation` 'nearest' (default) shows the patches as they are; 'cubic' smooths them. Values are mapped
    to [vmin, vmax] (default: the grid's min/max) through `cmap`. Cells outside `mask` (bool GxG) show the image in
    dimmed grey instead. `box_xyxy` (pixels of an image of `box_image_size`, default this image) is outlined in
    `color` (default white).
    """
    out = _as_rgb(image)
    H, W = out.shape[:2]
    grid = np.asarray(heatmap, dtype=np.float64)
    if grid.ndim != 2:
        raise ValueError(f"heatmap must be a 2-D (G, G) grid, got shape {grid.shape}")
    finite = grid[np.isfinite(grid)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    norm = (grid - lo) / (hi - lo) if hi > lo else np.full_like(grid, 0.5)
    norm = np.nan_to_num(np.clip(norm, 0.0, 1.0), nan=0.0)
    up = np.clip(_grid_on_pixels(norm, (H, W), grid_xyxy, box_image_size, interpolation), 0.0, 1.0)
    import matplotlib

    colored = (matplotlib.colormaps[cmap](up)[..., :3] * 255.0).astype(np.float32)
    blended = (1.0 - alpha) * out.astype(np.float32) + alpha * colored
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != grid.shape:
            raise ValueError(f"mask shape {m.shape} differs from the heatmap's {grid.shape}")
        inside = _grid_on_pixels(m, (H, W), grid_xyxy, box_image_size, "nearest")
        grey = out.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        dimmed = np.repeat((0.35 * grey + 60.0)[..., None], 3, axis=2)
        blended = np.where(inside[..., None], blended, dimmed)
    result = np.ascontiguousarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if box_xyxy is not None:
        box = _pixel_box(box_xyxy, box_image_size, (H, W))
        c = tuple(int(v) for v in (color if color is not None else (255, 255, 255)))
        cv2.rectangle(result, box[:2], box[2:], c, _thickness(H, W), cv2.LINE_8)
    return result


_SMOOTH_SUBCELLS = 16     # 'cubic' / 'linear': each cell interpolated to 16 x 16 values before sampling


def _grid_on_pixels(grid: np.ndarray, out_hw: tuple[int, int], grid_xyxy, src_size, interpolation: str) -> np.ndarray:
    """The grid's value at the centre of every pixel of an H x W image, the grid spanning `grid_xyxy` (pixels of an
    image of `src_size`; default: the whole image)."""
    H, W = out_hw
    if interpolation != "nearest":
        flags = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR}[interpolation]
        gh, gw = grid.shape
        grid = cv2.resize(grid.astype(np.float32), (gw * _SMOOTH_SUBCELLS, gh * _SMOOTH_SUBCELLS), interpolation=flags)
    sw, sh = src_size if src_size else (W, H)
    x0, y0, x1, y1 = (float(v) for v in (grid_xyxy if grid_xyxy is not None else (0, 0, sw, sh)))
    cols = ((np.arange(W) + 0.5) * sw / W - x0) / (x1 - x0) * grid.shape[1]
    rows = ((np.arange(H) + 0.5) * sh / H - y0) / (y1 - y0) * grid.shape[0]
    cols = np.clip(np.floor(cols).astype(np.int64), 0, grid.shape[1] - 1)
    rows = np.clip(np.floor(rows).astype(np.int64), 0, grid.shape[0] - 1)
    return grid[rows[:, None], cols[None, :]]


def itc_color_range(results: Sequence["GroundingResult"]) -> tuple[float, float]:
    """One colour scale for the results' patch-ITC heatmaps: min and max over the cells that show the image (not
    letterbox padding), so that phrases can be compared."""
    cells = [r.patch_heatmap[r.cells_on_image()] for r in results if r.patch_heatmap is not None]
    cells = [c for c in cells if c.size]
    lo = float(min(np.min(c) for c in cells)) if cells else -1.0
    hi = float(max(np.max(c) for c in cells)) if cells else 1.0
    return (lo - 1e-3, hi + 1e-3) if hi <= lo else (lo, hi)


def _thumbnail(image, max_side: int = FIGURE_MAX_SIDE) -> np.ndarray:
    arr = _as_rgb(image)
    h, w = arr.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return arr
    return cv2.resize(arr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _reason_panel(ax, img: np.ndarray, reason: str) -> None:
    ax.imshow((img.astype(np.float32) * 0.25 + 150).astype(np.uint8))
    ax.text(0.5, 0.5, textwrap.fill(reason, 28), transform=ax.transAxes, ha="center", va="center", fontsize=8,
            wrap=True, bbox=dict(boxstyle="round", facecolor="white", alpha=0.9, edgecolor="0.6"))


def _reason(r: "GroundingResult", *keys: str, default: str = "not available") -> str:
    return next((r.notes[k] for k in keys if r.notes.get(k)), default)


def heatmap_figure(image, results: Sequence["GroundingResult"],
                   gradcams: dict[str, np.ndarray] | None = None, cmap: str = HEATMAP_CMAP,
                   alpha: float = 0.5) -> "Figure":
    """One row per phrase: [image + box] [patch-ITC heatmap, image granularity] [the same restricted to the
    predicted box's patches, region granularity] (+ [ITM Grad-CAM] when `gradcams` maps phrases to (G, G) maps).

    All ITC panels share one color scale (cosine similarity, colorbar on the right) so phrases can be compared;
    Grad-CAM maps are each scaled to their own maximum. Missing signals show the reason from `r.notes`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    results = list(results)
    img = _thumbnail(image)
    h, w = img.shape[:2]
    ncols = 3 + (gradcams is not None)
    nrows = max(len(results), 1)
    panel = 2.6
    fig = Figure(figsize=(panel * ncols + 1.2, panel * nrows * max(0.45, min(h / w, 2.0)) + 0.9),
                 layout="constrained", dpi=110)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    if not results:
        axes[0, 0].imshow(img)
        axes[0, 0].set_title("no phrases", fontsize=9)
        for ax in axes[0, 1:]:
            ax.set_visible(False)
        return fig

    lo, hi = itc_color_range(results)
    itc_axes, cam_axes = [], []
    for i, r in enumerate(results):
        color = color_for(i)
        row = axes[i]
        # [0] the image with this phrase's box
        if r.box_xyxy is not None:
            row[0].imshow(draw_boxes(img, [r], colors=[color], show_labels=False))
        else:
            _reason_panel(row[0], img, "no box: " + _reason(r, "box"))
        itm = f"ITM {r.itm:.3f}" if r.itm is not None else "ITM n/a"
        phrase = textwrap.shorten(r.phrase, 60, placeholder="...")
        row[0].set_title(textwrap.fill(f"\u201c{phrase}\u201d", 34) + f"\n{itm}", fontsize=9,
                         color=np.array(color) / 255.0 * 0.75, fontweight="bold")
        # [1] patch ITC, image granularity; [2] region granularity
        if r.patch_heatmap is not None:
            row[1].imshow(overlay_heatmap(img, r.patch_heatmap, alpha, vmin=lo, vmax=hi, box_xyxy=r.box_xyxy,
                                          color=color, cmap=cmap, box_image_size=r.image_size,
                                          grid_xyxy=r.canvas_xyxy))
            row[1].set_title(f"patch ITC (image)\nITC(image) = {r.itc_image:.3f}", fontsize=9)
            itc_axes.append(row[1])
        else:
            _reason_panel(row[1], img, "no ITC: " + _reason(r, "itc"))
            row[1].set_title("patch ITC (image)", fontsize=9)
        if r.patch_heatmap is not None and r.region_mask is not None:
            row[2].imshow(overlay_heatmap(img, r.patch_heatmap, alpha, mask=r.region_mask, vmin=lo, vmax=hi,
                                          box_xyxy=r.box_xyxy, color=color, cmap=cmap,
                                          box_image_size=r.image_size, grid_xyxy=r.canvas_xyxy))
            region = f"{r.itc_region:.3f}" if r.itc_region is not None else "n/a"
            row[2].set_title(f"box patches (region)\nITC(region) = {region}", fontsize=9)
            itc_axes.append(row[2])
        else:
            _reason_panel(row[2], img, "no region score: " + _reason(r, "itc", "itc_region", "box"))
            row[2].set_title("box patches (region)", fontsize=9)
        # [3] ITM Grad-CAM
        if gradcams is not None:
            cam = gradcams.get(r.phrase)
            if cam is not None and np.isfinite(cam).all():
                peak = float(np.max(cam[r.cells_on_image(cam.shape[0])]))
                row[3].imshow(overlay_heatmap(img, cam, alpha, vmin=0.0, vmax=peak if peak > 0 else 1.0,
                                              box_xyxy=r.box_xyxy, color=color, cmap=cmap,
                                              box_image_size=r.image_size, grid_xyxy=r.canvas_xyxy))
                cam_axes.append(row[3])
            else:
                _reason_panel(row[3], img, "no Grad-CAM: " + _reason(r, "gradcam", "itm"))
            row[3].set_title("ITM Grad-CAM\n(per-map scale)", fontsize=9)
    if itc_axes:
        sm = ScalarMappable(norm=Normalize(lo, hi), cmap=cmap)
        cb = fig.colorbar(sm, ax=list(axes[:, 1:3].ravel()), shrink=0.8 if nrows > 1 else 0.95, pad=0.02)
        cb.set_label("cosine(patch, phrase)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    if cam_axes:
        sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        cb = fig.colorbar(sm, ax=list(axes[:, 3]), shrink=0.8 if nrows > 1 else 0.95, pad=0.02)
        cb.set_label("Grad-CAM / max", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    return fig


def save_figure(fig: "Figure", path: str | Path, dpi: int | None = None) -> Path:
    """Write the figure (format from the extension, e.g. .png/.pdf/.svg); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi or fig.dpi, facecolor="white")
    return path


__all__ = ["PALETTE", "color_for", "draw_boxes", "overlay_heatmap", "heatmap_figure", "itc_color_range", "save_figure",
           "score_text"]
