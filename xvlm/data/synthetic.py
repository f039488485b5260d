"""Seeded procedural scenes of simple shapes with multi-grained texts, to pre-train / fine-tune X-VLM without data.

Each scene is one X-VLM multi-grained record (I, T, {(V^j, T^j)}): the image I, a whole-scene caption T and
visual concepts V^j (objects and groups of objects, as pixel boxes) paired with their texts T^j.  Everything is a
pure function of the seed (`numpy.random.default_rng`), drawn with numpy + PIL, a few milliseconds per scene.

Referring expressions (`Scene.refexps`) pick out exactly one object; `resolve` implements their meaning and the
generator only keeps expressions that `resolve` maps to one object.  With X = the expression's description
(colour and/or shape, or the generic noun 'shape'/'object' = any shape), the candidates are the objects matching X:

* attribute  "the red circle", "the yellow shape": the candidates themselves; emitted when there is exactly one.
* size       "the large circle", "the small blue square": the candidates whose size class is the one named.  Sizes are
  bimodal per scene (every large object has >= 2.5x the drawn area of every small one) and size words are only
  used in scenes that have both classes; emitted when X alone matches 2+ objects and the size makes it one.
* position   "the leftmost square", "the bottom rectangle": the candidate with the smallest (largest) box-centre x
  (y) plus every candidate within 10% of the image width (height) of it, so it is unique only with a clear margin.
  "the circle on the left" / "on the right" / "at the top" / "at the bottom" need exactly two candidates (all
  candidates are returned otherwise) separated by >= 10% of the image side along that axis.  Emitted for 2+
  candidates only, so the position is needed.
* relation   "the triangle left of the red circle": for each anchor B matching the anchor description, the
  candidates other than B are *clearly* left of B when their centre-x < B's x0, *possibly* when their centre-x
  < B's centre-x.  No clear one: nothing; otherwise every possible one.  Right of / above / below mirror this with
  x1, y0, y1.  Emitted with a unique anchor, 2+ candidates and exactly one (clear) referent.

Scenes are built with distractors on purpose (same colour other shape, same shape other colour, twins of one
colour and shape in other sizes and places) so attributes alone rarely suffice.  Boxes are xyxy in pixels of
`Scene.image`, pixel i covering [i, i + 1), tight around the pixels where the drawn shape covers >= 50%.
`style='train'` randomises size, aspect, background, anti-aliasing, fill, rotation and low-resolution rendering;
`style='eval'` draws from other distributions and code paths (box-filter or blur anti-aliasing, radial and speckle
backgrounds, bicubic upscaling, other jitter and outline widths) for held-out evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Box = tuple[float, float, float, float]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 50, 170),
    "gray": (128, 128, 128),
    "white": (248, 248, 248),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "rectangle")
SIZES = ("small", "large")
POSITIONS = ("leftmost", "rightmost", "topmost", "bottommost", "left", "right", "top", "bottom")
RELATIONS = ("left", "right", "above", "below")
REFEXP_KINDS = ("attribute", "size", "position", "relation")
STYLES = ("train", "eval")

MAX_OBJECTS = 10
POSITION_MARGIN = 0.10  # fraction of the image side that separates a position referent from the runner-up
LARGE_SCALE = (1.8, 2.1)  # linear scale of large objects relative to small ones (area ratio >= (1.8/1.1)^2 > 2.5)
SMALL_SCALE = (1.0, 1.1)

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_GENERIC = ("shape", "object")
_ACHROMATIC = ("gray", "white", "black")
_SUPERLATIVE_WORDS = {"leftmost": ("leftmost",), "rightmost": ("rightmost",),
                      "topmost": ("topmost", "top"), "bottommost": ("bottommost", "bottom")}
_SIDE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_RELATION_WORDS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
                   "above": ("above",), "below": ("below",)}
_CAPTION_PREFIXES = ("", "", "an image of ", "a picture of ", "a picture with ")
_REGION_ALL = ("all the shapes", "all the objects", "all shapes", "all objects")

VOCAB_WORDS: list[str] = sorted(
    set(COLORS) | {"grey"} | set(SHAPES) | {s + "s" for s in SHAPES + _GENERIC} | set(_GENERIC)
    | {"small", "large", "big"} | set(_NUMBERS[2:])
    | {w for words in _SUPERLATIVE_WORDS.values() for w in words}
    | {w for phrase in _SIDE_WORDS.values() for w in phrase.split()}
    | {w for phrases in _RELATION_WORDS.values() for p in phrases for w in p.split()}
    | {w for p in _CAPTION_PREFIXES + _REGION_ALL for w in p.split()}
    | {"a", "an", "the", "and"}
)


# --- public records ------------------------------------------------------------------------------------------------
@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    box: Box


@dataclass(frozen=True)
class Desc:
    """What a noun phrase says about an object; None = not said (shape None is the generic 'shape'/'object')."""
    color: str | None = None
    shape: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return ((self.color is None or self.color == obj.color) and (self.shape is None or self.shape == obj.shape)
                and (self.size is None or self.size == obj.size))


@dataclass(frozen=True)
class RefSpec:
    """The meaning of a referring expression, independent of its wording (see the module docstring)."""
    kind: str                      # attribute | size | position | relation
    target: Desc
    position: str | None = None    # one of POSITIONS (kind 'position')
    relation: str | None = None    # one of RELATIONS (kind 'relation')
    anchor: Desc | None = None     # the landmark's description (kind 'relation')


@dataclass
class Phrase:
    text: str
    box: Box
    kind: str                      # object | region | attribute | size | position | relation (| refexp, official data)
    target: tuple[int, ...]        # indices into the scene's objects; () where unknown (official data)
    spec: RefSpec | None = None    # the meaning of a synthetic referring expression


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    caption: str
    objects_text: list[Phrase]
    regions: list[Phrase]
    refexps: list[Phrase]


@dataclass(frozen=True)
class RenderStyle:
    """How one scene is drawn.  Sampled per scene from 'train' or 'eval'; may also be passed to generate_scene."""
    width: int                     # final image size; a multiple of `upscale`
    height: int
    family: str = "train"          # 'train' | 'eval': picks the anti-aliasing, upscaling and jitter code paths
    background: str = "plain"      # plain | tinted | noisy | gradient (train); plain | radial | speckle (eval)
    dark: bool = False             # dark background: no black objects (else no white objects)
    supersample: int = 1           # 1 = hard edges; k = draw at k x and downsample
    upscale: int = 1               # draw at width/upscale then upscale (NEAREST for train, BICUBIC for eval)
    fill: str = "filled"           # filled | outline | bordered | mixed (per object)
    max_rotation: float = 0.0      # degrees, squares / rectangles / triangles
    object_scale: float = 0.08     # side of a small object's equal-area square, as a fraction of the short side


# --- semantics ----------------------------------------------------------------------------------------------------
def resolve(spec: RefSpec, objects: Sequence[SceneObject], image_size: tuple[int, int]) -> list[int]:
    """Indices of the objects the expression can refer to (sorted); unique referent <=> a list of one."""
    cands = [i for i, o in enumerate(objects) if spec.target.matches(o)]
    if spec.kind in ("attribute", "size"):
        return cands
    if spec.kind == "position":
        return _by_position(cands, spec.position, objects, image_size)
    if spec.kind == "relation":
        hits: set[int] = set()
        for b, anchor in enumerate(objects):
            if spec.anchor.matches(anchor):
                hits.update(_by_relation([c for c in cands if c != b], spec.relation, anchor, objects))
        return sorted(hits)
    raise ValueError(f"unknown referring-expression kind {spec.kind!r}")


def _center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _by_position(cands: list[int], position: str, objects: Sequence[SceneObject],
                 image_size: tuple[int, int]) -> list[int]:
    axis = 0 if position in ("leftmost", "rightmost", "left", "right") else 1
    if position in _SIDE_WORDS and len(cands) != 2:
        return cands
    sign = 1.0 if position in ("leftmost", "topmost", "left", "top") else -1.0
    keys = {i: sign * _center(objects[i].box)[axis] for i in cands}
    best = min(keys.values(), default=0.0)
    margin = POSITION_MARGIN * image_size[axis]
    return [i for i in cands if keys[i] - best < margin]


def _by_relation(cands: list[int], relation: str, anchor: SceneObject, objects: Sequence[SceneObject]) -> list[int]:
    axis = 0 if relation in ("left", "right") else 1
    sign = 1.0 if relation in ("left", "above") else -1.0      # compare sign * coordinate: smaller = satisfied
    a_center = _center(anchor.box)[axis]
    a_edge = anchor.box[axis] if sign > 0 else anchor.box[axis + 2]
    pos = {i: _center(objects[i].box)[axis] for i in cands}
    if not any(sign * pos[i] < sign * a_edge for i in cands):
        return []
    return [i for i in cands if sign * pos[i] < sign * a_center]


# --- generation ---------------------------------------------------------------------------------------------------
def generate_scene(seed_or_rng: int | np.random.Generator, *, style: str | RenderStyle = "train",
                   min_objects: int = 2, max_objects: int = 6) -> Scene:
    """One random scene; identical for an identical seed (or generator state) and arguments. `style`: 'train',
    'eval', a `RenderStyle`, or 'varied' / a `VariedStyle` (the renderer of `xvlm.data.varied`)."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    if not isinstance(style, RenderStyle) and style not in STYLES:    # 'varied' has a renderer of its own
        from .varied import VariedStyle, generate_varied_scene
        if style == "varied" or isinstance(style, VariedStyle):
            return generate_varied_scene(rng, None if style == "varied" else style, min_objects, max_objects)
    render = style if isinstance(style, RenderStyle) else sample_render_style(rng, style)
    palette = [c for c in COLORS if c != ("black" if render.dark else "white")]
    attrs = _plan_attributes(rng, int(rng.integers(min_objects, max_objects + 1)), palette)
    image, boxes = _render(rng, render, attrs)
    objects = [SceneObject(shape, color, size, box) for (shape, color, size), box in zip(attrs, boxes)]
    return Scene(image, objects, _caption(rng, objects), _object_phrases(rng, objects), _regions(rng, objects),
                 _refexps(rng, objects, image.size))


def iter_scenes(seed: int, n: int | None = None, **kw) -> Iterator[Scene]:
    """Scenes seeded by (seed, index): scene i is the same however many scenes are drawn.  Infinite if n is None."""
    i = 0
    while n is None or i < n:
        yield generate_scene(np.random.default_rng((seed, i)), **kw)
        i += 1


def sample_render_style(rng: np.random.Generator, style: str = "train") -> RenderStyle:
    """Draw the rendering parameters of one scene from the 'train' or the held-out 'eval' distribution."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES} or a RenderStyle, got {style!r}")
    train = style == "train"
    aspect = math.exp(rng.uniform(0.0, math.log(2.0)))
    long_side = math.exp(rng.uniform(math.log(96 * aspect), math.log(512))) if train else rng.uniform(96 * aspect, 512)
    w, h = int(long_side), max(96, int(long_side / aspect))
    if rng.random() < 0.5:
        w, h = h, w
    factors = [f for f in (2, 3, 4) if min(w, h) // f >= 48]
    upscale = int(rng.choice(factors)) if factors and rng.random() < (0.15 if train else 0.1) else 1
    backgrounds = ("plain", "tinted", "noisy", "gradient") if train else ("plain", "radial", "speckle")
    return RenderStyle(
        width=w // upscale * upscale, height=h // upscale * upscale, family=style,
        background=str(rng.choice(backgrounds)), dark=bool(rng.random() < 0.2),
        supersample=int(rng.choice((1, 2, 3, 4) if train else (1, 2, 3))), upscale=upscale,
        fill=str(rng.choice(("filled", "filled", "filled", "outline", "bordered", "mixed"))),
        max_rotation=float(rng.choice((0.0, 10.0, 20.0)) if train else rng.choice((0.0, 15.0))),
        object_scale=float(rng.uniform(0.06, 0.12) if train else rng.uniform(0.065, 0.11)),
    )


def _plan_attributes(rng: np.random.Generator, n: int, palette: list[str]) -> list[tuple[str, str, str]]:
    """(shape, colour, size) per object, mostly as distractors of an earlier object so one attribute rarely suffices."""
    attrs: list[tuple[str, str, str]] = []
    for _ in range(n):
        size = "large" if rng.random() < 0.35 else "small"
        if attrs and rng.random() < 0.65:
            shape, color, base_size = attrs[int(rng.integers(len(attrs)))]
            mode = int(rng.integers(3))
            if mode == 0:  # same colour, other shape
                shape = _other(rng, SHAPES, shape)
            elif mode == 1:  # same shape, other colour
                color = _other(rng, palette, color)
            elif rng.random() < 0.6:  # twin: same colour and shape, told apart by size (or else by position)
                size = "small" if base_size == "large" else "large"
        else:
            shape, color = str(rng.choice(SHAPES)), str(rng.choice(palette))
        attrs.append((shape, color, size))
    return attrs


def _other(rng: np.random.Generator, options: Sequence[str], current: str) -> str:
    return str(rng.choice([o for o in options if o != current]))


# --- rendering ----------------------------------------------------------------------------------------------------
def _render(rng: np.random.Generator, style: RenderStyle,
            attrs: list[tuple[str, str, str]]) -> tuple[Image.Image, list[Box]]:
    """Background, placed shapes and their tight boxes (in final-image pixels)."""
    cw, ch = style.width // style.upscale, style.height // style.upscale
    canvas = _background(rng, style, cw, ch)
    shapes = _layout(rng, style, attrs, cw, ch)
    boxes = []
    for (shape, color, _), points in zip(attrs, shapes):
        x0, y0, x1, y1 = _draw_object(rng, canvas, style, shape, color, points)
        boxes.append(tuple(float(v * style.upscale) for v in (x0, y0, x1, y1)))
    if style.upscale > 1:
        resample = Image.Resampling.NEAREST if style.family == "train" else Image.Resampling.BICUBIC
        canvas = canvas.resize((cw * style.upscale, ch * style.upscale), resample)
    return canvas, boxes


def _background(rng: np.random.Generator, style: RenderStyle, w: int, h: int) -> Image.Image:
    def tone() -> np.ndarray:
        return rng.uniform(15, 60, 3) if style.dark else 255 - rng.uniform(0, 45, 3)

    kind = style.background
    if kind == "plain":
        if style.dark:
            return Image.new("RGB", (w, h), (int(rng.uniform(20, 50)),) * 3)
        return Image.new("RGB", (w, h), (255 if style.family == "train" else int(rng.uniform(225, 250)),) * 3)
    if kind == "tinted":
        return Image.new("RGB", (w, h), tuple(int(v) for v in tone()))
    if kind in ("gradient", "radial"):
        a, b = tone(), tone()
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        if kind == "gradient":
            angle = rng.uniform(0, 2 * math.pi)
            t = xs * math.cos(angle) + ys * math.sin(angle)
        else:
            t = np.hypot(xs - rng.uniform(0, w), ys - rng.uniform(0, h))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return Image.fromarray((a + t[..., None] * (b - a)).astype(np.uint8))
    if kind == "noisy":
        noise = rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(3, 12)
        return Image.fromarray(np.clip(tone() + noise, 0, 255).astype(np.uint8))
    if kind == "speckle":  # uniform noise at half resolution, bilinearly upscaled
        small = tone() + rng.uniform(-12, 12, ((h + 1) // 2, (w + 1) // 2, 3))
        return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    raise ValueError(f"unknown background {kind!r}")


def _layout(rng: np.random.Generator, style: RenderStyle, attrs: list[tuple[str, str, str]],
            w: int, h: int) -> list[np.ndarray | tuple[float, float, float]]:
    """Shape geometry placed by rejection sampling with a gap between boxes; shrinks everything if it cannot fit."""
    unit = max(style.object_scale * min(w, h), 6.0)
    gap = max(3.0, 0.02 * min(w, h))
    while True:
        outlines = [_outline(rng, style, shape, unit * rng.uniform(*(LARGE_SCALE if size == "large" else SMALL_SCALE)))
                    for shape, _, size in attrs]
        placed = _place(rng, outlines, w, h, gap)
        if placed is not None:
            return placed
        unit *= 0.85


def _outline(rng: np.random.Generator, style: RenderStyle, shape: str, scale: float) -> np.ndarray | float:
    """Vertices around (0, 0) (or a circle's radius) of a shape whose drawn area is scale**2."""
    if shape == "circle":
        return scale / math.sqrt(math.pi)
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * scale / 2
    elif shape == "rectangle":
        ratio = rng.uniform(1.6, 2.4)
        half = np.array([math.sqrt(ratio), 1 / math.sqrt(ratio)]) * scale / 2
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * (half if rng.random() < 0.65 else half[::-1])
    else:  # isosceles triangle (equilateral in eval) pointing up, base * height / 2 = scale**2
        q = rng.uniform(0.75, 1.1) if style.family == "train" else math.sqrt(3) / 2
        base = scale * math.sqrt(2 / q)
        pts = np.array([[-base / 2, q * base / 2], [base / 2, q * base / 2], [0, -q * base / 2]])
    angle = math.radians(rng.uniform(-style.max_rotation, style.max_rotation))
    if shape == "triangle" and style.family == "train" and rng.random() < 0.2:
        angle = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _place(rng: np.random.Generator, outlines: list, w: int, h: int, gap: float) -> list | None:
    halves = [(o, o) if isinstance(o, float) else tuple(np.abs(o).max(axis=0)) for o in outlines]
    order = sorted(range(len(outlines)), key=lambda i: -halves[i][0] * halves[i][1])  # big ones first
    taken: list[tuple[float, float, float, float]] = []
    placed: list = [None] * len(outlines)
    for i in order:
        hx, hy = halves[i]
        lo_x, hi_x, lo_y, hi_y = hx + 3, w - hx - 3, hy + 3, h - hy - 3
        if lo_x > hi_x or lo_y > hi_y:
            return None
        for _ in range(60):
            cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            box = (cx - hx - gap, cy - hy - gap, cx + hx + gap, cy + hy + gap)
            if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
                taken.append((cx - hx, cy - hy, cx + hx, cy + hy))
                o = outlines[i]
                placed[i] = (cx, cy, o) if isinstance(o, float) else o + (cx, cy)
                break
        else:
            return None
    return placed


def _draw_object(rng: np.random.Generator, canvas: Image.Image, style: RenderStyle, shape: str, color: str,
                 geometry) -> tuple[int, int, int, int]:
    """Composite one shape onto the canvas through its coverage masks; returns its tight pixel box on the canvas."""
    if isinstance(geometry, tuple):
        cx, cy, r = geometry
        lo, hi = np.array([cx - r, cy - r]), np.array([cx + r, cy + r])
    else:
        lo, hi = geometry.min(axis=0), geometry.max(axis=0)
    ox, oy = int(math.floor(lo[0])) - 2, int(math.floor(lo[1])) - 2
    size = (int(math.ceil(hi[0])) + 2 - ox, int(math.ceil(hi[1])) + 2 - oy)
    extent = float(min(hi - lo))
    mode = str(rng.choice(("filled", "outline", "bordered"))) if style.fill == "mixed" else style.fill
    if mode == "bordered" and style.dark:
        mode = "filled"
    train = style.family == "train"
    rgb = _jitter(rng, color, train)
    if mode == "outline":
        width = max(2.0, extent * (rng.uniform(0.08, 0.18) if train else rng.uniform(0.12, 0.25)))
        mask = _mask(style, shape, geometry, (ox, oy), size, width)
        canvas.paste(rgb, (ox, oy), mask)
        return _mask_bounds(mask, (ox, oy))
    mask = _mask(style, shape, geometry, (ox, oy), size, None)
    canvas.paste(rgb, (ox, oy), mask)
    if mode == "bordered":
        width = max(1.0, extent * (rng.uniform(0.04, 0.08) if train else rng.uniform(0.06, 0.1)))
        canvas.paste(COLORS["black"], (ox, oy), _mask(style, shape, geometry, (ox, oy), size, width))
    return _mask_bounds(mask, (ox, oy))


def _jitter(rng: np.random.Generator, color: str, train: bool) -> tuple[int, int, int]:
    """A nearby, still nameable colour: +-20 per channel (train) or brightness x jitter (eval); greys stay grey."""
    base = np.array(COLORS[color], np.float64)
    if color in _ACHROMATIC:  # shift all channels together so a grey never turns greenish or pinkish
        out = base + rng.integers(-20, 21) + rng.integers(-5, 6, 3)
    elif train:
        out = base + rng.integers(-20, 21, 3)
    else:
        out = base * rng.uniform(0.9, 1.05) + rng.integers(-10, 11, 3)
    return tuple(int(v) for v in np.clip(out, 0, 255))


def _mask(style: RenderStyle, shape: str, geometry, offset: tuple[int, int], size: tuple[int, int],
          outline: float | None) -> Image.Image:
    """Coverage mask (L) of the filled shape, or of its inner ring of the given width, anti-aliased per style."""
    k = style.supersample
    mask = Image.new("L", (size[0] * k, size[1] * k), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, round(outline * k)) if outline is not None else 0
    paint = {"outline": 255, "width": width} if outline is not None else {"fill": 255}
    if isinstance(geometry, tuple):
        cx, cy, r = geometry
        x, y = (cx - offset[0]) * k, (cy - offset[1]) * k
        draw.ellipse([x - r * k, y - r * k, x + r * k, y + r * k], **paint)
    else:
        draw.polygon([((px - offset[0]) * k, (py - offset[1]) * k) for px, py in geometry], **paint)
    if k == 1:
        return mask.filter(ImageFilter.GaussianBlur(0.6)) if style.family == "eval" else mask
    if style.family == "train":
        return mask.resize(size, Image.Resampling.LANCZOS)
    return mask.reduce(k)  # box filter


def _mask_bounds(mask: Image.Image, offset: tuple[int, int]) -> tuple[int, int, int, int]:
    """Tight box (pixel edges) of the pixels at least half covered."""
    covered = np.asarray(mask) >= 128
    cols, rows = np.flatnonzero(covered.any(axis=0)), np.flatnonzero(covered.any(axis=1))
    x, y = offset
    return x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1


# --- texts --------------------------------------------------------------------------------------------------------
def _mixed_sizes(objects: Sequence[SceneObject]) -> bool:
    return len({o.size for o in objects}) == 2


def _color_word(rng: np.random.Generator, color: str) -> str:
    return "grey" if color == "gray" and rng.random() < 0.3 else color


def _size_word(rng: np.random.Generator, size: str) -> str:
    return "big" if size == "large" and rng.random() < 0.4 else size


def _noun(rng: np.random.Generator, shape: str | None, plural: bool = False) -> str:
    word = shape if shape is not None else _GENERIC[int(rng.integers(2))]
    return word + "s" if plural else word


def _describe(rng: np.random.Generator, desc: Desc, plural: bool = False) -> str:
    words = ([_size_word(rng, desc.size)] if desc.size else []) + ([_color_word(rng, desc.color)] if desc.color else [])
    return " ".join(words + [_noun(rng, desc.shape, plural)])


def _indefinite(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _union(objects: Sequence[SceneObject], idx: Sequence[int]) -> Box:
    boxes = np.array([objects[i].box for i in idx])
    return (float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max()))


def _groups(objects: Sequence[SceneObject], key) -> dict:
    out: dict = {}
    for i, o in enumerate(objects):
        out.setdefault(key(o), []).append(i)
    return out


def _caption(rng: np.random.Generator, objects: list[SceneObject]) -> str:
    """'a red circle, a small blue square and two green triangles': one item per (colour, shape) group."""
    mixed = _mixed_sizes(objects)
    items = []
    for (color, shape), idx in _groups(objects, lambda o: (o.color, o.shape)).items():
        sizes = {objects[i].size for i in idx}
        size = sizes.pop() if mixed and len(sizes) == 1 and rng.random() < 0.5 else None
        words = _describe(rng, Desc(color, shape, size), plural=len(idx) > 1)
        items.append(_indefinite(words) if len(idx) == 1 else f"{_NUMBERS[len(idx)]} {words}")
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return str(rng.choice(_CAPTION_PREFIXES)) + body


def _object_phrases(rng: np.random.Generator, objects: list[SceneObject]) -> list[Phrase]:
    mixed = _mixed_sizes(objects)
    return [Phrase(_describe(rng, Desc(o.color, o.shape, o.size if mixed else None)), o.box, "object", (i,))
            for i, o in enumerate(objects)]


def _regions(rng: np.random.Generator, objects: list[SceneObject], limit: int = 3) -> list[Phrase]:
    """Phrases about 2+ objects (groups by colour and/or shape, pairs, everything) with their union box."""
    cands: dict[tuple[int, ...], str] = {}

    def group_text(desc: Desc, idx: list[int]) -> str:
        words = _describe(rng, desc, plural=True)
        return str(rng.choice([f"{_NUMBERS[len(idx)]} {words}", f"the {_NUMBERS[len(idx)]} {words}", f"the {words}"]))

    for key, desc_of in ((lambda o: (o.color, o.shape), lambda k: Desc(*k)),
                         (lambda o: o.shape, lambda k: Desc(shape=k)),
                         (lambda o: o.color, lambda k: Desc(color=k))):
        for k, idx in _groups(objects, key).items():
            if len(idx) > 1:
                cands.setdefault(tuple(idx), group_text(desc_of(k), idx))
    unique = _unique_descs(objects, with_size=_mixed_sizes(objects))
    named = [i for i in range(len(objects)) if unique[i]]
    for _ in range(2):
        if len(named) < 2:
            break
        a, b = sorted(int(i) for i in rng.choice(named, 2, replace=False))
        da, db = (_describe(rng, unique[i][int(rng.integers(len(unique[i])))]) for i in (a, b))
        text = f"{_indefinite(da)} and {_indefinite(db)}" if rng.random() < 0.5 else f"the {da} and the {db}"
        cands.setdefault((a, b), text)
    if len(objects) > 1:
        cands.setdefault(tuple(range(len(objects))), str(rng.choice(_REGION_ALL)))
    keys = list(cands)
    chosen = [keys[i] for i in rng.permutation(len(keys))[:limit]]
    return [Phrase(cands[t], _union(objects, t), "region", t) for t in chosen]


def _all_descs(objects: Sequence[SceneObject], with_size: bool) -> list[Desc]:
    colors = sorted({o.color for o in objects})
    shapes = sorted({o.shape for o in objects})
    sizes = list(SIZES) if with_size else []
    return [Desc(c, s, z) for c in colors + [None] for s in shapes + [None] for z in sizes + [None]]


def absent_descs(objects: Sequence[SceneObject]) -> dict[str, list[Desc]]:
    """What a scene does not hold, by kind: the colour + shape pairs none of its objects has, and the shapes none has
    (in COLORS x SHAPES order). The not-found verdict's absent phrases and the training's same-image ITM negatives."""
    held = {(o.color, o.shape) for o in objects}
    shapes = {o.shape for o in objects}
    return {"colour + shape": [Desc(c, s) for c in COLORS for s in SHAPES if (c, s) not in held],
            "shape": [Desc(shape=s) for s in SHAPES if s not in shapes]}


def plain_names(desc: Desc) -> list[str]:
    """The plain ways to name a colour + shape or shape description: 'the red circle', 'a red circle', 'red circle';
    'the circle', 'a circle'."""
    words = " ".join(w for w in (desc.color, desc.shape) if w)
    return [f"the {words}", f"a {words}"] + ([words] if desc.color else [])


def _match_mask(desc: Desc, objects: Sequence[SceneObject]) -> int:
    return sum(1 << i for i, o in enumerate(objects) if desc.matches(o))


def _unique_descs(objects: Sequence[SceneObject], with_size: bool) -> list[list[Desc]]:
    """Per object, the colour/shape(/size) descriptions that match it alone (no generic-only description)."""
    out: list[list[Desc]] = [[] for _ in objects]
    for d in _all_descs(objects, with_size):
        mask = _match_mask(d, objects)
        if (d.color or d.shape) and mask.bit_count() == 1:
            out[mask.bit_length() - 1].append(d)
    return out


def _refexps(rng: np.random.Generator, objects: list[SceneObject], image_size: tuple[int, int],
             per_kind: int = 2) -> list[Phrase]:
    """Up to `per_kind` expressions of each kind the scene allows, each checked to resolve to exactly one object."""
    out = []
    for kind, specs in _refexp_specs(objects, image_size).items():
        for j in rng.permutation(len(specs))[:per_kind]:
            spec = specs[j]
            hit = resolve(spec, objects, image_size)
            assert len(hit) == 1, (spec, hit)
            out.append(Phrase(_refexp_text(rng, spec), objects[hit[0]].box, kind, (hit[0],), spec))
    return out


def _refexp_specs(objects: list[SceneObject], image_size: tuple[int, int]) -> dict[str, list[RefSpec]]:
    """Every expression meaning of each kind that picks out one object and needs its kind's information."""
    mixed = _mixed_sizes(objects)
    descs = _all_descs(objects, mixed)
    masks = {d: _match_mask(d, objects) for d in descs}
    plain = [d for d in descs if d.size is None]
    specs: dict[str, list[RefSpec]] = {k: [] for k in REFEXP_KINDS}
    for d in plain:
        if (d.color or d.shape) and masks[d].bit_count() == 1:
            specs["attribute"].append(RefSpec("attribute", d))
    for d in descs:
        if d.size and masks[d].bit_count() == 1 and masks[Desc(d.color, d.shape)].bit_count() > 1:
            specs["size"].append(RefSpec("size", d))
    for d in plain:
        cands = [i for i in range(len(objects)) if masks[d] >> i & 1]
        if len(cands) > 1:
            for p in POSITIONS:
                if len(_by_position(cands, p, objects, image_size)) == 1:
                    specs["position"].append(RefSpec("position", d, position=p))
    for b, anchor_descs in enumerate(_unique_descs(objects, with_size=False)):
        for d in plain if anchor_descs else []:
            cands = [i for i in range(len(objects)) if masks[d] >> i & 1 and i != b]
            if len(cands) > 1:
                for rel in RELATIONS:
                    if len(_by_relation(cands, rel, objects[b], objects)) == 1:
                        specs["relation"] += [RefSpec("relation", d, relation=rel, anchor=a) for a in anchor_descs]
    return specs


def _refexp_text(rng: np.random.Generator, spec: RefSpec) -> str:
    target = _describe(rng, spec.target)
    if spec.kind == "position":
        if spec.position in _SIDE_WORDS:
            return f"the {target} {_SIDE_WORDS[spec.position]}"
        return f"the {rng.choice(_SUPERLATIVE_WORDS[spec.position])} {target}"
    if spec.kind == "relation":
        return f"the {target} {rng.choice(_RELATION_WORDS[spec.relation])} the {_describe(rng, spec.anchor)}"
    return target if rng.random() < 0.2 else f"the {target}"
