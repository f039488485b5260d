"""The 'varied' corpus style: scenes that vary everything a renderer may vary (issue #26), for training only.

Same objects, texts and referring-expression semantics as `xvlm.data.synthetic` (its attribute planner and text
generators are reused, so every expression still resolves to exactly one object); the drawing is this module's own:

* image sizes from 150 to 1200 px per side, aspect ratios from 1:2 to 2:1 (log-uniform long side);
* backgrounds: flat, linear or radial gradients, Gaussian or blotchy noise, and textures (stripes, checks, grid lines,
  dots); 20% dark (then no black objects; on light backgrounds no white objects);
* edges: hard (no anti-aliasing), supersampled 2-4x (LANCZOS or box filter), or a Gaussian blur of hard edges;
* outlines: none (filled), a border of 2-12% of the object's extent in black or a darker shade of the fill, or outline
  only (rings of 5-25%), per scene or mixed per object;
* objects from 3% to 12% of the short side (a small object's equal-area square side; at least 5 px), large ones
  1.8-2.1x that, so the size classes of `synthetic` still hold;
* colours sampled inside each colour name's range (`COLOR_RANGES`, HSV; ranges of different names do not meet);
* layouts: apart (a gap between boxes), touching (boxes may abut), or overlapping (boxes may overlap, IoU <= 0.3, as
  long as every object keeps at least 60% of its pixels and its full extent, within a pixel, visible; its box is
  the tight box of the pixels that show it);
* JPEG compression at quality 25-90 for 40% of the scenes.

A box is tight around the pixels where the object's *visible* ink covers at least half (ink hidden by a later object
does not count), in final-image pixels. `VariedStyle(...)` fixes every parameter (tests); `sample_varied_style(rng)`
draws them.
"""
from __future__ import annotations

import colorsys
import dataclasses
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .synthetic import (LARGE_SCALE, SMALL_SCALE, Scene, SceneObject, _caption, _object_phrases, _plan_attributes,
                        _refexps, _regions)

MIN_SIDE, MAX_SIDE = 150, 1200
OBJECT_SCALE = (0.03, 0.12)
MIN_UNIT_PX = 5.0
BACKGROUNDS = ("flat", "linear", "radial", "noise", "blotches", "stripes", "checks", "grid", "dots")
ANTIALIAS = ("none", "lanczos", "box", "blur")
FILLS = ("filled", "bordered", "outline", "mixed")
LAYOUTS = ("apart", "touching", "overlapping")
MAX_BOX_IOU = 0.3
MIN_VISIBLE = 0.6

# name -> (hue range in degrees (lo > hi wraps through 0), saturation range, value range), HSV in [0, 1]
COLOR_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((352, 8), (0.72, 0.95), (0.68, 0.95)),
    "orange": ((22, 34), (0.78, 1.0), (0.88, 1.0)),
    "yellow": ((48, 60), (0.72, 0.95), (0.86, 1.0)),
    "green": ((105, 145), (0.6, 0.9), (0.45, 0.75)),
    "blue": ((212, 234), (0.68, 0.92), (0.62, 0.92)),
    "purple": ((272, 292), (0.55, 0.8), (0.48, 0.75)),
    "gray": ((0, 360), (0.0, 0.06), (0.42, 0.6)),
    "white": ((0, 360), (0.0, 0.04), (0.94, 1.0)),
    "black": ((0, 360), (0.0, 0.2), (0.04, 0.14)),
}


@dataclass(frozen=True)
class VariedStyle:
    width: int
    height: int
    background: str = "flat"       # one of BACKGROUNDS
    dark: bool = False
    antialias: str = "none"        # one of ANTIALIAS
    supersample: int = 1           # for lanczos / box
    fill: str = "filled"           # one of FILLS
    layout: str = "apart"          # one of LAYOUTS
    object_scale: float = 0.08     # a small object's equal-area square side / short side
    max_rotation: float = 0.0      # degrees (squares, rectangles, triangles); triangles may also turn freely
    jpeg_quality: int | None = None


def sample_varied_style(rng: np.random.Generator) -> VariedStyle:
    aspect = math.exp(rng.uniform(0.0, math.log(2.0)))
    long_side = math.exp(rng.uniform(math.log(MIN_SIDE * aspect), math.log(MAX_SIDE)))
    w, h = int(long_side), max(MIN_SIDE, int(long_side / aspect))
    if rng.random() < 0.5:
        w, h = h, w
    antialias = str(rng.choice(ANTIALIAS))
    return VariedStyle(
        width=w, height=h, background=str(rng.choice(BACKGROUNDS)), dark=bool(rng.random() < 0.2),
        antialias=antialias, supersample=int(rng.integers(2, 5)) if antialias in ("lanczos", "box") else 1,
        fill=str(rng.choice(FILLS, p=(0.4, 0.2, 0.2, 0.2))), layout=str(rng.choice(LAYOUTS, p=(0.5, 0.25, 0.25))),
        object_scale=float(math.exp(rng.uniform(*np.log(OBJECT_SCALE)))),
        max_rotation=float(rng.choice((0.0, 10.0, 25.0))),
        jpeg_quality=int(rng.integers(25, 91)) if rng.random() < 0.4 else None)


def generate_varied_scene(rng: np.random.Generator, style: VariedStyle | None = None, min_objects: int = 2,
                          max_objects: int = 6) -> Scene:
    style = style or sample_varied_style(rng)
    palette = [c for c in COLOR_RANGES if c != ("black" if style.dark else "white")]
    attrs = _plan_attributes(rng, int(rng.integers(min_objects, max_objects + 1)), palette)
    image, boxes = render(rng, style, attrs)
    objects = [SceneObject(shape, color, size, box) for (shape, color, size), box in zip(attrs, boxes)]
    return Scene(image, objects, _caption(rng, objects), _object_phrases(rng, objects), _regions(rng, objects),
                 _refexps(rng, objects, image.size))


# --- colours -----------------------------------------------------------------------------------------------------
def sample_color(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    """A colour inside the name's range (resampled when rounding to 8 bits leaves it: near a hue edge)."""
    (h0, h1), (s0, s1), (v0, v1) = COLOR_RANGES[name]
    while True:
        hue = rng.uniform(h0, h1 + 360 if h1 < h0 else h1) % 360
        r, g, b = colorsys.hsv_to_rgb(hue / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))
        rgb = tuple(int(round(c * 255)) for c in (r, g, b))
        if color_name(rgb) == name:
            return rgb


def color_name(rgb) -> str | None:
    """The colour name whose range holds `rgb` (None: none does); ranges are disjoint, so at most one."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    hue = h * 360
    for name, ((h0, h1), (s0, s1), (v0, v1)) in COLOR_RANGES.items():
        in_hue = (h0 <= hue <= h1) if h0 <= h1 else (hue >= h0 or hue <= h1)
        if in_hue and s0 - 1e-3 <= s <= s1 + 1e-3 and v0 - 2e-3 <= v <= v1 + 2e-3:
            return name
    return None


# --- backgrounds -------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, style: VariedStyle) -> np.ndarray:
    w, h = style.width, style.height

    def tone() -> np.ndarray:
        return rng.uniform(12, 70, 3) if style.dark else 255 - rng.uniform(0, 55, 3)

    a, b = tone().astype(np.float32), tone().astype(np.float32)
    ys, xs = np.ogrid[0:h, 0:w]                        # broadcast, never a full coordinate grid
    ys, xs = ys.astype(np.float32), xs.astype(np.float32)
    kind = style.background
    if kind == "flat":
        return np.broadcast_to(a, (h, w, 3)).copy()
    if kind in ("linear", "radial"):
        if kind == "linear":
            angle = rng.uniform(0, 2 * math.pi)
            t = xs * math.cos(angle) + ys * math.sin(angle)
        else:
            t = np.hypot(xs - rng.uniform(0, w), ys - rng.uniform(0, h))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a + t[..., None] * (b - a)
    elif kind == "noise":
        img = a + rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(3, 15))
    elif kind == "blotches":           # smooth noise at a few scales
        field = np.zeros((h, w), np.float32)
        for cell in (rng.uniform(20, 60), rng.uniform(5, 15)):
            gw, gh = max(2, int(w / cell)), max(2, int(h / cell))
            coarse = Image.fromarray(rng.uniform(0, 255, (gh, gw)).astype(np.uint8)).resize((w, h), Image.BICUBIC)
            field += (np.asarray(coarse, np.float32) / 255 - 0.5) * np.float32(rng.uniform(10, 30))
        img = a + field[..., None]
    else:                              # textures: two tones in a pattern
        period = np.float32(rng.uniform(6, 40))
        if kind == "stripes":
            angle = rng.uniform(0, math.pi)
            pattern = np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)) > 0
        elif kind == "checks":
            pattern = ((xs // period).astype(int) + (ys // period).astype(int)) % 2 == 0
        elif kind == "grid":
            pattern = ((xs % period) < 1.5) | ((ys % period) < 1.5)
        else:                          # dots
            radius = period * rng.uniform(0.1, 0.3)
            pattern = np.hypot(xs % period - period / 2, ys % period - period / 2) < radius
        img = np.where(pattern[..., None], b, a)
    return np.clip(img, 0, 255, dtype=np.float32)


# --- shapes ------------------------------------------------------------------------------------------------------
def _geometry(rng: np.random.Generator, style: VariedStyle, shape: str, scale: float):
    """Vertices around (0, 0), or ('circle', r), of a shape whose area is scale**2."""
    if shape == "circle":
        return scale / math.sqrt(math.pi)
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * scale / 2
    elif shape == "rectangle":
        ratio = rng.uniform(1.6, 2.6)
        half = np.array([math.sqrt(ratio), 1 / math.sqrt(ratio)]) * scale / 2
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * (half if rng.random() < 0.6 else half[::-1])
    else:
        q = rng.uniform(0.7, 1.15)                       # height / base
        base = scale * math.sqrt(2 / q)
        pts = np.array([[-base / 2, q * base / 3], [base / 2, q * base / 3], [0, -2 * q * base / 3]])
    angle = math.radians(rng.uniform(-style.max_rotation, style.max_rotation))
    if shape == "triangle" and rng.random() < 0.25:
        angle = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _half_extent(geo) -> tuple[float, float]:
    return (geo, geo) if isinstance(geo, float) else tuple(np.abs(geo).max(axis=0))


def _iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _placements(rng, style: VariedStyle, geos: list, w: int, h: int) -> list | None:
    """Centres for every shape under the layout's rule (None: no room)."""
    halves = [_half_extent(g) for g in geos]
    gap = {"apart": max(3.0, 0.02 * min(w, h)), "touching": 0.0, "overlapping": 0.0}[style.layout]
    taken, centres = [], [None] * len(geos)
    for i in sorted(range(len(geos)), key=lambda i: -halves[i][0] * halves[i][1]):
        hx, hy = halves[i]
        if 2 * hx + 4 > w or 2 * hy + 4 > h:
            return None
        attach = style.layout != "apart" and bool(taken) and rng.random() < 0.6   # else anywhere, so not one clump
        for attempt in range(80):
            if attach and attempt < 40:                              # next to (or onto) a placed object
                t = taken[int(rng.integers(len(taken)))]
                side = int(rng.integers(4))
                push = 0.0 if style.layout == "touching" else -rng.uniform(0.1, 0.45)
                tx, ty = (t[0] + t[2]) / 2, (t[1] + t[3]) / 2
                if side == 0:
                    cx, cy = t[2] + hx + push * 2 * hx, ty + rng.uniform(-1, 1) * (t[3] - t[1]) / 2
                elif side == 1:
                    cx, cy = t[0] - hx - push * 2 * hx, ty + rng.uniform(-1, 1) * (t[3] - t[1]) / 2
                elif side == 2:
                    cx, cy = tx + rng.uniform(-1, 1) * (t[2] - t[0]) / 2, t[3] + hy + push * 2 * hy
                else:
                    cx, cy = tx + rng.uniform(-1, 1) * (t[2] - t[0]) / 2, t[1] - hy - push * 2 * hy
            else:
                cx, cy = rng.uniform(hx + 2, w - hx - 2), rng.uniform(hy + 2, h - hy - 2)
            if not (hx + 2 <= cx <= w - hx - 2 and hy + 2 <= cy <= h - hy - 2):
                continue
            box = (cx - hx, cy - hy, cx + hx, cy + hy)
            grown = (box[0] - gap, box[1] - gap, box[2] + gap, box[3] + gap)
            if style.layout == "overlapping":
                ok = all(_iou(box, t) <= MAX_BOX_IOU for t in taken)
            else:   # disjoint interiors: touching boxes may share an edge
                eps = 1e-6
                ok = all(grown[2] <= t[0] + eps or t[2] <= grown[0] + eps or grown[3] <= t[1] + eps
                         or t[3] <= grown[1] + eps for t in taken)
            if ok:
                taken.append(box)
                centres[i] = (cx, cy)
                break
        else:
            return None
    return centres


def _mask(style: VariedStyle, geo, centre, ring: float | None, w: int, h: int):
    """Coverage (float32 in [0, 1]) of the filled shape, or of its inner ring of width `ring`, on a local patch;
    returns (patch, x offset, y offset)."""
    hx, hy = _half_extent(geo)
    cx, cy = centre
    ox, oy = max(0, int(math.floor(cx - hx)) - 3), max(0, int(math.floor(cy - hy)) - 3)
    pw, ph = min(w, int(math.ceil(cx + hx)) + 3) - ox, min(h, int(math.ceil(cy + hy)) + 3) - oy
    k = style.supersample if style.antialias in ("lanczos", "box") else 1
    im = Image.new("L", (pw * k, ph * k), 0)
    draw = ImageDraw.Draw(im)
    paint = {"outline": 255, "width": max(1, round(ring * k))} if ring is not None else {"fill": 255}
    if isinstance(geo, float):
        x, y = (cx - ox) * k, (cy - oy) * k
        draw.ellipse([x - geo * k, y - geo * k, x + geo * k, y + geo * k], **paint)
    else:
        draw.polygon([((px + cx - ox) * k, (py + cy - oy) * k) for px, py in geo], **paint)
    if style.antialias == "lanczos":
        im = im.resize((pw, ph), Image.Resampling.LANCZOS)
    elif style.antialias == "box":
        im = im.reduce(k)
    elif style.antialias == "blur":
        im = im.filter(ImageFilter.GaussianBlur(0.7))
    return np.asarray(im, np.float32) / 255, ox, oy


def render(rng: np.random.Generator, style: VariedStyle, attrs) -> tuple[Image.Image, list]:
    """The image and each object's box (tight around its visible pixels)."""
    w, h = style.width, style.height
    canvas = _background(rng, style)
    layout, unit = style, max(style.object_scale * min(w, h), MIN_UNIT_PX)
    hidden = 0
    while True:
        geos = [_geometry(rng, style, shape, unit * rng.uniform(*(LARGE_SCALE if size == "large" else SMALL_SCALE)))
                for shape, _, size in attrs]
        centres = _placements(rng, layout, geos, w, h)
        if centres is None:         # no room: everything smaller (the corpus' rule), until it fits
            unit *= 0.9
            continue
        layers = _layers(rng, style, attrs, geos, centres, w, h)
        visible = _visible(layers, w, h)
        if visible is not None:
            break
        hidden += 1
        if hidden >= 6:             # contacts that keep hiding an object's extent: keep the objects apart
            layout = dataclasses.replace(style, layout="apart")
    for layer in layers:
        for alpha, rgb in layer["paint"]:
            x, y = layer["x"], layer["y"]
            region = canvas[y:y + alpha.shape[0], x:x + alpha.shape[1]]
            region[:] = region * (1 - alpha[..., None]) + np.asarray(rgb, np.float32) * alpha[..., None]
    image = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    if style.jpeg_quality is not None:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=style.jpeg_quality)
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image, visible


def _layers(rng, style: VariedStyle, attrs, geos, centres, w: int, h: int) -> list[dict]:
    """Per object: its ink coverage (what its box is about) and the (coverage, colour) pairs painted in order."""
    layers = []
    for (shape, color, _), geo, centre in zip(attrs, geos, centres):
        hx, hy = _half_extent(geo)
        extent = 2 * min(hx, hy)
        mode = str(rng.choice(("filled", "bordered", "outline"))) if style.fill == "mixed" else style.fill
        rgb = sample_color(rng, color)
        if mode == "outline":
            ink, x, y = _mask(style, geo, centre, max(1.5, extent * rng.uniform(0.05, 0.25)), w, h)
            paint = [(ink, rgb)]
        else:
            ink, x, y = _mask(style, geo, centre, None, w, h)
            paint = [(ink, rgb)]
            if mode == "bordered":
                border = (tuple(int(c * rng.uniform(0.25, 0.55)) for c in rgb)
                          if rng.random() < 0.5 or style.dark else (15, 15, 15))
                ring, _, _ = _mask(style, geo, centre, max(1.0, extent * rng.uniform(0.02, 0.12)), w, h)
                paint.append((np.minimum(ring, ink), border))
        layers.append({"ink": ink, "x": x, "y": y, "paint": paint})
    return layers


def _visible(layers: list[dict], w: int, h: int) -> list | None:
    """Each object's box from its ink not hidden by later objects; None if an object lost more than 1 - MIN_VISIBLE
    of its ink or more than a pixel of its extent on any side (its box would no longer be the shape's; a pixel can go
    to a touching neighbour's anti-aliased edge)."""
    boxes = []
    for i, layer in enumerate(layers):
        ink, x, y = layer["ink"], layer["x"], layer["y"]
        vis = ink.copy()
        for later in layers[i + 1:]:
            lx, ly, lm = later["x"], later["y"], later["ink"]
            x0, y0 = max(x, lx), max(y, ly)
            x1, y1 = min(x + ink.shape[1], lx + lm.shape[1]), min(y + ink.shape[0], ly + lm.shape[0])
            if x0 < x1 and y0 < y1:
                vis[y0 - y:y1 - y, x0 - x:x1 - x] *= 1 - lm[y0 - ly:y1 - ly, x0 - lx:x1 - lx]
        full, seen = ink >= 0.5, vis >= 0.5
        if not full.any() or seen.sum() < MIN_VISIBLE * full.sum():
            return None
        if max(abs(a - b) for a, b in zip(_tight(seen), _tight(full))) > 1:
            return None
        bx0, by0, bx1, by1 = _tight(seen)
        boxes.append((float(x + bx0), float(y + by0), float(x + bx1), float(y + by1)))
    return boxes


def _tight(covered: np.ndarray) -> tuple[int, int, int, int] | None:
    cols, rows = np.flatnonzero(covered.any(axis=0)), np.flatnonzero(covered.any(axis=1))
    if len(cols) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
